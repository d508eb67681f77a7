//! The site's long-term Ed25519 key (signs its secure-aggregation keys), kept
//! in the state directory with 0600 permissions and never logged.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tessera_protocol::secagg::crypto::SigningKey;

/// Loads `<state_dir>/site.key`, creating it on first use.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = state_dir.join("site.key");
    if !path.exists() {
        std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
        let pkcs8 = SigningKey::generate_pkcs8();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&pkcs8)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let pkcs8 = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    SigningKey::from_pkcs8(&pkcs8).map_err(|e| anyhow::anyhow!("{} is not an Ed25519 key: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("site.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
