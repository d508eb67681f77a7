//! What the daemon is doing, for `tessera-participant status`: connected
//! or not (to which coordinator, since when), the last task it worked on,
//! the last error. Kept in memory, written to `<state_dir>/daemon-status.json`
//! as it changes, at most once a second (atomically: a reader never sees
//! half a file). Whether the daemon runs at all is its state-directory
//! lock's to say, not this file's: a killed daemon leaves the file behind.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "daemon-status.json";

/// The daemon's state as the file holds it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveStatus {
    pub pid: u32,
    pub coordinator: String,
    pub connected: bool,
    /// When the connection was made or lost.
    pub since_ms: u64,
    pub last_task: Option<Task>,
    pub last_error: Option<Failure>,
}

/// The last task the site worked on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub job_id: u64,
    /// "statistics", "round N" or "final evaluation (round N)".
    pub step: String,
    pub at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub message: String,
    pub at_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The daemon's handle: cheap to update from the task loop.
#[derive(Clone)]
pub struct Live {
    /// The status, and whether it changed since it was last written.
    state: Arc<Mutex<(LiveStatus, bool)>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Live {
    /// Starts the writer of `state_dir`'s status file.
    pub fn start(state_dir: &Path, coordinator: &str) -> Self {
        let status = LiveStatus {
            pid: std::process::id(),
            coordinator: coordinator.to_owned(),
            since_ms: now_ms(),
            ..Default::default()
        };
        let live = Self {
            state: Arc::new(Mutex::new((status, true))),
            changed: Arc::default(),
        };
        let writer = live.clone();
        let path = state_dir.join(FILE);
        tokio::spawn(async move {
            loop {
                writer.write_if_changed(&path);
                // Changes within the second after a write go in the next.
                tokio::time::sleep(Duration::from_secs(1)).await;
                writer.changed.notified().await;
            }
        });
        live
    }

    fn update(&self, change: impl FnOnce(&mut LiveStatus)) {
        let mut state = self.state.lock().expect("live status lock");
        let before = state.0.clone();
        change(&mut state.0);
        if state.0 != before {
            state.1 = true;
            self.changed.notify_one();
        }
    }

    pub fn connected(&self, connected: bool) {
        self.update(|s| {
            if s.connected != connected {
                s.connected = connected;
                s.since_ms = now_ms();
            }
        });
    }

    pub fn working_on(&self, job_id: u64, step: String) {
        self.update(|s| {
            if s.last_task
                .as_ref()
                .is_none_or(|t| t.job_id != job_id || t.step != step)
            {
                s.last_task = Some(Task {
                    job_id,
                    step,
                    at_ms: now_ms(),
                });
            }
        });
    }

    pub fn failed(&self, message: String) {
        self.update(|s| {
            s.last_error = Some(Failure {
                message,
                at_ms: now_ms(),
            })
        });
    }

    /// Writes the file when the state changed since the last write. A file
    /// that cannot be written (a full disk) is tried again next time.
    fn write_if_changed(&self, path: &PathBuf) {
        let status = {
            let mut state = self.state.lock().expect("live status lock");
            if !state.1 {
                return;
            }
            state.1 = false;
            state.0.clone()
        };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&status)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::debug!("cannot write {}: {e}", path.display());
            self.state.lock().expect("live status lock").1 = true;
            self.changed.notify_one();
        }
    }
}

/// The status file of `state_dir`, if the daemon ever wrote one.
pub fn read(state_dir: &Path) -> anyhow::Result<Option<LiveStatus>> {
    let path = state_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("{} is not a daemon status file: {e}", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}
