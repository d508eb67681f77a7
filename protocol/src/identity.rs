//! Who is on the other end of a connection. Every certificate the
//! consortium CA issues carries exactly one identity as a SAN URI,
//! `tessera://<role>/<name>`; the role decides what the holder may call.

use std::fmt;

use crate::ids::SiteId;

/// What an identity may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A hospital: takes part in rounds, endorses ledger blocks.
    Site,
    /// An ML lead: submits, watches, cancels and exports jobs.
    Operator,
    /// A regulator: reads the ledger, nothing else.
    Auditor,
    /// The coordinator's server certificate.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Coordinator => "coordinator",
        }
    }
}

/// A role and a name, as bound into a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}` is not a tessera://<role>/<name> identity")]
    NotTessera(String),
    #[error("unknown role `{0}` (site, operator, auditor, coordinator)")]
    UnknownRole(String),
    #[error("bad name in `{uri}`: {reason}")]
    BadName { uri: String, reason: String },
}

pub const SCHEME: &str = "tessera://";

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Self, IdentityError> {
        // Names follow site ids' rules for every role: one grammar, checked once.
        SiteId::new(name).map_err(|e| IdentityError::BadName {
            uri: format!("{SCHEME}{}/{name}", role.as_str()),
            reason: e.to_string(),
        })?;
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }

    /// The SAN URI for a certificate.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role.as_str(), self.name)
    }

    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotTessera(uri.to_owned()))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotTessera(uri.to_owned()))?;
        let role = match role {
            "site" => Role::Site,
            "operator" => Role::Operator,
            "auditor" => Role::Auditor,
            "coordinator" => Role::Coordinator,
            other => return Err(IdentityError::UnknownRole(other.to_owned())),
        };
        Self::new(role, name)
    }

    /// The site id of a site identity.
    pub fn site(&self) -> Option<SiteId> {
        (self.role == Role::Site).then(|| SiteId::new(&self.name).expect("checked in new"))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.role.as_str(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_named() {
        let id = Identity::new(Role::Auditor, "cnil").unwrap();
        assert_eq!(id.uri(), "tessera://auditor/cnil");
        assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
        assert_eq!(
            Identity::parse_uri("https://site/a"),
            Err(IdentityError::NotTessera("https://site/a".into()))
        );
        assert_eq!(
            Identity::parse_uri("tessera://admin/root"),
            Err(IdentityError::UnknownRole("admin".into()))
        );
        assert!(Identity::parse_uri("tessera://site/a/b").is_err());
        assert!(Identity::parse_uri("tessera://site/").is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = Identity::parse_uri(&s);
        }
    }
}
