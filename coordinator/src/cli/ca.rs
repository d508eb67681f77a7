//! `tessera ca`: provision a consortium (like FLARE's startup kits, one CLI).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tessera_protocol::identity::{Identity, Role};
use time::{Date, OffsetDateTime, Time};

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
    /// Issue a kit: a certificate bound to one identity and role, plus for a
    /// site its Ed25519 key, roster and a ready-to-edit site.toml.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[command(flatten)]
        who: Who,
        /// Last day the certificate is valid (YYYY-MM-DD, UTC). Default: one year.
        #[arg(long)]
        valid_until: Option<String>,
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

/// Exactly one identity.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Who {
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    operator: Option<String>,
    #[arg(long)]
    auditor: Option<String>,
}

impl Who {
    fn identity(&self) -> Result<Identity, CliError> {
        let (role, name) = match (&self.site, &self.operator, &self.auditor) {
            (Some(n), _, _) => (Role::Site, n),
            (_, Some(n), _) => (Role::Operator, n),
            (_, _, Some(n)) => (Role::Auditor, n),
            _ => unreachable!("clap requires one"),
        };
        Identity::new(role, name).map_err(|e| CliError::User(e.to_string()))
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
        CaCommand::Issue { ca, who, valid_until } => {
            let identity = who.identity()?;
            let until = valid_until.as_deref().map(parse_day).transpose()?;
            if until.is_some_and(|u| u < OffsetDateTime::now_utc()) {
                eprintln!("warning: this certificate is already expired");
            }
            let dir = ca::issue(&ca, &identity, until).map_err(|e| CliError::User(format!("{e:#}")))?;
            println!("issued {identity}: kit in {}", dir.display());
            if identity.role == Role::Site {
                println!(
                    "  copy the folder to the hospital's host, edit site.toml, and give the updated roster \
                     ({}/roster.toml) to the coordinator and every site",
                    ca.display()
                );
            }
        }
        CaCommand::Revoke { ca, who } => {
            let identity = who.identity()?;
            ca::revoke(&ca, &identity).map_err(|e| CliError::User(format!("{e:#}")))?;
            println!("revoked {identity} ({}/revoked.toml)", ca.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
