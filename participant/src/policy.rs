//! The hospital's review of a job before any of its data is touched: within
//! policy, a job is accepted automatically; outside it, the job waits for
//! the data team (`tessera-participant inspect`, then `approve` or
//! `reject`); a job asking for what the policy never allows (plaintext
//! updates, unless enabled) is refused outright.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tessera_protocol::job::{Aggregation, JobSpec, LocalWork};
use tessera_protocol::model::ModelSpec;

use crate::config::Policy;

/// What the policy says about a job.
#[derive(Debug, Default, PartialEq)]
pub struct Review {
    /// Reasons the site refuses the job whatever the data team says.
    pub refusals: Vec<String>,
    /// Limits the job exceeds: it needs the data team's approval.
    pub exceeded: Vec<String>,
}

/// Reviews `spec` (whose model has `n_params` parameters on this site's data).
pub fn review(policy: &Policy, spec: &JobSpec, n_params: usize) -> Review {
    let mut r = Review::default();
    if spec.aggregation == Aggregation::InsecurePlaintext && !policy.allow_insecure_plaintext {
        r.refusals.push(
            "asks for insecure_plaintext aggregation and this site's policy does not allow it \
             (policy.allow_insecure_plaintext)"
                .into(),
        );
    }
    let kind = match spec.model {
        ModelSpec::LogisticRegression => "logistic_regression",
        ModelSpec::Mlp { .. } => "mlp",
    };
    if let Some(models) = &policy.accepted_models
        && !models.iter().any(|m| m == kind)
    {
        r.exceeded.push(format!(
            "model kind `{kind}` is not in policy.accepted_models {models:?}"
        ));
    }
    if n_params as u64 > policy.max_params {
        r.exceeded.push(format!(
            "the model has {n_params} parameters > policy.max_params {}",
            policy.max_params
        ));
    }
    if spec.rounds > policy.max_rounds {
        r.exceeded.push(format!(
            "{} rounds > policy.max_rounds {}",
            spec.rounds, policy.max_rounds
        ));
    }
    if spec.min_sites < policy.min_sites {
        r.exceeded.push(format!(
            "min_sites {} < policy.min_sites {} (aggregates over too few sites)",
            spec.min_sites, policy.min_sites
        ));
    }
    if let Some([lo, hi]) = policy.learning_rate {
        let lr = spec.training.learning_rate;
        if !(lo..=hi).contains(&lr) {
            r.exceeded.push(format!(
                "learning_rate {lr} is outside policy.learning_rate [{lo}, {hi}]"
            ));
        }
    }
    if let Some(max) = policy.max_local_epochs
        && let LocalWork::Epochs(epochs) = spec.training.local_work
        && epochs > max
    {
        r.exceeded
            .push(format!("{epochs} local epochs > policy.max_local_epochs {max}"));
    }
    r
}

/// The data team's decision on a job, by job hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approved,
    Rejected,
}

/// Jobs waiting for the data team, and its decisions, in the state dir:
/// `pending/<hash>.toml` (the job file) and `pending/<hash>.txt` (why) while
/// the job waits; moved to `approved/` or `rejected/` once it is decided;
/// `decisions/<hash>` (`approved` or `rejected`) is what the daemon reads.
pub struct Approvals {
    dir: PathBuf,
}

/// Where a job's files are, by its state.
const FOLDERS: [&str; 3] = ["pending", "approved", "rejected"];

impl Decision {
    /// As the decision file and the CLI say it.
    pub fn word(self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::Rejected => "rejected",
        }
    }
}

impl Approvals {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_owned(),
        }
    }

    pub fn decision(&self, job_hash: &str) -> Option<Decision> {
        match std::fs::read_to_string(self.dir.join("decisions").join(job_hash))
            .ok()?
            .trim()
        {
            "approved" => Some(Decision::Approved),
            "rejected" => Some(Decision::Rejected),
            _ => None,
        }
    }

    /// Keeps a job for the data team to inspect (unless it is decided:
    /// its files were moved out of `pending/` then).
    pub fn hold(&self, job_hash: &str, job_toml: &str, review: &Review) -> anyhow::Result<()> {
        if self.decision(job_hash).is_some() {
            return Ok(());
        }
        let dir = self.dir.join("pending");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join(format!("{job_hash}.toml")), job_toml)?;
        std::fs::write(dir.join(format!("{job_hash}.txt")), review.exceeded.join("\n"))?;
        Ok(())
    }

    /// The full hash of the job held here (waiting or decided) whose hash
    /// starts with `prefix`.
    pub fn find(&self, prefix: &str) -> anyhow::Result<String> {
        let mut found: Vec<String> = FOLDERS
            .iter()
            .filter_map(|folder| std::fs::read_dir(self.dir.join(folder)).ok())
            .flat_map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".toml").map(str::to_owned))
                    .filter(|h| h.starts_with(prefix))
            })
            .collect();
        found.sort();
        found.dedup();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => bail!(
                "no job held for approval has a hash starting with `{prefix}` (in {})",
                self.dir.join("pending").display()
            ),
            n => bail!("`{prefix}` matches {n} jobs; give more of the hash"),
        }
    }

    /// The job file and what it exceeds, wherever the job is.
    pub fn pending_job(&self, job_hash: &str) -> anyhow::Result<(String, String)> {
        let dir = FOLDERS
            .iter()
            .map(|folder| self.dir.join(folder))
            .find(|dir| dir.join(format!("{job_hash}.toml")).exists())
            .with_context(|| format!("job {job_hash} is not held here"))?;
        let toml = std::fs::read_to_string(dir.join(format!("{job_hash}.toml")))?;
        let why = std::fs::read_to_string(dir.join(format!("{job_hash}.txt"))).unwrap_or_default();
        Ok((toml, why))
    }

    /// Records the data team's decision and moves the job's files out of
    /// `pending/`. A decision is final: the daemon signs it into the
    /// ledger at its next poll (this command cannot tell whether it has),
    /// where every member and auditor reads it, so a different second
    /// decision is refused rather than silently replacing the first. The
    /// same decision again changes nothing.
    pub fn decide(&self, job_hash: &str, decision: Decision) -> anyhow::Result<()> {
        match self.decision(job_hash) {
            Some(earlier) if earlier == decision => return Ok(()),
            Some(earlier) => bail!(
                "job {job_hash} was already {}: a decision is final (the daemon signs it into the ledger, where \
                 every site and auditor reads it); to take part after all, the ML lead submits the job again \
                 and this site decides on that one",
                earlier.word()
            ),
            None => {}
        }
        self.record(job_hash, decision)
    }

    /// Writes the decision file and files the job under its decision.
    fn record(&self, job_hash: &str, decision: Decision) -> anyhow::Result<()> {
        // Written whole or not at all, and only if no decision is there:
        // a crash leaves no empty file (read as undecided), and of two
        // commands racing, the second finds the first's file and fails.
        let dir = self.dir.join("decisions");
        std::fs::create_dir_all(&dir)?;
        let draft = dir.join(format!(".{job_hash}.{}", std::process::id()));
        std::fs::write(&draft, decision.word()).with_context(|| format!("cannot write to {}", dir.display()))?;
        let placed = std::fs::hard_link(&draft, dir.join(job_hash));
        let _ = std::fs::remove_file(&draft);
        if let Err(e) = placed {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                bail!("job {job_hash} was decided meanwhile: run the command again to see how");
            }
            return Err(e).with_context(|| format!("cannot write to {}", dir.display()));
        }
        let to = self.dir.join(decision.word());
        std::fs::create_dir_all(&to)?;
        for ext in ["toml", "txt"] {
            let from = self.dir.join("pending").join(format!("{job_hash}.{ext}"));
            if from.exists() {
                std::fs::rename(&from, to.join(format!("{job_hash}.{ext}")))
                    .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> JobSpec {
        let text = format!(
            "name = \"j\"\nrounds = 30\n{extra}\n[model]\nkind = \"logistic_regression\"\n\
             [training]\nlearning_rate = 0.05\nbatch_size = 16\nlocal_epochs = 1\n"
        );
        JobSpec::from_toml(&text).unwrap()
    }

    #[test]
    fn jobs_within_policy_pass_and_each_exceeded_limit_is_named() {
        let policy = Policy::default();
        assert_eq!(review(&policy, &job(""), 16), Review::default());

        let strict = Policy {
            accepted_models: Some(vec!["mlp".into()]),
            max_params: 10,
            max_rounds: 20,
            min_sites: 4,
            learning_rate: Some([0.001, 0.01]),
            ..Policy::default()
        };
        let r = review(&strict, &job(""), 16);
        assert!(r.refusals.is_empty());
        let text = r.exceeded.join("\n");
        for part in [
            "`logistic_regression` is not in policy.accepted_models",
            "16 parameters > policy.max_params 10",
            "30 rounds > policy.max_rounds 20",
            "min_sites 3 < policy.min_sites 4",
            "learning_rate 0.05 is outside",
        ] {
            assert!(text.contains(part), "missing `{part}` in {text}");
        }
    }

    #[test]
    fn plaintext_is_refused_outright_unless_allowed() {
        let plain = job("insecure_plaintext = true");
        let r = review(&Policy::default(), &plain, 16);
        assert_eq!(r.refusals.len(), 1);
        let allowed = Policy {
            allow_insecure_plaintext: true,
            ..Policy::default()
        };
        assert_eq!(review(&allowed, &plain, 16), Review::default());
    }

    #[test]
    fn decisions_are_found_by_hash_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let a = Approvals::new(dir.path());
        let review = Review {
            refusals: vec![],
            exceeded: vec!["30 rounds > policy.max_rounds 20".into()],
        };
        a.hold("abcdef0123", "name = \"j\"", &review).unwrap();
        a.hold("abcd990000", "name = \"k\"", &review).unwrap();
        assert!(a.find("abcd").is_err(), "ambiguous prefix");
        assert!(a.find("ffff").is_err());
        let hash = a.find("abcdef").unwrap();
        assert_eq!(a.decision(&hash), None);
        a.decide(&hash, Decision::Rejected).unwrap();
        assert_eq!(a.decision(&hash), Some(Decision::Rejected));
        // Moved out of pending/, still found and shown.
        assert!(!dir.path().join("pending/abcdef0123.toml").exists());
        assert!(dir.path().join("rejected/abcdef0123.toml").exists());
        assert!(dir.path().join("rejected/abcdef0123.txt").exists());
        assert_eq!(a.find("abcdef").unwrap(), hash);
        assert_eq!(a.pending_job(&hash).unwrap().1, "30 rounds > policy.max_rounds 20");
        // Final: the same decision again is a no-op, another is refused.
        a.decide(&hash, Decision::Rejected).unwrap();
        let e = a.decide(&hash, Decision::Approved).unwrap_err().to_string();
        assert!(e.contains("was already rejected: a decision is final"), "{e}");
        assert_eq!(a.decision(&hash), Some(Decision::Rejected));
        a.decide("abcd990000", Decision::Approved).unwrap();
        assert!(dir.path().join("approved/abcd990000.toml").exists());
        assert_eq!(a.decision("abcd990000"), Some(Decision::Approved));
        // A decided job is not held again, and no draft is left behind.
        a.hold("abcd990000", "name = \"k\"", &review).unwrap();
        assert!(!dir.path().join("pending/abcd990000.toml").exists());
        let drafts = std::fs::read_dir(dir.path().join("decisions")).unwrap().count();
        assert_eq!(drafts, 2, "only the two decisions");
        // A decision file that appears between the check and the write (a
        // second command racing this one) is not replaced.
        a.hold("abcd770000", "name = \"l\"", &review).unwrap();
        std::fs::write(dir.path().join("decisions/abcd770000"), "rejected").unwrap();
        let e = Approvals::new(dir.path())
            .record("abcd770000", Decision::Approved)
            .unwrap_err()
            .to_string();
        assert!(e.contains("was decided meanwhile"), "{e}");
        assert_eq!(a.decision("abcd770000"), Some(Decision::Rejected));
    }
}
