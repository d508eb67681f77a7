//! Mutual TLS and access control. Every connection presents a certificate
//! from the consortium CA; the identity in it (never a field of a message)
//! says who the caller is, and its role what it may call:
//!
//! | service      | site | operator | auditor |
//! |--------------|------|----------|---------|
//! | `Federation` | yes  |          |         |
//! | `Jobs`       |      | yes      |         |
//! | `Ledger`     | read, endorse as itself | read | read |

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use tessera_protocol::identity::{Identity, Role};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::warn;

use crate::ca::Revoked;

fn read(dir: &Path, file: &str) -> anyhow::Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// The server side of a kit directory (tls.pem, tls.key, ca.pem). Client
/// certificates are optional at the TLS layer so that a caller without one
/// gets a clear gRPC status (UNAUTHENTICATED) rather than a failed handshake;
/// a certificate that is presented must chain to the consortium CA.
pub fn server_config(dir: &Path) -> anyhow::Result<ServerTlsConfig> {
    Ok(ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(read(dir, "tls.pem")?, read(dir, "tls.key")?))
        .client_ca_root(Certificate::from_pem(read(dir, "ca.pem")?))
        .client_auth_optional(true)
        .timeout(std::time::Duration::from_secs(10)))
}

/// The client side of a kit directory.
pub fn client_config(dir: &Path) -> anyhow::Result<ClientTlsConfig> {
    Ok(tessera_protocol::keyfile::client_tls(dir)?)
}

/// The caller of a request, put in its extensions by the gate: `None` only
/// when the coordinator runs with `--insecure-dev`.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Identity>);

impl Caller {
    /// The caller of `request` (the gate always sets one).
    pub fn of<T>(request: &Request<T>) -> Option<&Identity> {
        request.extensions().get::<Caller>().and_then(|c| c.0.as_ref())
    }
}

/// Decides who may call a service.
#[derive(Clone)]
pub struct Gate {
    /// `None`: `--insecure-dev`, no certificates, everyone admitted.
    revoked: Option<Arc<RevocationList>>,
    limiter: Arc<RateLimiter>,
}

/// A token bucket per caller (its identity; its address under
/// `--insecure-dev`): a flooding client is refused with RESOURCE_EXHAUSTED
/// while everyone else's requests go on. Per caller rather than per
/// connection, so opening more connections does not help.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            buckets: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Takes one request's token for `caller`; false when it has none left.
    fn take(&self, caller: &str) -> bool {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let (tokens, last) = buckets.entry(caller.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct RevocationList {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, BTreeSet<String>)>,
}

impl RevocationList {
    /// The revoked identities, re-read whenever the file changes, so a
    /// revocation takes effect on the next request.
    fn contains(&self, uri: &str) -> bool {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().expect("revocation cache lock");
        if cache.0 != modified || modified.is_none() {
            match Revoked::load(&self.path) {
                Ok(list) => *cache = (modified, list.revoked),
                // A list that cannot be read keeps the last good one.
                Err(e) => warn!("{e:#}"),
            }
        }
        cache.1.contains(uri)
    }
}

impl Gate {
    /// Mutual TLS, with the revocation list at `revoked`.
    pub fn mutual_tls(revoked: PathBuf, limiter: RateLimiter) -> Self {
        Self {
            revoked: Some(Arc::new(RevocationList {
                path: revoked,
                cache: Mutex::new((None, BTreeSet::new())),
            })),
            limiter: Arc::new(limiter),
        }
    }

    /// No TLS: any caller is admitted and identified by its messages.
    pub fn insecure_dev(limiter: RateLimiter) -> Self {
        Self {
            revoked: None,
            limiter: Arc::new(limiter),
        }
    }

    pub fn is_insecure(&self) -> bool {
        self.revoked.is_none()
    }

    /// Admits a caller whose role is in `roles`, recording who it is.
    pub fn admit(&self, mut request: Request<()>, service: &str, roles: &[Role]) -> Result<Request<()>, Status> {
        let caller = match &self.revoked {
            None => None,
            Some(revoked) => {
                let identity = peer_identity(&request).inspect_err(|s| {
                    warn!(service, "connection refused: {}", s.message());
                })?;
                if revoked.contains(&identity.uri()) {
                    warn!(service, %identity, "revoked identity refused");
                    return Err(Status::permission_denied(format!(
                        "the certificate of {identity} has been revoked by the consortium CA"
                    )));
                }
                if !roles.contains(&identity.role) {
                    warn!(service, %identity, "call refused for this role");
                    return Err(Status::permission_denied(format!(
                        "{identity} may not call the {service} service (a {} certificate)",
                        identity.role.as_str()
                    )));
                }
                Some(identity)
            }
        };
        let key = match &caller {
            Some(identity) => identity.uri(),
            None => request.remote_addr().map_or_else(String::new, |a| a.ip().to_string()),
        };
        if !self.limiter.take(&key) {
            warn!(service, caller = %key, "request over the rate limit refused");
            return Err(Status::resource_exhausted(format!(
                "{key} is over its request rate limit ({} per second, bursts of {}); slow down",
                self.limiter.per_second, self.limiter.burst
            )));
        }
        request.extensions_mut().insert(Caller(caller));
        Ok(request)
    }
}

/// The identity bound into the client certificate of a request.
fn peer_identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    let certs = request.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
        Status::unauthenticated(
            "no client certificate: every connection needs a certificate issued by the consortium CA (tessera ca issue)",
        )
    })?;
    identity_of(certs[0].as_ref()).map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
}

/// The one `tessera://` SAN URI of a DER certificate.
pub fn identity_of(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?
        .ok_or("no subject alternative name")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("tessera://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse_uri(uri).map_err(|e| e.to_string()),
        [] => Err("no tessera:// identity in its subject alternative names".into()),
        _ => Err("more than one tessera:// identity".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kits_carry_exactly_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::init("test", dir.path(), &["localhost".into()]).unwrap();
        let site = Identity::new(Role::Site, "hungary").unwrap();
        let kit = crate::ca::issue(dir.path(), &site, crate::ca::Keys::Generate, None).unwrap();
        let pem = std::fs::read_to_string(kit.join("tls.pem")).unwrap();
        let der = pem_to_der(&pem);
        assert_eq!(identity_of(&der).unwrap(), site);
        let coordinator = std::fs::read_to_string(dir.path().join("coordinator/tls.pem")).unwrap();
        assert_eq!(identity_of(&pem_to_der(&coordinator)).unwrap().role, Role::Coordinator);
        // The CA certificate names no identity.
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        assert!(identity_of(&pem_to_der(&ca)).is_err());
        // Private keys are 0600; the site's key is in the roster.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [
                "ca.key",
                "coordinator/tls.key",
                "coordinator/ledger.key",
                "sites/hungary/tls.key",
                "sites/hungary/site.key",
            ] {
                let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }
        let roster =
            tessera_protocol::roster::parse(&std::fs::read_to_string(dir.path().join("roster.toml")).unwrap()).unwrap();
        let key = tessera_protocol::keyfile::load_or_create(&kit.join("site.key")).unwrap();
        assert_eq!(roster.get(&site.site().unwrap()), Some(&key.public_key()));
        // Revoking removes it from the roster and lists it.
        crate::ca::revoke(dir.path(), &site).unwrap();
        let revoked = Revoked::load(&dir.path().join("revoked.toml")).unwrap();
        assert!(revoked.revoked.contains("tessera://site/hungary"));
        assert!(
            crate::ca::issue(dir.path(), &site, crate::ca::Keys::Generate, None).is_err(),
            "a revoked name is not reissued"
        );
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }
}
