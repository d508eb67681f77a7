//! Exact secure summation of real-valued statistics (counts, sums, sums of
//! squares) whose range is not known in advance.
//!
//! Each value becomes a signed 64-bit fixed-point integer (`round(v · 2^16)`),
//! sign-extended to 80 bits and split into five 16-bit limbs, one per u32
//! word. A limb sum over `n ≤ 65 536` sites stays below 2^32, so it never
//! wraps; after unmasking, `Σ_k limb_sum_k · 2^(16k) mod 2^80` is the exact
//! two's-complement sum of up to 2^16 values below 2^63 in magnitude, which
//! always fits in 80 bits. Each value is rounded once (error ≤ 2^-17 per
//! site). A site refuses to encode a value at or beyond ±2^47 (or not
//! finite), and [`decode_sum`] refuses a sum at or beyond ±2^47 with the
//! index of the value: an overflow is an error, never a silently wrong sum.

/// Fractional bits of the fixed-point encoding.
pub const FRACTION_BITS: u32 = 16;
/// Words per encoded value.
pub const LIMBS: usize = 5;
/// Most sites whose limbs can be summed without wrapping.
pub const MAX_SITES: usize = 1 << 16;
/// Values and sums must stay strictly within ±`LIMIT`.
pub const LIMIT: f64 = (1u64 << 47) as f64;

/// A value that cannot be summed exactly.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExactError {
    #[error("value {index} is {value}: not finite, or beyond ±2^47; refusing to send it")]
    OutOfRange { index: usize, value: f64 },
    #[error("the sum of value {index} overflows ±2^47: no exact sum can be released")]
    Overflow { index: usize },
}

/// Encodes values as limbs (`LIMBS` words per value).
pub fn encode(values: &[f64]) -> Result<Vec<u32>, ExactError> {
    let scale = f64::from(1u32 << FRACTION_BITS);
    let mut out = Vec::with_capacity(values.len() * LIMBS);
    for (index, &v) in values.iter().enumerate() {
        if !(v.is_finite() && v.abs() < LIMIT) {
            return Err(ExactError::OutOfRange { index, value: v });
        }
        let fixed = (v * scale).round() as i64 as i128 as u128;
        for k in 0..LIMBS {
            out.push(((fixed >> (16 * k)) & 0xffff) as u32);
        }
    }
    Ok(out)
}

/// Decodes summed limbs back to the sums of the values.
pub fn decode_sum(limb_sums: &[u32]) -> Result<Vec<f64>, ExactError> {
    let scale = f64::from(1u32 << FRACTION_BITS);
    let width = 16 * LIMBS as u32;
    limb_sums
        .chunks_exact(LIMBS)
        .enumerate()
        .map(|(index, limbs)| {
            let total = limbs
                .iter()
                .enumerate()
                .fold(0u128, |acc, (k, &l)| acc + (u128::from(l) << (16 * k)))
                & ((1u128 << width) - 1);
            // Two's complement in `width` bits.
            let signed = if total >> (width - 1) == 1 {
                total as i128 - (1i128 << width)
            } else {
                total as i128
            };
            let value = signed as f64 / scale;
            if value.abs() >= LIMIT {
                return Err(ExactError::Overflow { index });
            }
            Ok(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(&[1.0]).unwrap(), vec![0, 1, 0, 0, 0]);
        assert_eq!(encode(&[-1.0 / 65536.0]).unwrap(), vec![0xffff; 5]);
        assert_eq!(
            decode_sum(&[0, 1, 0, 0, 0, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff]).unwrap(),
            vec![1.0, -1.0 / 65536.0]
        );
    }

    #[test]
    fn adversarial_exact_sum_overflow_is_an_error_not_a_wrong_sum() {
        // A site refuses values it cannot encode exactly.
        assert_eq!(
            encode(&[1.0, LIMIT]),
            Err(ExactError::OutOfRange { index: 1, value: LIMIT })
        );
        assert!(matches!(
            encode(&[f64::NAN]),
            Err(ExactError::OutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            encode(&[f64::NEG_INFINITY]),
            Err(ExactError::OutOfRange { index: 0, .. })
        ));
        // Values each within range whose sum is not: the coordinator gets an
        // error naming the statistic, not a wrapped value.
        let big = LIMIT * 0.75;
        let mut sums = vec![0u32; 2 * LIMBS];
        for site in [[1.0, big], [2.0, big], [3.0, -big / 4.0]] {
            for (s, e) in sums.iter_mut().zip(encode(&site).unwrap()) {
                *s += e;
            }
        }
        assert_eq!(decode_sum(&sums), Err(ExactError::Overflow { index: 1 }));
        // The same in the negative direction, and a sum that comes back
        // within range after a large partial sum is exact.
        let mut sums = vec![0u32; LIMBS];
        for v in [-big, -big, big, big * 0.5] {
            for (s, e) in sums.iter_mut().zip(encode(&[v]).unwrap()) {
                *s += e;
            }
        }
        assert_eq!(decode_sum(&sums).unwrap(), vec![-big * 0.5]);
        let mut sums = vec![0u32; LIMBS];
        for _ in 0..3 {
            for (s, e) in sums.iter_mut().zip(encode(&[-big]).unwrap()) {
                *s += e;
            }
        }
        assert_eq!(decode_sum(&sums), Err(ExactError::Overflow { index: 0 }));
    }

    proptest! {
        /// Limb-wise sums of many encodings decode to the sum of the values.
        #[test]
        fn sums_are_exact(values in prop::collection::vec(prop::collection::vec(-1e9f64..1e9, 3), 1..50)) {
            let mut sums = vec![0u32; 3 * LIMBS];
            for v in &values {
                for (s, e) in sums.iter_mut().zip(encode(v).unwrap()) {
                    *s = s.checked_add(e).expect("limb sums never wrap");
                }
            }
            let decoded = decode_sum(&sums).unwrap();
            for j in 0..3 {
                let truth: f64 = values.iter().map(|v| v[j]).sum();
                let bound = values.len() as f64 * 0.5 / 65536.0 + truth.abs() * 1e-15;
                prop_assert!((decoded[j] - truth).abs() <= bound, "{} vs {truth}", decoded[j]);
            }
        }
    }
}
