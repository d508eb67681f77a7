//! `tessera job metrics`: a job's evaluation metrics as a table an ML lead
//! loads into pandas, R or a spreadsheet, one row per model and source
//! (the pooled evaluation, then each site), instead of reading them off
//! `job status`.

use serde::Serialize;
use tessera_protocol::pb;

/// What `job metrics` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Comma-separated, with a header; an undefined value is an empty cell.
    Csv,
    /// A JSON array of objects with the same fields; undefined is `null`.
    Json,
}

/// One evaluation of one model: pooled over the sites (under secure
/// aggregation in secure jobs) or one site's own.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(crate) struct MetricRow {
    /// The round whose model was evaluated (0: the initial model).
    pub model_of_round: u32,
    /// `pooled`, or the site's id.
    pub source: String,
    /// How many sites the pooled row sums; empty for a site's row.
    pub n_sites: Option<u32>,
    pub n_test: u64,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    /// Undefined where the test rows have one class; pooled only for the
    /// final model (score histograms are summed once per job).
    pub roc_auc: Option<f64>,
    pub average_precision: Option<f64>,
    pub brier: Option<f64>,
    pub calibration_intercept: Option<f64>,
    pub calibration_slope: Option<f64>,
    /// The probability above which a row counts as predicted positive.
    pub threshold: Option<f64>,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
    pub ppv: Option<f64>,
    /// Pooled rows: the weighted training loss of the round that trained
    /// from this model (securely summed in secure jobs).
    pub train_loss: Option<f64>,
}

/// The column names, for the header of an empty CSV.
const COLUMNS: [&str; 16] = [
    "model_of_round",
    "source",
    "n_sites",
    "n_test",
    "accuracy",
    "loss",
    "roc_auc",
    "average_precision",
    "brier",
    "calibration_intercept",
    "calibration_slope",
    "threshold",
    "sensitivity",
    "specificity",
    "ppv",
    "train_loss",
];

fn defined(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl MetricRow {
    /// A row with the clinical metrics of `binary` (from a site on older
    /// software: none but the ROC AUC it sent as `auc`).
    fn with_binary(mut self, binary: Option<&pb::BinaryMetrics>) -> Self {
        if let Some(b) = binary {
            self.roc_auc = b.roc_auc;
            self.average_precision = b.average_precision;
            self.brier = b.brier;
            self.calibration_intercept = b.calibration_intercept;
            self.calibration_slope = b.calibration_slope;
            self.threshold = Some(b.threshold);
            self.sensitivity = b.sensitivity;
            self.specificity = b.specificity;
            self.ppv = b.ppv;
        }
        self
    }
}

/// The rows of a job's status, by model, the pooled row first, then the
/// sites by id.
pub(crate) fn rows(status: &pb::JobStatusResponse) -> Vec<MetricRow> {
    let train_loss = |model_of_round: u32| {
        status
            .rounds
            .iter()
            .find(|r| r.round == model_of_round + 1)
            .and_then(|r| defined(r.mean_train_loss))
    };
    let pooled = status.pooled.iter().map(|p| {
        let model_of_round = p.round.saturating_sub(1);
        MetricRow {
            model_of_round,
            source: "pooled".to_owned(),
            n_sites: Some(p.n_sites),
            n_test: p.n_test,
            accuracy: defined(p.accuracy),
            loss: defined(p.loss),
            train_loss: train_loss(model_of_round),
            ..MetricRow::default()
        }
        .with_binary(p.binary.as_ref())
    });
    let sites = status.metrics.iter().map(|m| {
        MetricRow {
            model_of_round: m.round.saturating_sub(1),
            source: m.site_id.clone(),
            n_test: m.n_test,
            accuracy: defined(m.accuracy),
            loss: defined(m.loss),
            roc_auc: defined(m.auc),
            ..MetricRow::default()
        }
        .with_binary(m.binary.as_ref())
    });
    let mut rows: Vec<MetricRow> = pooled.chain(sites).collect();
    rows.sort_by(|a, b| {
        (a.model_of_round, a.source != "pooled", &a.source).cmp(&(b.model_of_round, b.source != "pooled", &b.source))
    });
    rows
}

/// The rows in `format`.
pub(crate) fn render(rows: &[MetricRow], format: Format) -> anyhow::Result<Vec<u8>> {
    match format {
        Format::Json => {
            let mut out = serde_json::to_vec_pretty(rows)?;
            out.push(b'\n');
            Ok(out)
        }
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(Vec::new());
            if rows.is_empty() {
                writer.write_record(COLUMNS)?;
            }
            for row in rows {
                writer.serialize(row)?;
            }
            Ok(writer.into_inner().map_err(|e| e.into_error())?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "model_of_round,source,n_sites,n_test,accuracy,loss,roc_auc,average_precision,brier,\
                          calibration_intercept,calibration_slope,threshold,sensitivity,specificity,ppv,train_loss";

    fn status() -> pb::JobStatusResponse {
        let site = |round, site_id: &str, accuracy, auc| pb::SiteMetrics {
            round,
            site_id: site_id.into(),
            n_test: 10,
            loss: 0.5,
            accuracy,
            auc,
            model_hash: String::new(),
            binary: None,
        };
        pb::JobStatusResponse {
            metrics: vec![
                site(2, "va", 0.75, f64::NAN),
                site(1, "va", 0.5, 0.625),
                site(1, "cleveland", 0.25, 0.5),
            ],
            pooled: vec![
                pb::PooledMetrics {
                    round: 2,
                    n_sites: 2,
                    n_test: 20,
                    accuracy: 0.125,
                    loss: f64::NAN,
                    binary: Some(pb::BinaryMetrics {
                        roc_auc: Some(0.75),
                        brier: Some(0.125),
                        threshold: 0.5,
                        ..Default::default()
                    }),
                },
                pb::PooledMetrics {
                    round: 1,
                    n_sites: 2,
                    n_test: 20,
                    accuracy: 0.375,
                    loss: 0.25,
                    binary: None,
                },
            ],
            rounds: vec![pb::RoundSummary {
                round: 1,
                mean_train_loss: 0.5,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// By model, pooled first, sites by id; undefined values are empty
    /// cells in CSV and `null` in JSON, never NaN.
    #[test]
    fn metrics_come_out_by_model_pooled_first_and_undefined_as_empty() {
        let rows = rows(&status());
        let order: Vec<(u32, &str)> = rows.iter().map(|r| (r.model_of_round, r.source.as_str())).collect();
        assert_eq!(
            order,
            [(0, "pooled"), (0, "cleveland"), (0, "va"), (1, "pooled"), (1, "va")]
        );
        let csv = String::from_utf8(render(&rows, Format::Csv).unwrap()).unwrap();
        assert_eq!(
            csv,
            format!(
                "{HEADER}\n\
                 0,pooled,2,20,0.375,0.25,,,,,,,,,,0.5\n\
                 0,cleveland,,10,0.25,0.5,0.5,,,,,,,,,\n\
                 0,va,,10,0.5,0.5,0.625,,,,,,,,,\n\
                 1,pooled,2,20,0.125,,0.75,,0.125,,,0.5,,,,\n\
                 1,va,,10,0.75,0.5,,,,,,,,,,\n"
            )
        );
        let json: serde_json::Value = serde_json::from_slice(&render(&rows, Format::Json).unwrap()).unwrap();
        assert_eq!(json[3]["loss"], serde_json::Value::Null);
        assert_eq!(json[4]["roc_auc"], serde_json::Value::Null);
        assert_eq!(json[2]["roc_auc"], 0.625);
        assert_eq!(json.as_array().unwrap().len(), 5);
    }

    /// A job without metrics yet still gives a CSV header.
    #[test]
    fn no_metrics_is_a_header_alone() {
        let csv = render(&[], Format::Csv).unwrap();
        assert_eq!(csv, format!("{HEADER}\n").as_bytes());
    }
}
