//! Model architecture as data: layer shapes, the flat parameter order, the
//! initial weights and the byte encoding.
//!
//! This lives in `protocol/` (not `models/`) because the coordinator must
//! create, hash and update models without linking Burn (DESIGN.md invariant
//! 4). `models/` builds Burn modules from the same [`ModelSpec::layout`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Which network a job trains. Both end in one logit (binary classification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    LogisticRegression,
    Mlp { hidden: Vec<usize> },
}

/// One dense layer `y = x W + b`, with `W` of shape `[d_in, d_out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseShape {
    pub d_in: usize,
    pub d_out: usize,
}

impl DenseShape {
    pub fn n_params(&self) -> usize {
        self.d_in * self.d_out + self.d_out
    }
}

/// Layer shapes of a model for a given input width. The flat parameter vector
/// is, layer after layer: `W` in row-major order, then `b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub layers: Vec<DenseShape>,
}

impl Layout {
    pub fn n_params(&self) -> usize {
        self.layers.iter().map(DenseShape::n_params).sum()
    }
}

impl ModelSpec {
    /// Layer shapes for `n_features` inputs.
    pub fn layout(&self, n_features: usize) -> Layout {
        let mut widths = vec![n_features];
        if let ModelSpec::Mlp { hidden } = self {
            widths.extend(hidden);
        }
        widths.push(1);
        Layout {
            layers: widths
                .windows(2)
                .map(|w| DenseShape {
                    d_in: w[0],
                    d_out: w[1],
                })
                .collect(),
        }
    }

    /// Short label for listings: `logistic_regression` or `mlp[32,16]`.
    pub fn label(&self) -> String {
        match self {
            ModelSpec::LogisticRegression => "logistic_regression".into(),
            ModelSpec::Mlp { hidden } => {
                let sizes: Vec<String> = hidden.iter().map(|h| h.to_string()).collect();
                format!("mlp[{}]", sizes.join(","))
            }
        }
    }
}

/// Deterministic initial weights: `U(-1/sqrt(d_in), 1/sqrt(d_in))` for
/// weights (PyTorch's default for linear layers), zero biases. The same seed
/// gives the same model on every platform (ChaCha20 stream).
pub fn initial_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut params = Vec::with_capacity(layout.n_params());
    for layer in &layout.layers {
        let bound = 1.0 / (layer.d_in.max(1) as f32).sqrt();
        for _ in 0..layer.d_in * layer.d_out {
            params.push(rng.random_range(-bound..bound));
        }
        params.extend(std::iter::repeat_n(0.0, layer.d_out));
    }
    params
}

/// Checks that the model a coordinator announces for a job's first round is
/// the deterministic initial model of the accepted spec and seed, so a
/// coordinator cannot hand one site a crafted ("trap") model whose update
/// would reveal its data.
pub fn check_initial_model(layout: &Layout, seed: u64, announced_hash: &str) -> Result<(), TrapModel> {
    let expected = model_hash(&initial_params(layout, seed));
    if expected != announced_hash {
        return Err(TrapModel {
            announced: announced_hash.to_owned(),
            expected,
        });
    }
    Ok(())
}

/// A first-round model that is not the job's initial model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the first round's model {announced} is not the job's initial model {expected} (its spec and seed): \
     refusing to train on a model the coordinator chose"
)]
pub struct TrapModel {
    pub announced: String,
    pub expected: String,
}

/// Little-endian f32 bytes: the wire and storage encoding of a model.
pub fn encode_params(params: &[f32]) -> Vec<u8> {
    crate::wire::encode_words(bytemuck::cast_slice(params))
}

/// Why bytes are not an encoded model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("model encoding has {0} bytes, not a multiple of 4")]
    Truncated(usize),
    #[error("parameter {index} is not finite")]
    NonFinite { index: usize },
}

/// Inverse of [`encode_params`]; refuses NaN and infinities, which no valid
/// model or update contains.
pub fn decode_params(bytes: &[u8]) -> Result<Vec<f32>, DecodeError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    let mut params = Vec::with_capacity(bytes.len() / 4);
    for (index, chunk) in bytes.chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !value.is_finite() {
            return Err(DecodeError::NonFinite { index });
        }
        params.push(value);
    }
    Ok(params)
}

/// Hash that names a model everywhere: SHA-256 of [`encode_params`].
pub fn model_hash(params: &[f32]) -> String {
    // An f32's little-endian bytes are those of its bit pattern.
    hex::encode(crate::ids::sha256_le_words(bytemuck::cast_slice(params)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layouts_count_parameters() {
        let lr = ModelSpec::LogisticRegression.layout(13);
        assert_eq!(lr.layers, vec![DenseShape { d_in: 13, d_out: 1 }]);
        assert_eq!(lr.n_params(), 14);
        let mlp = ModelSpec::Mlp { hidden: vec![8, 4] }.layout(13);
        assert_eq!(mlp.n_params(), (13 * 8 + 8) + (8 * 4 + 4) + (4 + 1));
        assert_eq!(ModelSpec::Mlp { hidden: vec![8, 4] }.label(), "mlp[8,4]");
    }

    /// Attack 9: a crafted first-round model (or the initial model of
    /// another seed) is refused; the job's own initial model is accepted.
    #[test]
    fn adversarial_trap_initial_model_is_refused() {
        let layout = ModelSpec::Mlp { hidden: vec![4] }.layout(5);
        let honest = model_hash(&initial_params(&layout, 42));
        assert_eq!(check_initial_model(&layout, 42, &honest), Ok(()));
        let mut trap = initial_params(&layout, 42);
        trap[0] = 1e3;
        let err = check_initial_model(&layout, 42, &model_hash(&trap)).unwrap_err();
        assert_eq!(err.expected, honest);
        let other_seed = model_hash(&initial_params(&layout, 43));
        assert!(check_initial_model(&layout, 42, &other_seed).is_err());
    }

    #[test]
    fn initial_params_are_deterministic_bounded_and_seed_dependent() {
        let layout = ModelSpec::Mlp { hidden: vec![16] }.layout(9);
        let a = initial_params(&layout, 7);
        assert_eq!(a.len(), layout.n_params());
        assert_eq!(a, initial_params(&layout, 7));
        assert_ne!(a, initial_params(&layout, 8));
        let bound = 1.0 / 3.0;
        assert!(a[..9 * 16].iter().all(|w| w.abs() <= bound));
        assert!(a[9 * 16..9 * 16 + 16].iter().all(|&b| b == 0.0));
    }

    #[test]
    fn decode_refuses_bad_bytes() {
        assert_eq!(decode_params(&[0, 0, 0]), Err(DecodeError::Truncated(3)));
        let bytes = encode_params(&[1.0, f32::NAN]);
        assert_eq!(decode_params(&bytes), Err(DecodeError::NonFinite { index: 1 }));
        let bytes = encode_params(&[f32::INFINITY]);
        assert_eq!(decode_params(&bytes), Err(DecodeError::NonFinite { index: 0 }));
    }

    proptest! {
        /// A model's name is the hash of its wire encoding, bit for bit.
        #[test]
        fn model_hash_is_the_hash_of_the_encoding(params in prop::collection::vec(any::<f32>(), 0..3000)) {
            prop_assert_eq!(model_hash(&params), crate::ids::sha256_hex(&encode_params(&params)));
        }

        #[test]
        fn encode_decode_round_trip(params in prop::collection::vec(-1e30f32..1e30, 0..200)) {
            let bytes = encode_params(&params);
            prop_assert_eq!(bytes.len(), params.len() * 4);
            prop_assert_eq!(decode_params(&bytes).unwrap(), params);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_params(&bytes);
        }
    }
}
