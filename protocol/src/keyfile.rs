//! Long-term Ed25519 key files (a site's identity key, the coordinator's
//! ledger key): PKCS#8, created with 0600 permissions, never logged.

use std::io::{self, Write};
use std::path::Path;

use crate::secagg::crypto::SigningKey;

/// Loads the key at `path`, creating it (and its directory) on first use.
pub fn load_or_create(path: &Path) -> io::Result<SigningKey> {
    if !path.exists() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let pkcs8 = SigningKey::generate_pkcs8();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path)?;
        file.write_all(&pkcs8)?;
        file.sync_all()?;
    }
    let pkcs8 = std::fs::read(path)?;
    SigningKey::from_pkcs8(&pkcs8)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not an Ed25519 PKCS#8 key: {e}")))
}
