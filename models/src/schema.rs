//! The dataset schema (TOML): how a site's raw file becomes feature vectors and
//! labels. Every site of a job uses the same schema, so the encoded features
//! line up column for column; the coordinator checks this through the
//! features hash sent with the preprocessing statistics.

use serde::Deserialize;
use tessera_protocol::discovery::{Discovered, MAX_PROPOSED};
use tessera_protocol::ids::sha256_hex;

/// A validated schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Schema {
    pub delimiter: u8,
    pub header: bool,
    /// Cell values meaning "missing" in any column (e.g. `?`).
    pub missing_markers: Vec<String>,
    /// Columns in file order.
    pub columns: Vec<Column>,
    pub label: LabelRule,
    pub split: SplitSpec,
}

/// What one column of the file is for.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    /// A literal `0` in this column means "not measured".
    pub zero_means_missing: bool,
    /// This column's missing markers, in place of `[format]
    /// missing_markers`: `?` can mean "missing" in one column and be a
    /// legitimate code in another.
    pub missing_markers: Option<Vec<String>>,
    /// What a missing value does to its row; always `Drop` for the label
    /// and id columns (a row without them cannot be used).
    pub missing: MissingRule,
}

/// What a missing value in a feature column does, as `missing = "…"` in
/// the column (or `[format]`, for every feature column) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MissingRule {
    /// The row is left out (counted in the read report).
    #[default]
    Drop,
    /// The row stays: a number becomes the pooled mean of the values
    /// present (0 once standardised), a categorical value no category.
    Impute,
    /// As `Impute`, plus one more feature, `name=(missing)`, that is 1
    /// where the value was missing: the model can learn from the absence.
    Indicator,
}

impl MissingRule {
    fn parse(field: &str, text: &str) -> Result<Self, SchemaError> {
        match text {
            "drop" => Ok(Self::Drop),
            "impute" => Ok(Self::Impute),
            "indicator" => Ok(Self::Indicator),
            other => Err(invalid(
                field,
                format!("unknown missing rule `{other}`; expected drop, impute or indicator"),
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ColumnKind {
    Numeric,
    /// One-hot encoded over exactly these categories, in this order. Declared,
    /// not discovered, so that every site produces the same features.
    Categorical {
        categories: Vec<String>,
        /// A value that is no category (after `map`) goes to one more
        /// feature, `name=(other)`, instead of stopping the read.
        other: bool,
        /// Groups raw codes into the declared categories (ICD-9 codes into
        /// chapters): the first rule that matches a value decides its
        /// category; an unmatched value is compared with the categories.
        map: Vec<CategoryMap>,
        /// `discover = true`: more categories are formed per job from the
        /// sites' signed proposals (`tessera_protocol::discovery`), each
        /// site proposing at most this many (`top_k`) of its values.
        /// Until then `categories` holds the declared ones only.
        discover: Option<usize>,
    },
    Label,
    /// Identifies the patient (or other unit) a row belongs to: never a
    /// feature, never sent; `[split] group_by` keeps all rows of one id on
    /// the same side of the train/test split.
    Id,
    Drop,
}

/// One rule of a categorical column's `map`: values it matches go to
/// category `to` (an index into the declared categories).
#[derive(Clone, Debug, PartialEq)]
pub struct CategoryMap {
    pub matches: CodeMatch,
    pub to: usize,
}

/// Which raw values a `map` rule takes.
#[derive(Clone, Debug, PartialEq)]
pub enum CodeMatch {
    /// Values starting with this text (`250` takes `250.01`).
    Prefix(String),
    /// Values that read as a number in `[from, to + 1)`: `[390, 459]` takes
    /// 390 to 459.99, as an ICD-9 chapter does.
    Range { from: f64, to: f64 },
    /// Exactly these values.
    Values(Vec<String>),
}

/// How a row's label is derived from the label column.
#[derive(Clone, Debug, PartialEq)]
pub enum LabelRule {
    /// A number, positive when `value <op> threshold` (`positive_if`).
    Compare { op: CompareOp, threshold: f64 },
    /// A coded value, positive when it is one of `positive`
    /// (`positive_in`); with `negative` (`negative_in`) non-empty, a value
    /// in neither list is an error rather than a silent negative.
    OneOf {
        positive: Vec<String>,
        negative: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

/// Deterministic per-site train/test split.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitSpec {
    /// Without `group_by`, the test split holds exactly
    /// `ceil(test_fraction * rows)` rows; with it, each id is a test id with
    /// this probability, so the test rows are about this fraction.
    pub test_fraction: f64,
    pub seed: u64,
    /// The `id` column whose rows stay together: one patient's encounters
    /// are all in train or all in test, whatever their order in the file.
    pub group_by: Option<String>,
}

/// Why a schema file was refused; `field` is the TOML path.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("schema is not valid TOML: {0}")]
    Syntax(String),
    #[error("schema file refused: {0}")]
    NotText(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Schema {
    pub fn from_toml(text: &str) -> Result<Self, SchemaError> {
        if let Some(reason) = tessera_protocol::cli::not_config_text(text) {
            return Err(SchemaError::NotText(reason));
        }
        let raw: RawSchema = toml::from_str(text).map_err(|e| SchemaError::Syntax(e.to_string()))?;
        raw.validate()
    }

    /// Names of the encoded features, in order (`cp=1` for one-hot columns).
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for column in &self.columns {
            match &column.kind {
                ColumnKind::Numeric => names.push(column.name.clone()),
                ColumnKind::Categorical { categories, other, .. } => {
                    names.extend(categories.iter().map(|c| format!("{}={c}", column.name)));
                    if *other {
                        names.push(format!("{}={OTHER}", column.name));
                    }
                }
                ColumnKind::Label | ColumnKind::Id | ColumnKind::Drop => continue,
            }
            if column.missing == MissingRule::Indicator {
                names.push(format!("{}={MISSING}", column.name));
            }
        }
        names
    }

    /// Fingerprint of everything that decides the encoded rows, compared
    /// across sites: the features, how each used column's values become
    /// them (missing markers, zero handling, category maps, the other
    /// bucket) and the label rule. Two sites whose schemas differ in any
    /// of these would train one model on different meanings.
    pub fn features_hash(&self) -> String {
        sha256_hex(self.encoding().as_bytes())
    }

    /// The canonical text [`Self::features_hash`] hashes.
    fn encoding(&self) -> String {
        let mut text = String::from("tessera features v3\n");
        for name in self.feature_names() {
            text.push_str(&format!("feature {name:?}\n"));
        }
        for column in &self.columns {
            let kind = match &column.kind {
                ColumnKind::Drop | ColumnKind::Id => continue,
                ColumnKind::Numeric => "numeric".to_owned(),
                ColumnKind::Label => format!("label {:?}", self.label),
                ColumnKind::Categorical {
                    categories,
                    other,
                    map,
                    discover,
                } => {
                    // Said only when set, so that the hashes of schemas
                    // without discovery are those older versions computed.
                    let discover = discover.map(|k| format!(" discover top_k={k}")).unwrap_or_default();
                    format!("categorical {categories:?} other={other} map={map:?}{discover}")
                }
            };
            text.push_str(&format!(
                "column {:?} {kind} zero_means_missing={} missing={:?} missing_rule={:?}\n",
                column.name,
                column.zero_means_missing,
                self.missing_markers_of(column),
                column.missing
            ));
        }
        text
    }

    /// The columns whose categories a job discovers, as the protocol's
    /// discovery sees them.
    pub fn discovered(&self) -> Vec<Discovered> {
        self.columns
            .iter()
            .filter_map(|c| match &c.kind {
                ColumnKind::Categorical {
                    categories,
                    discover: Some(top_k),
                    ..
                } => Some(Discovered {
                    column: c.name.clone(),
                    declared: categories.clone(),
                    top_k: *top_k,
                }),
                _ => None,
            })
            .collect()
    }

    /// This schema with a job's discovered categories (from
    /// `tessera_protocol::discovery::union`: the declared ones first) in
    /// place of the declared ones: the encoding every site of the job uses.
    pub fn with_categories(&self, union: &std::collections::BTreeMap<String, Vec<String>>) -> Schema {
        let mut resolved = self.clone();
        for column in &mut resolved.columns {
            if let ColumnKind::Categorical {
                categories,
                discover: Some(_),
                ..
            } = &mut column.kind
                && let Some(values) = union.get(&column.name)
            {
                categories.clone_from(values);
            }
        }
        resolved
    }

    /// The values that mean "missing" in `column`.
    pub fn missing_markers_of<'a>(&'a self, column: &'a Column) -> &'a [String] {
        column.missing_markers.as_deref().unwrap_or(&self.missing_markers)
    }
}

/// The values one site proposes for a discovered column unless its `top_k`
/// says otherwise.
pub const DEFAULT_TOP_K: usize = 100;

/// The name of a categorical column's other bucket (`name=(other)`).
pub const OTHER: &str = "(other)";

/// The name of a column's missing-value indicator (`name=(missing)`).
pub const MISSING: &str = "(missing)";

impl CompareOp {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            CompareOp::Gt => value > threshold,
            CompareOp::Ge => value >= threshold,
            CompareOp::Lt => value < threshold,
            CompareOp::Le => value <= threshold,
            CompareOp::Eq => value == threshold,
            CompareOp::Ne => value != threshold,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    format: RawFormat,
    label: RawLabel,
    split: RawSplit,
    column: Vec<RawColumn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFormat {
    #[serde(default = "default_delimiter")]
    delimiter: String,
    #[serde(default)]
    header: bool,
    #[serde(default)]
    missing_markers: Vec<String>,
    /// The missing rule of every feature column that names none.
    missing: Option<String>,
}

fn default_delimiter() -> String {
    ",".into()
}

impl Default for RawFormat {
    fn default() -> Self {
        Self {
            delimiter: default_delimiter(),
            header: false,
            missing_markers: Vec::new(),
            missing: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    column: String,
    positive_if: Option<String>,
    positive_in: Option<Vec<String>>,
    #[serde(default)]
    negative_in: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    test_fraction: f64,
    #[serde(default)]
    seed: u64,
    group_by: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    kind: String,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    zero_means_missing: bool,
    missing_markers: Option<Vec<String>>,
    missing: Option<String>,
    #[serde(default)]
    other: bool,
    #[serde(default)]
    map: Vec<RawMap>,
    #[serde(default)]
    discover: bool,
    top_k: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    prefix: Option<String>,
    range: Option<[f64; 2]>,
    values: Option<Vec<String>>,
    to: String,
}

impl RawSchema {
    fn validate(self) -> Result<Schema, SchemaError> {
        let delimiter = match self.format.delimiter.as_bytes() {
            [b] => *b,
            _ => return Err(invalid("format.delimiter", "must be exactly one ASCII character")),
        };
        let default_missing = match &self.format.missing {
            Some(text) => MissingRule::parse("format.missing", text)?,
            None => MissingRule::Drop,
        };
        let mut columns = Vec::with_capacity(self.column.len());
        for (i, raw) in self.column.into_iter().enumerate() {
            let field = format!("column[{i}] ({})", raw.name);
            if raw.name.trim().is_empty() {
                return Err(invalid(format!("column[{i}].name"), "must not be empty"));
            }
            if columns.iter().any(|c: &Column| c.name == raw.name) {
                return Err(invalid(field, "duplicate column name"));
            }
            let kind = match raw.kind.as_str() {
                "numeric" => ColumnKind::Numeric,
                "categorical" => {
                    if raw.categories.is_empty() && !raw.discover {
                        return Err(invalid(
                            field,
                            "a categorical column needs `categories` (or `discover = true`)",
                        ));
                    }
                    if raw.discover && !raw.other {
                        return Err(invalid(
                            field,
                            "`discover = true` needs `other = true`: a value too rare to be proposed goes there",
                        ));
                    }
                    let discover = match (raw.discover, raw.top_k) {
                        (true, Some(k)) if (1..=MAX_PROPOSED).contains(&k) => Some(k),
                        (true, Some(k)) => {
                            return Err(invalid(
                                format!("{field}.top_k"),
                                format!("must be between 1 and {MAX_PROPOSED}, got {k}"),
                            ));
                        }
                        (true, None) => Some(DEFAULT_TOP_K),
                        (false, Some(_)) => {
                            return Err(invalid(format!("{field}.top_k"), "only applies with `discover = true`"));
                        }
                        (false, None) => None,
                    };
                    if raw.categories.iter().any(|c| c == OTHER) {
                        return Err(invalid(
                            field,
                            format!("`{OTHER}` is the other bucket's name; set `other = true` instead"),
                        ));
                    }
                    if raw.categories.iter().any(|c| c == MISSING) {
                        return Err(invalid(
                            field,
                            format!(
                                "`{MISSING}` is the missing indicator's name; set `missing = \"indicator\"` instead"
                            ),
                        ));
                    }
                    let map = raw
                        .map
                        .iter()
                        .enumerate()
                        .map(|(k, rule)| rule.validate(&format!("{field}.map[{k}]"), &raw.categories))
                        .collect::<Result<_, _>>()?;
                    ColumnKind::Categorical {
                        categories: raw.categories.clone(),
                        other: raw.other,
                        map,
                        discover,
                    }
                }
                "label" => ColumnKind::Label,
                "id" => {
                    if self.split.group_by.as_deref() != Some(raw.name.as_str()) {
                        return Err(invalid(
                            format!("{field}.kind"),
                            "an id column is used only by `[split] group_by`: name it there, or declare it kind = \"drop\"",
                        ));
                    }
                    ColumnKind::Id
                }
                "drop" => ColumnKind::Drop,
                other => {
                    return Err(invalid(
                        format!("{field}.kind"),
                        format!("unknown kind `{other}`; expected numeric, categorical, label, id or drop"),
                    ));
                }
            };
            if !matches!(kind, ColumnKind::Categorical { .. }) {
                for (set, key) in [
                    (!raw.categories.is_empty(), "categories"),
                    (raw.other, "other"),
                    (!raw.map.is_empty(), "map"),
                    (raw.discover, "discover"),
                    (raw.top_k.is_some(), "top_k"),
                ] {
                    if set {
                        return Err(invalid(
                            field,
                            format!("`{key}` only applies to kind = \"categorical\""),
                        ));
                    }
                }
            }
            let is_feature = matches!(kind, ColumnKind::Numeric | ColumnKind::Categorical { .. });
            let missing = match (&raw.missing, is_feature) {
                (Some(text), true) => MissingRule::parse(&format!("{field}.missing"), text)?,
                (None, true) => default_missing,
                (Some(_), false) => {
                    return Err(invalid(
                        format!("{field}.missing"),
                        "only applies to feature columns (numeric, categorical): a row without its label or id is always left out",
                    ));
                }
                (None, false) => MissingRule::Drop,
            };
            columns.push(Column {
                name: raw.name,
                kind,
                zero_means_missing: raw.zero_means_missing,
                missing_markers: raw.missing_markers,
                missing,
            });
        }
        let labels: Vec<&Column> = columns.iter().filter(|c| c.kind == ColumnKind::Label).collect();
        match labels.as_slice() {
            [one] if one.name == self.label.column => {}
            [] => return Err(invalid("label.column", "no column has kind = \"label\"")),
            [one] => {
                return Err(invalid(
                    "label.column",
                    format!("names `{}` but the label column is `{}`", self.label.column, one.name),
                ));
            }
            _ => return Err(invalid("column", "more than one column has kind = \"label\"")),
        }
        if !columns
            .iter()
            .any(|c| matches!(c.kind, ColumnKind::Numeric | ColumnKind::Categorical { .. }))
        {
            return Err(invalid("column", "no feature columns (numeric or categorical)"));
        }
        if let Some(group_by) = &self.split.group_by
            && !columns.iter().any(|c| &c.name == group_by && c.kind == ColumnKind::Id)
        {
            return Err(invalid(
                "split.group_by",
                format!("names `{group_by}`, which is not a column of kind = \"id\""),
            ));
        }
        let label = match (self.label.positive_if, self.label.positive_in) {
            (Some(rule), None) if self.label.negative_in.is_empty() => parse_rule(&rule)?,
            (None, Some(positive)) if !positive.is_empty() => {
                if let Some(both) = positive.iter().find(|p| self.label.negative_in.contains(p)) {
                    return Err(invalid(
                        "label.negative_in",
                        format!("`{both}` is in both positive_in and negative_in"),
                    ));
                }
                LabelRule::OneOf {
                    positive,
                    negative: self.label.negative_in,
                }
            }
            (Some(_), None) => {
                return Err(invalid("label.negative_in", "only applies with `positive_in`"));
            }
            (None, Some(_)) => return Err(invalid("label.positive_in", "must name at least one value")),
            (Some(_), Some(_)) => {
                return Err(invalid("label", "set either `positive_if` or `positive_in`, not both"));
            }
            (None, None) => {
                return Err(invalid(
                    "label",
                    "needs `positive_if` (a numeric rule such as \"> 0\") or `positive_in` (a list of values)",
                ));
            }
        };
        let test_fraction = self.split.test_fraction;
        if !(test_fraction.is_finite() && test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(invalid(
                "split.test_fraction",
                format!("must be in (0, 1), got {test_fraction}"),
            ));
        }
        Ok(Schema {
            delimiter,
            header: self.format.header,
            missing_markers: self.format.missing_markers,
            columns,
            label,
            split: SplitSpec {
                test_fraction,
                seed: self.split.seed,
                group_by: self.split.group_by,
            },
        })
    }
}

impl RawMap {
    fn validate(&self, field: &str, categories: &[String]) -> Result<CategoryMap, SchemaError> {
        let to = categories
            .iter()
            .position(|c| *c == self.to)
            .ok_or_else(|| invalid(field, format!("`to = \"{}\"` is not a declared category", self.to)))?;
        let matches = match (&self.prefix, &self.range, &self.values) {
            (Some(prefix), None, None) if !prefix.is_empty() => CodeMatch::Prefix(prefix.clone()),
            (None, Some([from, to]), None) if from.is_finite() && to.is_finite() && from <= to => {
                CodeMatch::Range { from: *from, to: *to }
            }
            (None, None, Some(values)) if !values.is_empty() => CodeMatch::Values(values.clone()),
            _ => {
                return Err(invalid(
                    field,
                    "needs exactly one of `prefix = \"250\"`, `range = [390, 459]` (from <= to) or `values = [...]`, and `to`",
                ));
            }
        };
        Ok(CategoryMap { matches, to })
    }
}

impl CodeMatch {
    /// Whether a raw value (its text, and its number where it reads as one)
    /// is taken by this rule.
    pub fn takes(&self, text: &str, number: Option<f64>) -> bool {
        match self {
            CodeMatch::Prefix(prefix) => text.starts_with(prefix.as_str()),
            CodeMatch::Range { from, to } => number.is_some_and(|v| *from <= v && v < to + 1.0),
            CodeMatch::Values(values) => values.iter().any(|v| v == text),
        }
    }
}

fn parse_rule(rule: &str) -> Result<LabelRule, SchemaError> {
    let rule = rule.trim();
    let ops = [
        (">=", CompareOp::Ge),
        ("<=", CompareOp::Le),
        ("==", CompareOp::Eq),
        ("!=", CompareOp::Ne),
        (">", CompareOp::Gt),
        ("<", CompareOp::Lt),
    ];
    for (text, op) in ops {
        if let Some(rest) = rule.strip_prefix(text) {
            let threshold: f64 = rest
                .trim()
                .parse()
                .map_err(|_| invalid("label.positive_if", format!("`{}` is not a number", rest.trim())))?;
            return Ok(LabelRule::Compare { op, threshold });
        }
    }
    Err(invalid(
        "label.positive_if",
        format!("`{rule}` should look like \"> 0\" (operators: > >= < <= == !=)"),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) const SMALL: &str = r#"
[format]
missing_markers = ["?"]
[label]
column = "y"
positive_if = "> 0"
[split]
test_fraction = 0.25
seed = 1
[[column]]
name = "a"
kind = "numeric"
zero_means_missing = true
[[column]]
name = "c"
kind = "categorical"
categories = ["1", "2"]
[[column]]
name = "skip"
kind = "drop"
[[column]]
name = "y"
kind = "label"
"#;

    fn check_err(from: &str, to: &str, field_part: &str, reason_part: &str) {
        let text = SMALL.replace(from, to);
        assert_ne!(text, SMALL);
        match Schema::from_toml(&text) {
            Err(SchemaError::Invalid { field, reason }) => {
                assert!(field.contains(field_part), "{field}");
                assert!(reason.contains(reason_part), "{reason}");
            }
            other => panic!("expected error on {field_part}, got {other:?}"),
        }
    }

    #[test]
    fn small_schema_parses() {
        let schema = Schema::from_toml(SMALL).unwrap();
        assert_eq!(schema.feature_names(), vec!["a", "c=1", "c=2"]);
        assert_eq!(
            schema.label,
            LabelRule::Compare {
                op: CompareOp::Gt,
                threshold: 0.0
            }
        );
        assert!(schema.columns[0].zero_means_missing);
        assert_eq!(schema.delimiter, b',');
    }

    #[test]
    fn schema_errors_name_the_field() {
        check_err(
            "positive_if = \"> 0\"",
            "positive_if = \"bigger 0\"",
            "label.positive_if",
            "should look like",
        );
        check_err(
            "positive_if = \"> 0\"",
            "positive_if = \"> x\"",
            "label.positive_if",
            "not a number",
        );
        check_err(
            "kind = \"drop\"",
            "kind = \"dropp\"",
            "column[2] (skip).kind",
            "unknown kind `dropp`",
        );
        check_err("categories = [\"1\", \"2\"]", "", "column[1] (c)", "needs `categories`");
        check_err("column = \"y\"", "column = \"z\"", "label.column", "names `z`");
        check_err(
            "test_fraction = 0.25",
            "test_fraction = 1.5",
            "split.test_fraction",
            "(0, 1)",
        );
        check_err("name = \"skip\"", "name = \"a\"", "column[2] (a)", "duplicate");
        check_err(
            "kind = \"drop\"",
            "kind = \"id\"",
            "column[2] (skip).kind",
            "only by `[split] group_by`",
        );
        check_err(
            "seed = 1",
            "seed = 1\ngroup_by = \"skip\"",
            "split.group_by",
            "names `skip`, which is not a column of kind = \"id\"",
        );
        assert!(matches!(Schema::from_toml("[label"), Err(SchemaError::Syntax(_))));
        assert!(matches!(
            Schema::from_toml(&SMALL.replace("seed = 1", "seed = 1\nsede = 2")),
            Err(SchemaError::Syntax(m)) if m.contains("sede")
        ));
    }

    #[test]
    fn group_by_names_an_id_column_that_is_not_a_feature() {
        let text = SMALL
            .replace("seed = 1", "seed = 1\ngroup_by = \"skip\"")
            .replace("kind = \"drop\"", "kind = \"id\"");
        let schema = Schema::from_toml(&text).unwrap();
        assert_eq!(schema.split.group_by.as_deref(), Some("skip"));
        assert_eq!(schema.columns[2].kind, ColumnKind::Id);
        let plain = Schema::from_toml(SMALL).unwrap();
        assert_eq!(schema.feature_names(), plain.feature_names());
        assert_eq!(schema.features_hash(), plain.features_hash());
    }

    /// `discover` needs an other bucket and bounds what a site proposes;
    /// a schema without it hashes as before it existed.
    #[test]
    fn discovery_is_declared_on_a_categorical_column_with_an_other_bucket() {
        let cats = "categories = [\"1\", \"2\"]";
        check_err(cats, "discover = true", "column[1] (c)", "needs `other = true`");
        check_err(
            cats,
            &format!("{cats}\ntop_k = 5"),
            "column[1] (c).top_k",
            "only applies with `discover = true`",
        );
        check_err(
            cats,
            "discover = true\nother = true\ntop_k = 0",
            "column[1] (c).top_k",
            "between 1 and 1000",
        );
        check_err(
            cats,
            "discover = true\nother = true\ntop_k = 1001",
            "column[1] (c).top_k",
            "between 1 and 1000",
        );
        check_err(
            "zero_means_missing = true",
            "discover = true",
            "column[0] (a)",
            "`discover` only applies",
        );
        let plain = Schema::from_toml(SMALL).unwrap();
        // No declared category at all: every one is discovered.
        let discovering = Schema::from_toml(&SMALL.replace(cats, "discover = true\nother = true")).unwrap();
        assert_eq!(
            discovering.discovered(),
            [Discovered {
                column: "c".into(),
                declared: vec![],
                top_k: DEFAULT_TOP_K,
            }]
        );
        assert_eq!(discovering.feature_names(), ["a", "c=(other)"]);
        assert!(plain.discovered().is_empty());
        // The encoding text of a schema without discovery is unchanged.
        assert!(!plain.encoding().contains("discover"));
        let union = BTreeMap::from([("c".to_owned(), vec!["1".to_owned(), "2".to_owned()])]);
        let resolved = discovering.with_categories(&union);
        assert_eq!(resolved.feature_names(), ["a", "c=1", "c=2", "c=(other)"]);
        // What was discovered is part of the hash: a site that discovered
        // the same values with a declared list, or none, encodes otherwise.
        let declared = Schema::from_toml(&SMALL.replace(cats, &format!("{cats}\nother = true"))).unwrap();
        assert_eq!(declared.feature_names(), resolved.feature_names());
        assert_ne!(declared.features_hash(), resolved.features_hash());
        assert_ne!(discovering.features_hash(), resolved.features_hash());
        // Only discovered columns take the union.
        assert_eq!(plain.with_categories(&union), plain);
    }

    #[test]
    fn comparison_operators() {
        for (rule, v, expect) in [
            ("> 0", 1.0, true),
            ("> 0", 0.0, false),
            (">= 1", 1.0, true),
            ("< 2", 2.0, false),
            ("<= 2", 2.0, true),
            ("== 3", 3.0, true),
            ("!= 3", 3.0, false),
        ] {
            let LabelRule::Compare { op, threshold } = parse_rule(rule).unwrap() else {
                panic!("{rule} is a comparison")
            };
            assert_eq!(op.holds(v, threshold), expect, "{rule} on {v}");
        }
    }
}
