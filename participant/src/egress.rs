//! The site's egress log: one JSON line per message sent to the coordinator
//! (time, kind, size, SHA-256), so the data team can see exactly what left the
//! site (DESIGN.md invariant 1).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use prost::Message;
use tessera_protocol::ids::sha256_hex;

pub struct EgressLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl EgressLog {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
        let path = dir.join("egress.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open egress log {}", path.display()))?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one outbound protobuf message. Called before the message is sent;
    /// a site that cannot log does not send.
    pub fn record<M: Message>(&self, kind: &str, message: &M) -> anyhow::Result<()> {
        let bytes = message.encode_to_vec();
        let line = serde_json::json!({
            "time_ms": now_ms(),
            "kind": kind,
            "bytes": bytes.len(),
            "sha256": sha256_hex(&bytes),
        });
        self.write(&line)
    }

    /// Records the body of a chunked upload as one line: its total size,
    /// the number of chunks and the SHA-256 of the concatenated data. For
    /// an update or a masked input that hash is the commitment the round's
    /// ledger block records for this site, so an auditor can match the two;
    /// and the body is hashed once, not once for the log and again for the
    /// commitment.
    pub fn record_body(&self, kind: &str, bytes: usize, chunks: usize, sha256: &[u8; 32]) -> anyhow::Result<()> {
        let line = serde_json::json!({
            "time_ms": now_ms(),
            "kind": kind,
            "bytes": bytes,
            "chunks": chunks,
            "sha256": hex::encode(sha256),
        });
        self.write(&line)
    }

    fn write(&self, line: &serde_json::Value) -> anyhow::Result<()> {
        let mut file = self.file.lock().expect("egress log lock poisoned");
        writeln!(file, "{line}").with_context(|| format!("cannot write egress log {}", self.path.display()))?;
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
