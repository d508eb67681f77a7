//! `tessera ca`: provision a consortium (like FLARE's startup kits, one CLI).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tessera_protocol::identity::{Identity, Role};
use time::{Date, OffsetDateTime, Time};

use tessera_protocol::enroll;

use super::{CliError, CliResult};
use crate::ca;

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create the consortium CA, the coordinator's kit (TLS certificate and
    /// Ed25519 ledger key) and an empty roster in DIR.
    Init {
        #[arg(long)]
        consortium: String,
        #[arg(long)]
        out: PathBuf,
        /// Host names or IP addresses the coordinator is reached at
        /// (repeatable). Default: localhost and 127.0.0.1.
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
    },
    /// Issue a kit from an enrollment request (`--csr`, made by the owner
    /// with `tessera-participant enroll` or `tessera ca request`): a
    /// certificate bound to one identity and role, plus for a site the
    /// roster and a ready-to-edit site.toml. No private key is in the kit.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[command(flatten)]
        who: Who,
        /// The owner's enrollment request (NAME.enroll.toml).
        #[arg(long, conflicts_with = "generate_key")]
        csr: Option<PathBuf>,
        /// Demo and tests only: the CA generates the identity's keys and
        /// writes them into the kit, so the CA folder holds a copy of them.
        #[arg(long)]
        generate_key: bool,
        /// Last day the certificate is valid (YYYY-MM-DD, UTC). Default: one year.
        #[arg(long)]
        valid_until: Option<String>,
    },
    /// On an operator's or auditor's own host: make its TLS key (tls.key,
    /// 0600) and an enrollment request for the CA. Sites use
    /// `tessera-participant enroll`.
    Request {
        #[command(flatten)]
        who: Who,
        /// Folder for tls.key and the request (the kit goes here later).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke an identity: the coordinator refuses it from its next request
    /// on; a revoked site also leaves the roster and the ledger's membership.
    Revoke {
        #[arg(long)]
        ca: PathBuf,
        #[command(flatten)]
        who: Who,
    },
}

/// At most one identity (`issue --csr` reads it from the request).
#[derive(Args)]
#[group(required = false, multiple = false)]
pub(crate) struct Who {
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    operator: Option<String>,
    #[arg(long)]
    auditor: Option<String>,
}

impl Who {
    fn given(&self) -> Result<Option<Identity>, CliError> {
        let (role, name) = match (&self.site, &self.operator, &self.auditor) {
            (Some(n), _, _) => (Role::Site, n),
            (_, Some(n), _) => (Role::Operator, n),
            (_, _, Some(n)) => (Role::Auditor, n),
            _ => return Ok(None),
        };
        Identity::new(role, name)
            .map(Some)
            .map_err(|e| CliError::User(e.to_string()))
    }

    fn identity(&self) -> Result<Identity, CliError> {
        self.given()?
            .ok_or_else(|| CliError::User("name one identity: --site, --operator or --auditor".into()))
    }
}

/// The identity and keys of `tessera ca issue`.
fn issue_keys(who: &Who, csr: Option<&PathBuf>, generate_key: bool) -> Result<(Identity, ca::Keys), CliError> {
    let given = who.given()?;
    match (csr, generate_key) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::User(format!("cannot read {}: {e}", path.display())))?;
            let request = enroll::Request::parse(&text)
                .and_then(|r| r.verify())
                .map_err(|e| CliError::User(format!("{}: {e}", path.display())))?;
            if let Some(named) = given
                && named != request.identity
            {
                return Err(CliError::User(format!(
                    "{} is a request for {}, not {named}",
                    path.display(),
                    request.identity
                )));
            }
            Ok((request.identity.clone(), ca::Keys::Request(Box::new(request))))
        }
        (None, true) => Ok((who.identity()?, ca::Keys::Generate)),
        (None, false) => Err(CliError::User(
            "the CA does not make its members' keys: the owner runs `tessera-participant enroll` (a site) or \
             `tessera ca request` (a person) and sends the request; issue it with --csr FILE. \
             For a demo, --generate-key makes the keys here (the CA folder then holds a copy)"
                .into(),
        )),
    }
}

fn parse_day(text: &str) -> Result<OffsetDateTime, CliError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = Date::parse(text, &format).map_err(|e| CliError::User(format!("--valid-until `{text}`: {e}")))?;
    Ok(day.with_time(Time::from_hms(23, 59, 59).expect("valid")).assume_utc())
}

pub(crate) fn exec(cmd: CaCommand) -> CliResult {
    match cmd {
        CaCommand::Init {
            consortium,
            out,
            mut hostnames,
        } => {
            if hostnames.is_empty() {
                hostnames = vec!["localhost".into(), "127.0.0.1".into()];
            }
            ca::init(&consortium, &out, &hostnames).map_err(|e| CliError::User(format!("{e:#}")))?;
            println!("consortium `{consortium}` CA in {}", out.display());
            println!(
                "  coordinator kit: {}/coordinator (for {})",
                out.display(),
                hostnames.join(", ")
            );
            println!(
                "  next: tessera ca issue --ca {} --site NAME (one per hospital)",
                out.display()
            );
        }
        CaCommand::Issue {
            ca,
            who,
            csr,
            generate_key,
            valid_until,
        } => {
            let (identity, keys) = issue_keys(&who, csr.as_ref(), generate_key)?;
            let until = valid_until.as_deref().map(parse_day).transpose()?;
            if until.is_some_and(|u| u < OffsetDateTime::now_utc()) {
                eprintln!("warning: this certificate is already expired");
            }
            let generated = matches!(keys, ca::Keys::Generate);
            let dir = ca::issue(&ca, &identity, keys, until).map_err(|e| CliError::User(format!("{e:#}")))?;
            println!("issued {identity}: kit in {}", dir.display());
            if generated {
                println!("  --generate-key: the kit holds the private keys, and so does this CA folder");
            } else {
                println!("  the kit holds no private key: copy it next to the owner's tls.key (and site.key)");
            }
            if identity.role == Role::Site {
                println!(
                    "  copy the folder to the hospital's host, edit site.toml, and give the updated roster \
                     ({}/roster.toml) to the coordinator and every site",
                    ca.display()
                );
            }
        }
        CaCommand::Request { who, out } => {
            let identity = who.identity()?;
            if identity.role == Role::Site {
                return Err(CliError::User(
                    "a site enrolls with `tessera-participant enroll` (it also makes the site's signing key)".into(),
                ));
            }
            let request = enroll::make_request(&identity, &out, None).map_err(|e| CliError::User(e.to_string()))?;
            let path = out.join(enroll::file_name(&identity));
            std::fs::write(&path, request.to_toml())
                .map_err(|e| CliError::User(format!("cannot write {}: {e}", path.display())))?;
            println!(
                "{identity}: key in {}, request in {}",
                out.join("tls.key").display(),
                path.display()
            );
            println!("  send the request to the consortium's CA; keep tls.key here");
        }
        CaCommand::Revoke { ca, who } => {
            let identity = who.identity()?;
            ca::revoke(&ca, &identity).map_err(|e| CliError::User(format!("{e:#}")))?;
            println!("revoked {identity} ({}/revoked.toml)", ca.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
