//! The site's long-term Ed25519 key (signs its secure-aggregation keys), kept
//! in the state directory with 0600 permissions and never logged.

use std::path::Path;

use anyhow::Context;
use tessera_protocol::secagg::crypto::SigningKey;

/// Loads `<state_dir>/site.key`, creating it on first use.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = state_dir.join("site.key");
    tessera_protocol::keyfile::load_or_create(&path).with_context(|| format!("site key {}", path.display()))
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
