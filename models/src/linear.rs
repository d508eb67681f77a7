//! Logistic regression trained without an autodiff graph.
//!
//! A one-layer model's gradient has a closed form, `Xᵀ(σ(Xw + b) − y) / B`,
//! so building Burn's graph for every minibatch of 256 rows costs far more
//! than the arithmetic (issue 13's 1M rows/s per core, issue 14's per-batch
//! overheads). This learner computes that gradient straight on the rows of
//! the shuffle buffer and applies the same SGD and Adam updates as Burn's
//! optimisers (Burn 0.22's defaults: plain SGD; Adam with β₁ 0.9, β₂ 0.999,
//! ε 1e-5), so a job trains to the same weights, up to float rounding,
//! whichever path runs it. `train::tests` holds the two paths side by side.

use tessera_protocol::job::OptimizerKind;

use crate::data::Dataset;

const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// Weights, optimiser state and scratch space of one local training run.
pub(crate) struct LinearLearner {
    /// The weights followed by the bias: the layout's flat order.
    params: Vec<f32>,
    /// The global model and FedProx μ, when the proximal term is on.
    anchor: Option<(Vec<f32>, f32)>,
    learning_rate: f32,
    /// The weight of a positive row's loss and gradient.
    pos_weight: f32,
    adam: Option<Adam>,
    grad: Vec<f32>,
}

struct Adam {
    moment_1: Vec<f32>,
    moment_2: Vec<f32>,
    time: i32,
}

impl LinearLearner {
    /// Starts from `global` (`n_features` weights, then the bias).
    pub(crate) fn new(
        global: &[f32],
        optimizer: OptimizerKind,
        learning_rate: f64,
        proximal_mu: f64,
        pos_weight: f64,
    ) -> Self {
        let n = global.len();
        Self {
            params: global.to_vec(),
            anchor: (proximal_mu > 0.0).then(|| (global.to_vec(), proximal_mu as f32)),
            learning_rate: learning_rate as f32,
            pos_weight: pos_weight as f32,
            adam: matches!(optimizer, OptimizerKind::Adam).then(|| Adam {
                moment_1: vec![0.0; n],
                moment_2: vec![0.0; n],
                time: 0,
            }),
            grad: vec![0.0; n],
        }
    }

    /// One optimiser step on the rows `batch` of `data`; returns their mean
    /// binary cross-entropy before the step (without the proximal term).
    ///
    /// On a core with AVX2 the same code runs on 256-bit registers: the dot
    /// product's eight lanes are one register there and two elsewhere, and
    /// no multiply-add is fused, so every core computes the same bits.
    pub(crate) fn step(&mut self, data: &Dataset, batch: &[usize]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.step_avx2(data, batch) };
        }
        self.step_portable(data, batch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn step_avx2(&mut self, data: &Dataset, batch: &[usize]) -> f64 {
        self.step_portable(data, batch)
    }

    #[inline(always)]
    fn step_portable(&mut self, data: &Dataset, batch: &[usize]) -> f64 {
        let width = data.n_features;
        let (weights, bias) = self.params.split_at(width);
        let bias = bias[0];
        let scale = 1.0 / batch.len() as f32;
        self.grad.fill(0.0);
        let (grad_w, grad_b) = self.grad.split_at_mut(width);
        let mut loss = 0.0f64;
        for (k, &i) in batch.iter().enumerate() {
            // The rows come in shuffled order from a buffer larger than the
            // cache: ask for a row a few steps ahead, so that it is there
            // when its turn comes (waiting for each row's first line was
            // two thirds of a step).
            if let Some(&ahead) = batch.get(k + PREFETCH_AHEAD) {
                prefetch(data.row(ahead));
            }
            let row = data.row(i);
            let z = dot(row, weights) + bias;
            let y = data.labels[i];
            // 1.0 for a negative (and for every row when unweighted): the
            // products below are then exact, and the step the plain one.
            let weight = if y > 0.5 { self.pos_weight } else { 1.0 };
            loss += f64::from(weight) * bce_with_logit(z, y);
            let residual = weight * (sigmoid(z) - y) * scale;
            axpy(residual, row, grad_w);
            grad_b[0] += residual;
        }
        if let Some((anchor, mu)) = &self.anchor {
            for ((g, p), a) in self.grad.iter_mut().zip(&self.params).zip(anchor) {
                *g += mu * (p - a);
            }
        }
        let lr = self.learning_rate;
        match &mut self.adam {
            None => axpy(-lr, &self.grad, &mut self.params),
            Some(adam) => adam.step(lr, &self.grad, &mut self.params),
        }
        loss / batch.len() as f64
    }

    /// The trained weights in the layout's flat order.
    pub(crate) fn into_params(self) -> Vec<f32> {
        self.params
    }
}

impl Adam {
    fn step(&mut self, lr: f32, grad: &[f32], params: &mut [f32]) {
        self.time += 1;
        let bias_correction_2 = (1.0 - BETA_2.powi(self.time)).sqrt();
        let factor = bias_correction_2 / (1.0 - BETA_1.powi(self.time));
        let epsilon = EPSILON * bias_correction_2;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.moment_1)
            .zip(&mut self.moment_2)
        {
            *m = *m * BETA_1 + g * (1.0 - BETA_1);
            *v = *v * BETA_2 + g * g * (1.0 - BETA_2);
            *p -= lr * (*m * factor / (v.sqrt() + epsilon));
        }
    }
}

/// How many rows ahead [`LinearLearner::step`] prefetches.
const PREFETCH_AHEAD: usize = 4;

/// Asks the core to bring `row`'s cache lines in (a hint: no effect on any
/// result, none where the architecture has no such instruction).
#[inline(always)]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch reads nothing and cannot fault; the address
        // is that of a live slice.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Dot product in eight independent lanes, so that the compiler can keep
/// them in one vector register (a single accumulator cannot be vectorised
/// without reordering the float additions).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out += alpha · x`.
#[inline(always)]
fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// `−[y·log σ(z) + (1 − y)·log σ(−z)]`, stable for large |z|.
fn bce_with_logit(z: f32, y: f32) -> f64 {
    let (z, y) = (f64::from(z), f64::from(y));
    // log σ(z) = −log(1 + e^(−z)) = min(z, 0) − log(1 + e^(−|z|)).
    let log_sigmoid = |t: f64| t.min(0.0) - (-t.abs()).exp().ln_1p();
    -(y * log_sigmoid(z) + (1.0 - y) * log_sigmoid(-z))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_gradient_step_matches_a_hand_computation() {
        // Two rows, two features, w = [1, -1], b = 0.5, SGD with lr 0.1.
        let data = Dataset {
            features: vec![1.0, 2.0, -1.0, 0.5],
            labels: vec![1.0, 0.0],
            ..Dataset::empty(2)
        };
        let mut learner = LinearLearner::new(&[1.0, -1.0, 0.5], OptimizerKind::Sgd, 0.1, 0.0, 1.0);
        let loss = learner.step(&data, &[0, 1]);
        // z = [1 - 2 + 0.5, -1 - 0.5 + 0.5] = [-0.5, -1.0]
        let (s0, s1) = (sigmoid(-0.5), sigmoid(-1.0));
        let (r0, r1) = ((s0 - 1.0) / 2.0, s1 / 2.0);
        let expected = [
            1.0 - 0.1 * (r0 - r1),
            -1.0 - 0.1 * (r0 * 2.0 + r1 * 0.5),
            0.5 - 0.1 * (r0 + r1),
        ];
        let params = learner.into_params();
        for (got, want) in params.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{params:?} vs {expected:?}");
        }
        let want_loss = (-(f64::from(s0)).ln() - (1.0 - f64::from(s1)).ln()) / 2.0;
        assert!((loss - want_loss).abs() < 1e-6, "{loss} vs {want_loss}");
    }

    proptest! {
        #[test]
        fn dot_and_bce_agree_with_the_plain_formulas(
            values in prop::collection::vec(-4.0f32..4.0, 0..40),
            z in -60.0f32..60.0,
            y in prop::sample::select(vec![0.0f32, 1.0]),
        ) {
            let half = values.len() / 2;
            let (a, b) = (&values[..half], &values[half..2 * half]);
            let plain: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            prop_assert!((dot(a, b) - plain).abs() <= 1e-4 * (1.0 + plain.abs()));
            let p = 1.0 / (1.0 + (-f64::from(z)).exp());
            let plain = -(f64::from(y) * p.ln() + (1.0 - f64::from(y)) * (1.0 - p).ln());
            let stable = bce_with_logit(z, y);
            prop_assert!(stable.is_finite());
            // The plain formula loses digits to `1 − p` as |z| grows; where
            // it still has them, both agree.
            if plain < 20.0 {
                prop_assert!((stable - plain).abs() <= 1e-7 * (1.0 + plain), "{} vs {}", stable, plain);
            }
        }
    }
}
