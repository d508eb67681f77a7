//! The site's durable record of the secure summations it has sent a masked
//! input to, one per (job, round), surviving restarts.
//!
//! Two summations of the same input over survivor sets that differ by one
//! site reveal that site's input (their difference). Within one process the
//! input is consumed by its first summation; after a restart the site would
//! train the round again and a coordinator could run the round a second
//! time over another set. So a masked input is sent only after this record
//! was durably created, and never a second time for the same round.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// `<state_dir>/contributions/`: one empty file per (job, round).
pub struct Contributions {
    dir: PathBuf,
}

impl Contributions {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("contributions");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Records that this site is about to send its masked input for `round`
    /// of `job_id` (round 0: the preprocessing statistics). Returns false,
    /// recording nothing, if it already did, in this process or an earlier
    /// one. The record is on disk before this returns.
    pub fn claim(&self, job_id: u64, round: u32) -> anyhow::Result<bool> {
        let path = self.dir.join(format!("job-{job_id}-round-{round}"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                file.sync_all()
                    .with_context(|| format!("cannot sync {}", path.display()))?;
                // The new name must be durable too.
                std::fs::File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("cannot sync {}", self.dir.display()))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_claimed_once_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = Contributions::open(dir.path()).unwrap();
        assert!(first.claim(7, 3).unwrap());
        assert!(!first.claim(7, 3).unwrap(), "claimed twice in one process");
        // Other rounds and jobs are independent.
        assert!(first.claim(7, 4).unwrap());
        assert!(first.claim(8, 3).unwrap());
        assert!(first.claim(7, 0).unwrap());
        drop(first);
        // A restarted daemon opens the same state directory.
        let again = Contributions::open(dir.path()).unwrap();
        for (job, round) in [(7, 3), (7, 4), (8, 3), (7, 0)] {
            assert!(
                !again.claim(job, round).unwrap(),
                "({job}, {round}) claimed again after a restart"
            );
        }
        assert!(again.claim(9, 1).unwrap());
    }
}
