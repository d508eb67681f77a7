//! The site's data as the participant sees it: read through the schema, split
//! into train and test, never sent anywhere.
//!
//! A table whose encoded rows fit in `[data] in_memory_mib` is held in
//! memory; a larger one is read from its file, batch by batch, on every
//! pass (statistics, each round's training and evaluation), so the site's
//! memory does not grow with its table. Both give the same rows, split and
//! model (`tessera_models::stream`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use tessera_models::data::{DataError, ReadReport, Source};
use tessera_models::schema::{Schema, SchemaError};
use tessera_models::stream::{Rows, TableSplit, census};

use crate::config::SiteConfig;

/// A site's data, ready for passes.
pub struct LocalData {
    pub schema: Schema,
    pub report: ReadReport,
    pub train: Arc<dyn Rows>,
    pub test: Arc<dyn Rows>,
    /// Whether the rows are read from the file on every pass.
    pub streamed: bool,
    source: Source,
    in_memory_mib: u64,
}

impl LocalData {
    pub fn load(config: &SiteConfig) -> anyhow::Result<Self> {
        let schema_text = std::fs::read_to_string(&config.schema_path)
            .with_context(|| format!("cannot read schema {}", config.schema_path.display()))?;
        let schema = Schema::from_toml(&schema_text)
            .with_context(|| format!("invalid schema {}", config.schema_path.display()))?;
        Self::open(config.source.clone(), schema, config.in_memory_mib)
    }

    fn open(source: Source, schema: Schema, in_memory_mib: u64) -> anyhow::Result<Self> {
        // One pass checks the whole file and counts its rows.
        let (train, test, report) = TableSplit::open(source.clone(), schema.clone())?;
        let width = schema.feature_names().len() + 1;
        let bytes = report.rows_kept as u64 * width as u64 * 4;
        let streamed = bytes > in_memory_mib * 1024 * 1024;
        let (train, test): (Arc<dyn Rows>, Arc<dyn Rows>) = if streamed {
            (Arc::new(train), Arc::new(test))
        } else {
            let (all, _) = tessera_models::data::read_source(&source, &schema)?;
            let (train, test) = all.split(&schema.split);
            (Arc::new(train), Arc::new(test))
        };
        Ok(Self {
            schema,
            report,
            train,
            test,
            streamed,
            source,
            in_memory_mib,
        })
    }

    /// The same data encoded with a job's discovered categories (a pass to
    /// check it). The rows are the same: a discovered column has an other
    /// bucket, so no value of it leaves a row out.
    /// Returned as work to run off the async threads.
    pub fn with_categories(
        &self,
        union: &BTreeMap<String, Vec<String>>,
    ) -> impl FnOnce() -> anyhow::Result<Self> + Send + 'static {
        let (source, schema, in_memory_mib) = (
            self.source.clone(),
            self.schema.with_categories(union),
            self.in_memory_mib,
        );
        move || Self::open(source, schema, in_memory_mib)
    }

    pub fn n_features(&self) -> usize {
        self.train.n_features()
    }

    /// Rows and positive labels of (train, test), one pass each.
    pub fn census(&self) -> anyhow::Result<((usize, usize), (usize, usize))> {
        Ok((census(self.train.as_ref())?, census(self.test.as_ref())?))
    }
}

/// What a site whose data cannot be loaded tells the coordinator (in its
/// signed refusal of each job, kept in the ledger): the kind of problem
/// and the consortium schema's column names, never a value, a line, a path
/// or the error's other details, which stay in the site's own log.
pub fn public_reason(error: &anyhow::Error) -> String {
    if let Some(e) = error.downcast_ref::<DataError>() {
        e.public_reason()
    } else if error.downcast_ref::<SchemaError>().is_some() {
        "the site's schema file is not valid".to_owned()
    } else {
        "the site's schema or data file cannot be read".to_owned()
    }
}
