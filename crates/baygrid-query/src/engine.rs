//! One table's side of a query, run over its files: filter, restrict to the agreed
//! individuals, bound each individual's contribution, aggregate, threshold and add noise.
//!
//! Bounding: first sum per (individual, group) — in one pass in the files' order when they
//! come individual by individual ([`crate::ordered`]), else by DataFusion's hash aggregate.
//! An individual keeps at most
//! `m = max_rows_per_subject` groups (those whose key hashes lowest, so the choice depends
//! on that individual's rows alone), and its kept rows are weighted by min(1, m / rows), so
//! over all groups it adds at most m rows, m · max(|low|, |high|) to a sum and 1 to each of
//! at most m groups' count of individuals. Those are the L1 sensitivities the noise is
//! scaled to.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{JoinType, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{cast, ident, lit, when, Expr};
use datafusion::prelude::{CsvReadOptions, DataFrame, ParquetReadOptions, SessionContext};
use futures::StreamExt;
use rand::Rng;

use crate::noise::{gaussian, gaussian_sigma, laplace, threshold};
use crate::shape::{Aggregate, Shape, Side};
use crate::{Group, Mechanism, NoiseNote, QueryError, Refusal, Released, SideAnswer, Table};

/// Registers a dataset's files (all CSV with a header, or all Parquet) in `dir` as `table`.
pub async fn register_files(
    ctx: &SessionContext,
    table: &Table,
    dir: &Path,
) -> Result<(), QueryError> {
    let mut csv = 0;
    let mut parquet = 0;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| QueryError::Engine(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        match entry.path().extension().and_then(|e| e.to_str()) {
            Some("csv") => csv += 1,
            Some("parquet") => parquet += 1,
            _ => {}
        }
    }
    let path = dir
        .to_str()
        .ok_or_else(|| QueryError::Engine(format!("{} is not UTF-8", dir.display())))?;
    let path = format!("{}/", path.trim_end_matches('/'));
    match (csv, parquet) {
        (0, 0) => Err(QueryError::Engine(format!(
            "`{}` has no CSV or Parquet file",
            table.name
        ))),
        (_, 0) => {
            let schema = table.schema();
            ctx.register_csv(
                table.name.as_str(),
                &path,
                CsvReadOptions::new().has_header(true).schema(&schema),
            )
            .await?;
            Ok(())
        }
        (0, _) => {
            ctx.register_parquet(table.name.as_str(), &path, ParquetReadOptions::default())
                .await?;
            Ok(())
        }
        _ => Err(QueryError::Engine(format!(
            "`{}` mixes CSV and Parquet files",
            table.name
        ))),
    }
}

const SUBJECT: &str = "__subject";
const ROWS: &str = "__rows";
const MEMBERS: &str = "__member";

fn value(i: usize) -> String {
    format!("__v{i}")
}

fn present(i: usize) -> String {
    format!("__p{i}")
}

fn clamped(column: &str, (low, high): (f64, f64)) -> Expr {
    let x = cast(ident(column), DataType::Float64);
    when(x.clone().lt(lit(low)), lit(low))
        .when(x.clone().gt(lit(high)), lit(high))
        .otherwise(x)
        .expect("a CASE with branches")
}

/// Runs one side of a query over `table` as registered in `ctx`. `members`, for a query
/// across two vaults, is the individuals both hold (as text): rows of others are dropped
/// before anything is computed. `epsilon` is split in equal shares over the side's
/// threshold count and its aggregates; `delta` bounds the chance that a group of one
/// individual shows.
pub async fn answer<R: Rng + ?Sized>(
    ctx: &SessionContext,
    table: &Table,
    side: &Side,
    privacy: Privacy,
    members: Option<&[String]>,
    rng: &mut R,
) -> Result<SideAnswer, QueryError> {
    let Privacy {
        epsilon,
        delta,
        mechanism,
    } = privacy;
    let grouped = !side.dimensions.is_empty();
    if grouped && delta <= 0.0 {
        return Err(Refusal::new(
            "grouping needs a δ above 0 (the chance a group of one individual shows); the offer gives none",
        )
        .into());
    }
    if mechanism == Mechanism::Gaussian && delta <= 0.0 {
        return Err(Refusal::new("the Gaussian mechanism needs a δ above 0").into());
    }
    // with Gaussian noise a grouped query's δ is split between the threshold and the noise
    let (threshold_delta, noise_delta) = match (mechanism, grouped) {
        (Mechanism::Laplace, _) => (delta, 0.0),
        (Mechanism::Gaussian, true) => (delta / 2.0, delta / 2.0),
        (Mechanism::Gaussian, false) => (delta, delta),
    };
    let m = table.terms.max_rows_per_subject.max(1);
    let mut df = ctx.table(table.name.as_str()).await?;
    if let Some(filter) = &side.filter {
        let predicate = df.parse_sql_expr(filter)?;
        df = df.filter(predicate)?;
    }
    if let Some(members) = members {
        let schema = Arc::new(Schema::new(vec![Field::new(
            MEMBERS,
            DataType::Utf8,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from_iter_values(members.iter())) as ArrayRef],
        )
        .map_err(|e| QueryError::Engine(e.to_string()))?;
        let ids = ctx.read_table(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))?;
        df = df.join_on(
            ids,
            JoinType::LeftSemi,
            [cast(ident(&table.subject), DataType::Utf8).eq(ident(MEMBERS))],
        )?;
    }
    let mut projection = vec![ident(&table.subject).alias(SUBJECT)];
    for (i, d) in side.dimensions.iter().enumerate() {
        projection.push(ident(d).alias(format!("__d{i}")));
    }
    let mut columns = Vec::new();
    for aggregate in &side.aggregates {
        if let Some(c) = aggregate.column() {
            if !columns.iter().any(|x: &String| x == c) {
                columns.push(c.to_string());
            }
        }
    }
    let dims = side.dimensions.len();
    let ranges: Vec<(f64, f64)> = columns.iter().map(|c| table.range(c)).collect();
    // the rows of a semi-join come in no particular order: those are hashed; the ordered
    // pass clamps the values itself
    let ordered = match members {
        None => {
            let mut raw = projection.clone();
            for (i, c) in columns.iter().enumerate() {
                raw.push(cast(ident(c), DataType::Float64).alias(value(i)));
            }
            crate::ordered::totals(df.clone().select(raw)?, dims, &ranges, m).await?
        }
        Some(_) => None,
    };
    let totals = match ordered {
        Some(totals) => totals,
        None => {
            for (i, (c, range)) in columns.iter().zip(&ranges).enumerate() {
                projection.push(clamped(c, *range).alias(value(i)));
            }
            hashed_cells(df.select(projection)?, dims, columns.len())
                .await?
                .totals(m)
        }
    };

    let shares = side.shares() as f64;
    let each = epsilon / shares;
    let m = m as f64;
    let subjects_scale = m / each;
    let cut = threshold(
        table.terms.k_min,
        grouped,
        table.terms.max_rows_per_subject.max(1),
        subjects_scale,
        threshold_delta,
    );
    // each share's noise for a number of the given sensitivity, and a draw of it
    let delta_each = noise_delta / shares;
    let scale_for = |sensitivity: f64| match mechanism {
        Mechanism::Laplace => sensitivity / each,
        Mechanism::Gaussian => gaussian_sigma(each, delta_each, sensitivity),
    };
    let draw = |rng: &mut R, scale: f64| match mechanism {
        Mechanism::Laplace => laplace(rng, scale),
        Mechanism::Gaussian => gaussian(rng, scale),
    };
    let count_scale = scale_for(m);
    let scales: Vec<f64> = side
        .aggregates
        .iter()
        .map(|a| match a {
            Aggregate::Count => count_scale,
            // the distinct-individual count is the threshold's own Laplace-noised count
            Aggregate::Subjects => subjects_scale,
            Aggregate::Sum(c) => {
                let (low, high) = table.range(c);
                scale_for(m * low.abs().max(high.abs()))
            }
            // half the aggregate's two shares on the centred sum, half on the count
            Aggregate::Avg(c) => {
                let (low, high) = table.range(c);
                scale_for(m * (high - low) / 2.0)
            }
        })
        .collect();
    let mut groups = Vec::new();
    let mut order: Vec<usize> = (0..totals.len()).collect();
    if !grouped && order.is_empty() {
        // an ungrouped query's one group exists whatever the data: it is tested like any
        order.push(usize::MAX);
    }
    for g in order {
        let empty = Totals::new(columns.len());
        let (key, t) = match totals.get(g) {
            Some((key, t)) => (key.clone(), t),
            None => (vec![], &empty),
        };
        let noisy_subjects = t.subjects + laplace(rng, subjects_scale);
        if noisy_subjects < cut {
            continue;
        }
        let mut values = Vec::new();
        for (a, scale) in side.aggregates.iter().zip(&scales) {
            let v = match a {
                Aggregate::Count => {
                    serde_json::json!((t.rows + draw(rng, *scale)).round().max(0.0))
                }
                Aggregate::Subjects => serde_json::json!(noisy_subjects.round()),
                Aggregate::Sum(c) => {
                    let i = columns.iter().position(|x| x == c).expect("column listed");
                    serde_json::json!(t.sums[i] + draw(rng, *scale))
                }
                Aggregate::Avg(c) => {
                    let i = columns.iter().position(|x| x == c).expect("column listed");
                    let (low, high) = table.range(c);
                    let mid = (low + high) / 2.0;
                    let centred = t.sums[i] - mid * t.present[i] + draw(rng, *scale);
                    let n = t.present[i] + draw(rng, count_scale);
                    if n < 1.0 {
                        serde_json::Value::Null
                    } else {
                        serde_json::json!((mid + centred / n).clamp(low, high))
                    }
                }
            };
            values.push(v);
        }
        groups.push(Group {
            key,
            values,
            subjects: noisy_subjects,
        });
    }
    Ok(SideAnswer {
        table: table.name.clone(),
        groups,
        threshold: cut,
        scales,
        mechanism,
    })
}

/// The (individual, group) cells of `rows` (columns `__subject`, `__d0…`, `__v0…`) by
/// DataFusion's hash aggregate.
pub(crate) async fn hashed_cells(
    rows: DataFrame,
    dims: usize,
    values: usize,
) -> Result<Bounding, QueryError> {
    let mut keys = vec![ident(SUBJECT)];
    keys.extend((0..dims).map(|i| ident(format!("__d{i}"))));
    let mut sums = vec![count(lit(1)).alias(ROWS)];
    for i in 0..values {
        sums.push(sum(ident(value(i))).alias(value(i)));
        sums.push(count(ident(value(i))).alias(present(i)));
    }
    let per_subject = rows.aggregate(keys, sums)?;
    let mut pass = Bounding::with_values(values);
    let mut stream = per_subject.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        pass.add(&batch?, dims, values)?;
    }
    Ok(pass)
}

/// What a side may spend: its ε and δ, and the noise mechanism.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Privacy {
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: Mechanism,
}

/// Per group: weighted rows, weighted clamped sums and non-null counts per value column,
/// and individuals.
#[derive(Debug, Clone)]
pub(crate) struct Totals {
    pub(crate) rows: f64,
    pub(crate) sums: Vec<f64>,
    pub(crate) present: Vec<f64>,
    pub(crate) subjects: f64,
}

impl Totals {
    pub(crate) fn new(values: usize) -> Totals {
        Totals {
            rows: 0.0,
            sums: vec![0.0; values],
            present: vec![0.0; values],
            subjects: 0.0,
        }
    }
}

/// A key already spread by a 128-bit hash: its low bits serve the map as they are.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // only u128 keys are hashed here
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

pub(crate) type KeyMap = HashMap<u128, u32, std::hash::BuildHasherDefault<Prehashed>>;

/// An individual's or a group's key: two differently seeded 64-bit XXH64 hashes of its
/// row-encoded columns. Two different keys share one with a chance near 2⁻¹²⁸ per pair
/// (below 10⁻²⁵ for ten million individuals), so no key bytes are kept.
pub(crate) fn key_of(bytes: &[u8]) -> u128 {
    let low = twox_hash::XxHash64::oneshot(0x9e37_79b9_7f4a_7c15, bytes);
    let high = twox_hash::XxHash64::oneshot(0xc2b2_ae3d_27d4_eb4f, bytes);
    (u128::from(high) << 64) | u128::from(low)
}

/// The (individual, group) rows of the first aggregation, column by column: which
/// individual and group, the rows, and per value column its clamped sum and non-null count
/// (`values` of each, side by side).
#[derive(Default)]
pub(crate) struct Bounding {
    subjects: KeyMap,
    groups: KeyMap,
    /// Per group: its key's values and the hash that orders an individual's groups.
    keys: Vec<(Vec<serde_json::Value>, u64)>,
    subject: Vec<u32>,
    group: Vec<u32>,
    rows: Vec<f64>,
    sums: Vec<f64>,
    present: Vec<f64>,
    values: usize,
    converters: Option<(RowConverter, RowConverter)>,
}

impl Bounding {
    pub(crate) fn with_values(values: usize) -> Bounding {
        Bounding {
            values,
            ..Bounding::default()
        }
    }

    fn add(&mut self, batch: &RecordBatch, dims: usize, values: usize) -> Result<(), QueryError> {
        let engine = |e: datafusion::arrow::error::ArrowError| QueryError::Engine(e.to_string());
        let columns = batch.columns();
        if self.converters.is_none() {
            let field = |c: &ArrayRef| SortField::new(c.data_type().clone());
            let subject = RowConverter::new(vec![field(&columns[0])]).map_err(engine)?;
            let dims =
                RowConverter::new(columns[1..=dims].iter().map(field).collect()).map_err(engine)?;
            self.converters = Some((subject, dims));
            self.values = values;
        }
        let (subject_conv, dims_conv) = self.converters.as_mut().expect("set above");
        let subject_rows = subject_conv
            .convert_columns(&columns[..1])
            .map_err(engine)?;
        let dim_rows = if dims == 0 {
            None
        } else {
            Some(
                dims_conv
                    .convert_columns(&columns[1..=dims])
                    .map_err(engine)?,
            )
        };
        let rows = columns[dims + 1].as_primitive::<Int64Type>();
        let sums: Vec<_> = (0..values)
            .map(|i| columns[dims + 2 + 2 * i].as_primitive::<Float64Type>())
            .collect();
        let present: Vec<_> = (0..values)
            .map(|i| columns[dims + 3 + 2 * i].as_primitive::<Int64Type>())
            .collect();
        let n = batch.num_rows();
        self.subject.reserve(n);
        self.group.reserve(n);
        self.rows.reserve(n);
        self.sums.reserve(n * values);
        self.present.reserve(n * values);
        for r in 0..n {
            let next = self.subjects.len() as u32;
            let subject = *self
                .subjects
                .entry(key_of(subject_rows.row(r).as_ref()))
                .or_insert(next);
            let bytes: &[u8] = match &dim_rows {
                Some(rows) => rows.row(r).data(),
                None => &[],
            };
            let group_key = key_of(bytes);
            let group = match self.groups.get(&group_key) {
                Some(g) => *g,
                None => {
                    let g = self.keys.len() as u32;
                    let mut key = Vec::with_capacity(dims);
                    for column in &columns[1..=dims] {
                        key.push(json(column, r)?);
                    }
                    self.keys.push((key, (group_key >> 64) as u64));
                    self.groups.insert(group_key, g);
                    g
                }
            };
            self.subject.push(subject);
            self.group.push(group);
            self.rows.push(rows.value(r) as f64);
            for (s, p) in sums.iter().zip(&present) {
                self.sums.push(if s.is_null(r) { 0.0 } else { s.value(r) });
                self.present.push(p.value(r) as f64);
            }
        }
        Ok(())
    }

    /// Keeps at most `m` groups per individual, weights its rows down to `m` in all, and
    /// sums per group.
    pub(crate) fn totals(self, m: u32) -> Vec<(Vec<serde_json::Value>, Totals)> {
        let subjects = self.subject.iter().max().map_or(0, |s| *s as usize + 1);
        let cells = self.subject.len();
        let mut groups_of = vec![0u32; subjects];
        for &s in &self.subject {
            groups_of[s as usize] += 1;
        }
        // individuals in more than m groups keep the m whose keys hash lowest
        let mut kept = vec![true; cells];
        let mut crowded: HashMap<u32, Vec<(u64, usize)>> = HashMap::new();
        for (i, (&s, &g)) in self.subject.iter().zip(&self.group).enumerate() {
            if groups_of[s as usize] > m {
                crowded
                    .entry(s)
                    .or_default()
                    .push((self.keys[g as usize].1, i));
            }
        }
        for (_, mut list) in crowded {
            list.sort_unstable();
            for (_, i) in list.into_iter().skip(m as usize) {
                kept[i] = false;
            }
        }
        let mut rows_of = vec![0f64; subjects];
        for i in (0..cells).filter(|&i| kept[i]) {
            rows_of[self.subject[i] as usize] += self.rows[i];
        }
        let values = self.values;
        let mut totals: Vec<Totals> = (0..self.keys.len()).map(|_| Totals::new(values)).collect();
        for i in (0..cells).filter(|&i| kept[i]) {
            let weight = (m as f64 / rows_of[self.subject[i] as usize]).min(1.0);
            let t = &mut totals[self.group[i] as usize];
            t.rows += weight * self.rows[i];
            t.subjects += 1.0;
            for v in 0..values {
                t.sums[v] += weight * self.sums[i * values + v];
                t.present[v] += weight * self.present[i * values + v];
            }
        }
        self.keys
            .into_iter()
            .map(|(key, _)| key)
            .zip(totals)
            .collect()
    }
}

pub(crate) fn json(column: &ArrayRef, row: usize) -> Result<serde_json::Value, QueryError> {
    let scalar = ScalarValue::try_from_array(column, row)?;
    Ok(match scalar {
        s if s.is_null() => serde_json::Value::Null,
        ScalarValue::Boolean(Some(b)) => serde_json::json!(b),
        ScalarValue::Int8(Some(v)) => serde_json::json!(v),
        ScalarValue::Int16(Some(v)) => serde_json::json!(v),
        ScalarValue::Int32(Some(v)) => serde_json::json!(v),
        ScalarValue::Int64(Some(v)) => serde_json::json!(v),
        ScalarValue::UInt8(Some(v)) => serde_json::json!(v),
        ScalarValue::UInt16(Some(v)) => serde_json::json!(v),
        ScalarValue::UInt32(Some(v)) => serde_json::json!(v),
        ScalarValue::UInt64(Some(v)) => serde_json::json!(v),
        ScalarValue::Float32(Some(v)) => serde_json::json!(v),
        ScalarValue::Float64(Some(v)) => serde_json::json!(v),
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => {
            serde_json::json!(s)
        }
        other => serde_json::json!(other.to_string()),
    })
}

/// Puts the sides' answers together in the query's output order. With two sides and no
/// grouping, the one row shows only when both sides released theirs; grouped, the rows
/// are the grouping side's, and the other side's threshold on the individuals both hold
/// must pass as well.
pub fn assemble(shape: &Shape, answers: &[SideAnswer]) -> Result<Released, QueryError> {
    let side_of = |table: &str| {
        answers
            .iter()
            .find(|a| a.table == table)
            .ok_or_else(|| QueryError::Engine(format!("no answer from `{table}`")))
    };
    let columns = shape.outputs.iter().map(|o| o.name.clone()).collect();
    let mut noise = Vec::new();
    let mut position: HashMap<&str, (usize, usize)> = HashMap::new(); // table → (dims, aggs) seen
    let mut where_is = Vec::new();
    for output in &shape.outputs {
        let seen = position.entry(output.table.as_str()).or_insert((0, 0));
        if output.dimension.is_some() {
            where_is.push((output.table.as_str(), true, seen.0));
            seen.0 += 1;
        } else {
            let answer = side_of(&output.table)?;
            let mechanism = match output.aggregate {
                Some(Aggregate::Subjects) => Mechanism::Laplace,
                _ => answer.mechanism,
            };
            noise.push(NoiseNote {
                output: output.name.clone(),
                mechanism: mechanism.as_str().into(),
                scale: answer.scales.get(seen.1).copied().unwrap_or_default(),
            });
            where_is.push((output.table.as_str(), false, seen.1));
            seen.1 += 1;
        }
    }
    for table in &shape.tables {
        side_of(table)?;
    }
    let every_side_released = answers.iter().all(|a| !a.groups.is_empty());
    let mut rows = Vec::new();
    if every_side_released {
        let leader = shape
            .dimensions()
            .next()
            .map(|o| o.table.clone())
            .unwrap_or_else(|| shape.tables[0].clone());
        for group in &side_of(&leader)?.groups {
            let mut row = Vec::new();
            for (table, is_dim, i) in &where_is {
                let g = if *table == leader.as_str() {
                    group
                } else {
                    &side_of(table)?.groups[0]
                };
                row.push(if *is_dim {
                    g.key[*i].clone()
                } else {
                    g.values[*i].clone()
                });
            }
            rows.push(row);
        }
    }
    Ok(Released {
        columns,
        rows,
        noise,
    })
}
