//! Burn networks whose parameters map one-to-one onto the flat vector order
//! defined by [`Layout`]: layer after layer, weight (row-major `[d_in, d_out]`)
//! then bias.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::relu;
use tessera_protocol::model::{DenseShape, Layout};

/// One dense layer `x W + b`.
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

/// A stack of dense layers with ReLU between them, ending in one logit.
/// Logistic regression is the one-layer case.
#[derive(Module, Debug)]
pub struct Net {
    pub layers: Vec<Dense>,
}

/// A flat vector that does not fit the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("parameter vector has {got} values, the model layout needs {expected}")]
pub struct ShapeError {
    pub expected: usize,
    pub got: usize,
}

impl Net {
    /// Builds the network of `layout` holding `params`.
    pub fn from_flat(layout: &Layout, params: &[f32], device: &Device) -> Result<Self, ShapeError> {
        let expected = layout.n_params();
        if params.len() != expected {
            return Err(ShapeError {
                expected,
                got: params.len(),
            });
        }
        let mut offset = 0;
        let mut layers = Vec::with_capacity(layout.layers.len());
        for &DenseShape { d_in, d_out } in &layout.layers {
            let w = params[offset..offset + d_in * d_out].to_vec();
            offset += d_in * d_out;
            let b = params[offset..offset + d_out].to_vec();
            offset += d_out;
            layers.push(Dense {
                weight: Param::from_data(TensorData::new(w, [d_in, d_out]), device),
                bias: Param::from_data(TensorData::new(b, [d_out]), device),
            });
        }
        Ok(Self { layers })
    }

    /// The parameters in layout order.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat = Vec::new();
        for layer in &self.layers {
            flat.extend(tensor_values(layer.weight.val().into_data()));
            flat.extend(tensor_values(layer.bias.val().into_data()));
        }
        flat
    }

    /// Logits of shape `[batch, 1]`.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (i, layer) in self.layers.iter().enumerate() {
            x = x.matmul(layer.weight.val()) + layer.bias.val().unsqueeze_dim(0);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

fn tensor_values(data: TensorData) -> Vec<f32> {
    // The tensors were created from f32 data on a float backend, so the
    // conversion cannot fail.
    data.convert::<f32>().try_to_vec::<f32>().expect("float tensor data")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tessera_protocol::model::ModelSpec;

    fn device() -> Device {
        crate::default_device()
    }

    #[test]
    fn wrong_length_is_refused() {
        let layout = ModelSpec::LogisticRegression.layout(3);
        let err = Net::from_flat(&layout, &[0.0; 5], &device()).unwrap_err();
        assert_eq!(err, ShapeError { expected: 4, got: 5 });
    }

    #[test]
    fn forward_matches_hand_computation() {
        // 2 inputs -> 2 hidden (ReLU) -> 1 output.
        let layout = ModelSpec::Mlp { hidden: vec![2] }.layout(2);
        #[rustfmt::skip]
        let params = [
            1.0, -1.0,   // W1 row for x0
            2.0, 1.0,    // W1 row for x1
            0.5, 0.0,    // b1
            1.0, 3.0,    // W2
            -1.0,        // b2
        ];
        let net = Net::from_flat(&layout, &params, &device()).unwrap();
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 1.0], [1, 2]), &device());
        // h = relu([1+2+0.5, -1+1+0]) = [3.5, 0]; y = 3.5*1 + 0*3 - 1 = 2.5
        let y: Vec<f32> = tensor_values(net.forward(x).into_data());
        assert_eq!(y, vec![2.5]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn flatten_unflatten_round_trip(
            n_features in 1usize..6,
            hidden in prop::collection::vec(1usize..5, 0..3),
            seed in any::<u64>(),
        ) {
            let spec = if hidden.is_empty() { ModelSpec::LogisticRegression } else { ModelSpec::Mlp { hidden } };
            let layout = spec.layout(n_features);
            let params = tessera_protocol::model::initial_params(&layout, seed);
            let net = Net::from_flat(&layout, &params, &device()).unwrap();
            prop_assert_eq!(net.to_flat(), params);
        }
    }
}
