//! Local training and evaluation of a flat parameter vector on one site's data.

use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::log_sigmoid;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use tessera_protocol::job::{LocalWork, OptimizerKind, TrainingSpec};
use tessera_protocol::model::Layout;

use std::ops::ControlFlow;

use crate::data::Dataset;
use crate::linear::LinearLearner;
use crate::metrics::Evaluation;
use crate::net::{Net, ShapeError};
use crate::stream::Rows;

/// How one site trains in one round.
#[derive(Clone, Debug)]
pub struct LocalTraining<'a> {
    pub layout: &'a Layout,
    pub spec: &'a TrainingSpec,
    /// FedProx μ; 0 disables the proximal term.
    pub proximal_mu: f64,
    /// Seeds the minibatch order (vary it per site and round).
    pub seed: u64,
    /// The weight of a positive row's loss (1: the plain loss), resolved
    /// from the job's `pos_weight` (`stats::ClassCounts::pos_weight`).
    pub pos_weight: f64,
}

/// The result of local training: new weights and the sample count that
/// weights them in FedAvg.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    pub params: Vec<f32>,
    pub n_samples: usize,
    /// Mean minibatch loss (without the proximal term) over local training.
    pub train_loss: f64,
}

/// Why training could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error("the training split is empty")]
    NoData,
    #[error("data has {got} features, the model expects {expected}")]
    Width { expected: usize, got: usize },
    /// A pass over the site's data failed (its file became unreadable):
    /// kept whole, so the site can tell the coordinator its public reason.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Rows shuffled together in local training: the rows of one pass are read
/// in file order into a buffer of this many rows, which is shuffled and
/// trained on (its last incomplete minibatch carries over). A split of up
/// to this size is shuffled whole each epoch; a larger one is shuffled
/// within windows of this size (about 34 MiB for a 131-feature table).
pub const SHUFFLE_ROWS: usize = 65_536;

/// Trains from `global` on `data` (already standardised) and returns the new
/// weights. Deterministic for a given seed, and the same for the same rows
/// whether they are in memory or streamed from a file (`crate::stream`).
pub fn train_local(
    cfg: &LocalTraining<'_>,
    global: &[f32],
    data: &dyn Rows,
    device: &Device,
) -> Result<LocalUpdate, TrainError> {
    train_with(cfg, global, data, device, Engine::for_layout(cfg.layout))
}

fn train_with(
    cfg: &LocalTraining<'_>,
    global: &[f32],
    data: &dyn Rows,
    device: &Device,
    engine: Engine,
) -> Result<LocalUpdate, TrainError> {
    let n = data.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    check_width(cfg.layout, data.n_features())?;
    let mut learner = Learner::new(cfg, global, device, engine)?;
    let batch_size = cfg.spec.batch_size.min(n);
    let total_steps = match cfg.spec.local_work {
        LocalWork::Epochs(e) => e as usize * n.div_ceil(batch_size),
        LocalWork::Steps(s) => s as usize,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let (mut loss_sum, mut loss_count) = (0.0, 0usize);
    let mut step = 0;
    // Shuffles the buffer and trains on its minibatches; unless the pass
    // is over, an incomplete last minibatch stays in the buffer. The
    // buffer and the order keep their memory from window to window (a
    // 34 MiB buffer allocated anew each time cost page faults and copies).
    let mut order: Vec<usize> = Vec::new();
    let mut drain = |buffer: &mut Dataset, end_of_pass: bool, step: &mut usize| {
        order.clear();
        order.extend(0..buffer.len());
        order.shuffle(&mut rng);
        let mut rest: &[usize] = &[];
        for batch in order.chunks(batch_size) {
            if *step >= total_steps {
                break;
            }
            if batch.len() < batch_size && !end_of_pass {
                rest = batch;
                break;
            }
            loss_sum += learner.step(buffer, batch);
            loss_count += 1;
            *step += 1;
        }
        let kept = buffer.select(rest);
        buffer.features.clear();
        buffer.labels.clear();
        buffer.features.extend_from_slice(&kept.features);
        buffer.labels.extend_from_slice(&kept.labels);
    };
    let mut buffer = Dataset::empty(data.n_features());
    let rows = n.min(SHUFFLE_ROWS);
    buffer.features.reserve_exact(rows * data.n_features());
    buffer.labels.reserve_exact(rows);
    while step < total_steps {
        data.scan(&mut |batch| {
            // The buffer is drained at exactly SHUFFLE_ROWS rows, wherever
            // the source's batches end.
            let width = batch.n_features.max(1);
            let mut from = 0;
            while from < batch.len() && step < total_steps {
                let take = (SHUFFLE_ROWS - buffer.len()).min(batch.len() - from);
                buffer
                    .features
                    .extend_from_slice(&batch.features[from * width..(from + take) * width]);
                buffer.labels.extend_from_slice(&batch.labels[from..from + take]);
                from += take;
                if buffer.len() == SHUFFLE_ROWS {
                    drain(&mut buffer, false, &mut step);
                }
            }
            if step >= total_steps {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        drain(&mut buffer, true, &mut step);
    }
    Ok(LocalUpdate {
        params: learner.into_params(),
        n_samples: n,
        train_loss: if loss_count > 0 {
            loss_sum / loss_count as f64
        } else {
            f64::NAN
        },
    })
}

/// Which code computes the minibatch steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// The closed-form gradient of a one-layer model (`crate::linear`).
    Linear,
    /// Burn's autodiff graph: any layout.
    Graph,
}

impl Engine {
    fn for_layout(layout: &Layout) -> Self {
        match layout.layers.as_slice() {
            [only] if only.d_out == 1 => Engine::Linear,
            _ => Engine::Graph,
        }
    }
}

/// The model being trained and its optimiser.
enum Learner<'d> {
    Linear(LinearLearner),
    Graph(GraphLearner<'d>),
}

/// A network trained through Burn's autodiff, one graph per minibatch.
struct GraphLearner<'d> {
    model: Option<Net>,
    optimizer: ModuleOptimizer,
    /// The global model's tensors, when the proximal term is on.
    anchor: Option<Vec<(Tensor<2>, Tensor<1>)>>,
    proximal_mu: f64,
    learning_rate: f64,
    pos_weight: f64,
    device: &'d Device,
}

impl<'d> Learner<'d> {
    fn new(cfg: &LocalTraining<'_>, global: &[f32], device: &'d Device, engine: Engine) -> Result<Self, TrainError> {
        if engine == Engine::Linear {
            // The width was checked against the layout, and the layout
            // against the vector here, so the learner's split is right.
            Net::from_flat(cfg.layout, global, device)?;
            return Ok(Learner::Linear(LinearLearner::new(
                global,
                cfg.spec.optimizer,
                cfg.spec.learning_rate,
                cfg.proximal_mu,
                cfg.pos_weight,
            )));
        }
        Ok(Learner::Graph(GraphLearner {
            model: Some(Net::from_flat(cfg.layout, global, device)?),
            optimizer: match cfg.spec.optimizer {
                OptimizerKind::Sgd => SgdConfig::new().init(),
                OptimizerKind::Adam => AdamConfig::new().init(),
            },
            anchor: (cfg.proximal_mu > 0.0).then(|| anchor_tensors(cfg.layout, global, device)),
            proximal_mu: cfg.proximal_mu,
            learning_rate: cfg.spec.learning_rate,
            pos_weight: cfg.pos_weight,
            device,
        }))
    }

    /// One optimiser step on the rows `batch` of `data`; returns their mean
    /// loss (without the proximal term).
    fn step(&mut self, data: &Dataset, batch: &[usize]) -> f64 {
        match self {
            Learner::Linear(learner) => learner.step(data, batch),
            Learner::Graph(g) => {
                let (x, y) = batch_tensors(data, batch, g.device);
                let net = g.model.take().expect("model present between steps");
                let data_loss = bce_loss(net.forward(x), y, g.pos_weight);
                let loss_value = f64::from(data_loss.clone().into_scalar::<f32>());
                let loss = match &g.anchor {
                    Some(anchor) => data_loss + proximal_term(&net, anchor) * (g.proximal_mu / 2.0),
                    None => data_loss,
                };
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                g.model = Some(g.optimizer.step(g.learning_rate, net, grads));
                loss_value
            }
        }
    }

    fn into_params(self) -> Vec<f32> {
        match self {
            Learner::Linear(learner) => learner.into_params(),
            Learner::Graph(g) => g.model.expect("model present after training").to_flat(),
        }
    }
}

/// `params` judged on `data` at `threshold`, in one pass (the scores are
/// kept for the ranking metrics: 8 bytes per row).
pub fn evaluate(
    layout: &Layout,
    params: &[f32],
    data: &dyn Rows,
    threshold: f64,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let (logits, labels) = score(layout, params, data, device)?;
    Ok(Evaluation::of_scores(&logits, &labels, threshold))
}

/// The logits of `params` on every row of `data`, and the rows' labels.
pub fn score(
    layout: &Layout,
    params: &[f32],
    data: &dyn Rows,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    check_width(layout, data.n_features())?;
    let model = Net::from_flat(layout, params, device)?;
    let (mut logits, mut labels) = (Vec::with_capacity(data.len()), Vec::with_capacity(data.len()));
    data.scan(&mut |batch| {
        logits.extend(logits_of(&model, batch, device));
        labels.extend_from_slice(&batch.labels);
        ControlFlow::Continue(())
    })?;
    Ok((logits, labels))
}

/// Logits of `params` on every row of `data`, in row order.
pub fn predict_logits(
    layout: &Layout,
    params: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<Vec<f32>, TrainError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let model = Net::from_flat(layout, params, device)?;
    Ok(logits_of(&model, data, device))
}

fn logits_of(model: &Net, data: &Dataset, device: &Device) -> Vec<f32> {
    if data.is_empty() {
        return Vec::new();
    }
    let x = Tensor::<2>::from_data(
        TensorData::new(data.features.clone(), [data.len(), data.n_features]),
        device,
    );
    let out = model.forward(x).into_data();
    out.convert::<f32>().try_to_vec::<f32>().expect("float logits")
}

fn check_width(layout: &Layout, n_features: usize) -> Result<(), TrainError> {
    let expected = layout.layers.first().map_or(0, |l| l.d_in);
    if n_features != expected {
        return Err(TrainError::Width {
            expected,
            got: n_features,
        });
    }
    Ok(())
}

fn batch_tensors(data: &Dataset, batch: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut x = Vec::with_capacity(batch.len() * data.n_features);
    let mut y = Vec::with_capacity(batch.len());
    for &i in batch {
        x.extend_from_slice(data.row(i));
        y.push(data.labels[i]);
    }
    (
        Tensor::from_data(TensorData::new(x, [batch.len(), data.n_features]), device),
        Tensor::from_data(TensorData::new(y, [batch.len(), 1]), device),
    )
}

/// Mean binary cross-entropy on logits: `−[y·logσ(z) + (1−y)·logσ(−z)]`.
/// Mean binary cross-entropy, a positive row's term weighted by
/// `pos_weight` (left out of the graph when it is 1, so the plain loss is
/// computed exactly as before).
fn bce_loss(logits: Tensor<2>, labels: Tensor<2>, pos_weight: f64) -> Tensor<1> {
    let mut positive = log_sigmoid(logits.clone()) * labels.clone();
    if pos_weight != 1.0 {
        positive = positive * pos_weight;
    }
    let negative = log_sigmoid(logits.neg()) * (labels.neg() + 1.0);
    (positive + negative).neg().mean()
}

/// The global model's tensors, as constants (no gradient).
fn anchor_tensors(layout: &Layout, global: &[f32], device: &Device) -> Vec<(Tensor<2>, Tensor<1>)> {
    let mut offset = 0;
    layout
        .layers
        .iter()
        .map(|l| {
            let w = global[offset..offset + l.d_in * l.d_out].to_vec();
            offset += l.d_in * l.d_out;
            let b = global[offset..offset + l.d_out].to_vec();
            offset += l.d_out;
            (
                Tensor::from_data(TensorData::new(w, [l.d_in, l.d_out]), device),
                Tensor::from_data(TensorData::new(b, [l.d_out]), device),
            )
        })
        .collect()
}

/// `||w − w_global||²` over all layers.
fn proximal_term(model: &Net, anchor: &[(Tensor<2>, Tensor<1>)]) -> Tensor<1> {
    let mut total: Option<Tensor<1>> = None;
    for (layer, (w0, b0)) in model.layers.iter().zip(anchor) {
        let term = (layer.weight.val() - w0.clone()).square().sum() + (layer.bias.val() - b0.clone()).square().sum();
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    total.expect("a model has at least one layer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;
    use tessera_protocol::job::PosWeight;
    use tessera_protocol::model::{ModelSpec, initial_params};

    /// Linearly separable data: label = x0 > 0.
    fn separable(n: usize) -> Dataset {
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let x0 = (i as f32 / n as f32) * 2.0 - 1.0 + 0.01;
            features.extend([x0, ((i * 7) % 5) as f32 / 5.0]);
            labels.push(if x0 > 0.0 { 1.0 } else { 0.0 });
        }
        Dataset {
            features,
            labels,
            ..Dataset::empty(2)
        }
    }

    fn spec(optimizer: OptimizerKind, epochs: u32) -> TrainingSpec {
        TrainingSpec {
            optimizer,
            learning_rate: 0.1,
            batch_size: 16,
            local_work: LocalWork::Epochs(epochs),
            pos_weight: PosWeight::default(),
        }
    }

    #[test]
    fn training_learns_a_separable_problem() {
        let device = crate::default_device();
        let data = separable(200);
        for (model, optimizer) in [
            (ModelSpec::LogisticRegression, OptimizerKind::Sgd),
            (ModelSpec::Mlp { hidden: vec![8] }, OptimizerKind::Adam),
        ] {
            let layout = model.layout(2);
            let init = initial_params(&layout, 3);
            let before = evaluate(&layout, &init, &data, 0.5, &device).unwrap();
            let spec = spec(optimizer, 20);
            let cfg = LocalTraining {
                layout: &layout,
                spec: &spec,
                proximal_mu: 0.0,
                seed: 1,
                pos_weight: 1.0,
            };
            let update = train_local(&cfg, &init, &data, &device).unwrap();
            let after = evaluate(&layout, &update.params, &data, 0.5, &device).unwrap();
            assert_eq!(update.n_samples, 200);
            assert!(after.loss < before.loss, "{model:?}: {} !< {}", after.loss, before.loss);
            assert!(after.accuracy >= 0.95, "{model:?}: accuracy {}", after.accuracy);
            assert!(after.auc() >= 0.98);
        }
    }

    proptest! {
        // A fixed seed: Adam's first step is about `lr · sign(g)`, so a
        // gradient coordinate within float rounding of zero can flip it in
        // one engine and not the other. Random seeds would meet such a
        // case now and then; these 48 cases are checked to have none.
        #![proptest_config(ProptestConfig {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(20261207),
            ..ProptestConfig::default()
        })]
        /// The closed-form learner is an optimisation of the graph one: on
        /// random data, optimisers, FedProx μ, class weights and batch sizes, both end at
        /// the same weights and report the same loss, up to float rounding.
        #[test]
        fn the_linear_learner_trains_as_burns_graph_does(
            n_features in 1usize..20,
            n_rows in 1usize..150,
            adam in any::<bool>(),
            mu in prop::sample::select(vec![0.0, 0.5]),
            pos_weight in prop::sample::select(vec![1.0, 4.5]),
            batch_size in 1usize..40,
            epochs in 1u32..3,
            seed in any::<u64>(),
        ) {
            let device = crate::default_device();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let data = Dataset {
                features: (0..n_rows * n_features).map(|_| rng.random_range(-3.0f32..3.0)).collect(),
                labels: (0..n_rows).map(|_| f32::from(u8::from(rng.random_bool(0.3)))).collect(),
                ..Dataset::empty(n_features)
            };
            let layout = ModelSpec::LogisticRegression.layout(n_features);
            let init = initial_params(&layout, seed);
            let spec = TrainingSpec {
                optimizer: if adam { OptimizerKind::Adam } else { OptimizerKind::Sgd },
                learning_rate: 0.05,
                batch_size,
                local_work: LocalWork::Epochs(epochs),
                pos_weight: PosWeight::default(),
            };
            let cfg = LocalTraining { layout: &layout, spec: &spec, proximal_mu: mu, seed, pos_weight };
            prop_assert_eq!(Engine::for_layout(&layout), Engine::Linear);
            let linear = train_with(&cfg, &init, &data, &device, Engine::Linear).unwrap();
            let graph = train_with(&cfg, &init, &data, &device, Engine::Graph).unwrap();
            for (a, b) in linear.params.iter().zip(&graph.params) {
                prop_assert!((a - b).abs() <= 2e-4 * (1.0 + b.abs()), "{:?} vs {:?}", linear.params, graph.params);
            }
            prop_assert!((linear.train_loss - graph.train_loss).abs() <= 1e-4 * (1.0 + graph.train_loss));
            prop_assert_eq!(linear.n_samples, graph.n_samples);
        }
    }

    /// A positive class weight above 1 makes positives cost more: the
    /// model then predicts a higher risk for every row, in both engines.
    #[test]
    fn a_positive_class_weight_raises_the_predicted_risk() {
        let device = crate::default_device();
        let mut data = separable(200);
        // Overlapping classes, 1 positive in 4: a weight has room to act.
        for (i, y) in data.labels.iter_mut().enumerate() {
            *y = f32::from(u8::from(i % 4 == 0));
        }
        for model in [ModelSpec::LogisticRegression, ModelSpec::Mlp { hidden: vec![4] }] {
            let layout = model.layout(2);
            let init = initial_params(&layout, 3);
            let spec = spec(OptimizerKind::Sgd, 20);
            let mean_logit = |pos_weight: f64| {
                let cfg = LocalTraining {
                    layout: &layout,
                    spec: &spec,
                    proximal_mu: 0.0,
                    seed: 1,
                    pos_weight,
                };
                let params = train_local(&cfg, &init, &data, &device).unwrap().params;
                let (logits, _) = score(&layout, &params, &data, &device).unwrap();
                logits.iter().map(|&z| f64::from(z)).sum::<f64>() / logits.len() as f64
            };
            let (plain, weighted) = (mean_logit(1.0), mean_logit(3.0));
            // ln 3 ≈ 1.1 is what a weight of 3 shifts an intercept-only model by.
            assert!(weighted > plain + 0.5, "{model:?}: {weighted} vs {plain}");
        }
    }

    #[test]
    fn training_is_deterministic_per_seed() {
        let device = crate::default_device();
        let data = separable(50);
        let layout = ModelSpec::LogisticRegression.layout(2);
        let init = initial_params(&layout, 0);
        let spec = spec(OptimizerKind::Sgd, 2);
        let run = |seed| {
            let cfg = LocalTraining {
                layout: &layout,
                spec: &spec,
                proximal_mu: 0.0,
                seed,
                pos_weight: 1.0,
            };
            train_local(&cfg, &init, &data, &device).unwrap().params
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn proximal_term_keeps_weights_closer_to_the_global_model() {
        let device = crate::default_device();
        let data = separable(100);
        let layout = ModelSpec::LogisticRegression.layout(2);
        let init = initial_params(&layout, 0);
        let spec = spec(OptimizerKind::Sgd, 10);
        let distance = |mu| {
            let cfg = LocalTraining {
                layout: &layout,
                spec: &spec,
                proximal_mu: mu,
                seed: 1,
                pos_weight: 1.0,
            };
            let p = train_local(&cfg, &init, &data, &device).unwrap().params;
            p.iter().zip(&init).map(|(a, b)| (a - b) * (a - b)).sum::<f32>()
        };
        assert!(distance(1.0) < 0.8 * distance(0.0));
    }

    #[test]
    fn local_steps_and_width_errors() {
        let device = crate::default_device();
        let data = separable(10);
        let layout = ModelSpec::LogisticRegression.layout(3);
        let init = initial_params(&layout, 0);
        let spec = TrainingSpec {
            local_work: LocalWork::Steps(3),
            ..spec(OptimizerKind::Sgd, 1)
        };
        let cfg = LocalTraining {
            layout: &layout,
            spec: &spec,
            proximal_mu: 0.0,
            seed: 1,
            pos_weight: 1.0,
        };
        assert!(matches!(
            train_local(&cfg, &init, &data, &device).unwrap_err(),
            TrainError::Width { expected: 3, got: 2 }
        ));
        let empty = Dataset::empty(3);
        assert!(matches!(
            train_local(&cfg, &init, &empty, &device).unwrap_err(),
            TrainError::NoData
        ));
    }
}
