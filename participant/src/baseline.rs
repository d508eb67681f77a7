//! The pooled baseline: the job's model trained centrally on the union of the
//! sites' training splits, evaluated on each site's test split. A research
//! tool for consortia (what would centralising the data have given?); it only
//! runs where all the data files are readable, e.g. the local demo.

use tessera_models::data::Dataset;
use tessera_models::metrics::Evaluation;
use tessera_models::stream::{Standardized, to_dataset};
use tessera_models::train::{LocalTraining, score, train_local};
use tessera_protocol::ids::SiteId;
use tessera_protocol::job::{JobSpec, LocalWork};
use tessera_protocol::model::initial_params;
use tessera_protocol::stats::{FeatureStats, Normalization};

use crate::local::LocalData;

/// The centrally trained model judged on each site's test split, and on
/// all of them pooled (exactly: here the scores are all in one process).
pub struct Baseline {
    pub per_site: Vec<(SiteId, Evaluation)>,
    pub mean_accuracy: f64,
    pub pooled: Evaluation,
}

/// Trains centrally for as many passes over the data as the federated job
/// makes (rounds × local epochs, or rounds × local steps).
pub fn pooled_baseline(job: &JobSpec, sites: &[(SiteId, LocalData)]) -> anyhow::Result<Baseline> {
    let train = Dataset::concat(
        &sites
            .iter()
            .map(|(_, d)| to_dataset(d.train.as_ref()))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let mut stats = FeatureStats::of_rows(train.n_features, train.rows());
    stats.add_labels(&train.labels);
    let normalization = Normalization::from_stats(&stats)?;
    let layout = job.model.layout(train.n_features);
    let mut spec = job.training.clone();
    spec.local_work = match spec.local_work {
        LocalWork::Epochs(e) => LocalWork::Epochs(e * job.rounds),
        LocalWork::Steps(s) => LocalWork::Steps(s * job.rounds),
    };
    let device = tessera_models::default_device();
    let cfg = LocalTraining {
        layout: &layout,
        spec: &spec,
        proximal_mu: 0.0,
        seed: job.seed,
        // "balanced" from the union's classes: what the cohort's secure
        // statistics give the federated sites.
        pos_weight: stats.classes().pos_weight(job.training.pos_weight)?,
    };
    let init = initial_params(&layout, job.seed);
    let trained = train_local(&cfg, &init, &train.standardized(&normalization), &device)?;
    let threshold = job.evaluation.threshold;
    let (mut per_site, mut all_logits, mut all_labels) = (Vec::new(), Vec::new(), Vec::new());
    for (site, data) in sites {
        let test = Standardized {
            rows: data.test.as_ref(),
            normalization: &normalization,
        };
        let (logits, labels) = score(&layout, &trained.params, &test, &device)?;
        per_site.push((site.clone(), Evaluation::of_scores(&logits, &labels, threshold)));
        all_logits.extend(logits);
        all_labels.extend(labels);
    }
    let mean_accuracy = per_site.iter().map(|s| s.1.accuracy).sum::<f64>() / per_site.len().max(1) as f64;
    Ok(Baseline {
        per_site,
        mean_accuracy,
        pooled: Evaluation::of_scores(&all_logits, &all_labels, threshold),
    })
}
