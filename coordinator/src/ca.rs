//! `tessera ca`: the consortium's certificate authority and the kits it
//! hands out. A kit is one folder: a TLS certificate bound to one identity
//! (SAN URI `tessera://<role>/<name>`), the CA certificate, and for sites
//! the roster and a ready-to-edit `site.toml`.
//!
//! Keys are made by their owners (`tessera-participant enroll`, `tessera ca
//! request`) and reach the CA only as an enrollment request
//! (`protocol::enroll`): the kit then holds no private key, and neither does
//! the CA folder. `--generate-key` keeps the old convenience for demos and
//! tests: the CA makes the keys and writes them into the kit (so the CA
//! folder holds a copy).
//!
//! ```text
//! CA_DIR/ca.pem ca.key consortium.toml roster.toml revoked.toml
//! CA_DIR/coordinator/  tls.pem tls.key ca.pem ledger.key roster.toml
//! CA_DIR/sites/NAME/   tls.pem ca.pem roster.toml site.toml [tls.key site.key: --generate-key only]
//! CA_DIR/operators/NAME/, CA_DIR/auditors/NAME/   tls.pem ca.pem [tls.key: --generate-key only]
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde::{Deserialize, Serialize};
use tessera_protocol::enroll;
use tessera_protocol::identity::{Identity, Role};
use tessera_protocol::keyfile::{load_or_create, write_private};
use time::{Duration, OffsetDateTime};

/// `consortium.toml` (in the CA directory, the coordinator's kit and every
/// site kit): the consortium's name and the coordinator's ledger key, which
/// sites pin (`protocol::ledger::pin`).
pub use tessera_protocol::ledger::pin::Consortium;

/// The consortium named in a kit or CA directory, if any.
pub fn consortium_name(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("consortium.toml")).ok()?;
    Consortium::parse(&text).ok().map(|c| c.name)
}

/// Identities the CA has revoked (`revoked.toml`), read by the coordinator.
#[derive(Serialize, Deserialize, Default)]
pub struct Revoked {
    #[serde(default)]
    pub revoked: BTreeSet<String>,
}

impl Revoked {
    /// Reads a revocation list; a missing file means nothing is revoked.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("invalid revocation list {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_private(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

fn ca_params(consortium: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Tessera consortium CA: {consortium}"));
    params.distinguished_name.push(DnType::OrganizationName, consortium);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    Ok(params)
}

/// `tessera ca init`: the CA, the coordinator's kit (TLS certificate for
/// `hostnames`, Ed25519 ledger key) and an empty roster.
pub fn init(consortium: &str, out: &Path, hostnames: &[String]) -> anyhow::Result<()> {
    if out.join("ca.pem").exists() {
        bail!("{} already holds a CA; refusing to overwrite it", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(consortium)?.self_signed(&key)?;
    private(&out.join("ca.key"), &key.serialize_pem())?;
    write_public(&out.join("ca.pem"), &cert.pem())?;
    write_public(
        &out.join("roster.toml"),
        "# Ed25519 public keys of the consortium's sites.\n[sites]\n",
    )?;
    write_public(&out.join("revoked.toml"), "revoked = []\n")?;
    let coordinator = Identity {
        role: Role::Coordinator,
        name: "coordinator".into(),
    };
    let dir = out.join("coordinator");
    issue_tls(out, &coordinator, &dir, hostnames, None, None)?;
    let ledger_key = load_or_create(&dir.join("ledger.key")).context("cannot create the coordinator's ledger key")?;
    // Every site kit pins this: a site trusts no genesis signed by another key.
    let pin = Consortium {
        name: consortium.to_owned(),
        coordinator_key: Some(hex::encode(ledger_key.public_key())),
    }
    .to_toml();
    write_public(&out.join("consortium.toml"), &pin)?;
    write_public(&dir.join("consortium.toml"), &pin)?;
    Ok(())
}

/// Where `issue` puts the kit of an identity.
pub fn kit_dir(ca_dir: &Path, identity: &Identity) -> PathBuf {
    let group = match identity.role {
        Role::Site => "sites",
        Role::Operator => "operators",
        Role::Auditor => "auditors",
        Role::Coordinator => "coordinator",
    };
    ca_dir.join(group).join(&identity.name)
}

/// Where the keys of a new kit come from.
pub enum Keys {
    /// The owner's verified enrollment request: the CA signs its public keys.
    Request(Box<enroll::Verified>),
    /// The CA generates them and writes them into the kit (demo and tests).
    Generate,
}

/// `tessera ca issue`: the kit of a site, an operator or an auditor.
/// `valid_until` (default: one year) bounds the certificate.
pub fn issue(
    ca_dir: &Path,
    identity: &Identity,
    keys: Keys,
    valid_until: Option<OffsetDateTime>,
) -> anyhow::Result<PathBuf> {
    if let Keys::Request(request) = &keys
        && request.identity != *identity
    {
        bail!("the request is for {}, not {identity}", request.identity);
    }
    let dir = kit_dir(ca_dir, identity);
    if dir.join("tls.pem").exists() {
        bail!("{} already has a kit in {}", identity, dir.display());
    }
    let revoked = Revoked::load(&ca_dir.join("revoked.toml"))?;
    if revoked.revoked.contains(&identity.uri()) {
        bail!("{identity} was revoked; issue under a new name");
    }
    let signing_key = match &keys {
        Keys::Request(request) => request.signing_key,
        Keys::Generate if identity.site().is_some() => Some(
            load_or_create(&dir.join("site.key"))
                .context("cannot create the site's Ed25519 key")?
                .public_key(),
        ),
        Keys::Generate => None,
    };
    let csr = match keys {
        Keys::Request(request) => Some(request.csr),
        Keys::Generate => None,
    };
    issue_tls(ca_dir, identity, &dir, &[], valid_until, csr)?;
    if let Some(site) = identity.site() {
        let key = signing_key.context("a site's kit needs its signing key")?;
        let roster_path = ca_dir.join("roster.toml");
        let text =
            std::fs::read_to_string(&roster_path).with_context(|| format!("cannot read {}", roster_path.display()))?;
        let mut roster = tessera_protocol::roster::parse(&text)?;
        roster.insert(site.clone(), key);
        let text = tessera_protocol::roster::to_toml(&roster);
        write_public(&roster_path, &text)?;
        write_public(&dir.join("roster.toml"), &text)?;
        write_public(&dir.join("site.toml"), &site_config(&site.to_string()))?;
        if let Ok(pin) = std::fs::read_to_string(ca_dir.join("consortium.toml")) {
            write_public(&dir.join("consortium.toml"), &pin)?;
        }
    }
    Ok(dir)
}

fn site_config(site: &str) -> String {
    format!(
        "# Site configuration of `{site}` (paths relative to this file). Edit the
# coordinator address and the data paths, then run
#   tessera-participant check --config site.toml
#   tessera-participant run --config site.toml
site_id = \"{site}\"
coordinator = \"https://coordinator.example.org:50051\"
state_dir = \".\"          # this kit: keys, egress log, ledger replica
roster = \"roster.toml\"   # replace with the consortium's final roster
tls = \".\"                # tls.pem, tls.key and ca.pem of this kit

[data]
path = \"/path/to/local/data.csv\"
schema = \"schema.toml\"   # the consortium's dataset schema

[policy]
allow_insecure_plaintext = false
"
    )
}

fn issue_tls(
    ca_dir: &Path,
    identity: &Identity,
    dir: &Path,
    hostnames: &[String],
    valid_until: Option<OffsetDateTime>,
    csr: Option<rcgen::CertificateSigningRequestParams>,
) -> anyhow::Result<()> {
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("ca.key")).with_context(|| format!("no CA in {}", ca_dir.display()))?,
    )?;
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("cannot load the CA certificate")?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, identity.uri());
    params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
    for host in hostnames {
        params.subject_alt_names.push(match host.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into()?),
        });
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match identity.role {
        Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
        _ => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let now = OffsetDateTime::now_utc();
    let not_after = valid_until.unwrap_or(now + Duration::days(365));
    params.not_before = (now - Duration::days(1)).min(not_after - Duration::days(1));
    params.not_after = not_after;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert = match csr {
        // Only the request's public key is used; identity, usages and
        // validity are the CA's.
        Some(mut request) => {
            request.params = params;
            request.signed_by(&issuer)?
        }
        None => {
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            private(&dir.join("tls.key"), &key.serialize_pem())?;
            cert
        }
    };
    write_public(&dir.join("tls.pem"), &cert.pem())?;
    write_public(&dir.join("ca.pem"), &ca_pem)?;
    if identity.role == Role::Coordinator {
        std::fs::copy(ca_dir.join("roster.toml"), dir.join("roster.toml"))?;
    }
    Ok(())
}

/// `tessera ca revoke`: the identity goes on the revocation list (the
/// coordinator refuses it from its next request on, and records a revoked
/// site as a `site_revoked` ledger block); a site also leaves the roster.
pub fn revoke(ca_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    let path = ca_dir.join("revoked.toml");
    let mut revoked = Revoked::load(&path)?;
    if !revoked.revoked.insert(identity.uri()) {
        bail!("{identity} is already revoked");
    }
    write_public(&path, &toml::to_string(&revoked)?)?;
    if let Some(site) = identity.site() {
        let roster_path = ca_dir.join("roster.toml");
        let mut roster = tessera_protocol::roster::parse(&std::fs::read_to_string(&roster_path)?)?;
        roster.remove(&site);
        write_public(&roster_path, &tessera_protocol::roster::to_toml(&roster))?;
    }
    Ok(())
}
