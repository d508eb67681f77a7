//! A job's discovered categories at this site (`discover = true` columns):
//! the proposal the site signs with its acceptance, and the categories it
//! forms itself from the cohort's signed proposals
//! (`tessera_protocol::discovery`), kept in its state directory so that a
//! restarted daemon encodes the job's rows exactly as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tessera_protocol::discovery::{self, JobRef, SignedProposal};
use tessera_protocol::ids::SiteId;
use tessera_protocol::secagg::crypto::SigningKey;

use crate::local::LocalData;

/// This site's signed proposal for a job, or `None` when its schema
/// discovers nothing. The same data gives the same proposal (and, Ed25519
/// being deterministic, the same signature) every time.
pub fn proposal(
    data: &LocalData,
    min_rows: u64,
    key: &SigningKey,
    job: JobRef<'_>,
    site: &SiteId,
) -> Option<SignedProposal> {
    let discovered = data.schema.discovered();
    if discovered.is_empty() {
        return None;
    }
    let proposal = discovery::propose(&discovered, &data.report.discovered, min_rows);
    Some(discovery::sign(key, job, site, proposal))
}

/// What the site stores of a job's categories.
#[derive(Serialize, Deserialize)]
struct Stored {
    job_hash: String,
    categories: BTreeMap<String, Vec<String>>,
}

fn path(state_dir: &Path, job_id: u64) -> PathBuf {
    state_dir.join("categories").join(format!("job-{job_id}.json"))
}

/// Keeps the categories this site formed for a job (written whole, then
/// renamed: a crash leaves the old file or the new one).
pub fn save(
    state_dir: &Path,
    job_id: u64,
    job_hash: &str,
    categories: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<()> {
    let file = path(state_dir, job_id);
    let dir = file.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_vec_pretty(&Stored {
        job_hash: job_hash.to_owned(),
        categories: categories.clone(),
    })?;
    let tmp = file.with_extension("json.part");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &file))
        .with_context(|| format!("cannot write {}", file.display()))
}

/// The categories this site formed for a job, if it did (for this job
/// file: a job id reused by another coordinator database is another job).
pub fn load(state_dir: &Path, job_id: u64, job_hash: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<String>>>> {
    let file = path(state_dir, job_id);
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let stored: Stored = serde_json::from_slice(&text).with_context(|| format!("{} is damaged", file.display()))?;
    Ok((stored.job_hash == job_hash).then_some(stored.categories))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_kept_per_job_file() {
        let dir = tempfile::tempdir().unwrap();
        let categories: BTreeMap<String, Vec<String>> =
            [("diag".to_owned(), vec!["250".to_owned(), "428".to_owned()])].into();
        assert_eq!(load(dir.path(), 3, "aa").unwrap(), None);
        save(dir.path(), 3, "aa", &categories).unwrap();
        assert_eq!(load(dir.path(), 3, "aa").unwrap(), Some(categories.clone()));
        // Another job file under the same id is another job.
        assert_eq!(load(dir.path(), 3, "bb").unwrap(), None);
        assert_eq!(load(dir.path(), 4, "aa").unwrap(), None);
        std::fs::write(path(dir.path(), 3), "{").unwrap();
        assert!(load(dir.path(), 3, "aa").unwrap_err().to_string().contains("damaged"));
    }
}
