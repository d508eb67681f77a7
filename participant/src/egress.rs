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
            "time_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "kind": kind,
            "bytes": bytes.len(),
            "sha256": sha256_hex(&bytes),
        });
        let mut file = self.file.lock().expect("egress log lock poisoned");
        writeln!(file, "{line}").with_context(|| format!("cannot write egress log {}", self.path.display()))?;
        Ok(())
    }
}
