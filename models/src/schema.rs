//! The dataset schema (TOML): how a site's raw file becomes feature vectors and
//! labels. Every site of a job uses the same schema, so the encoded features
//! line up column for column; the coordinator checks this through the
//! features hash sent with the preprocessing statistics.

use serde::Deserialize;
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
}

#[derive(Clone, Debug, PartialEq)]
pub enum ColumnKind {
    Numeric,
    /// One-hot encoded over exactly these categories, in this order. Declared,
    /// not discovered, so that every site produces the same features.
    Categorical {
        categories: Vec<String>,
    },
    Label,
    Drop,
}

/// A binary label derived from a numeric column: positive when
/// `value <op> threshold`.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelRule {
    pub op: CompareOp,
    pub threshold: f64,
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitSpec {
    /// The test split holds `ceil(test_fraction * rows)` rows.
    pub test_fraction: f64,
    pub seed: u64,
}

/// Why a schema file was refused; `field` is the TOML path.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("schema is not valid TOML: {0}")]
    Syntax(String),
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
        let raw: RawSchema = toml::from_str(text).map_err(|e| SchemaError::Syntax(e.to_string()))?;
        raw.validate()
    }

    /// Names of the encoded features, in order (`cp=1` for one-hot columns).
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for column in &self.columns {
            match &column.kind {
                ColumnKind::Numeric => names.push(column.name.clone()),
                ColumnKind::Categorical { categories } => {
                    names.extend(categories.iter().map(|c| format!("{}={c}", column.name)));
                }
                ColumnKind::Label | ColumnKind::Drop => {}
            }
        }
        names
    }

    /// Fingerprint of the feature encoding, compared across sites.
    pub fn features_hash(&self) -> String {
        sha256_hex(self.feature_names().join("\n").as_bytes())
    }
}

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
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    column: String,
    positive_if: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    test_fraction: f64,
    #[serde(default)]
    seed: u64,
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
}

impl RawSchema {
    fn validate(self) -> Result<Schema, SchemaError> {
        let delimiter = match self.format.delimiter.as_bytes() {
            [b] => *b,
            _ => return Err(invalid("format.delimiter", "must be exactly one ASCII character")),
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
                    if raw.categories.is_empty() {
                        return Err(invalid(field, "a categorical column needs `categories`"));
                    }
                    ColumnKind::Categorical {
                        categories: raw.categories.clone(),
                    }
                }
                "label" => ColumnKind::Label,
                "drop" => ColumnKind::Drop,
                other => {
                    return Err(invalid(
                        format!("{field}.kind"),
                        format!("unknown kind `{other}`; expected numeric, categorical, label or drop"),
                    ));
                }
            };
            if !raw.categories.is_empty() && !matches!(kind, ColumnKind::Categorical { .. }) {
                return Err(invalid(field, "`categories` only applies to kind = \"categorical\""));
            }
            columns.push(Column {
                name: raw.name,
                kind,
                zero_means_missing: raw.zero_means_missing,
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
        let label = parse_rule(&self.label.positive_if)?;
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
            },
        })
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
            return Ok(LabelRule { op, threshold });
        }
    }
    Err(invalid(
        "label.positive_if",
        format!("`{rule}` should look like \"> 0\" (operators: > >= < <= == !=)"),
    ))
}

#[cfg(test)]
mod tests {
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
            LabelRule {
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
        assert!(matches!(Schema::from_toml("[label"), Err(SchemaError::Syntax(_))));
        assert!(matches!(
            Schema::from_toml(&SMALL.replace("seed = 1", "seed = 1\nsede = 2")),
            Err(SchemaError::Syntax(m)) if m.contains("sede")
        ));
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
            let r = parse_rule(rule).unwrap();
            assert_eq!(r.op.holds(v, r.threshold), expect, "{rule} on {v}");
        }
    }
}
