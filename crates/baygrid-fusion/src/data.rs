//! Party tables: an id column, an optional label `y`, and numeric features.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: empty file, expected a header line")]
    Empty { path: PathBuf },
    #[error("{path}: header must start with an `id` column, found `{found}`")]
    NoId { path: PathBuf, found: String },
    #[error("{path}:{line}: expected {expected} fields, found {found}")]
    Width {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("{path}:{line}: column `{column}`: `{value}` is not a number")]
    Number {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
    },
    #[error("{path}:{line}: column `y`: label `{value}` must be 0 or 1")]
    Label {
        path: PathBuf,
        line: usize,
        value: String,
    },
    #[error("tables disagree on features: {0}")]
    Schema(String),
}

/// One party's rows. Features are row-major, `rows × columns.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub ids: Vec<String>,
    pub labels: Option<Vec<f32>>,
    pub columns: Vec<String>,
    pub features: Vec<f32>,
}

impl Table {
    /// Read a CSV whose header is `id[,y],x0,x1,...`.
    pub fn read_csv(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_csv(&text, path)
    }

    pub fn parse_csv(text: &str, path: &Path) -> Result<Self, DataError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines.next().ok_or_else(|| DataError::Empty {
            path: path.to_path_buf(),
        })?;
        let names: Vec<String> = header.split(',').map(|s| s.trim().to_string()).collect();
        if names[0] != "id" {
            return Err(DataError::NoId {
                path: path.to_path_buf(),
                found: names[0].clone(),
            });
        }
        let has_label = names.get(1).is_some_and(|n| n == "y");
        let first_feature = if has_label { 2 } else { 1 };
        let columns = names[first_feature..].to_vec();
        let mut table = Table {
            ids: Vec::new(),
            labels: has_label.then(Vec::new),
            columns,
            features: Vec::new(),
        };
        for (n, line) in lines {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != names.len() {
                return Err(DataError::Width {
                    path: path.to_path_buf(),
                    line: n + 1,
                    expected: names.len(),
                    found: fields.len(),
                });
            }
            table.ids.push(fields[0].to_string());
            if let Some(labels) = table.labels.as_mut() {
                let y = match fields[1] {
                    "0" | "0.0" => 0.0,
                    "1" | "1.0" => 1.0,
                    other => {
                        return Err(DataError::Label {
                            path: path.to_path_buf(),
                            line: n + 1,
                            value: other.to_string(),
                        })
                    }
                };
                labels.push(y);
            }
            for (c, value) in fields[first_feature..].iter().enumerate() {
                let v: f32 = value.parse().map_err(|_| DataError::Number {
                    path: path.to_path_buf(),
                    line: n + 1,
                    column: names[first_feature + c].clone(),
                    value: value.to_string(),
                })?;
                table.features.push(v);
            }
        }
        Ok(table)
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn width(&self) -> usize {
        self.columns.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.width()..(i + 1) * self.width()]
    }

    /// The rows at `index`, in that order.
    pub fn select(&self, index: &[usize]) -> Table {
        let mut features = Vec::with_capacity(index.len() * self.width());
        for &i in index {
            features.extend_from_slice(self.row(i));
        }
        Table {
            ids: index.iter().map(|&i| self.ids[i].clone()).collect(),
            labels: self
                .labels
                .as_ref()
                .map(|l| index.iter().map(|&i| l[i]).collect()),
            columns: self.columns.clone(),
            features,
        }
    }

    /// Keep a seeded random `keep` fraction of rows (original order kept).
    pub fn sample(&self, keep: f64, seed: u64) -> Table {
        self.split(keep, seed).0
    }

    /// Split rows by a seeded shuffle into (first `fraction`, rest), each in
    /// original order.
    pub fn split(&self, fraction: f64, seed: u64) -> (Table, Table) {
        let mut index: Vec<usize> = (0..self.rows()).collect();
        index.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let n = ((self.rows() as f64) * fraction).round() as usize;
        let (mut a, mut b) = (index[..n].to_vec(), index[n..].to_vec());
        a.sort_unstable();
        b.sort_unstable();
        (self.select(&a), self.select(&b))
    }

    /// Rows of `self` then `other`, which must have the same columns.
    pub fn concat(&self, other: &Table) -> Result<Table, DataError> {
        if self.columns != other.columns || self.labels.is_some() != other.labels.is_some() {
            return Err(DataError::Schema(format!(
                "{} columns{} vs {} columns{}",
                self.width(),
                if self.labels.is_some() { " + y" } else { "" },
                other.width(),
                if other.labels.is_some() { " + y" } else { "" },
            )));
        }
        let mut out = self.clone();
        out.ids.extend(other.ids.iter().cloned());
        if let (Some(a), Some(b)) = (out.labels.as_mut(), other.labels.as_ref()) {
            a.extend_from_slice(b);
        }
        out.features.extend_from_slice(&other.features);
        Ok(out)
    }

    /// Columns of `self` then `other`, row by row; both must hold the same
    /// ids in the same order. Labels come from whichever side has them.
    pub fn join_columns(&self, other: &Table) -> Result<Table, DataError> {
        if self.ids != other.ids {
            return Err(DataError::Schema("rows are not aligned by id".into()));
        }
        let mut features = Vec::with_capacity(self.features.len() + other.features.len());
        for i in 0..self.rows() {
            features.extend_from_slice(self.row(i));
            features.extend_from_slice(other.row(i));
        }
        let mut columns: Vec<String> = self.columns.iter().map(|c| format!("a.{c}")).collect();
        columns.extend(other.columns.iter().map(|c| format!("b.{c}")));
        Ok(Table {
            ids: self.ids.clone(),
            labels: self.labels.clone().or_else(|| other.labels.clone()),
            columns,
            features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Table, DataError> {
        Table::parse_csv(text, Path::new("t.csv"))
    }

    #[test]
    fn reads_ids_labels_and_features() {
        let t = parse("id,y,x0,x1\na,1,0.5,-1\nb,0,2,3\n").unwrap();
        assert_eq!(t.ids, vec!["a", "b"]);
        assert_eq!(t.labels, Some(vec![1.0, 0.0]));
        assert_eq!(t.columns, vec!["x0", "x1"]);
        assert_eq!(t.row(1), &[2.0, 3.0]);
        let h = parse("id,x0\na,1\n").unwrap();
        assert_eq!(h.labels, None);
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let e = parse("id,y,x0\na,1,0.5\nb,0,zz\n").unwrap_err().to_string();
        assert_eq!(e, "t.csv:3: column `x0`: `zz` is not a number");
        let e = parse("id,y,x0\na,2,0.5\n").unwrap_err().to_string();
        assert!(e.contains("t.csv:2") && e.contains("must be 0 or 1"), "{e}");
        let e = parse("id,y,x0\na,1\n").unwrap_err().to_string();
        assert!(e.contains("expected 3 fields, found 2"), "{e}");
        let e = parse("key,x0\n").unwrap_err().to_string();
        assert!(e.contains("`id`"), "{e}");
        assert!(matches!(parse(""), Err(DataError::Empty { .. })));
    }

    #[test]
    fn split_and_sample_are_seeded_and_keep_order() {
        let text: String = std::iter::once("id,x0".to_string())
            .chain((0..100).map(|i| format!("{i},{i}")))
            .collect::<Vec<_>>()
            .join("\n");
        let t = parse(&text).unwrap();
        let (a, b) = t.split(0.2, 7);
        assert_eq!((a.rows(), b.rows()), (20, 80));
        assert_eq!(t.split(0.2, 7).0, a);
        let ids: Vec<usize> = a.ids.iter().map(|s| s.parse().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(t.sample(0.75, 1).rows(), 75);
        assert!(a.concat(&b).is_ok());
    }
}
