//! Identities that cross the wire, as newtypes so a site id can never be
//! confused with a job id or a model hash.

use std::fmt;

/// A hospital's identity in a consortium. Restricted to a small alphabet so it
/// is safe in file names, logs and SQL without escaping.
///
/// Deserialising checks the alphabet too: a snapshot read back from disk is
/// input like any other.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
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

impl TryFrom<String> for SiteId {
    type Error = SiteIdError;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(&id)
    }
}

impl From<SiteId> for String {
    fn from(id: SiteId) -> Self {
        id.0
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

/// SHA-256 of 32-bit words as little-endian bytes: the encoding every hash
/// of a vector in Tessera names (model parameters, masked inputs, released
/// aggregates). It reads the words in place on a little-endian machine and
/// through a small buffer elsewhere, never through a copy of the vector:
/// these vectors are a model's size and hashed several times a round.
pub fn sha256_le_words(words: &[u32]) -> [u8; 32] {
    if cfg!(target_endian = "little") {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytemuck::cast_slice(words)).as_ref());
        out
    } else {
        sha256_le_words_buffered(words)
    }
}

/// [`sha256_le_words`] for any byte order, through a 16 KiB buffer.
fn sha256_le_words_buffered(words: &[u32]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = [0u8; 16 * 1024];
    for chunk in words.chunks(buffer.len() / 4) {
        for (bytes, word) in buffer.chunks_exact_mut(4).zip(chunk) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        ctx.update(&buffer[..chunk.len() * 4]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Known answer: the word 0x64636261 is the bytes "abcd".
    #[test]
    fn word_hash_known_answer() {
        let expected = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";
        assert_eq!(hex::encode(sha256_le_words(&[0x6463_6261])), expected);
        assert_eq!(hex::encode(sha256_le_words_buffered(&[0x6463_6261])), expected);
        assert_eq!(sha256_hex(b"abcd"), expected);
    }

    proptest! {
        /// Both paths hash exactly the little-endian bytes, across the
        /// buffer's boundaries.
        #[test]
        fn word_hash_is_the_hash_of_little_endian_bytes(words in prop::collection::vec(any::<u32>(), 0..9000)) {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let expected = sha256_hex(&bytes);
            prop_assert_eq!(hex::encode(sha256_le_words(&words)), expected.clone());
            prop_assert_eq!(hex::encode(sha256_le_words_buffered(&words)), expected);
        }
    }

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
