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
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open egress log {}", path.display()))?;
        let torn = repair(&mut file).with_context(|| format!("cannot repair egress log {}", path.display()))?;
        if torn > 0 {
            tracing::warn!(
                bytes = torn,
                "removed an incomplete last record from {} (left by a crash or a full disk; \
                 its message was never sent, for a record is written before its message)",
                path.display()
            );
        }
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
        append_record(&mut *file, line).with_context(|| {
            format!(
                "cannot write egress log {} (nothing is sent unless it is logged)",
                self.path.display()
            )
        })
    }
}

/// What the egress log is written to: a file, or in tests one that fails
/// where a full disk would.
trait RecordFile: Write {
    fn end(&mut self) -> std::io::Result<u64>;
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl RecordFile for std::fs::File {
    fn end(&mut self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
}

/// Appends one record as one line, all or nothing: the line is written
/// whole in one call, and a write that fails part-way (a full disk) is
/// cut off again, so the log never holds a torn record that a reader of
/// JSON lines would choke on or that a later record would be glued to.
fn append_record(file: &mut impl RecordFile, line: &serde_json::Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let before = file.end()?;
    if let Err(e) = file.write_all(&bytes).and_then(|()| file.flush()) {
        // Best effort: if even this fails, `repair` removes the torn end
        // when the log is next opened.
        let _ = file.truncate(before);
        return Err(e);
    }
    Ok(())
}

/// Cuts an incomplete last line (one a crash or a full disk left) off the
/// log; returns how many bytes it removed.
fn repair(file: &mut std::fs::File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    // Back from the end, a block at a time, to the last newline.
    let mut end = len;
    let mut block = vec![0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
            }
            return Ok(len - keep);
        }
        end = start;
    }
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(len)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file on a disk that fills after `room` more bytes: a write past
    /// it lands in part, then fails, as `write(2)` does on a full disk.
    struct FillingFile {
        bytes: Vec<u8>,
        room: usize,
    }

    impl Write for FillingFile {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.bytes.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl RecordFile for FillingFile {
        fn end(&mut self) -> std::io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }

        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.room += self.bytes.len() - len as usize;
            self.bytes.truncate(len as usize);
            Ok(())
        }
    }

    fn lines_are_records(bytes: &[u8]) {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
    }

    #[test]
    fn a_write_that_fills_the_disk_leaves_no_torn_record() {
        let record = serde_json::json!({"time_ms": 1, "kind": "PollTask", "bytes": 8, "sha256": "ab"});
        let size = serde_json::to_vec(&record).unwrap().len() + 1;
        for room in 0..3 * size {
            let mut file = FillingFile {
                bytes: Vec::new(),
                room,
            };
            let mut written = 0;
            while append_record(&mut file, &record).is_ok() {
                written += 1;
            }
            assert_eq!(written, room / size, "room {room}");
            assert_eq!(file.bytes.len(), written * size, "room {room}");
            lines_are_records(&file.bytes);
        }
    }

    #[test]
    fn a_torn_last_record_is_cut_off_when_the_log_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.jsonl");
        let good = "{\"kind\":\"Heartbeat\"}\n".repeat(300);
        for (torn, expected) in [
            ("", good.as_str()),
            ("{\"time_ms\":12,\"ki", good.as_str()),
            // A torn record longer than one block read back from the end.
            (&*"x".repeat(9000), good.as_str()),
            ("no newline at all", ""),
        ] {
            let before = if expected.is_empty() { "" } else { good.as_str() };
            std::fs::write(&path, format!("{before}{torn}")).unwrap();
            let log = EgressLog::open(dir.path()).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
            log.record("PollTask", &tessera_protocol::pb::PollTaskRequest::default())
                .unwrap();
            let after = std::fs::read(&path).unwrap();
            assert!(after.starts_with(expected.as_bytes()));
            lines_are_records(&after);
        }
    }
}
