//! Compute-to-data SQL (可用不可见): a consumer's aggregate query is planned with DataFusion,
//! checked on its logical plan against the query offer's terms, and run where the data is
//! with each individual's contribution bounded, a noisy k-threshold on every group and
//! calibrated Laplace noise on every released number. Only the noisy aggregate leaves.
//!
//! [`plan`] needs only the tables' schemas (the server checks a query and prices it before
//! any budget is spent); [`answer`] runs one table's side over its files (the vault's
//! agent). A query over two tables joined on their subject columns is answered by each
//! table's vault over the individuals both hold, each with its own columns; see
//! docs/QUERY.md for the threat model.

pub use datafusion;

mod engine;
pub mod noise;
mod ordered;
mod shape;

use std::sync::Arc;

use baygrid_api::{ColumnType, DatasetSpec, QueryTerms};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

pub use baygrid_api::{GroupAnswer as Group, Mechanism, NoiseNote, SideAnswer};
pub use engine::{answer, assemble, register_files, Privacy};

/// A dataset's name as a table in SQL: each `-` written `_`.
pub fn sql_name(dataset: &str) -> String {
    dataset.replace('-', "_")
}
pub use shape::{Aggregate, Output, Shape, Side};

/// Why a query may not run, naming the expression at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{reason}{}", expression.as_ref().map(|e| format!(" (at `{e}`)")).unwrap_or_default())]
pub struct Refusal {
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            expression: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// Reading or computing over the data failed.
    #[error("engine: {0}")]
    Engine(String),
}

impl From<datafusion::error::DataFusionError> for QueryError {
    fn from(e: datafusion::error::DataFusionError) -> QueryError {
        QueryError::Engine(e.to_string())
    }
}

/// A dataset a query may read, with the terms of the offer it is read under.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The table's name in SQL.
    pub name: String,
    /// The column that identifies an individual.
    pub subject: String,
    pub columns: Vec<(String, ColumnType)>,
    pub terms: QueryTerms,
}

impl Table {
    /// A dataset under a query offer, named as SQL sees it ([`sql_name`]); its subject
    /// column is required.
    pub fn new(dataset: &DatasetSpec, terms: QueryTerms) -> Result<Table, Refusal> {
        let subject = dataset.subject_column.clone().ok_or_else(|| {
            Refusal::new(format!(
                "`{}` names no subject column, so no individual's contribution can be bounded",
                dataset.name
            ))
        })?;
        Ok(Table {
            name: sql_name(&dataset.name),
            subject,
            columns: dataset
                .schema
                .iter()
                .map(|c| (c.name.clone(), c.kind))
                .collect(),
            terms,
        })
    }

    /// The Arrow schema the dataset's files are read with.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|(name, kind)| Field::new(name, arrow_type(*kind), true))
                .collect::<Vec<_>>(),
        ))
    }

    /// The range values of `column` are clamped to.
    pub fn range(&self, column: &str) -> (f64, f64) {
        self.terms.ranges.get(column).copied().unwrap_or((0.0, 0.0))
    }
}

pub fn arrow_type(kind: ColumnType) -> DataType {
    match kind {
        ColumnType::String => DataType::Utf8,
        ColumnType::Int => DataType::Int64,
        ColumnType::Float => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Date => DataType::Date32,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
    }
}

/// Parses the SQL into exactly one query statement; malformed SQL, several statements and
/// anything but a query are refused with the reason.
fn parse(sql: &str) -> Result<datafusion::sql::parser::Statement, Refusal> {
    use datafusion::sql::parser::{DFParserBuilder, Statement};
    let mut statements = DFParserBuilder::new(sql)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| Refusal::new(format!("the SQL does not parse: {e}")))?;
    let statement = match (statements.pop_front(), statements.len()) {
        (None, _) => return Err(Refusal::new("the SQL holds no statement")),
        (Some(s), 0) => s,
        (Some(_), more) => {
            return Err(Refusal::new(format!(
                "one statement per query: this SQL holds {}",
                more + 1
            )))
        }
    };
    match &statement {
        Statement::Statement(s)
            if matches!(
                s.as_ref(),
                datafusion::sql::sqlparser::ast::Statement::Query(_)
            ) =>
        {
            Ok(statement)
        }
        other => {
            let head: String = other.to_string().chars().take(40).collect();
            Err(Refusal {
                reason: "only a SELECT may run".into(),
                expression: Some(head),
            })
        }
    }
}

/// The tables the SQL names, in order of first mention (at most two).
pub fn tables_named(sql: &str) -> Result<Vec<String>, Refusal> {
    let statement = parse(sql)?;
    let ctx = SessionContext::new();
    let references = ctx
        .state()
        .resolve_table_references(&statement)
        .map_err(|e| {
            Refusal::new(format!(
                "the query does not plan: {}",
                first_line(&e.to_string())
            ))
        })?;
    let mut names: Vec<String> = Vec::new();
    for r in references {
        let name = r.table().to_string();
        if r.schema().is_some() {
            return Err(Refusal {
                reason: "name datasets as plain tables".into(),
                expression: Some(r.to_string()),
            });
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    match names.len() {
        0 => Err(Refusal::new("the query reads no dataset")),
        1 | 2 => Ok(names),
        n => Err(Refusal::new(format!(
            "a query reads one dataset, or two joined on their subjects; this one names {n}"
        ))),
    }
}

/// Plans one SQL query over the tables' schemas (no data) and checks the plan's shape.
pub async fn plan(sql: &str, tables: &[Table]) -> Result<Shape, Refusal> {
    let statement = parse(sql)?;
    let ctx = SessionContext::new();
    for table in tables {
        let empty = MemTable::try_new(table.schema(), vec![vec![]])
            .map_err(|e| Refusal::new(format!("table `{}`: {e}", table.name)))?;
        ctx.register_table(table.name.as_str(), Arc::new(empty))
            .map_err(|e| Refusal::new(format!("table `{}`: {e}", table.name)))?;
    }
    let plan = ctx
        .state()
        .statement_to_plan(statement)
        .await
        .map_err(|e| {
            Refusal::new(format!(
                "the query does not plan: {}",
                first_line(&e.to_string())
            ))
        })?;
    shape::check(&plan, tables)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// What a query costs one table's budget, and how its ε is split.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SideCost {
    pub table: String,
    pub epsilon: f64,
    /// Spent when the query groups (choosing which groups exist) or uses Gaussian noise.
    pub delta: f64,
    /// Equal shares of ε: the individuals' threshold count and each aggregate's own.
    pub shares: u32,
}

/// The privacy cost of a query at `epsilon` (and `delta` when it groups or its noise is
/// Gaussian), per table read.
pub fn cost(shape: &Shape, epsilon: f64, delta: f64, mechanism: Mechanism) -> Vec<SideCost> {
    let spends_delta = shape.grouped() || mechanism == Mechanism::Gaussian;
    shape
        .tables
        .iter()
        .map(|t| SideCost {
            table: t.clone(),
            epsilon,
            delta: if spends_delta { delta } else { 0.0 },
            shares: shape.side(t).shares(),
        })
        .collect()
}

/// The released answer, as the API carries it.
pub type Released = baygrid_api::QueryResult;

#[cfg(test)]
mod tests;

/// Copies a CSV with a header, dropping the rows of a seeded share of its subjects: the
/// same ids go whatever the rows' order (each id's SHA-256 with the seed decides). Returns
/// (rows kept, rows dropped). Used to make two parties' tables overlap only in part.
pub fn drop_subjects(
    from: &std::path::Path,
    to: &std::path::Path,
    subject: &str,
    share: f64,
    seed: u64,
) -> std::io::Result<(usize, usize)> {
    use sha2::Digest;
    use std::io::{BufRead, Write};
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let input = std::io::BufReader::new(std::fs::File::open(from)?);
    let mut out = std::io::BufWriter::new(std::fs::File::create(to)?);
    let mut lines = input.lines();
    let header = lines
        .next()
        .ok_or_else(|| bad(format!("{} is empty", from.display())))??;
    let column = header
        .split(',')
        .position(|c| c.trim() == subject)
        .ok_or_else(|| bad(format!("{} has no column `{subject}`", from.display())))?;
    writeln!(out, "{header}")?;
    let (mut kept, mut dropped) = (0, 0);
    for line in lines {
        let line = line?;
        let id = line.split(',').nth(column).unwrap_or("");
        let mut hash = sha2::Sha256::new();
        hash.update(seed.to_le_bytes());
        hash.update(id.as_bytes());
        let digest = hash.finalize();
        let draw =
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
        if draw < share {
            dropped += 1;
        } else {
            writeln!(out, "{line}")?;
            kept += 1;
        }
    }
    out.flush()?;
    Ok((kept, dropped))
}
