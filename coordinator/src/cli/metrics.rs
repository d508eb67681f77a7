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
#[derive(Debug, PartialEq, Serialize)]
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
    /// A site's ROC AUC; undefined where its test split has one class,
    /// and not computed for pooled rows yet.
    pub roc_auc: Option<f64>,
}

fn defined(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The rows of a job's status, by model, the pooled row first, then the
/// sites by id.
pub(crate) fn rows(status: &pb::JobStatusResponse) -> Vec<MetricRow> {
    let pooled = status.pooled.iter().map(|p| MetricRow {
        model_of_round: p.round.saturating_sub(1),
        source: "pooled".to_owned(),
        n_sites: Some(p.n_sites),
        n_test: p.n_test,
        accuracy: defined(p.accuracy),
        loss: defined(p.loss),
        roc_auc: None,
    });
    let sites = status.metrics.iter().map(|m| MetricRow {
        model_of_round: m.round.saturating_sub(1),
        source: m.site_id.clone(),
        n_sites: None,
        n_test: m.n_test,
        accuracy: defined(m.accuracy),
        loss: defined(m.loss),
        roc_auc: defined(m.auc),
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
                writer.write_record([
                    "model_of_round",
                    "source",
                    "n_sites",
                    "n_test",
                    "accuracy",
                    "loss",
                    "roc_auc",
                ])?;
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

    fn status() -> pb::JobStatusResponse {
        let site = |round, site_id: &str, accuracy, auc| pb::SiteMetrics {
            round,
            site_id: site_id.into(),
            n_test: 10,
            loss: 0.5,
            accuracy,
            auc,
            model_hash: String::new(),
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
                },
                pb::PooledMetrics {
                    round: 1,
                    n_sites: 2,
                    n_test: 20,
                    accuracy: 0.375,
                    loss: 0.25,
                },
            ],
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
            "model_of_round,source,n_sites,n_test,accuracy,loss,roc_auc\n\
             0,pooled,2,20,0.375,0.25,\n\
             0,cleveland,,10,0.25,0.5,0.5\n\
             0,va,,10,0.5,0.5,0.625\n\
             1,pooled,2,20,0.125,,\n\
             1,va,,10,0.75,0.5,\n"
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
        assert_eq!(csv, b"model_of_round,source,n_sites,n_test,accuracy,loss,roc_auc\n");
    }
}
