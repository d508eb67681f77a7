//! The shared verifier corpus (`tessera_protocol::ledger::corpus`): every
//! case is written to a real SQLite ledger file, and both verifiers, the
//! regulator's `tessera ledger verify` and the independent
//! `scripts/verify_ledger.py` (written from docs/ledger-format.md), must give
//! it the verdict the specification gives it. A rule the two read
//! differently shows up here as a named case.

use std::path::Path;
use std::process::{Command, Output};

use tessera_protocol::ledger::corpus::{Case, Expect, cases};
use tessera_protocol::ledger::store::LedgerStore;
use tessera_tests::{bin, repo};

async fn write(case: &Case, path: &Path) {
    let store = LedgerStore::open(path).await.expect("create the ledger file");
    for (height, block) in case.blocks.iter().enumerate() {
        store.append(height as u64, block).await.expect("append a block");
    }
    for conflict in &case.conflicts {
        store.add_conflict(conflict).await.expect("store a conflict");
    }
    store.pool().close().await;
}

fn rust(path: &Path, allow_pending: bool) -> Output {
    let mut cmd = Command::new(bin("tessera"));
    cmd.args(["ledger", "verify"]).arg(path);
    if allow_pending {
        cmd.arg("--allow-pending");
    }
    cmd.output().expect("run tessera ledger verify")
}

fn python(path: &Path, allow_pending: bool) -> Output {
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("scripts/verify_ledger.py")).arg(path);
    if allow_pending {
        cmd.arg("--allow-pending");
    }
    cmd.output().expect("run python3 scripts/verify_ledger.py")
}

/// Checks one verifier's run against the verdict; returns what was wrong.
fn judge(who: &str, case: &Case, allow_pending: bool, out: &Output) -> Option<String> {
    let code = out.status.code();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (want_code, named) = match case.expect {
        Expect::Final => (0, None),
        Expect::Pending { .. } if allow_pending => (0, None),
        Expect::Pending { first } => (1, Some(first)),
        Expect::Invalid { height } => (1, Some(height)),
    };
    if code != Some(want_code) {
        return Some(format!(
            "{}: {who} (allow_pending={allow_pending}) exited {code:?}, expected {want_code} for {:?}; stderr: {stderr}",
            case.name, case.expect
        ));
    }
    if let Some(height) = named {
        let needle = format!("block {height}");
        // "block 1" must not be satisfied by "block 12".
        let names_it = stderr
            .match_indices(&needle)
            .any(|(at, _)| !stderr[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()));
        if !names_it {
            return Some(format!(
                "{}: {who} did not name block {height} ({:?}); stderr: {stderr}",
                case.name, case.expect
            ));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_verifiers_give_every_corpus_case_the_specified_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    let mut wrong = Vec::new();
    for case in &cases {
        let path = dir.path().join(format!("{}.db", case.name));
        write(case, &path).await;
        for allow_pending in [false, true] {
            wrong.extend(judge("tessera", case, allow_pending, &rust(&path, allow_pending)));
            wrong.extend(judge(
                "verify_ledger.py",
                case,
                allow_pending,
                &python(&path, allow_pending),
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} disagreement(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The corpus covers all three verdicts.
    for expected in ["Final", "Pending", "Invalid"] {
        assert!(
            cases.iter().any(|c| format!("{:?}", c.expect).starts_with(expected)),
            "no {expected} case"
        );
    }
}
