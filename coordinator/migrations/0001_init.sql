-- Coordinator state. Rows in `models`, `rounds`, `round_members` and
-- `metrics` are only ever inserted; `jobs` rows change status as a job runs.
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL,
    job_toml         TEXT    NOT NULL,
    job_hash         TEXT    NOT NULL,
    status           TEXT    NOT NULL,          -- queued | running | finished | failed | cancelled
    phase            TEXT    NOT NULL DEFAULT '',
    rounds_total     INTEGER NOT NULL,
    rounds_done      INTEGER NOT NULL DEFAULT 0,
    strategy         TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    finished_at_ms   INTEGER,
    error            TEXT    NOT NULL DEFAULT '',
    final_model_hash TEXT,
    n_features       INTEGER,
    normalization    TEXT                        -- JSON {mean, std}
);

CREATE TABLE sites (
    site_id        TEXT PRIMARY KEY,
    first_seen_ms  INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL
);

-- Models are stored by hash (SHA-256 of the little-endian f32 encoding).
CREATE TABLE models (
    hash          TEXT PRIMARY KEY,
    n_params      INTEGER NOT NULL,
    data          BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE rounds (
    job_id          INTEGER NOT NULL REFERENCES jobs(id),
    round           INTEGER NOT NULL,
    base_model_hash TEXT    NOT NULL,
    model_hash      TEXT    NOT NULL,
    total_weight    REAL    NOT NULL,
    mean_train_loss REAL,                       -- NULL under secure aggregation (per-site losses stay local)
    transcript      TEXT,                       -- secure aggregation transcript (JSON)
    started_at_ms   INTEGER NOT NULL,
    finished_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (job_id, round)
);

CREATE TABLE round_members (
    job_id    INTEGER NOT NULL REFERENCES jobs(id),
    round     INTEGER NOT NULL,
    site_id   TEXT    NOT NULL,
    outcome   TEXT    NOT NULL,                 -- submitted | dropped:<reason or phase>
    n_samples INTEGER NOT NULL DEFAULT 0,       -- 0 under secure aggregation (weights stay in the sum)
    PRIMARY KEY (job_id, round, site_id)
);

-- `round` is the round whose announcement carried the model: the metrics
-- describe the global model produced by round `round - 1`.
CREATE TABLE metrics (
    job_id     INTEGER NOT NULL REFERENCES jobs(id),
    round      INTEGER NOT NULL,
    site_id    TEXT    NOT NULL,
    model_hash TEXT    NOT NULL,
    n_test     INTEGER NOT NULL,
    loss       REAL    NOT NULL,
    accuracy   REAL    NOT NULL,
    auc        REAL,
    PRIMARY KEY (job_id, round, site_id)
);

-- Evaluation pooled over sites by secure sum (secure jobs): only these sums,
-- never a site's own figures unless it chose to report them (`metrics`).
CREATE TABLE pooled_metrics (
    job_id   INTEGER NOT NULL REFERENCES jobs(id),
    round    INTEGER NOT NULL,
    n_sites  INTEGER NOT NULL,
    n_test   INTEGER NOT NULL,
    accuracy REAL,
    loss     REAL,
    PRIMARY KEY (job_id, round)
);
