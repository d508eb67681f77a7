//! The consortium roster: each site's long-term Ed25519 public key, as a TOML
//! file distributed out of band (by the consortium, not by the coordinator).
//! Sites accept secure-aggregation keys only when signed by a roster key, so
//! a coordinator cannot insert or impersonate a site.
//!
//! ```toml
//! [sites]
//! cleveland = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::ids::SiteId;

/// Site id → Ed25519 public key.
pub type Roster = BTreeMap<SiteId, [u8; 32]>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RosterError {
    #[error("roster is not valid TOML: {0}")]
    Syntax(String),
    #[error("sites.{site}: {reason}")]
    Invalid { site: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoster {
    sites: BTreeMap<String, String>,
}

/// Parses a roster file.
pub fn parse(text: &str) -> Result<Roster, RosterError> {
    let raw: RawRoster = toml::from_str(text).map_err(|e| RosterError::Syntax(e.to_string()))?;
    let mut roster = Roster::new();
    for (site, key) in raw.sites {
        let invalid = |reason: String| RosterError::Invalid {
            site: site.clone(),
            reason,
        };
        let id = SiteId::new(&site).map_err(|e| invalid(e.to_string()))?;
        let bytes = hex::decode(key.trim()).map_err(|e| invalid(format!("not hex: {e}")))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(format!("an Ed25519 public key is 32 bytes, got {}", b.len())))?;
        roster.insert(id, key);
    }
    Ok(roster)
}

/// Writes a roster file.
pub fn to_toml(roster: &Roster) -> String {
    let mut out = String::from("# Ed25519 public keys of the consortium's sites.\n[sites]\n");
    for (site, key) in roster {
        out.push_str(&format!("{site} = \"{}\"\n", hex::encode(key)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let mut roster = Roster::new();
        roster.insert(SiteId::new("a").unwrap(), [1; 32]);
        roster.insert(SiteId::new("b").unwrap(), [2; 32]);
        assert_eq!(parse(&to_toml(&roster)).unwrap(), roster);
        let err = parse("[sites]\na = \"00\"\n").unwrap_err();
        assert_eq!(err.to_string(), "sites.a: an Ed25519 public key is 32 bytes, got 1");
        assert!(matches!(
            parse("[sites]\n\"A B\" = \"00\"\n"),
            Err(RosterError::Invalid { .. })
        ));
        assert!(matches!(parse("[site]\n"), Err(RosterError::Syntax(_))));
    }
}
