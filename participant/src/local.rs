//! The site's data as the participant sees it: read through the schema, split
//! into train and test, never sent anywhere.

use anyhow::Context;
use tessera_models::data::{Dataset, ReadReport, read_table};
use tessera_models::schema::Schema;
use tessera_protocol::stats::{FeatureStats, Normalization};

use crate::config::SiteConfig;

/// A site's loaded data.
pub struct LocalData {
    pub schema: Schema,
    pub report: ReadReport,
    pub train: Dataset,
    pub test: Dataset,
}

impl LocalData {
    pub fn load(config: &SiteConfig) -> anyhow::Result<Self> {
        let schema_text = std::fs::read_to_string(&config.schema_path)
            .with_context(|| format!("cannot read schema {}", config.schema_path.display()))?;
        let schema = Schema::from_toml(&schema_text)
            .with_context(|| format!("invalid schema {}", config.schema_path.display()))?;
        let (data, report) = read_table(&config.data_path, &schema)?;
        let (train, test) = data.split(&schema.split);
        Ok(Self {
            schema,
            report,
            train,
            test,
        })
    }

    /// The only thing preprocessing sends: count, sums and sums of squares of
    /// the training split.
    pub fn train_stats(&self) -> FeatureStats {
        FeatureStats::of_rows(self.train.n_features, self.train.rows())
    }

    /// Train and test splits standardised with the global statistics.
    pub fn normalized(&self, normalization: &Normalization) -> (Dataset, Dataset) {
        (
            self.train.standardized(normalization),
            self.test.standardized(normalization),
        )
    }
}
