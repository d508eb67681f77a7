//! Shamir t-of-n secret sharing of 32-byte secrets, byte-wise over GF(2^8)
//! (the AES field, reduction polynomial x^8 + x^4 + x^3 + x + 1).
//!
//! Each byte of the secret is the constant term of its own random polynomial
//! of degree t−1; share `x` (1..=255) holds the 32 evaluations at `x`. Any t
//! shares give the secret by Lagrange interpolation at 0; t−1 shares are
//! uniformly distributed whatever the secret.

use rand::RngCore;

/// Maximum number of shares (x = 1..=255).
pub const MAX_SHARES: usize = 255;

/// One share of a 32-byte secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub x: u8,
    pub y: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShamirError {
    #[error("threshold {t} must be between 1 and the number of shares {n}")]
    BadThreshold { t: usize, n: usize },
    #[error("at most {MAX_SHARES} shares")]
    TooManyShares,
    #[error("need {needed} shares, got {got}")]
    NotEnoughShares { needed: usize, got: usize },
    #[error("two shares have the same x = {0}, or x = 0")]
    BadX(u8),
}

/// GF(2^8) multiplication (Russian-peasant, constant time in the operands).
pub fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & (0u8.wrapping_sub(b & 1));
        let carry = a >> 7;
        a <<= 1;
        a ^= 0x1b & 0u8.wrapping_sub(carry);
        b >>= 1;
    }
    product
}

/// Multiplicative inverse (a^254); `gf_inv(0) = 0`.
pub fn gf_inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut base = a;
    let mut exp = 254u8;
    while exp > 0 {
        if exp & 1 == 1 {
            result = gf_mul(result, base);
        }
        base = gf_mul(base, base);
        exp >>= 1;
    }
    result
}

/// Splits `secret` into `n` shares with x = 1..=n, any `t` of which recover it.
pub fn split(secret: &[u8; 32], t: usize, n: usize, rng: &mut impl RngCore) -> Result<Vec<Share>, ShamirError> {
    if n > MAX_SHARES {
        return Err(ShamirError::TooManyShares);
    }
    if t == 0 || t > n {
        return Err(ShamirError::BadThreshold { t, n });
    }
    // coefficients[k][i]: coefficient of x^k for secret byte i.
    let mut coefficients = vec![[0u8; 32]; t];
    coefficients[0] = *secret;
    for c in coefficients.iter_mut().skip(1) {
        rng.fill_bytes(c);
    }
    Ok((1..=n as u8)
        .map(|x| {
            let mut y = [0u8; 32];
            for (i, yi) in y.iter_mut().enumerate() {
                // Horner's rule from the highest coefficient.
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = gf_mul(acc, x) ^ c[i];
                }
                *yi = acc;
            }
            Share { x, y }
        })
        .collect())
}

/// Recovers the secret from at least `t` shares (extra shares are ignored).
pub fn combine(shares: &[Share], t: usize) -> Result<[u8; 32], ShamirError> {
    if shares.len() < t || t == 0 {
        return Err(ShamirError::NotEnoughShares {
            needed: t.max(1),
            got: shares.len(),
        });
    }
    interpolate(&shares[..t], 0)
}

/// Evaluates at `at` the polynomial through `shares` (all of them, so
/// `shares.len()` is its degree + 1): at 0 the secret, at a share's x the
/// value that share must hold if it is consistent with the others.
pub fn interpolate(shares: &[Share], at: u8) -> Result<[u8; 32], ShamirError> {
    for (i, s) in shares.iter().enumerate() {
        if s.x == 0 || shares[..i].iter().any(|o| o.x == s.x) {
            return Err(ShamirError::BadX(s.x));
        }
    }
    let mut out = [0u8; 32];
    for (j, sj) in shares.iter().enumerate() {
        // Lagrange basis at `at`: Π_{m≠j} (at − x_m) / (x_j − x_m); subtraction is XOR.
        let mut basis = 1u8;
        for (m, sm) in shares.iter().enumerate() {
            if m != j {
                basis = gf_mul(basis, gf_mul(at ^ sm.x, gf_inv(sm.x ^ sj.x)));
            }
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b ^= gf_mul(basis, sj.y[i]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// An "RNG" replaying fixed bytes: chooses the polynomial's coefficients.
    struct Fixed(Vec<u8>);

    impl rand::RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            unreachable!("split only fills bytes")
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!("split only fills bytes")
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            dest.copy_from_slice(&self.0[..dest.len()]);
        }
    }

    #[test]
    fn gf_known_answers() {
        // FIPS-197 section 4.2: {57} • {83} = {c1}, {57} • {13} = {fe}.
        assert_eq!(gf_mul(0x57, 0x83), 0xc1);
        assert_eq!(gf_mul(0x57, 0x13), 0xfe);
        // {53} and {ca} are inverses in the AES field.
        assert_eq!(gf_mul(0x53, 0xca), 0x01);
        assert_eq!(gf_inv(0x53), 0xca);
        assert_eq!(gf_inv(1), 1);
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn hand_computed_two_of_two() {
        // Degree-1 polynomial s + a·x with a = 0x02 for every byte:
        // share(1) = s ^ 0x02, share(2) = s ^ gf_mul(2, 2) = s ^ 0x04.
        let secret = [0x10u8; 32];
        let shares = [Share { x: 1, y: [0x12; 32] }, Share { x: 2, y: [0x14; 32] }];
        assert_eq!(combine(&shares, 2).unwrap(), secret);
    }

    #[test]
    fn errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        assert_eq!(
            split(&[0; 32], 0, 3, &mut rng),
            Err(ShamirError::BadThreshold { t: 0, n: 3 })
        );
        assert_eq!(
            split(&[0; 32], 4, 3, &mut rng),
            Err(ShamirError::BadThreshold { t: 4, n: 3 })
        );
        assert_eq!(split(&[0; 32], 2, 256, &mut rng), Err(ShamirError::TooManyShares));
        let shares = split(&[7; 32], 2, 3, &mut rng).unwrap();
        assert_eq!(
            combine(&shares[..1], 2),
            Err(ShamirError::NotEnoughShares { needed: 2, got: 1 })
        );
        assert_eq!(
            combine(&[shares[0].clone(), shares[0].clone()], 2),
            Err(ShamirError::BadX(1))
        );
    }

    proptest! {
        #[test]
        fn any_t_shares_reconstruct(
            secret in any::<[u8; 32]>(),
            n in 1usize..12,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            pick_seed in any::<u64>(),
        ) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let shares = split(&secret, t, n, &mut rng).unwrap();
            // A random subset of exactly t shares, in random order.
            let mut order: Vec<usize> = (0..n).collect();
            let mut pick = ChaCha20Rng::seed_from_u64(pick_seed);
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut pick);
            let subset: Vec<Share> = order[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(combine(&subset, t).unwrap(), secret);
        }

        /// t−1 shares carry no information: whatever one share (t = 2) shows,
        /// every candidate secret is consistent with it. For the observed share
        /// of s1, the polynomial of s2 with coefficient `y ^ s2` produces the
        /// very same share, so the share cannot distinguish s1 from s2.
        #[test]
        fn t_minus_one_shares_reveal_nothing_checkable(
            s1 in any::<[u8; 32]>(),
            s2 in any::<[u8; 32]>(),
            seed in any::<u64>(),
        ) {
            let shares1 = split(&s1, 2, 3, &mut ChaCha20Rng::seed_from_u64(seed)).unwrap();
            let observed = &shares1[0];
            // At x = 1 the share is s ^ a, so a = observed ^ s2 explains it for s2.
            let coefficient: Vec<u8> = (0..32).map(|i| observed.y[i] ^ s2[i]).collect();
            let shares2 = split(&s2, 2, 3, &mut Fixed(coefficient)).unwrap();
            prop_assert_eq!(&shares2[0], observed);
            // And with that second share, s2 (not s1) is what reconstructs.
            prop_assert_eq!(combine(&[shares2[0].clone(), shares2[1].clone()], 2).unwrap(), s2);
        }
    }
}
