//! Key files: long-term Ed25519 keys (a site's identity key, the
//! coordinator's ledger key; PKCS#8, created with 0600 permissions, never
//! logged) and the TLS files of a kit.

use std::io::{self, Write};
use std::path::Path;

use crate::secagg::crypto::SigningKey;

/// Loads the key at `path`, creating it (and its directory) on first use.
pub fn load_or_create(path: &Path) -> io::Result<SigningKey> {
    if !path.exists() {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        write_private(path, &SigningKey::generate_pkcs8())?;
    }
    let pkcs8 = std::fs::read(path)?;
    SigningKey::from_pkcs8(&pkcs8)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not an Ed25519 PKCS#8 key: {e}")))
}

/// Writes a new private file (a key): created with 0600 permissions (never
/// readable by others, not even for an instant), refusing to overwrite.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The client side of a kit directory (`tls.pem`, `tls.key`, `ca.pem`):
/// mutual TLS to the coordinator, which must present a certificate from
/// the same consortium CA.
pub fn client_tls(dir: &Path) -> io::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("tls.pem")?, read("tls.key")?)))
}
