//! Exact secure summation of real-valued statistics (counts, sums, sums of
//! squares) whose range is not known in advance.
//!
//! Each value becomes a signed 64-bit fixed-point integer (`round(v · 2^16)`,
//! two's complement), split into four 16-bit limbs, one per u32 word. A limb
//! sum over `n ≤ 65 536` sites stays below 2^32, so it never wraps; after
//! unmasking, `Σ_k limb_sum_k · 2^(16k) mod 2^64` is the exact two's-complement
//! sum. Each value is rounded once (error ≤ 2^-17 per site); the sum itself is
//! exact as long as it fits in ±2^47.

/// Fractional bits of the fixed-point encoding.
pub const FRACTION_BITS: u32 = 16;
/// Words per encoded value.
pub const LIMBS: usize = 4;
/// Most sites whose limbs can be summed without wrapping.
pub const MAX_SITES: usize = 1 << 16;

/// Encodes values as limbs (`LIMBS` words per value).
pub fn encode(values: &[f64]) -> Vec<u32> {
    let scale = f64::from(1u32 << FRACTION_BITS);
    let mut out = Vec::with_capacity(values.len() * LIMBS);
    for &v in values {
        let fixed = (v * scale).round() as i64 as u64;
        for k in 0..LIMBS {
            out.push(((fixed >> (16 * k)) & 0xffff) as u32);
        }
    }
    out
}

/// Decodes summed limbs back to the sums of the values.
pub fn decode_sum(limb_sums: &[u32]) -> Vec<f64> {
    let scale = f64::from(1u32 << FRACTION_BITS);
    limb_sums
        .chunks_exact(LIMBS)
        .map(|limbs| {
            let total = limbs
                .iter()
                .enumerate()
                .fold(0u64, |acc, (k, &l)| acc.wrapping_add(u64::from(l) << (16 * k)));
            total as i64 as f64 / scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(&[1.0]), vec![0, 1, 0, 0]);
        assert_eq!(encode(&[-1.0 / 65536.0]), vec![0xffff; 4]);
        assert_eq!(
            decode_sum(&[0, 1, 0, 0, 0xffff, 0xffff, 0xffff, 0xffff]),
            vec![1.0, -1.0 / 65536.0]
        );
    }

    proptest! {
        /// Limb-wise sums of many encodings decode to the sum of the values.
        #[test]
        fn sums_are_exact(values in prop::collection::vec(prop::collection::vec(-1e9f64..1e9, 3), 1..50)) {
            let mut sums = vec![0u32; 3 * LIMBS];
            for v in &values {
                for (s, e) in sums.iter_mut().zip(encode(v)) {
                    *s = s.checked_add(e).expect("limb sums never wrap");
                }
            }
            let decoded = decode_sum(&sums);
            for j in 0..3 {
                let truth: f64 = values.iter().map(|v| v[j]).sum();
                let bound = values.len() as f64 * 0.5 / 65536.0 + truth.abs() * 1e-15;
                prop_assert!((decoded[j] - truth).abs() <= bound, "{} vs {truth}", decoded[j]);
            }
        }
    }
}
