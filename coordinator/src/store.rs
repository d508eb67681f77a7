//! Durable coordinator state in SQLite (WAL mode), through sqlx. Thin: each
//! method is one statement or one transaction, and knows nothing of rounds.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use sqlx::AssertSqlSafe;
use sqlx::SqliteConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tessera_protocol::ids::{JobId, SiteId};
use tessera_protocol::metrics::BinaryMetrics;
use tessera_protocol::stats::{ClassCounts, Normalization};

/// Handle to the coordinator database.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// A job row as listed by the CLI.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct JobRow {
    pub id: i64,
    pub name: String,
    pub job_toml: String,
    pub job_hash: String,
    pub status: String,
    pub phase: String,
    pub rounds_total: i64,
    pub rounds_done: i64,
    pub strategy: String,
    pub model: String,
    pub created_at_ms: i64,
    pub error: String,
    pub final_model_hash: Option<String>,
    pub n_features: Option<i64>,
    pub normalization: Option<String>,
    /// The features hash the job's sites agreed on, once they did.
    pub features_hash: Option<String>,
}

/// One finished round.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RoundRow {
    pub round: i64,
    pub base_model_hash: String,
    pub model_hash: String,
    pub total_weight: f64,
    pub mean_train_loss: Option<f64>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub transcript: Option<String>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MemberRow {
    pub round: i64,
    pub site_id: String,
    pub outcome: String,
    pub n_samples: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MetricsRow {
    pub round: i64,
    pub site_id: String,
    pub model_hash: String,
    pub n_test: i64,
    pub loss: f64,
    pub accuracy: f64,
    pub auc: Option<f64>,
    /// JSON of the site's `BinaryMetrics`; none from a site on older software.
    pub binary: Option<String>,
}

/// Evaluation pooled by secure sum.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PooledRow {
    pub round: i64,
    pub n_sites: i64,
    pub n_test: i64,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    /// JSON of the pooled `BinaryMetrics`.
    pub binary: Option<String>,
}

/// The clinical metrics a row stores as JSON; a row whose JSON does not
/// parse (it was written by this code, so it should) reads as none.
pub fn binary_metrics(json: Option<&str>) -> Option<BinaryMetrics> {
    serde_json::from_str(json?).ok()
}

/// How [`binary_metrics`] reads it back.
pub fn binary_json(m: &BinaryMetrics) -> String {
    serde_json::to_string(m).expect("metrics serialise")
}

/// A validated job about to be queued.
pub struct NewJob<'a> {
    pub job_toml: &'a str,
    pub job_hash: &'a str,
    pub name: &'a str,
    pub rounds: u32,
    pub strategy: &'a str,
    pub model: &'a str,
    pub now_ms: i64,
}

/// A finished round, ready to be written in one transaction.
pub struct RoundRecord<'a> {
    pub job_id: JobId,
    pub round: u32,
    pub base_model_hash: &'a str,
    pub model_hash: &'a str,
    pub model_bytes: &'a [u8],
    pub n_params: usize,
    pub total_weight: f64,
    pub mean_train_loss: Option<f64>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Secure aggregation transcript (JSON).
    pub transcript: Option<String>,
    /// (site, outcome, n_samples)
    pub members: Vec<(SiteId, String, u64)>,
    /// A secure round's released aggregate: (SHA-256 hex, little-endian u32 words).
    pub aggregate: Option<(&'a str, &'a [u8])>,
    /// The strategy's state after this round (`Strategy::save_state`).
    pub strategy_state: &'a [u8],
}

/// The reason recorded for a job an operator cancelled.
pub const CANCELLED: &str = "cancelled by operator";

/// Columns of [`JobRow`]; a constant, so the formatted queries carry no input.
const JOB_COLUMNS: &str = "id, name, job_toml, job_hash, status, phase, rounds_total, rounds_done, strategy, model, \
     created_at_ms, error, final_model_hash, n_features, normalization, features_hash";

impl Store {
    /// Opens (creating if needed) the database and applies the embedded migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .with_context(|| format!("bad database path {}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open database {}", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("cannot migrate database {}", path.display()))?;
        Ok(Self { pool })
    }

    /// The pool, for transactions that also append ledger blocks.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Whether the database answers a read (for `/healthz`).
    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Queues a job inside the caller's transaction (with its ledger block).
    pub async fn insert_job_in(conn: &mut SqliteConnection, job: &NewJob<'_>) -> anyhow::Result<JobId> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (name, job_toml, job_hash, status, rounds_total, strategy, model, created_at_ms) \
             VALUES (?, ?, ?, 'queued', ?, ?, ?, ?) RETURNING id",
        )
        .bind(job.name)
        .bind(job.job_toml)
        .bind(job.job_hash)
        .bind(i64::from(job.rounds))
        .bind(job.strategy)
        .bind(job.model)
        .bind(job.now_ms)
        .fetch_one(&mut *conn)
        .await
        .context("cannot insert job")?;
        Ok(JobId(id as u64))
    }

    pub async fn job(&self, job_id: JobId) -> anyhow::Result<Option<JobRow>> {
        let row = sqlx::query_as::<_, JobRow>(AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?")))
            .bind(job_id.0 as i64)
            .fetch_optional(&self.pool)
            .await
            .with_context(|| format!("cannot read job {job_id}"))?;
        Ok(row)
    }

    pub async fn jobs(&self) -> anyhow::Result<Vec<JobRow>> {
        let rows = sqlx::query_as::<_, JobRow>(AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id")))
            .fetch_all(&self.pool)
            .await
            .context("cannot list jobs")?;
        Ok(rows)
    }

    /// Every job, read in `conn` (a transaction that then acts on them).
    pub async fn jobs_in(conn: &mut SqliteConnection) -> anyhow::Result<Vec<JobRow>> {
        let rows = sqlx::query_as::<_, JobRow>(AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id")))
            .fetch_all(conn)
            .await
            .context("cannot list jobs")?;
        Ok(rows)
    }

    /// Each stored model's size in bytes.
    pub async fn model_sizes_in(conn: &mut SqliteConnection) -> anyhow::Result<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT hash, length(data) FROM models")
            .fetch_all(conn)
            .await
            .context("cannot list stored models")?;
        Ok(rows.into_iter().map(|(hash, len)| (hash, len.max(0) as u64)).collect())
    }

    /// Deletes stored models (`tessera job prune`, with its ledger block in
    /// the same transaction).
    pub async fn delete_models_in(conn: &mut SqliteConnection, hashes: &[String]) -> anyhow::Result<()> {
        for hash in hashes {
            sqlx::query("DELETE FROM models WHERE hash = ?")
                .bind(hash)
                .execute(&mut *conn)
                .await
                .with_context(|| format!("cannot delete model {hash}"))?;
        }
        Ok(())
    }

    /// Copies the write-ahead log into the database file and empties it (a
    /// clean shutdown), so that the file alone holds everything.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
            .context("checkpoint failed")?;
        Ok(())
    }

    /// Compacts the database file after rows were deleted (`tessera job
    /// prune`): returns its size before and after, in bytes. VACUUM needs
    /// free disk space for a copy of the live rows; when it fails, the freed
    /// pages are still reused by later writes.
    pub async fn vacuum(&self) -> anyhow::Result<(u64, u64)> {
        let size = || async {
            let (pages, page_size): (i64, i64) =
                sqlx::query_as("SELECT page_count, page_size FROM pragma_page_count(), pragma_page_size()")
                    .fetch_one(&self.pool)
                    .await
                    .context("cannot read the database size")?;
            anyhow::Ok((pages.max(0) * page_size.max(0)) as u64)
        };
        let before = size().await?;
        sqlx::query("VACUUM")
            .execute(&self.pool)
            .await
            .context("VACUUM failed")?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
            .context("cannot checkpoint the write-ahead log")?;
        Ok((before, size().await?))
    }

    /// The oldest queued job, if any.
    /// The job to run next: one left running by a previous process first
    /// (it resumes where its stored progress ends), then the oldest queued.
    pub async fn next_to_run(&self) -> anyhow::Result<Option<JobRow>> {
        let row = sqlx::query_as::<_, JobRow>(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('running', 'queued') \
             ORDER BY status = 'running' DESC, id LIMIT 1"
        )))
        .fetch_optional(&self.pool)
        .await
        .context("cannot read job queue")?;
        Ok(row)
    }

    pub async fn set_status(&self, job_id: JobId, status: &str, error: &str, now_ms: i64) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        Self::set_status_in(&mut conn, job_id, status, error, now_ms).await
    }

    /// Sets a job's status inside the caller's transaction.
    pub async fn set_status_in(
        conn: &mut SqliteConnection,
        job_id: JobId,
        status: &str,
        error: &str,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let finished = matches!(status, "finished" | "failed" | "cancelled").then_some(now_ms);
        sqlx::query("UPDATE jobs SET status = ?, error = ?, finished_at_ms = COALESCE(?, finished_at_ms) WHERE id = ?")
            .bind(status)
            .bind(error)
            .bind(finished)
            .bind(job_id.0 as i64)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot update job {job_id}"))?;
        Ok(())
    }

    /// Cancels a job that has not started; returns false if it is not queued.
    pub async fn cancel_if_queued_in(conn: &mut SqliteConnection, job_id: JobId, now_ms: i64) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', error = ?, finished_at_ms = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(CANCELLED)
        .bind(now_ms)
        .bind(job_id.0 as i64)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("cannot cancel job {job_id}"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_phase(&self, job_id: JobId, phase: &str) -> anyhow::Result<()> {
        Self::set_phase_in(&mut *self.pool.acquire().await?, job_id, phase).await
    }

    pub async fn set_phase_in(conn: &mut SqliteConnection, job_id: JobId, phase: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE jobs SET phase = ? WHERE id = ?")
            .bind(phase)
            .bind(job_id.0 as i64)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot update job {job_id}"))?;
        Ok(())
    }

    /// Stores the job's feature count and normalisation, inside the caller's
    /// transaction (with the statistics' ledger block when there is one):
    /// a resumed job skips its preprocessing exactly when they are stored.
    pub async fn set_preprocessing_in(
        conn: &mut SqliteConnection,
        job_id: JobId,
        n_features: usize,
        normalization: &Normalization,
        classes: ClassCounts,
    ) -> anyhow::Result<()> {
        let json = serde_json::json!({
            "mean": normalization.mean, "std": normalization.std,
            "rows": classes.rows, "positives": classes.positives,
        })
        .to_string();
        sqlx::query("UPDATE jobs SET n_features = ?, normalization = ? WHERE id = ?")
            .bind(n_features as i64)
            .bind(json)
            .bind(job_id.0 as i64)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot store preprocessing of job {job_id}"))?;
        Ok(())
    }

    /// Records the encoding the job's sites agreed on (their features hash).
    pub async fn set_features_hash(&self, job_id: JobId, features_hash: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE jobs SET features_hash = ? WHERE id = ?")
            .bind(features_hash)
            .bind(job_id.0 as i64)
            .execute(&self.pool)
            .await
            .with_context(|| format!("cannot store the features hash of job {job_id}"))?;
        Ok(())
    }

    /// Stores the snapshot of a secure summation's open stage, replacing
    /// the one of the stage before.
    pub async fn put_session(&self, job_id: JobId, round: u32, snapshot: &[u8]) -> anyhow::Result<()> {
        sqlx::query("INSERT OR REPLACE INTO secure_sessions (job_id, round, snapshot) VALUES (?, ?, ?)")
            .bind(job_id.0 as i64)
            .bind(i64::from(round))
            .bind(snapshot)
            .execute(&self.pool)
            .await
            .with_context(|| format!("cannot store the secure summation of job {job_id} round {round}"))?;
        Ok(())
    }

    /// The stored snapshot of a secure summation in flight, if any.
    pub async fn session(&self, job_id: JobId, round: u32) -> anyhow::Result<Option<Vec<u8>>> {
        let row = sqlx::query_scalar("SELECT snapshot FROM secure_sessions WHERE job_id = ? AND round = ?")
            .bind(job_id.0 as i64)
            .bind(i64::from(round))
            .fetch_optional(&self.pool)
            .await
            .with_context(|| format!("cannot read the secure summation of job {job_id} round {round}"))?;
        Ok(row)
    }

    /// Forgets the snapshots of a job's summations up to `round` (all of
    /// them: `u32::MAX`), inside the transaction that records their end.
    pub async fn forget_sessions_in(conn: &mut SqliteConnection, job_id: JobId, round: u32) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM secure_sessions WHERE job_id = ? AND round <= ?")
            .bind(job_id.0 as i64)
            .bind(i64::from(round))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot forget the secure summations of job {job_id}"))?;
        Ok(())
    }

    /// What the job's strategy carried into its next round, as stored with
    /// its last round (empty before the first).
    pub async fn strategy_state(&self, job_id: JobId) -> anyhow::Result<Vec<u8>> {
        let state: Option<Vec<u8>> = sqlx::query_scalar("SELECT strategy_state FROM jobs WHERE id = ?")
            .bind(job_id.0 as i64)
            .fetch_optional(&self.pool)
            .await
            .with_context(|| format!("cannot read the strategy state of job {job_id}"))?
            .flatten();
        Ok(state.unwrap_or_default())
    }

    pub async fn put_model(&self, hash: &str, n_params: usize, bytes: &[u8], now_ms: i64) -> anyhow::Result<()> {
        sqlx::query("INSERT OR IGNORE INTO models (hash, n_params, data, created_at_ms) VALUES (?, ?, ?, ?)")
            .bind(hash)
            .bind(n_params as i64)
            .bind(bytes)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .with_context(|| format!("cannot store model {hash}"))?;
        Ok(())
    }

    /// Stores a released aggregate (round 0: the preprocessing statistics)
    /// inside the transaction that appends the block committing to it.
    pub async fn put_aggregate_in(
        tx: &mut SqliteConnection,
        job_id: JobId,
        round: u32,
        sha256: &str,
        data: &[u8],
    ) -> anyhow::Result<()> {
        sqlx::query("INSERT INTO aggregates (job_id, round, sha256, data) VALUES (?, ?, ?, ?)")
            .bind(job_id.0 as i64)
            .bind(i64::from(round))
            .bind(sha256)
            .bind(data)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot store the aggregate of job {job_id} round {round}"))?;
        Ok(())
    }

    /// A secure round's released aggregate: (SHA-256 hex, bytes).
    pub async fn aggregate(&self, job_id: JobId, round: u32) -> anyhow::Result<Option<(String, Vec<u8>)>> {
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT sha256, data FROM aggregates WHERE job_id = ? AND round = ?")
                .bind(job_id.0 as i64)
                .bind(i64::from(round))
                .fetch_optional(&self.pool)
                .await
                .with_context(|| format!("cannot read the aggregate of job {job_id} round {round}"))?;
        Ok(row)
    }

    pub async fn model(&self, hash: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let bytes: Option<Vec<u8>> = sqlx::query_scalar("SELECT data FROM models WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .with_context(|| format!("cannot read model {hash}"))?;
        Ok(bytes)
    }

    /// Stores a round's model, its row, its members and the job's progress,
    /// atomically: a crash leaves either all of the round or none of it.
    /// Inside the caller's transaction, which also appends the round's
    /// ledger block: the model is never served before its block is stored.
    pub async fn record_round_in(tx: &mut SqliteConnection, r: &RoundRecord<'_>) -> anyhow::Result<()> {
        let job = r.job_id.0 as i64;
        sqlx::query("INSERT OR IGNORE INTO models (hash, n_params, data, created_at_ms) VALUES (?, ?, ?, ?)")
            .bind(r.model_hash)
            .bind(r.n_params as i64)
            .bind(r.model_bytes)
            .bind(r.finished_at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO rounds (job_id, round, base_model_hash, model_hash, total_weight, mean_train_loss, \
             started_at_ms, finished_at_ms, transcript) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job)
        .bind(i64::from(r.round))
        .bind(r.base_model_hash)
        .bind(r.model_hash)
        .bind(r.total_weight)
        .bind(r.mean_train_loss)
        .bind(r.started_at_ms)
        .bind(r.finished_at_ms)
        .bind(r.transcript.as_deref())
        .execute(&mut *tx)
        .await?;
        if let Some((sha256, data)) = r.aggregate {
            Self::put_aggregate_in(tx, r.job_id, r.round, sha256, data).await?;
        }
        for (site, outcome, n_samples) in &r.members {
            sqlx::query(
                "INSERT INTO round_members (job_id, round, site_id, outcome, n_samples) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(job)
            .bind(i64::from(r.round))
            .bind(site.as_str())
            .bind(outcome)
            .bind(*n_samples as i64)
            .execute(&mut *tx)
            .await?;
        }
        Self::forget_sessions_in(tx, r.job_id, r.round).await?;
        sqlx::query("UPDATE jobs SET rounds_done = ?, final_model_hash = ?, strategy_state = ? WHERE id = ?")
            .bind(i64::from(r.round))
            .bind(r.model_hash)
            .bind(r.strategy_state)
            .bind(job)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot store round {} of job {}", r.round, r.job_id))?;
        Ok(())
    }

    pub async fn rounds(&self, job_id: JobId) -> anyhow::Result<Vec<RoundRow>> {
        let rows = sqlx::query_as::<_, RoundRow>(
            "SELECT round, base_model_hash, model_hash, total_weight, mean_train_loss, started_at_ms, finished_at_ms, \
             transcript FROM rounds WHERE job_id = ? ORDER BY round",
        )
        .bind(job_id.0 as i64)
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("cannot read rounds of job {job_id}"))?;
        Ok(rows)
    }

    pub async fn members(&self, job_id: JobId) -> anyhow::Result<Vec<MemberRow>> {
        let rows = sqlx::query_as::<_, MemberRow>(
            "SELECT round, site_id, outcome, n_samples FROM round_members WHERE job_id = ? ORDER BY round, site_id",
        )
        .bind(job_id.0 as i64)
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("cannot read round members of job {job_id}"))?;
        Ok(rows)
    }

    /// Records why a site that accepted the job was left out of it (the
    /// first reason stands).
    pub async fn record_problem(&self, job_id: JobId, site: &SiteId, problem: &str, now_ms: i64) -> anyhow::Result<()> {
        sqlx::query("INSERT OR IGNORE INTO site_problems (job_id, site_id, problem, at_ms) VALUES (?, ?, ?, ?)")
            .bind(job_id.0 as i64)
            .bind(site.as_str())
            .bind(problem)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .with_context(|| format!("cannot record a problem of `{site}` in job {job_id}"))?;
        Ok(())
    }

    /// Keeps a site's signed category proposal for a job (the latest
    /// stands: a site's proposal for one job is the same every time).
    pub async fn put_proposal(&self, job_id: JobId, site: &SiteId, proposal: &[u8]) -> anyhow::Result<()> {
        sqlx::query("INSERT OR REPLACE INTO category_proposals (job_id, site_id, proposal) VALUES (?, ?, ?)")
            .bind(job_id.0 as i64)
            .bind(site.as_str())
            .bind(proposal)
            .execute(&self.pool)
            .await
            .with_context(|| format!("cannot store the category proposal of `{site}` for job {job_id}"))?;
        Ok(())
    }

    /// The sites' category proposals for a job, by site.
    pub async fn proposals(&self, job_id: JobId) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        sqlx::query_as("SELECT site_id, proposal FROM category_proposals WHERE job_id = ? ORDER BY site_id")
            .bind(job_id.0 as i64)
            .fetch_all(&self.pool)
            .await
            .with_context(|| format!("cannot read the category proposals of job {job_id}"))
    }

    /// The sites left out of the job, with why.
    pub async fn problems(&self, job_id: JobId) -> anyhow::Result<Vec<(String, String)>> {
        let rows = sqlx::query_as::<_, (String, String)>(
            "SELECT site_id, problem FROM site_problems WHERE job_id = ? ORDER BY site_id",
        )
        .bind(job_id.0 as i64)
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("cannot read the site problems of job {job_id}"))?;
        Ok(rows)
    }

    /// Stores a site's evaluation; a repeated report for the same round is ignored.
    pub async fn insert_metrics(&self, job_id: JobId, m: &MetricsRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO metrics (job_id, round, site_id, model_hash, n_test, loss, accuracy, auc, binary) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job_id.0 as i64)
        .bind(m.round)
        .bind(&m.site_id)
        .bind(&m.model_hash)
        .bind(m.n_test)
        .bind(m.loss)
        .bind(m.accuracy)
        .bind(m.auc)
        .bind(&m.binary)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot store metrics of job {job_id}"))?;
        Ok(())
    }

    pub async fn metrics(&self, job_id: JobId) -> anyhow::Result<Vec<MetricsRow>> {
        let rows = sqlx::query_as::<_, MetricsRow>(
            "SELECT round, site_id, model_hash, n_test, loss, accuracy, auc, binary FROM metrics WHERE job_id = ? \
             ORDER BY round, site_id",
        )
        .bind(job_id.0 as i64)
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("cannot read metrics of job {job_id}"))?;
        Ok(rows)
    }

    pub async fn insert_pooled(&self, job_id: JobId, row: &PooledRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO pooled_metrics (job_id, round, n_sites, n_test, accuracy, loss, binary) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job_id.0 as i64)
        .bind(row.round)
        .bind(row.n_sites)
        .bind(row.n_test)
        .bind(row.accuracy)
        .bind(row.loss)
        .bind(&row.binary)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot store pooled metrics of job {job_id}"))?;
        Ok(())
    }

    pub async fn pooled(&self, job_id: JobId) -> anyhow::Result<Vec<PooledRow>> {
        let rows = sqlx::query_as::<_, PooledRow>(
            "SELECT round, n_sites, n_test, accuracy, loss, binary FROM pooled_metrics WHERE job_id = ? ORDER BY round",
        )
        .bind(job_id.0 as i64)
        .fetch_all(&self.pool)
        .await
        .with_context(|| format!("cannot read pooled metrics of job {job_id}"))?;
        Ok(rows)
    }

    /// Records the participant version a site reported.
    pub async fn set_site_version(&self, site: &SiteId, version: &str, now_ms: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO sites (site_id, first_seen_ms, last_seen_ms, version) VALUES (?, ?, ?, ?) \
             ON CONFLICT(site_id) DO UPDATE SET version = excluded.version",
        )
        .bind(site.as_str())
        .bind(now_ms)
        .bind(now_ms)
        .bind(version)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot record the version of site {site}"))?;
        Ok(())
    }

    /// Records the session id `site`'s daemon sent (it draws one when it
    /// starts), for the next coordinator process.
    pub async fn set_site_session(&self, site: &SiteId, session: &str, now_ms: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO sites (site_id, first_seen_ms, last_seen_ms, session) VALUES (?, ?, ?, ?) \
             ON CONFLICT(site_id) DO UPDATE SET session = excluded.session",
        )
        .bind(site.as_str())
        .bind(now_ms)
        .bind(now_ms)
        .bind(session)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot record the session of site {site}"))?;
        Ok(())
    }

    /// The session id each site's daemon last sent.
    pub async fn site_sessions(&self) -> anyhow::Result<Vec<(SiteId, String)>> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT site_id, session FROM sites WHERE session != ''")
            .fetch_all(&self.pool)
            .await
            .context("cannot read the sites' sessions")?;
        Ok(rows
            .into_iter()
            .filter_map(|(site, session)| Some((SiteId::new(&site).ok()?, session)))
            .collect())
    }

    /// Every site ever heard from: id, when last heard from (unix ms) and
    /// the version it reported.
    pub async fn sites(&self) -> anyhow::Result<Vec<(String, i64, String)>> {
        sqlx::query_as("SELECT site_id, last_seen_ms, version FROM sites ORDER BY site_id")
            .fetch_all(&self.pool)
            .await
            .context("cannot read the sites")
    }

    /// Per site, the latest job it was left out of, and why.
    pub async fn latest_problems(&self) -> anyhow::Result<BTreeMap<String, (u64, String)>> {
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT site_id, job_id, problem FROM site_problems ORDER BY job_id")
                .fetch_all(&self.pool)
                .await
                .context("cannot read the site problems")?;
        Ok(rows
            .into_iter()
            .map(|(site, job, problem)| (site, (job as u64, problem)))
            .collect())
    }

    pub async fn touch_site(&self, site: &SiteId, now_ms: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO sites (site_id, first_seen_ms, last_seen_ms) VALUES (?, ?, ?) \
             ON CONFLICT(site_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
        )
        .bind(site.as_str())
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot record site {site}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job<'a>(toml: &'a str) -> NewJob<'a> {
        NewJob {
            job_toml: toml,
            job_hash: "hash",
            name: "j",
            rounds: 2,
            strategy: "fedavg",
            model: "logistic_regression",
            now_ms: 1,
        }
    }

    /// The transactional operations, each in a transaction of its own.
    impl Store {
        async fn insert_job(&self, job: &NewJob<'_>) -> anyhow::Result<JobId> {
            let mut conn = self.pool.acquire().await?;
            Self::insert_job_in(&mut conn, job).await
        }

        async fn record_round(&self, r: &RoundRecord<'_>) -> anyhow::Result<()> {
            let mut tx = self.pool.begin().await?;
            Self::record_round_in(&mut tx, r).await?;
            Ok(tx.commit().await?)
        }

        async fn cancel_if_queued(&self, job_id: JobId, now_ms: i64) -> anyhow::Result<bool> {
            let mut conn = self.pool.acquire().await?;
            Self::cancel_if_queued_in(&mut conn, job_id, now_ms).await
        }
    }

    #[tokio::test]
    async fn jobs_rounds_and_restart_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = Store::open(&path).await.unwrap();
        let a = store.insert_job(&new_job("a")).await.unwrap();
        let b = store.insert_job(&new_job("b")).await.unwrap();
        assert_eq!(store.next_to_run().await.unwrap().unwrap().id, a.0 as i64);
        store.set_status(a, "running", "", 2).await.unwrap();
        store.put_session(a, 1, b"stage of round 1").await.unwrap();
        store.put_session(a, 2, b"stage of round 2").await.unwrap();
        let site = SiteId::new("s1").unwrap();
        store
            .record_round(&RoundRecord {
                aggregate: None,
                job_id: a,
                round: 1,
                base_model_hash: "m0",
                model_hash: "m1",
                model_bytes: &[1, 2, 3, 4],
                n_params: 1,
                total_weight: 10.0,
                mean_train_loss: Some(0.5),
                transcript: None,
                started_at_ms: 3,
                finished_at_ms: 4,
                members: vec![(site.clone(), "submitted".into(), 10)],
                strategy_state: b"moments",
            })
            .await
            .unwrap();
        assert!(store.cancel_if_queued(b, 5).await.unwrap());
        assert!(
            !store.cancel_if_queued(a, 5).await.unwrap(),
            "a running job is not cancelled here"
        );
        drop(store);

        // A new coordinator process: the running job is the next to run,
        // with its round, its model, its strategy state and the summation
        // of the round in flight (not the one of the round recorded).
        let store = Store::open(&path).await.unwrap();
        let job = store.next_to_run().await.unwrap().unwrap();
        assert_eq!((job.id, job.status.as_str()), (a.0 as i64, "running"));
        assert_eq!(store.strategy_state(a).await.unwrap(), b"moments");
        assert_eq!(store.session(a, 1).await.unwrap(), None);
        assert_eq!(
            store.session(a, 2).await.unwrap().as_deref(),
            Some(&b"stage of round 2"[..])
        );
        assert_eq!(job.rounds_done, 1);
        assert_eq!(job.final_model_hash.as_deref(), Some("m1"));
        assert_eq!(store.model("m1").await.unwrap(), Some(vec![1, 2, 3, 4]));
        let members = store.members(a).await.unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].n_samples, 10);
        assert_eq!(store.job(b).await.unwrap().unwrap().status, "cancelled");
        store.set_status(a, "finished", "", 7).await.unwrap();
        assert!(store.next_to_run().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_failed_round_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).await.unwrap();
        let a = store.insert_job(&new_job("a")).await.unwrap();
        let record = |round| RoundRecord {
            aggregate: None,
            job_id: a,
            round,
            base_model_hash: "m0",
            model_hash: "m1",
            model_bytes: &[0; 4],
            n_params: 1,
            total_weight: 1.0,
            mean_train_loss: Some(0.1),
            transcript: None,
            started_at_ms: 0,
            finished_at_ms: 1,
            members: vec![],
            strategy_state: &[],
        };
        store.record_round(&record(1)).await.unwrap();
        // The same round twice violates the primary key: the transaction
        // rolls back and the job's progress is unchanged.
        let mut again = record(1);
        again.model_hash = "m2";
        assert!(store.record_round(&again).await.is_err());
        assert_eq!(
            store.job(a).await.unwrap().unwrap().final_model_hash.as_deref(),
            Some("m1")
        );
        assert_eq!(store.model("m2").await.unwrap(), None);
        assert_eq!(store.rounds(a).await.unwrap().len(), 1);
    }
}
