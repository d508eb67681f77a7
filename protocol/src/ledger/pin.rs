//! What a member's kit pins about its consortium's ledger (`consortium.toml`,
//! written by `tessera ca init` and copied into every site kit): the
//! consortium's name and the coordinator's ledger key. A site checks the
//! genesis block a coordinator serves against it, so a coordinator cannot
//! start the site on a chain of its own making (trust on first use).

use serde::{Deserialize, Serialize};

use super::payload::Genesis;

/// `consortium.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consortium {
    pub name: String,
    /// Hex Ed25519 public key that must sign the ledger's genesis (and every
    /// later block). Absent in kits made before it was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_key: Option<String>,
}

impl Consortium {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a consortium serialises")
    }

    /// Whether `genesis` is this consortium's: its name, and its coordinator
    /// key when pinned.
    pub fn check_genesis(&self, genesis: &Genesis) -> Result<(), String> {
        if genesis.consortium != self.name {
            return Err(format!(
                "the ledger's genesis is for consortium `{}`, this site's kit pins `{}`",
                genesis.consortium, self.name
            ));
        }
        if let Some(key) = &self.coordinator_key
            && !genesis.coordinator_key.eq_ignore_ascii_case(key)
        {
            return Err(format!(
                "the ledger's genesis names coordinator key {}, this site's kit pins {key}",
                genesis.coordinator_key
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn genesis(consortium: &str, key: &str) -> Genesis {
        Genesis {
            consortium: consortium.into(),
            coordinator_key: key.into(),
            sites: Vec::new(),
            quorum: 1,
            software: "test".into(),
        }
    }

    /// Attack 7: a coordinator serves a genesis of its own (another key, or
    /// another consortium's name): a pinned site refuses it.
    #[test]
    fn adversarial_foreign_genesis_is_refused_by_a_pinned_kit() {
        let pin = Consortium {
            name: "cardio".into(),
            coordinator_key: Some("ab".repeat(32)),
        };
        let text = pin.to_toml();
        assert_eq!(Consortium::parse(&text).unwrap(), pin);
        assert_eq!(pin.check_genesis(&genesis("cardio", &"ab".repeat(32))), Ok(()));
        assert_eq!(pin.check_genesis(&genesis("cardio", &"AB".repeat(32))), Ok(()));
        let err = pin.check_genesis(&genesis("cardio", &"cd".repeat(32))).unwrap_err();
        assert!(err.contains("coordinator key"), "{err}");
        let err = pin.check_genesis(&genesis("other", &"ab".repeat(32))).unwrap_err();
        assert!(err.contains("consortium `other`"), "{err}");
        // A kit from before the key was pinned still pins the name.
        let old = Consortium::parse("name = \"cardio\"\n").unwrap();
        assert_eq!(old.coordinator_key, None);
        assert!(old.check_genesis(&genesis("cardio", &"cd".repeat(32))).is_ok());
        assert!(old.check_genesis(&genesis("other", &"cd".repeat(32))).is_err());
    }
}
