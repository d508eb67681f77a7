//! The site configuration file (`site.toml`), owned by the hospital.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use tessera_models::data::Source;
use tessera_models::postgres::PgSource;
use tessera_protocol::ids::SiteId;

/// A validated site configuration; relative paths are resolved against the
/// directory of the config file.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    pub site_id: SiteId,
    pub coordinator: String,
    /// The site's rows: a CSV or Parquet file, or a query on its warehouse.
    pub source: tessera_models::data::Source,
    pub schema_path: PathBuf,
    /// Encoded rows up to this size are held in memory; a larger table is
    /// read from its file on every pass (`tessera_models::stream`).
    pub in_memory_mib: u64,
    /// Where the egress log, the site key and other local state go.
    pub state_dir: PathBuf,
    /// The consortium roster (site Ed25519 public keys), needed to check
    /// peers' signed keys in secure aggregation.
    pub roster_path: Option<PathBuf>,
    /// The site's kit (tls.pem, tls.key, ca.pem): mutual TLS to the
    /// coordinator. `None` only for a coordinator run with --insecure-dev.
    pub tls_dir: Option<PathBuf>,
    pub policy: Policy,
}

/// The hospital's local rules for jobs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether this site ever takes part in a job with
    /// `insecure_plaintext = true` (its update would reach the coordinator in
    /// the clear). Off unless the hospital turns it on.
    #[serde(default)]
    pub allow_insecure_plaintext: bool,
    /// Whether this site reports its own test metrics to the coordinator (on
    /// by default, as Flower and FLARE do), into the ledger every member and
    /// regulator reads. They include sensitivity and specificity, from which
    /// with the accuracy and the declared test rows the site's test
    /// prevalence follows. Off: its evaluation only enters the secure sum,
    /// so the coordinator sees pooled figures alone.
    #[serde(default = "yes")]
    pub report_site_metrics: bool,
    /// Model kinds (`logistic_regression`, `mlp`) this site trains without
    /// asking; any kind when absent.
    #[serde(default)]
    pub accepted_models: Option<Vec<String>>,
    /// Largest model (parameters) trained without asking.
    #[serde(default = "default_max_params")]
    pub max_params: u64,
    /// Most rounds per job without asking.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    /// Smallest `min_sites` a job may declare without asking (never below 3).
    #[serde(default = "default_min_sites")]
    pub min_sites: u32,
    /// Learning rates accepted without asking: `[lowest, highest]`.
    #[serde(default)]
    pub learning_rate: Option<[f64; 2]>,
    /// Most local epochs per round without asking.
    #[serde(default)]
    pub max_local_epochs: Option<u32>,
    /// The fewest rows a value of a `discover = true` column needs here
    /// before this site proposes it as a category (k): a rarer code stays
    /// in the other bucket and is never named outside the site.
    #[serde(default = "default_discovery_min_rows")]
    pub discovery_min_rows: u64,
}

fn default_discovery_min_rows() -> u64 {
    10
}

fn default_max_params() -> u64 {
    10_000_000
}

fn default_max_rounds() -> u32 {
    1000
}

fn default_min_sites() -> u32 {
    3
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_insecure_plaintext: false,
            report_site_metrics: true,
            accepted_models: None,
            max_params: default_max_params(),
            max_rounds: default_max_rounds(),
            min_sites: default_min_sites(),
            learning_rate: None,
            max_local_epochs: None,
            discovery_min_rows: default_discovery_min_rows(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site_id: String,
    #[serde(default = "default_coordinator")]
    coordinator: String,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    roster: Option<PathBuf>,
    tls: Option<PathBuf>,
    #[serde(default)]
    policy: Policy,
    data: RawData,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    /// A CSV or Parquet file.
    path: Option<PathBuf>,
    /// A PostgreSQL connection URL (the cohort is `query`'s result).
    postgres: Option<String>,
    /// Table name → CSV or Parquet file: the cohort is `query` over them,
    /// run by the embedded DataFusion.
    tables: Option<std::collections::BTreeMap<String, PathBuf>>,
    /// The cohort's `SELECT`, for a `postgres` source or over `tables`.
    query: Option<String>,
    /// Memory a query over `tables` may hold (a join's build side, a sort).
    #[serde(default = "default_query_memory_mib")]
    query_memory_mib: u64,
    schema: PathBuf,
    #[serde(default = "default_in_memory_mib")]
    in_memory_mib: u64,
}

fn default_in_memory_mib() -> u64 {
    256
}

fn default_query_memory_mib() -> u64 {
    1024
}

fn default_coordinator() -> String {
    "http://127.0.0.1:50051".into()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("tessera-site-state")
}

/// A cohort query over the site's files.
#[cfg(feature = "sql")]
fn sql_cohort(
    _config: &Path,
    base: &Path,
    tables: std::collections::BTreeMap<String, PathBuf>,
    query: String,
    memory_mib: u64,
) -> anyhow::Result<Source> {
    Ok(Source::Sql(tessera_models::cohort::SqlCohort {
        tables: tables.into_iter().map(|(name, file)| (name, base.join(file))).collect(),
        query,
        memory_mib,
    }))
}

#[cfg(not(feature = "sql"))]
fn sql_cohort(
    config: &Path,
    _base: &Path,
    _tables: std::collections::BTreeMap<String, PathBuf>,
    _query: String,
    _memory_mib: u64,
) -> anyhow::Result<Source> {
    bail!(
        "{}: [data.tables] needs SQL cohorts, which this build of tessera-participant leaves out \
         (it was built without the `sql` feature)",
        config.display()
    )
}

impl SiteConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read site config {}", path.display()))?;
        if let Some(reason) = tessera_protocol::cli::not_config_text(&text) {
            bail!("site config {} refused: {reason}", path.display());
        }
        let raw: RawConfig =
            toml::from_str(&text).with_context(|| format!("invalid site config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let site_id = SiteId::new(&raw.site_id).with_context(|| format!("{}: site_id", path.display()))?;
        let data = raw.data;
        let named = [data.path.is_some(), data.postgres.is_some(), data.tables.is_some()];
        if named.iter().filter(|n| **n).count() > 1 {
            bail!(
                "{}: [data] names more than one source (`path`, `postgres`, `tables`): keep one",
                path.display()
            );
        }
        let source = match (data.path, data.postgres, data.tables, data.query) {
            (Some(file), _, _, None) => Source::File(base.join(file)),
            (Some(_), _, _, Some(_)) => bail!(
                "{}: [data] query is for a `postgres` source or `[data.tables]`, not a `path`",
                path.display()
            ),
            (_, Some(url), _, Some(query)) => Source::Postgres(PgSource { url, query }),
            (_, _, Some(tables), Some(query)) => {
                if tables.is_empty() {
                    bail!("{}: [data.tables] names no table", path.display());
                }
                sql_cohort(path, base, tables, query, data.query_memory_mib)?
            }
            (_, Some(_), _, None) | (_, _, Some(_), None) => {
                bail!("{}: [data] needs the cohort's `query`", path.display())
            }
            (None, None, None, Some(_)) => bail!(
                "{}: [data] query needs a `postgres` URL or `[data.tables]` (the files it reads)",
                path.display()
            ),
            (None, None, None, None) => bail!(
                "{}: [data] needs a `path` (CSV or Parquet file), a `postgres` URL and `query`, or \
                 `[data.tables]` and `query`",
                path.display()
            ),
        };
        let schema_path = base.join(&data.schema);
        let in_memory_mib = data.in_memory_mib;
        Ok(Self {
            site_id,
            coordinator: raw.coordinator,
            source,
            schema_path,
            in_memory_mib,
            state_dir: base.join(raw.state_dir),
            roster_path: raw.roster.map(|r| base.join(r)),
            tls_dir: raw.tls.map(|t| base.join(t)),
            policy: raw.policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(data: &str) -> anyhow::Result<SiteConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(&path, format!("site_id = \"h\"\n[data]\nschema = \"s.toml\"\n{data}")).unwrap();
        SiteConfig::load(&path)
    }

    /// A site reads a file, a warehouse query or a query over its files,
    /// exactly one of them, and each mistake in saying which is named.
    #[test]
    #[cfg(feature = "sql")]
    fn the_data_source_is_a_file_or_a_query() {
        let config = load("path = \"rows.csv\"").unwrap();
        assert!(matches!(&config.source, Source::File(p) if p.ends_with("rows.csv")));
        let config = load("postgres = \"postgresql://tessera@db/omop\"\nquery = \"SELECT 1\"").unwrap();
        assert_eq!(
            config.source,
            Source::Postgres(PgSource {
                url: "postgresql://tessera@db/omop".into(),
                query: "SELECT 1".into()
            })
        );
        let config = load("query = \"SELECT 1\"\n[data.tables]\nencounters = \"x/enc.parquet\"").unwrap();
        let Source::Sql(cohort) = &config.source else {
            panic!("{:?}", config.source)
        };
        assert_eq!(cohort.query, "SELECT 1");
        assert_eq!(cohort.tables.len(), 1);
        assert_eq!(cohort.tables[0].0, "encounters");
        assert!(cohort.tables[0].1.ends_with("x/enc.parquet") && cohort.tables[0].1.is_absolute());
        assert_eq!(cohort.memory_mib, 1024);
        let err = |data: &str| format!("{:#}", load(data).unwrap_err());
        assert!(err("postgres = \"postgresql://db\"").contains("needs the cohort's `query`"));
        assert!(err("[data.tables]\nencounters = \"enc.csv\"").contains("needs the cohort's `query`"));
        assert!(err("query = \"SELECT 1\"\n[data.tables]").contains("names no table"));
        assert!(err("path = \"a.csv\"\npostgres = \"postgresql://db\"\nquery = \"SELECT 1\"").contains("keep one"));
        assert!(err("path = \"a.csv\"\nquery = \"SELECT 1\"\n[data.tables]\nt = \"a.csv\"").contains("keep one"));
        assert!(err("path = \"a.csv\"\nquery = \"SELECT 1\"").contains("not a `path`"));
        assert!(err("query = \"SELECT 1\"").contains("needs a `postgres` URL or `[data.tables]`"));
        assert!(err("").contains("needs a `path`"));
    }
}
