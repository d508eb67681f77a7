//! Enrollment: an identity makes its own keys on its own host and sends the
//! consortium CA a request; the CA signs it and never holds a private key.
//!
//! A request (`NAME.enroll.toml`) carries a PKCS#10 certificate signing
//! request for the owner's TLS key (self-signed: proof that the requester
//! holds that key) and, for a site, the public half of its Ed25519 signing
//! key (the roster key that signs its secure-aggregation keys and ledger
//! endorsements) with an Ed25519 signature over
//! `"tessera/enroll/v1\0" ‖ identity URI ‖ "\0" ‖ CSR PEM`: proof that the
//! same requester holds that key too, bound to this identity and this TLS
//! key. The CA sets the certificate's identity, usages and validity itself;
//! nothing in the CSR but its public key is used.

use std::path::Path;

use rcgen::{CertificateParams, CertificateSigningRequestParams, DnType, KeyPair, SanType};
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Role};
use crate::secagg::crypto::{SigningKey, verify};

/// File name of an identity's request.
pub fn file_name(identity: &Identity) -> String {
    format!("{}-{}.enroll.toml", identity.role.as_str(), identity.name)
}

/// An enrollment request, as sent to the CA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `tessera://ROLE/NAME`.
    pub identity: String,
    /// PEM of the certificate signing request for the TLS key.
    pub csr: String,
    /// Sites: hex of the Ed25519 public key that goes into the roster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// Sites: hex of the Ed25519 proof of possession.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// A request the CA may sign: what it names and the public keys it binds.
pub struct Verified {
    pub identity: Identity,
    pub csr: CertificateSigningRequestParams,
    /// Sites: the roster key.
    pub signing_key: Option<[u8; 32]>,
}

/// Why a request is refused, or cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("not an enrollment request: {0}")]
    Syntax(String),
    #[error("identity `{0}` is not tessera://site|operator|auditor/NAME")]
    Identity(String),
    #[error("the certificate signing request does not parse or its self-signature does not verify: {0}")]
    Csr(rcgen::Error),
    #[error("a site's request needs its Ed25519 signing key and proof of possession")]
    MissingSigningKey,
    #[error("only a site's request carries a signing key")]
    UnexpectedSigningKey,
    #[error("the signing key is not 32 hex bytes")]
    BadSigningKey,
    #[error("the proof of possession of the signing key does not verify")]
    BadProof,
    #[error("cannot write the request's keys: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot make the certificate signing request: {0}")]
    Make(rcgen::Error),
}

fn proof_message(identity: &str, csr_pem: &str) -> Vec<u8> {
    let mut out = b"tessera/enroll/v1\0".to_vec();
    out.extend_from_slice(identity.as_bytes());
    out.push(0);
    out.extend_from_slice(csr_pem.as_bytes());
    out
}

/// Makes a request on the owner's host: the TLS key is `dir/tls.key`
/// (created with mode 0600 if missing, reused otherwise); a site passes its
/// Ed25519 key, which the request proves it holds.
pub fn make_request(identity: &Identity, dir: &Path, signing_key: Option<&SigningKey>) -> Result<Request, EnrollError> {
    if (identity.role == Role::Site) != signing_key.is_some() {
        return Err(if signing_key.is_some() {
            EnrollError::UnexpectedSigningKey
        } else {
            EnrollError::MissingSigningKey
        });
    }
    let key_path = dir.join("tls.key");
    let key = match std::fs::read_to_string(&key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(EnrollError::Make)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(EnrollError::Make)?;
            std::fs::create_dir_all(dir)?;
            crate::keyfile::write_private(&key_path, key.serialize_pem().as_bytes())?;
            key
        }
        Err(e) => return Err(e.into()),
    };
    let uri = identity.uri();
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(EnrollError::Make)?;
    params.distinguished_name.push(DnType::CommonName, uri.clone());
    params
        .subject_alt_names
        .push(SanType::URI(uri.clone().try_into().map_err(EnrollError::Make)?));
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(EnrollError::Make)?;
    let (signing_key, proof) = match signing_key {
        Some(k) => (
            Some(hex::encode(k.public_key())),
            Some(hex::encode(k.sign(&proof_message(&uri, &csr)))),
        ),
        None => (None, None),
    };
    Ok(Request {
        identity: uri,
        csr,
        signing_key,
        proof,
    })
}

impl Request {
    pub fn to_toml(&self) -> String {
        let mut text = String::from(
            "# A Tessera enrollment request: public keys only. Send this file to the\n\
             # consortium's CA (`tessera ca issue --csr FILE`); keep tls.key and site.key.\n",
        );
        text.push_str(&toml::to_string(self).expect("a request serialises"));
        text
    }

    pub fn parse(text: &str) -> Result<Self, EnrollError> {
        toml::from_str(text).map_err(|e| EnrollError::Syntax(e.to_string()))
    }

    /// Checks the CSR's self-signature and, for a site, the proof of
    /// possession of its signing key.
    pub fn verify(&self) -> Result<Verified, EnrollError> {
        let identity = Identity::parse_uri(&self.identity).map_err(|_| EnrollError::Identity(self.identity.clone()))?;
        if identity.role == Role::Coordinator {
            return Err(EnrollError::Identity(self.identity.clone()));
        }
        let csr = CertificateSigningRequestParams::from_pem(&self.csr).map_err(EnrollError::Csr)?;
        let signing_key = match (identity.role, &self.signing_key, &self.proof) {
            (Role::Site, Some(key), Some(proof)) => {
                let key: [u8; 32] = hex::decode(key)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or(EnrollError::BadSigningKey)?;
                let proof = hex::decode(proof).map_err(|_| EnrollError::BadProof)?;
                if !verify(&key, &proof_message(&self.identity, &self.csr), &proof) {
                    return Err(EnrollError::BadProof);
                }
                Some(key)
            }
            (Role::Site, _, _) => return Err(EnrollError::MissingSigningKey),
            (_, None, None) => None,
            _ => return Err(EnrollError::UnexpectedSigningKey),
        };
        Ok(Verified {
            identity,
            csr,
            signing_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn site_key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
    }

    #[test]
    fn a_site_request_round_trips_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::new(Role::Site, "cleveland").unwrap();
        let key = site_key();
        let request = make_request(&id, dir.path(), Some(&key)).unwrap();
        let parsed = Request::parse(&request.to_toml()).unwrap();
        assert_eq!(parsed, request);
        let verified = parsed.verify().unwrap();
        assert_eq!(verified.identity, id);
        assert_eq!(verified.signing_key, Some(key.public_key()));
        // The request holds no private key; the TLS key stays in `dir`.
        assert!(!request.to_toml().contains("PRIVATE KEY"));
        let tls_key = std::fs::read_to_string(dir.path().join("tls.key")).unwrap();
        assert!(tls_key.contains("PRIVATE KEY"));
        let key_pair = KeyPair::from_pem(&tls_key).unwrap();
        let public = key_pair.der_bytes();
        assert_eq!(verified.csr.public_key.der_bytes(), public);
        // A second request reuses the key.
        let again = make_request(&id, dir.path(), Some(&key)).unwrap().verify().unwrap();
        assert_eq!(again.csr.public_key.der_bytes(), public);
    }

    /// Attack 5 (the CA's side): a request whose Ed25519 key is swapped,
    /// whose proof was made for another identity or CSR, or whose CSR was
    /// edited, is refused; so is a site request without a signing key.
    #[test]
    fn adversarial_tampered_enrollment_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::new(Role::Site, "va").unwrap();
        let request = make_request(&id, dir.path(), Some(&site_key())).unwrap();
        let mut swapped = request.clone();
        swapped.signing_key = Some(hex::encode(site_key().public_key()));
        assert!(matches!(swapped.verify(), Err(EnrollError::BadProof)));
        let mut renamed = request.clone();
        renamed.identity = "tessera://site/hungary".into();
        assert!(matches!(renamed.verify(), Err(EnrollError::BadProof)));
        let other_dir = tempfile::tempdir().unwrap();
        let other = make_request(&id, other_dir.path(), Some(&site_key())).unwrap();
        let mut other_csr = request.clone();
        other_csr.csr = other.csr.clone();
        assert!(matches!(other_csr.verify(), Err(EnrollError::BadProof)));
        let mut edited = request.clone();
        let mid = edited.csr.len() / 2;
        let flipped = if &edited.csr[mid..=mid] == "A" { "B" } else { "A" };
        edited.csr.replace_range(mid..=mid, flipped);
        assert!(matches!(
            edited.verify(),
            Err(EnrollError::Csr(_)) | Err(EnrollError::BadProof)
        ));
        let mut keyless = request.clone();
        keyless.signing_key = None;
        assert!(matches!(keyless.verify(), Err(EnrollError::MissingSigningKey)));
        // An operator's request carries no signing key.
        let op = Identity::new(Role::Operator, "alice").unwrap();
        let op_request = make_request(&op, dir.path().join("alice").as_path(), None).unwrap();
        assert!(op_request.verify().unwrap().signing_key.is_none());
        let mut with_key = op_request.clone();
        with_key.signing_key = request.signing_key.clone();
        with_key.proof = request.proof.clone();
        assert!(matches!(with_key.verify(), Err(EnrollError::UnexpectedSigningKey)));
        assert!(matches!(
            make_request(&op, dir.path(), Some(&site_key())),
            Err(EnrollError::UnexpectedSigningKey)
        ));
    }
}
