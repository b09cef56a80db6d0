//! Datasets in the data zone: what a holder registers, and what the catalog shows.

use baygrid_rules::{EvidenceKind, Level, Personal};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A dataset's registration: who holds it, which vault keeps it, and the facts the
/// cross-border rules decide on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Lowercase letters, digits and `-`.
    pub name: String,
    /// The party that holds the data (the exporter of every flow out of it).
    pub holder: String,
    /// The site whose vault keeps the data; the data is in that site's jurisdiction.
    pub vault: String,
    /// general | important | core
    #[schema(value_type = String)]
    pub level: Level,
    /// none | personal | sensitive
    #[schema(value_type = String)]
    pub personal: Personal,
    /// Individuals the data is about (0 when `personal` is none).
    #[serde(default)]
    pub subjects: u64,
    /// The column that identifies an individual; required for personal data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_column: Option<String>,
    /// What the data was collected for.
    pub purposes: Vec<String>,
    /// Whether the data was collected outside the holder's jurisdiction.
    #[serde(default)]
    pub collected_abroad: bool,
    /// The kind of contract the data arrived under, when it came from elsewhere:
    /// standard_contract | gba_contract_hk | gba_contract_mo
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub arrived_under: Option<EvidenceKind>,
    /// The columns, in file order. A derived dataset (a job's outputs) may have none: its
    /// files are whatever the job wrote.
    #[serde(default)]
    pub schema: Vec<Column>,
    /// For a job's outputs: the datasets it read, whose classification it carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub derived_from: Vec<String>,
}

/// One column of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ColumnType,
}

/// The types a column may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    String,
    Int,
    Float,
    Bool,
    Date,
    Timestamp,
}

/// A field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DatasetError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: impl Into<String>, message: impl Into<String>) -> DatasetError {
    DatasetError {
        field: field.into(),
        message: message.into(),
    }
}

/// A column or purpose name: 1-63 letters, digits, `_` and `-`, starting with a letter or `_`.
pub(crate) fn is_identifier(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && value.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
}

impl DatasetSpec {
    /// Checks what can be checked without the catalog (the holder and vault are checked
    /// against it by the server).
    pub fn validate(&self) -> Result<(), DatasetError> {
        if !baygrid_core::ids::is_valid_name(&self.name) {
            return Err(bad(
                "name",
                format!(
                    "`{}` is not a name: use 1-63 lowercase letters, digits and `-`",
                    self.name
                ),
            ));
        }
        let derived = !self.derived_from.is_empty();
        if self.schema.is_empty() && !derived {
            return Err(bad("schema", "must list at least one column"));
        }
        for (i, column) in self.schema.iter().enumerate() {
            if !is_identifier(&column.name) {
                return Err(bad(
                    format!("schema[{i}].name"),
                    format!(
                        "`{}` is not a column name: use 1-63 letters, digits, `_` and `-`, starting with a letter",
                        column.name
                    ),
                ));
            }
            if self.schema[..i].iter().any(|c| c.name == column.name) {
                return Err(bad(
                    format!("schema[{i}].name"),
                    format!("`{}` appears twice", column.name),
                ));
            }
        }
        if self.purposes.is_empty() {
            return Err(bad("purposes", "name at least one collection purpose"));
        }
        for (i, purpose) in self.purposes.iter().enumerate() {
            if !is_identifier(purpose) {
                return Err(bad(
                    format!("purposes[{i}]"),
                    format!("`{purpose}` is not a purpose: use letters, digits, `_` and `-`"),
                ));
            }
        }
        match self.personal {
            Personal::None => {
                if self.subjects != 0 {
                    return Err(bad(
                        "subjects",
                        "data with no personal information is about no individuals: leave it 0 or set `personal`",
                    ));
                }
            }
            Personal::Personal | Personal::Sensitive => {
                if self.subjects == 0 {
                    return Err(bad(
                        "subjects",
                        "personal data must say how many individuals it is about",
                    ));
                }
                let Some(column) = self.subject_column.as_deref() else {
                    if derived {
                        return self.check_arrived_under();
                    }
                    return Err(bad(
                        "subject_column",
                        "personal data must name the column that identifies an individual",
                    ));
                };
                if !self.schema.iter().any(|c| c.name == column) {
                    return Err(bad(
                        "subject_column",
                        format!("`{column}` is not in the schema"),
                    ));
                }
            }
        }
        if let Some(column) = self.subject_column.as_deref() {
            if !self.schema.iter().any(|c| c.name == column) {
                return Err(bad(
                    "subject_column",
                    format!("`{column}` is not in the schema"),
                ));
            }
        }
        self.check_arrived_under()
    }

    fn check_arrived_under(&self) -> Result<(), DatasetError> {
        if let Some(kind) = self.arrived_under {
            if !matches!(
                kind,
                EvidenceKind::StandardContract
                    | EvidenceKind::GbaContractHk
                    | EvidenceKind::GbaContractMo
            ) {
                return Err(bad(
                    "arrived_under",
                    format!(
                        "`{}` is not a contract: use standard_contract, gba_contract_hk or gba_contract_mo",
                        kind.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The facts the rules decide a flow of this dataset on.
    pub fn facts(&self) -> baygrid_rules::DataFacts {
        baygrid_rules::DataFacts {
            name: self.name.clone(),
            level: self.level,
            personal: self.personal,
            subjects: self.subjects,
            collected_abroad: self.collected_abroad,
            collection_purposes: self.purposes.clone(),
            arrived_under: self
                .arrived_under
                .map(|k| k.as_str().to_string())
                .unwrap_or_default(),
        }
    }
}

/// A dataset as the catalog shows it: metadata to every tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatasetView {
    #[serde(flatten)]
    pub spec: DatasetSpec,
    /// The vault's jurisdiction.
    pub jurisdiction: baygrid_core::Jurisdiction,
    /// Uploaded versions, oldest first.
    #[serde(default)]
    pub versions: Vec<DatasetVersion>,
}

/// One file of a dataset version, as uploaded: its digest is checked on every read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionFile {
    /// The file's name in the version (letters, digits, `.`, `_`, `-`).
    pub name: String,
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    pub rows: u64,
    /// csv | parquet; `file` for what a job wrote among its outputs
    pub format: String,
}

/// What an upload asks the exchange to record once its files are in the vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// The upload's id: its files are under `datasets/<name>/uploads/<upload>/`.
    pub upload: String,
    pub files: Vec<VersionFile>,
    /// Distinct values of the dataset's subject column across the files (required when it
    /// names one): the individuals the version is about.
    #[serde(default)]
    pub subjects: Option<u64>,
}

/// A recorded version of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatasetVersion {
    pub dataset: String,
    /// 1, 2, … in upload order.
    pub version: u32,
    pub upload: String,
    pub files: Vec<VersionFile>,
    pub rows: u64,
    pub bytes: u64,
    /// Distinct individuals counted in the files, where the dataset has a subject column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<u64>,
    /// RFC 3339.
    pub created_at: String,
}

/// A site's vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VaultView {
    pub site: String,
    pub jurisdiction: baygrid_core::Jurisdiction,
    /// A local directory, `file:///…` or `s3://bucket/prefix`.
    pub url: String,
}

/// The longest name of a file in a dataset's version, in bytes.
pub const FILE_NAME_MAX: usize = 128;

/// A character a file name in a dataset's version may hold.
pub fn is_file_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A name a file in a dataset's version may have: letters, digits, `.`, `_` and `-`, at
/// most [`FILE_NAME_MAX`] bytes, not starting with a dot.
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= FILE_NAME_MAX
        && !name.starts_with('.')
        && name.chars().all(is_file_name_char)
}

impl NewVersion {
    /// Checks the shape of an upload record, naming the field at fault.
    pub fn validate(&self) -> Result<(), DatasetError> {
        if self.upload.is_empty()
            || self.upload.len() > 64
            || !self
                .upload
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("upload", "use 1-64 letters, digits, `-` and `_`"));
        }
        if self.files.is_empty() {
            return Err(bad("files", "a version has at least one file"));
        }
        for (i, file) in self.files.iter().enumerate() {
            if !is_file_name(&file.name) {
                return Err(bad(
                    format!("files[{i}].name"),
                    format!(
                        "`{}` is not a file name: letters, digits, `.`, `_` and `-`",
                        file.name
                    ),
                ));
            }
            if self.files[..i].iter().any(|f| f.name == file.name) {
                return Err(bad(
                    format!("files[{i}].name"),
                    format!("`{}` appears twice", file.name),
                ));
            }
            if file.sha256.len() != 64
                || !file
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                return Err(bad(
                    format!("files[{i}].sha256"),
                    "must be 64 lowercase hex digits",
                ));
            }
            if !matches!(file.format.as_str(), "csv" | "parquet" | "file") {
                return Err(bad(
                    format!("files[{i}].format"),
                    format!("`{}`: use csv or parquet", file.format),
                ));
            }
        }
        let rows: u64 = self.files.iter().map(|f| f.rows).sum();
        if let Some(subjects) = self.subjects.filter(|n| *n > rows) {
            return Err(bad(
                "subjects",
                format!("{subjects} individuals in {rows} rows: each row is about one at most"),
            ));
        }
        Ok(())
    }
}

impl DatasetSpec {
    /// The individuals the rules count for this dataset: what its holder declared, or what
    /// its latest version's files hold where that is more.
    pub fn subjects_in(&self, versions: &[DatasetVersion]) -> u64 {
        let counted = versions.last().and_then(|v| v.subjects).unwrap_or(0);
        self.subjects.max(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatasetSpec {
        serde_json::from_value(serde_json::json!({
            "name": "hk-card-spend",
            "holder": "hk-bank",
            "vault": "hk-cyberport",
            "level": "general",
            "personal": "personal",
            "subjects": 120000,
            "subject_column": "customer_id",
            "purposes": ["credit_risk"],
            "schema": [
                {"name": "customer_id", "type": "string"},
                {"name": "spend", "type": "float"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_good_spec_passes_and_gives_its_facts() {
        let s = spec();
        s.validate().unwrap();
        let facts = s.facts();
        assert_eq!(facts.subjects, 120000);
        assert_eq!(facts.arrived_under, "");
    }

    #[test]
    fn errors_name_the_field() {
        type Edit = Box<dyn Fn(&mut DatasetSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|s| s.name = "Bad Name".into())),
            ("schema", Box::new(|s| s.schema.clear())),
            (
                "schema[1].name",
                Box::new(|s| s.schema[1].name = "customer_id".into()),
            ),
            ("purposes", Box::new(|s| s.purposes.clear())),
            ("purposes[0]", Box::new(|s| s.purposes[0] = "a b".into())),
            ("subjects", Box::new(|s| s.subjects = 0)),
            ("subject_column", Box::new(|s| s.subject_column = None)),
            (
                "subject_column",
                Box::new(|s| s.subject_column = Some("nope".into())),
            ),
            (
                "subjects",
                Box::new(|s| {
                    s.personal = Personal::None;
                }),
            ),
            (
                "arrived_under",
                Box::new(|s| s.arrived_under = Some(EvidenceKind::MoConsent)),
            ),
        ];
        for (field, edit) in cases {
            let mut s = spec();
            edit(&mut s);
            let err = s.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }
}
