//! Identities that cross the wire, as newtypes so a site id can never be
//! confused with a job id or a model hash.

use std::fmt;

/// A hospital's identity in a consortium. Restricted to a small alphabet so it
/// is safe in file names, logs and SQL without escaping.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(String);

/// Why a string is not a valid [`SiteId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteIdError {
    #[error("site id is empty")]
    Empty,
    #[error("site id is longer than 64 characters")]
    TooLong,
    #[error("site id `{0}` may only contain a-z, 0-9, '-' and '_'")]
    BadCharacter(String),
}

impl SiteId {
    /// Parses a site id, refusing anything outside `[a-z0-9_-]{1,64}`.
    pub fn new(id: &str) -> Result<Self, SiteIdError> {
        if id.is_empty() {
            return Err(SiteIdError::Empty);
        }
        if id.len() > 64 {
            return Err(SiteIdError::TooLong);
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(SiteIdError::BadCharacter(id.to_owned()));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job, numbered by the coordinator in submission order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hex SHA-256 of some bytes: the one digest used for job files, models and
/// feature encodings, so every hash in logs and the database compares alike.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_restricted() {
        assert!(SiteId::new("cleveland").is_ok());
        assert!(SiteId::new("site_2-b").is_ok());
        assert_eq!(SiteId::new(""), Err(SiteIdError::Empty));
        assert_eq!(SiteId::new(&"a".repeat(65)), Err(SiteIdError::TooLong));
        assert!(matches!(SiteId::new("Bad Site"), Err(SiteIdError::BadCharacter(_))));
        assert!(matches!(SiteId::new("../etc"), Err(SiteIdError::BadCharacter(_))));
    }

    #[test]
    fn sha256_known_answer() {
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
