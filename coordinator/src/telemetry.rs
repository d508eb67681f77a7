//! What an operator's monitoring reads: Prometheus metrics at `/metrics`
//! (rounds and their duration, secure-aggregation stage timings, jobs by
//! outcome, connected sites, update and model bytes) and `/healthz`, on their own plain-HTTP address
//! (`--metrics-listen`), apart from the sites' mutual-TLS port. Only counts
//! and timings: never a record, an update, a site's metric or a key, so a
//! scraper needs no consortium identity.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::state::Shared;

/// A site heard from within this window counts as connected (sites poll
/// and send heartbeats every few seconds).
pub const CONNECTED_MS: u64 = 30_000;

/// The coordinator's metrics, updated where the events happen.
pub struct Telemetry {
    registry: Registry,
    rounds: Counter,
    round_seconds: Histogram,
    stage_seconds: Family<Vec<(String, String)>, Histogram>,
    jobs_ended: Family<Vec<(String, String)>, Counter>,
    update_bytes: Counter,
    model_bytes: Counter,
    sites_connected: Gauge,
    job_running: Gauge,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::default();
        let rounds = Counter::default();
        // 10 ms to about 11 minutes.
        let round_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 17));
        let stage_seconds: Family<Vec<(String, String)>, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 20)));
        let jobs_ended = Family::default();
        let (update_bytes, model_bytes) = (Counter::default(), Counter::default());
        let (sites_connected, job_running) = (Gauge::default(), Gauge::default());
        registry.register(
            "tessera_rounds",
            "Training rounds recorded (with their model and ledger blocks)",
            rounds.clone(),
        );
        registry.register(
            "tessera_round_duration_seconds",
            "Time from a round's announcement to its recorded model",
            round_seconds.clone(),
        );
        registry.register(
            "tessera_secagg_stage_duration_seconds",
            "Time each secure-aggregation stage stayed open, by stage",
            stage_seconds.clone(),
        );
        registry.register(
            "tessera_jobs_ended",
            "Jobs that ended, by status (finished, failed, cancelled)",
            jobs_ended.clone(),
        );
        registry.register(
            "tessera_update_bytes_received",
            "Bytes of updates and masked inputs received from sites",
            update_bytes.clone(),
        );
        registry.register(
            "tessera_model_bytes_sent",
            "Bytes of models and aggregates sent to sites",
            model_bytes.clone(),
        );
        registry.register(
            "tessera_sites_connected",
            "Sites heard from in the last 30 seconds",
            sites_connected.clone(),
        );
        registry.register(
            "tessera_job_running",
            "1 while a job runs (one at a time), else 0",
            job_running.clone(),
        );
        Self {
            registry,
            rounds,
            round_seconds,
            stage_seconds,
            jobs_ended,
            update_bytes,
            model_bytes,
            sites_connected,
            job_running,
        }
    }
}

impl Telemetry {
    /// A training round was recorded, `millis` after it was announced.
    pub fn round_recorded(&self, millis: u64) {
        self.rounds.inc();
        self.round_seconds.observe(millis as f64 / 1000.0);
    }

    /// A secure-aggregation stage closed after `millis`.
    pub fn stage_closed(&self, stage: &str, millis: u64) {
        self.stage_seconds
            .get_or_create(&vec![("stage".to_owned(), stage.to_owned())])
            .observe(millis as f64 / 1000.0);
    }

    /// A job ended with `status`.
    pub fn job_ended(&self, status: &str) {
        self.jobs_ended
            .get_or_create(&vec![("status".to_owned(), status.to_owned())])
            .inc();
    }

    /// A site's update or masked input of `bytes` arrived whole.
    pub fn update_received(&self, bytes: usize) {
        self.update_bytes.inc_by(bytes as u64);
    }

    /// A model or aggregate of `bytes` is being sent to a site.
    pub fn model_sent(&self, bytes: usize) {
        self.model_bytes.inc_by(bytes as u64);
    }

    /// The metrics in the OpenMetrics text format, with the gauges read now.
    pub fn encode(&self, sites_connected: usize, job_running: bool) -> String {
        self.sites_connected.set(sites_connected as i64);
        self.job_running.set(i64::from(job_running));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing into a String cannot fail");
        text
    }
}

/// `/metrics` and `/healthz`, for tonic to serve on the metrics address.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let running = shared.lock().active.is_some();
    let text = shared.telemetry.encode(shared.online(CONNECTED_MS).len(), running);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// 200 while the coordinator can use its database (every job, round and
/// ledger block goes through it), else 503 with the reason.
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e:#}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_in_the_text_format() {
        let telemetry = Telemetry::default();
        telemetry.round_recorded(1500);
        telemetry.round_recorded(20);
        telemetry.job_ended("finished");
        telemetry.job_ended("failed");
        telemetry.job_ended("failed");
        telemetry.update_received(4096);
        telemetry.model_sent(100);
        telemetry.stage_closed("masked input", 3);
        let text = telemetry.encode(3, true);
        for line in [
            "tessera_rounds_total 2",
            "tessera_round_duration_seconds_count 2",
            "tessera_round_duration_seconds_sum 1.52",
            "tessera_round_duration_seconds_bucket{le=\"0.02\"} 1",
            "tessera_round_duration_seconds_bucket{le=\"2.56\"} 2",
            "tessera_jobs_ended_total{status=\"failed\"} 2",
            "tessera_jobs_ended_total{status=\"finished\"} 1",
            "tessera_update_bytes_received_total 4096",
            "tessera_model_bytes_sent_total 100",
            "tessera_secagg_stage_duration_seconds_count{stage=\"masked input\"} 1",
            "tessera_secagg_stage_duration_seconds_bucket{le=\"0.004\",stage=\"masked input\"} 1",
            "tessera_sites_connected 3",
            "tessera_job_running 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(telemetry.encode(0, false).contains("\ntessera_job_running 0\n"));
    }
}
