//! The (individual, group) cells of a table whose rows come individual by individual.
//!
//! Vault tables are often written one individual after another (a patient's visits, a card
//! holder's payments), so each partition DataFusion reads streams its rows with the
//! individuals' keys in ascending order. Then an individual's cells are complete as soon as
//! the next individual's first row arrives: one pass in the files' own order sums them,
//! without a hash table over every individual, on every core at once.
//!
//! Nothing is assumed: each partition checks that its individuals' keys (as bytes that
//! compare as the values sort: a 64-bit integer or a text as itself, any other type in
//! Arrow's row format, one encoding for the whole table) only ever go up, and the
//! partitions' ranges must not overlap except for one individual at a boundary, whose cells
//! are merged. At the first row out of order, or a null individual, the pass gives up and
//! the caller aggregates by hashing instead, with the same result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, AsArray, Int64Array, LargeStringArray, RecordBatch, StringArray, StringViewArray,
};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::prelude::DataFrame;
use futures::StreamExt;

use crate::engine::{json, key_of, KeyMap, Totals};
use crate::QueryError;

fn engine(e: impl std::fmt::Display) -> QueryError {
    QueryError::Engine(e.to_string())
}

/// Row `r` of each column, as one-row columns.
fn slice(columns: &[Arc<dyn Array>], r: usize) -> Vec<Arc<dyn Array>> {
    columns.iter().map(|c| c.slice(r, 1)).collect()
}

/// The sign bit flipped, big-endian: bytes that sort as the numbers do.
fn int_bytes(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

/// Short-text groups told apart by their views, at most.
const SHORT_GROUPS: usize = 64;

/// A batch's key columns as bytes per row that compare as the values sort: a single
/// non-null 64-bit integer or text column as itself, anything else in Arrow's row format.
enum Keys<'a> {
    Int(&'a Int64Array, [u8; 8]),
    Text(&'a StringArray),
    LargeText(&'a LargeStringArray),
    TextView(&'a StringViewArray),
    Rows(Rows),
}

impl<'a> Keys<'a> {
    fn new(conv: &mut RowConverter, columns: &'a [Arc<dyn Array>]) -> Result<Keys<'a>, QueryError> {
        match Keys::raw(columns) {
            Some(keys) => Ok(keys),
            None => Ok(Keys::Rows(conv.convert_columns(columns).map_err(engine)?)),
        }
    }

    /// The columns as themselves, when they can be.
    fn raw(columns: &'a [Arc<dyn Array>]) -> Option<Keys<'a>> {
        match columns {
            [c] if c.null_count() == 0 => match c.data_type() {
                DataType::Int64 => Some(Keys::Int(c.as_primitive::<Int64Type>(), [0; 8])),
                DataType::Utf8 => Some(Keys::Text(c.as_string::<i32>())),
                DataType::LargeUtf8 => Some(Keys::LargeText(c.as_string::<i64>())),
                DataType::Utf8View => Some(Keys::TextView(c.as_string_view())),
                _ => None,
            },
            _ => None,
        }
    }

    /// Row `r`'s value itself as a number, when it is a text of at most 12 bytes held
    /// inline in its view (length and bytes, the rest masked off): equal numbers are equal
    /// texts.
    fn short_text(&self, r: usize) -> Option<u128> {
        match self {
            Keys::TextView(column) => {
                let view = column.views()[r];
                let len = view as u32;
                match len {
                    0..=11 => Some(view & ((1u128 << (32 + 8 * len)) - 1)),
                    12 => Some(view),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn get(&mut self, r: usize) -> &[u8] {
        match self {
            Keys::Int(column, buf) => {
                *buf = int_bytes(column.value(r));
                &buf[..]
            }
            Keys::Text(column) => column.value(r).as_bytes(),
            Keys::LargeText(column) => column.value(r).as_bytes(),
            Keys::TextView(column) => column.value(r).as_bytes(),
            Keys::Rows(rows) => rows.row(r).data(),
        }
    }
}

/// One partition's pass.
struct Run {
    dims: usize,
    values: usize,
    /// Each value column's range: values are clamped to it as they are summed.
    ranges: Vec<(f64, f64)>,
    converters: Option<(RowConverter, Option<RowConverter>)>,
    /// The first and the current individual's key bytes.
    first: Option<Vec<u8>>,
    last: Vec<u8>,
    /// The current individual's key as a number, when the key column is one of 64-bit
    /// integers (`last` holds its bytes too).
    last_int: Option<i64>,
    /// Individuals finished (the current one is number `subjects`).
    subjects: u32,
    /// At most this many groups per individual, and rows weighted down to it.
    m: u32,
    /// The current individual's cells.
    open: Cells,
    /// Groups met here: the 128-bit key, the key's values and the hash that orders them.
    group_of: KeyMap,
    groups: Vec<(u128, Vec<serde_json::Value>, u64)>,
    /// Groups by their columns' raw bytes, and the last row's.
    raw_group_of: KeyMap,
    last_group: Option<u32>,
    last_group_bytes: Vec<u8>,
    /// Groups told by a short text held in its view (see [`Keys::short_text`]), the few
    /// met first, and the last row's.
    short_groups: Vec<(u128, u32)>,
    last_short: Option<(u128, u32)>,
    /// Per group: the bounded totals of the individuals met wholly inside this run.
    totals: Vec<Totals>,
    /// The first and the last individual's cells, unbounded: either may go on in the
    /// run before or after (one individual alone is only `last_cells`).
    first_cells: Option<Cells>,
    last_cells: Option<Cells>,
}

/// One individual's cells: group, rows, and per value its sum and non-nulls.
#[derive(Debug, Clone, Default)]
struct Cells {
    groups: Vec<u32>,
    rows: Vec<f64>,
    sums: Vec<f64>,
    present: Vec<f64>,
}

impl Cells {
    /// The index of `group`'s cell, opened empty if there is none.
    fn cell(&mut self, group: u32, values: usize) -> usize {
        match self.groups.iter().position(|&x| x == group) {
            Some(i) => i,
            None => {
                self.groups.push(group);
                self.rows.push(0.0);
                self.sums.extend(std::iter::repeat_n(0.0, values));
                self.present.extend(std::iter::repeat_n(0.0, values));
                self.groups.len() - 1
            }
        }
    }

    /// Empties the cells, keeping their room.
    fn clear(&mut self) {
        self.groups.clear();
        self.rows.clear();
        self.sums.clear();
        self.present.clear();
    }

    /// Adds `other`'s cells (groups already in this numbering), merging equal groups.
    fn absorb(&mut self, other: &Cells, values: usize) {
        for (c, &g) in other.groups.iter().enumerate() {
            let i = self.cell(g, values);
            self.rows[i] += other.rows[c];
            for v in 0..values {
                self.sums[i * values + v] += other.sums[c * values + v];
                self.present[i * values + v] += other.present[c * values + v];
            }
        }
    }

    fn renumber(mut self, to: &[u32]) -> Cells {
        for g in &mut self.groups {
            *g = to[*g as usize];
        }
        self
    }

    /// Bounds one individual into `totals`: it keeps at most `m` groups (those whose keys
    /// hash lowest, by `order`), its rows weighted by min(1, m / rows), and counts once in
    /// each group it keeps (as the hash path's bounding does).
    fn bound_into(&self, m: u32, order: impl Fn(u32) -> u64, totals: &mut [Totals], values: usize) {
        let mut kept: Vec<usize> = (0..self.groups.len()).collect();
        if kept.len() > m as usize {
            kept.sort_by_key(|&i| (order(self.groups[i]), i));
            kept.truncate(m as usize);
        }
        let rows: f64 = kept.iter().map(|&i| self.rows[i]).sum();
        let weight = (f64::from(m) / rows).min(1.0);
        for &i in &kept {
            let t = &mut totals[self.groups[i] as usize];
            t.rows += weight * self.rows[i];
            t.subjects += 1.0;
            for v in 0..values {
                t.sums[v] += weight * self.sums[i * values + v];
                t.present[v] += weight * self.present[i * values + v];
            }
        }
    }
}

impl Run {
    fn new(dims: usize, ranges: Vec<(f64, f64)>, m: u32) -> Run {
        Run {
            dims,
            values: ranges.len(),
            ranges,
            converters: None,
            first: None,
            last: Vec::new(),
            last_int: None,
            subjects: 0,
            m,
            open: Cells::default(),
            group_of: KeyMap::default(),
            groups: Vec::new(),
            raw_group_of: KeyMap::default(),
            last_group: None,
            last_group_bytes: Vec::new(),
            short_groups: Vec::new(),
            last_short: None,
            totals: Vec::new(),
            first_cells: None,
            last_cells: None,
        }
    }

    /// Takes a batch of `[individual, dims…, clamped values…]` rows; false when an
    /// individual's key goes down (the rows are not in order) or is null.
    fn add(&mut self, batch: &RecordBatch) -> Result<bool, QueryError> {
        let dims = self.dims;
        let columns = batch.columns();
        if self.converters.is_none() {
            let field = |c: &Arc<dyn Array>| SortField::new(c.data_type().clone());
            let subject = RowConverter::new(vec![field(&columns[0])]).map_err(engine)?;
            let dims = (dims > 0)
                .then(|| RowConverter::new(columns[1..=dims].iter().map(field).collect()))
                .transpose()
                .map_err(engine)?;
            self.converters = Some((subject, dims));
        }
        let mut converters = self.converters.take().expect("set above");
        let result = self.add_with(&mut converters, batch);
        self.converters = Some(converters);
        result
    }

    fn add_with(
        &mut self,
        (subject_conv, dims_conv): &mut (RowConverter, Option<RowConverter>),
        batch: &RecordBatch,
    ) -> Result<bool, QueryError> {
        let (dims, values) = (self.dims, self.values);
        let columns = batch.columns();
        // an individual's key is compared in one encoding across batches, chosen by its type
        // (a batch with a null key would be in the row format): a null key is hashed
        if columns[0].null_count() > 0 {
            return Ok(false);
        }
        let mut subjects = Keys::new(subject_conv, &columns[..1])?;
        // a group is told by its columns' own bytes; its key (the hash path's) is made from
        // the row format only for a group not seen before. A batch with nulls in them is in
        // the row format, so the last row's group is not carried from another batch
        self.last_group = None;
        let dim_columns = &columns[1..=dims];
        let mut groups = match Keys::raw(dim_columns) {
            _ if dims == 0 => None,
            Some(keys) => Some((keys, true)),
            None => {
                let conv = dims_conv.as_mut().expect("dims have a converter");
                let rows = conv.convert_columns(dim_columns).map_err(engine)?;
                Some((Keys::Rows(rows), false))
            }
        };
        let value_columns: Vec<_> = (0..values)
            .map(|i| columns[dims + 1 + i].as_primitive::<Float64Type>())
            .collect();
        let int_subjects = match &subjects {
            Keys::Int(column, _) => Some(*column),
            _ => None,
        };
        for r in 0..batch.num_rows() {
            let in_order = match int_subjects {
                Some(column) => self.next_int(column.value(r)),
                None => self.next_key(subjects.get(r)),
            };
            if !in_order {
                return Ok(false);
            }
            let group = match &mut groups {
                None => self.group_for(&[], columns, r, None)?,
                Some((keys, raw)) => self.row_group(keys, *raw, dims_conv, columns, r)?,
            };
            let cell = self.open.cell(group, values);
            self.open.rows[cell] += 1.0;
            for (v, (column, &(low, high))) in value_columns.iter().zip(&self.ranges).enumerate() {
                if !column.is_null(r) {
                    let x = column.value(r);
                    // as the hash path's CASE: below low is low, above high is high
                    let x = if x < low {
                        low
                    } else if x > high {
                        high
                    } else {
                        x
                    };
                    self.open.sums[cell * values + v] += x;
                    self.open.present[cell * values + v] += 1.0;
                }
            }
        }
        Ok(true)
    }

    /// The number of row `r`'s group, told by its columns' own bytes (`keys`; `raw` when
    /// they are not in the row format).
    fn row_group(
        &mut self,
        keys: &mut Keys<'_>,
        raw: bool,
        dims_conv: &mut Option<RowConverter>,
        columns: &[Arc<dyn Array>],
        r: usize,
    ) -> Result<u32, QueryError> {
        // a short text is compared as one number, not as bytes
        let short = keys.short_text(r);
        if let Some(v) = short {
            if let Some((_, g)) = self.last_short.filter(|(w, _)| *w == v) {
                return Ok(g);
            }
            if let Some(&(_, g)) = self.short_groups.iter().find(|(w, _)| *w == v) {
                self.last_short = Some((v, g));
                return Ok(g);
            }
        }
        let bytes = keys.get(r);
        let group = match self.last_group {
            Some(g) if self.last_group_bytes.as_slice() == bytes => g,
            _ => {
                // bytes in the row format are the group's key itself; the columns' own
                // bytes are filed apart, so the two encodings never meet
                let g = if raw {
                    let raw_key = key_of(bytes);
                    match self.raw_group_of.get(&raw_key) {
                        Some(g) => *g,
                        // a group not seen before: its key from the row format
                        None => {
                            let conv = dims_conv.as_mut().expect("dims have a converter");
                            let rows = conv
                                .convert_columns(&slice(&columns[1..=self.dims], r))
                                .map_err(engine)?;
                            let row_bytes = rows.row(0).data().to_vec();
                            self.group_for(&row_bytes, columns, r, Some(raw_key))?
                        }
                    }
                } else {
                    self.group_for(bytes, columns, r, None)?
                };
                self.last_group = Some(g);
                self.last_group_bytes.clear();
                self.last_group_bytes.extend_from_slice(bytes);
                g
            }
        };
        if let Some(v) = short {
            self.last_short = Some((v, group));
            if self.short_groups.len() < SHORT_GROUPS {
                self.short_groups.push((v, group));
            }
        }
        Ok(group)
    }

    /// Steps to the row whose individual's key is the integer `key`: false when it goes
    /// down.
    fn next_int(&mut self, key: i64) -> bool {
        match self.last_int {
            Some(last) if last == key => true,
            Some(last) if key < last => false,
            Some(_) => {
                self.close();
                self.last.clear();
                self.last.extend_from_slice(&int_bytes(key));
                self.last_int = Some(key);
                true
            }
            None => {
                let in_order = self.next_key(&int_bytes(key));
                self.last_int = in_order.then_some(key);
                in_order
            }
        }
    }

    /// Steps to the row whose individual's key bytes are `key`: false when they go down.
    fn next_key(&mut self, key: &[u8]) -> bool {
        self.last_int = None;
        match &self.first {
            None => {
                self.first = Some(key.to_vec());
                self.last.extend_from_slice(key);
            }
            Some(_) if key == self.last.as_slice() => {}
            Some(_) => {
                if key < self.last.as_slice() {
                    return false;
                }
                self.close();
                self.last.clear();
                self.last.extend_from_slice(key);
            }
        }
        true
    }

    /// The number of the group whose row-format bytes are `bytes` (row `r` of `columns`
    /// holds its values), numbering it if new; `raw` also files it under its raw key.
    fn group_for(
        &mut self,
        bytes: &[u8],
        columns: &[Arc<dyn Array>],
        r: usize,
        raw: Option<u128>,
    ) -> Result<u32, QueryError> {
        let k = key_of(bytes);
        let g = match self.group_of.get(&k) {
            Some(g) => *g,
            None => {
                let g = self.groups.len() as u32;
                let mut values = Vec::with_capacity(self.dims);
                for column in &columns[1..=self.dims] {
                    values.push(json(column, r)?);
                }
                self.groups.push((k, values, (k >> 64) as u64));
                self.group_of.insert(k, g);
                self.totals.push(Totals::new(self.values));
                g
            }
        };
        if let Some(raw) = raw {
            self.raw_group_of.insert(raw, g);
        }
        Ok(g)
    }

    /// Finishes the current individual: the run's first is kept aside (it may have begun in
    /// the run before), any other is bounded into the run's totals.
    fn close(&mut self) {
        if self.subjects == 0 {
            self.first_cells = Some(std::mem::take(&mut self.open));
        } else {
            let groups = &self.groups;
            self.open.bound_into(
                self.m,
                |g| groups[g as usize].2,
                &mut self.totals,
                self.values,
            );
            self.open.clear();
        }
        self.subjects += 1;
    }

    /// The last individual is kept aside too (it may go on in the run after).
    fn finish(mut self) -> Run {
        if self.first.is_some() {
            self.last_cells = Some(std::mem::take(&mut self.open));
        }
        self
    }
}

/// Per group, the bounded totals of `rows` (columns: individual, `dims` group columns, one
/// Float64 column per range in `ranges`, clamped to it here; at most `m` groups and rows per
/// individual), when every partition streams its individuals in ascending order and the
/// partitions do not overlap; `None` otherwise (nothing is lost: aggregate by hashing).
pub(crate) async fn totals(
    rows: DataFrame,
    dims: usize,
    ranges: &[(f64, f64)],
    m: u32,
) -> Result<Option<Vec<(Vec<serde_json::Value>, Totals)>>, QueryError> {
    let values = ranges.len();
    let streams = rows.execute_stream_partitioned().await?;
    let gave_up = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let gave_up = gave_up.clone();
            let ranges = ranges.to_vec();
            tokio::spawn(async move {
                let mut run = Run::new(dims, ranges, m);
                while let Some(batch) = stream.next().await {
                    if gave_up.load(Ordering::Relaxed) || !run.add(&batch?)? {
                        gave_up.store(true, Ordering::Relaxed);
                        return Ok::<_, QueryError>(None);
                    }
                }
                Ok(Some(run.finish()))
            })
        })
        .collect();
    let mut runs = Vec::new();
    for task in tasks {
        match task.await.map_err(engine)?? {
            Some(run) => runs.push(run),
            None => return Ok(None),
        }
    }
    Ok(merge(runs, values, m))
}

/// The runs' totals added up by group, and their boundary individuals bounded (one that
/// goes on from one run into the next counted once); `None` when two runs' ranges of
/// individuals overlap beyond a shared boundary.
fn merge(
    mut runs: Vec<Run>,
    values: usize,
    m: u32,
) -> Option<Vec<(Vec<serde_json::Value>, Totals)>> {
    runs.retain(|r| r.first.is_some());
    runs.sort_by(|a, b| a.first.cmp(&b.first));
    let mut group_of = KeyMap::default();
    let mut keys: Vec<(Vec<serde_json::Value>, u64)> = Vec::new();
    let mut totals: Vec<Totals> = Vec::new();
    // the previous run's last individual: its key and its cells, in the global numbering
    let mut pending: Option<(Vec<u8>, Cells)> = None;
    let bound = |cells: &Cells, keys: &[(Vec<serde_json::Value>, u64)], totals: &mut [Totals]| {
        cells.bound_into(m, |g| keys[g as usize].1, totals, values);
    };
    for run in runs {
        let numbering: Vec<u32> = run
            .groups
            .into_iter()
            .map(|(key, group_values, order)| match group_of.get(&key) {
                Some(g) => *g,
                None => {
                    let g = keys.len() as u32;
                    keys.push((group_values, order));
                    totals.push(Totals::new(values));
                    group_of.insert(key, g);
                    g
                }
            })
            .collect();
        for (local, t) in run.totals.iter().enumerate() {
            let all = &mut totals[numbering[local] as usize];
            all.rows += t.rows;
            all.subjects += t.subjects;
            for v in 0..values {
                all.sums[v] += t.sums[v];
                all.present[v] += t.present[v];
            }
        }
        let first_key = run.first.expect("kept runs have rows");
        let last_cells = run
            .last_cells
            .expect("a finished run keeps its last individual")
            .renumber(&numbering);
        // the run's first individual: kept aside, or (alone in the run) its last
        let alone = run.first_cells.is_none();
        let first_cells = run.first_cells.map(|c| c.renumber(&numbering));
        let first = match &first_cells {
            Some(c) => c.clone(),
            None => last_cells.clone(),
        };
        let first = match pending.take() {
            Some((key, _)) if key > first_key => return None,
            Some((key, mut cells)) if key == first_key => {
                cells.absorb(&first, values);
                cells
            }
            Some((_, cells)) => {
                bound(&cells, &keys, &mut totals);
                first
            }
            None => first,
        };
        if alone {
            // one individual: it may go on in the next run too
            pending = Some((run.last, first));
        } else {
            bound(&first, &keys, &mut totals);
            pending = Some((run.last, last_cells));
        }
    }
    if let Some((_, cells)) = pending {
        bound(&cells, &keys, &mut totals);
    }
    Some(keys.into_iter().map(|(key, _)| key).zip(totals).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;

    use super::*;
    use crate::engine::hashed_cells;

    /// Rows of (individual, region, amount or null), cut into partitions at `cuts`; the
    /// individual as a 64-bit integer (`kind` 0), zero-padded text (1), a 32-bit integer
    /// (2, compared in Arrow's row format) or text in views (3), the integers from -15; the
    /// region as text in views (as Parquet is read) when `kind` is 3, else as plain text.
    async fn frame(rows: &[(i64, u8, Option<f64>)], cuts: &[usize], kind: u8) -> DataFrame {
        let subject_type = [
            DataType::Int64,
            DataType::Utf8,
            DataType::Int32,
            DataType::Utf8View,
        ][kind as usize]
            .clone();
        let region_type = if kind == 3 {
            DataType::Utf8View
        } else {
            DataType::Utf8
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("__subject", subject_type, false),
            Field::new("__d0", region_type, false),
            Field::new("__v0", DataType::Float64, true),
        ]));
        let batch = |part: &[(i64, u8, Option<f64>)]| {
            // region 3's name is too long to be held in its view
            let regions = part.iter().map(|r| match r.1 {
                3 => "region-3-of-the-delta".to_string(),
                g => format!("region-{g}"),
            });
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    match kind {
                        // negative keys too: the integers' order is not their bytes'
                        0 => Arc::new(Int64Array::from_iter_values(part.iter().map(|r| r.0 - 15)))
                            as ArrayRef,
                        1 => Arc::new(StringArray::from_iter_values(
                            part.iter().map(|r| format!("s{:04}", r.0)),
                        )),
                        2 => Arc::new(Int32Array::from_iter_values(
                            part.iter().map(|r| r.0 as i32 - 15),
                        )),
                        _ => Arc::new(StringViewArray::from_iter_values(
                            part.iter().map(|r| format!("s{:04}", r.0)),
                        )),
                    },
                    if kind == 3 {
                        Arc::new(StringViewArray::from_iter_values(regions)) as ArrayRef
                    } else {
                        Arc::new(StringArray::from_iter_values(regions))
                    },
                    Arc::new(Float64Array::from_iter(part.iter().map(|r| r.2))),
                ],
            )
            .unwrap()
        };
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (rows.len() + 1)).collect();
        bounds.push(0);
        bounds.push(rows.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut partitions: Vec<Vec<RecordBatch>> = bounds
            .windows(2)
            .map(|w| vec![batch(&rows[w[0]..w[1]])])
            .collect();
        if partitions.is_empty() {
            partitions.push(vec![batch(&[])]);
        }
        let ctx = SessionContext::new();
        ctx.read_table(Arc::new(MemTable::try_new(schema, partitions).unwrap()))
            .unwrap()
    }

    type Summary = BTreeMap<String, (f64, f64, f64, f64)>;

    /// Per group: rows, sum, non-nulls and individuals.
    fn summary(totals: Vec<(Vec<serde_json::Value>, Totals)>) -> Summary {
        totals
            .into_iter()
            .map(|(key, t)| {
                (
                    serde_json::to_string(&key).unwrap(),
                    (t.rows, t.sums[0], t.present[0], t.subjects),
                )
            })
            .collect()
    }

    fn close(a: &Summary, b: &Summary) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, x) in a {
            let y = &b[k];
            for (p, q) in [(x.0, y.0), (x.1, y.1), (x.2, y.2), (x.3, y.3)] {
                assert!(
                    (p - q).abs() <= 1e-9 * (1.0 + p.abs()),
                    "{k}: {x:?} against {y:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn the_ordered_pass_sums_as_the_hash_aggregate_does(
            mut rows in proptest::collection::vec(
                (0i64..30, 0u8..4, proptest::option::of(-50.0f64..50.0)), 0..200),
            cuts in proptest::collection::vec(0usize..400, 0..4),
            m in 1u32..4,
            shuffle in any::<bool>(),
            kind in 0u8..4,
        ) {
            if !shuffle {
                rows.sort_by_key(|r| r.0);
            }
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                // the hash path is given values already clamped to [-20, 30]
                let clamped: Vec<_> = rows
                    .iter()
                    .map(|&(s, g, v)| (s, g, v.map(|x| x.clamp(-20.0, 30.0))))
                    .collect();
                let hashed = summary(
                    hashed_cells(frame(&clamped, &cuts, kind).await, 1, 1)
                        .await
                        .unwrap()
                        .totals(m),
                );
                let ordered = totals(frame(&rows, &cuts, kind).await, 1, &[(-20.0, 30.0)], m)
                    .await
                    .unwrap();
                let in_order = rows.windows(2).all(|w| w[0].0 <= w[1].0);
                match ordered {
                    Some(t) => close(&summary(t), &hashed),
                    // it gives up only on rows out of order
                    None => assert!(!in_order, "sorted rows were hashed"),
                }
            });
        }
    }

    #[tokio::test]
    async fn a_null_individual_is_hashed_whatever_batch_it_is_in() {
        // one partition of two batches: [null, 3, 5] then [3]; compared in the row format
        // (first batch) against bare integers (second), 3 would seem to follow 5
        let schema = Arc::new(Schema::new(vec![
            Field::new("__subject", DataType::Int64, true),
            Field::new("__d0", DataType::Utf8, false),
            Field::new("__v0", DataType::Float64, true),
        ]));
        let batch = |keys: Vec<Option<i64>>| {
            let n = keys.len();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(keys)) as ArrayRef,
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                        "north", n,
                    ))),
                    Arc::new(Float64Array::from_iter_values(std::iter::repeat_n(1.0, n))),
                ],
            )
            .unwrap()
        };
        let partitions = vec![vec![
            batch(vec![None, Some(3), Some(5)]),
            batch(vec![Some(3)]),
        ]];
        let frame = || {
            SessionContext::new()
                .read_table(Arc::new(
                    MemTable::try_new(schema.clone(), partitions.clone()).unwrap(),
                ))
                .unwrap()
        };
        let hashed = summary(hashed_cells(frame(), 1, 1).await.unwrap().totals(4));
        // three individuals (the null one, 3 and 5), individual 3 with two rows
        assert_eq!(hashed["[\"north\"]"].3, 3.0);
        match totals(frame(), 1, &[(0.0, 10.0)], 4).await.unwrap() {
            None => {}
            Some(t) => close(&summary(t), &hashed),
        }
    }

    #[tokio::test]
    async fn partitions_in_order_each_but_overlapping_are_hashed() {
        // individuals 1..=4 then 2..=3: each partition ascends, their ranges overlap
        let rows: Vec<(i64, u8, Option<f64>)> = [1, 2, 3, 4, 2, 3]
            .into_iter()
            .map(|s| (s, 0, Some(1.0)))
            .collect();
        assert!(totals(frame(&rows, &[4], 0).await, 1, &[(0.0, 10.0)], 1)
            .await
            .unwrap()
            .is_none());
        // an individual split across a boundary is one individual
        let rows: Vec<(i64, u8, Option<f64>)> = [1, 2, 2, 2, 3]
            .into_iter()
            .map(|s| (s, 0, Some(1.0)))
            .collect();
        let by_group = summary(
            totals(frame(&rows, &[2, 3], 0).await, 1, &[(0.0, 10.0)], 1)
                .await
                .unwrap()
                .unwrap(),
        );
        let (rows, sum, present, subjects) = by_group["[\"region-0\"]"];
        // three individuals, the middle one's three rows weighted down to one
        assert_eq!(subjects, 3.0);
        assert!(
            (rows - 3.0).abs() < 1e-9 && (sum - 3.0).abs() < 1e-9 && (present - 3.0).abs() < 1e-9
        );
    }
}
