//! Mask expansion: a 32-byte seed becomes a vector of u32 words from the
//! ChaCha20 keystream (RFC 8439 block function, 20 rounds, zero nonce), added
//! to or subtracted from an input modulo 2^32.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Plus,
    Minus,
}

/// Adds (or subtracts) the mask expanded from `seed` to `acc`, mod 2^32.
pub fn apply_mask(acc: &mut [u32], seed: &[u8; 32], sign: Sign) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 4096];
    for chunk in acc.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        match sign {
            Sign::Plus => {
                for (a, w) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                    *a = a.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                }
            }
            Sign::Minus => {
                for (a, w) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                    *a = a.wrapping_sub(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                }
            }
        }
    }
}

/// Raw keystream bytes of `seed` (benchmarks measure this as the physical
/// limit of mask generation).
pub fn keystream(seed: &[u8; 32], out: &mut [u8]) {
    ChaCha20Rng::from_seed(*seed).fill_bytes(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chacha20_rfc8439_keystream_known_answer() {
        // RFC 8439 A.1 test vector #1: all-zero key and nonce, block counter 0.
        let mut out = [0u8; 64];
        keystream(&[0; 32], &mut out);
        assert_eq!(
            hex::encode(out),
            "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
             da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
        );
    }

    proptest! {
        #[test]
        fn plus_and_minus_cancel(seed in any::<[u8; 32]>(), values in prop::collection::vec(any::<u32>(), 0..3000)) {
            let mut acc = values.clone();
            apply_mask(&mut acc, &seed, Sign::Plus);
            if values.len() > 8 {
                prop_assert_ne!(&acc, &values);
            }
            apply_mask(&mut acc, &seed, Sign::Minus);
            prop_assert_eq!(acc, values);
        }
    }
}
