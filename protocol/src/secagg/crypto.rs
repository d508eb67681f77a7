//! The cryptographic primitives of secure aggregation, each a thin wrapper
//! over a well-kept crate: X25519 key agreement (x25519-dalek, because the
//! mask key must be exportable to be secret-shared), HKDF-SHA256, AEAD
//! ChaCha20-Poly1305 and Ed25519 signatures (ring).

use ring::aead::{CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use x25519_dalek::{PublicKey, StaticSecret};

/// An X25519 key pair whose secret can be exported (and so secret-shared).
#[derive(Clone)]
pub struct DhKeyPair {
    secret: StaticSecret,
    pub public: [u8; 32],
}

impl DhKeyPair {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// HKDF-SHA256 of the X25519 shared secret with `peer`, bound to
    /// `context` (job, round, purpose, direction). Returns `None` for a
    /// low-order peer key (an all-zero shared secret).
    pub fn agree(&self, peer: &[u8; 32], context: &[&[u8]]) -> Option<[u8; 32]> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        Some(hkdf_32(shared.as_bytes(), context))
    }
}

/// HKDF-SHA256 (empty salt) expanding `ikm` to 32 bytes with `info`.
pub fn hkdf_32(ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(ikm);
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255 * 32 limit: cannot fail.
    prk.expand(info, Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF output of 32 bytes");
    out
}

/// Seals `plaintext` under a key used for exactly one message, so the
/// all-zero nonce is safe.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key"));
    let mut buffer = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        ring::aead::Aad::from(aad),
        &mut buffer,
    )
    .expect("ChaCha20-Poly1305 seal of a short message");
    buffer
}

/// Opens a [`seal`]ed message; `None` if it was altered or the key is wrong.
pub fn open(key: &[u8; 32], aad: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).ok()?);
    let mut buffer = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            ring::aead::Aad::from(aad),
            &mut buffer,
        )
        .ok()?;
    Some(plain.to_vec())
}

/// A site's long-term Ed25519 identity key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// From a PKCS#8 document (as written by [`SigningKey::generate_pkcs8`]).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        Ed25519KeyPair::from_pkcs8(pkcs8).map(Self)
    }

    /// A fresh key as PKCS#8 bytes, to store with 0600 permissions.
    pub fn generate_pkcs8() -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        // Fails only if the OS random source fails.
        Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("OS randomness")
            .as_ref()
            .to_vec()
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.public_key().as_ref());
        out
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).as_ref().to_vec()
    }
}

/// Verifies an Ed25519 signature.
pub fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let v = hex::decode(s).unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn x25519_rfc7748_known_answer() {
        // RFC 7748 section 6.1.
        let alice = DhKeyPair::from_secret(unhex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = DhKeyPair::from_secret(unhex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            hex::encode(alice.public),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(
            hex::encode(bob.public),
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
        );
        let shared =
            x25519_dalek::StaticSecret::from(alice.secret_bytes()).diffie_hellman(&PublicKey::from(bob.public));
        assert_eq!(
            hex::encode(shared.as_bytes()),
            "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
        );
        // Both sides derive the same key; different contexts give different keys.
        let ab = alice.agree(&bob.public, &[b"ctx"]).unwrap();
        assert_eq!(ab, bob.agree(&alice.public, &[b"ctx"]).unwrap());
        assert_ne!(ab, alice.agree(&bob.public, &[b"other"]).unwrap());
        // A low-order point is refused.
        assert!(alice.agree(&[0u8; 32], &[b"ctx"]).is_none());
    }

    #[test]
    fn hkdf_rfc5869_test_case_3_prefix() {
        // RFC 5869 A.3 (SHA-256, empty salt and info): first 32 bytes of OKM.
        let ikm = [0x0bu8; 22];
        assert_eq!(
            hex::encode(hkdf_32(&ikm, &[])),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
        );
    }

    #[test]
    fn aead_round_trip_and_tamper_detection() {
        let key = [7u8; 32];
        let sealed = seal(&key, b"aad", b"share bytes");
        assert_eq!(open(&key, b"aad", &sealed).unwrap(), b"share bytes");
        assert!(open(&key, b"other aad", &sealed).is_none());
        assert!(open(&[8u8; 32], b"aad", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(open(&key, b"aad", &flipped).is_none());
    }

    #[test]
    fn ed25519_rfc8032_test_1() {
        // RFC 8032 section 7.1, TEST 1 (empty message).
        let public: [u8; 32] = unhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let signature = hex::decode(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        )
        .unwrap();
        assert!(verify(&public, b"", &signature));
        assert!(!verify(&public, b"x", &signature));
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap();
        let sig = key.sign(b"keys");
        assert!(verify(&key.public_key(), b"keys", &sig));
        assert!(!verify(&public, b"keys", &sig));
    }
}
