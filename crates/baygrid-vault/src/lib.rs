//! Vaults: each site's storage for datasets, over `object_store`.
//!
//! A vault is named by a URL: a local directory (`/var/lib/baygrid/vaults/hk-cyberport`
//! or `file:///…`) by default, or an S3-compatible bucket and prefix (`s3://bucket/prefix`,
//! credentials and endpoint from the usual `AWS_*` variables). Files go in and come out
//! streamed, with their SHA-256 computed on the way; a read whose bytes do not hash to the
//! recorded digest fails rather than handing over something else.
//!
//! A dataset version's objects live under `datasets/<name>/uploads/<upload id>/<file>`:
//! an upload never overwrites another, and the exchange records which upload is which
//! version only after every file is in.

use std::path::Path;
use std::sync::Arc;

use baygrid_api::{Column, ColumnType};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("vault URL `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{key}: the vault's bytes hash to {got}, the version records {want}")]
    Checksum {
        key: String,
        got: String,
        want: String,
    },
    #[error("vault: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> VaultError {
    VaultError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One file as written to or read from a vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// A site's vault.
#[derive(Debug, Clone)]
pub struct Vault {
    url: String,
    store: Arc<dyn ObjectStore>,
}

const CHUNK: usize = 1 << 20;

impl Vault {
    /// Opens the vault at `url`; a local directory is made when missing.
    pub fn open(url: &str) -> Result<Vault, VaultError> {
        let bad = |message: String| VaultError::Url {
            url: url.to_string(),
            message,
        };
        let store: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("names no bucket".into()));
            }
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            }
        } else {
            let path = match url.strip_prefix("file://") {
                Some(path) => path,
                None if url.contains("://") => {
                    return Err(bad(
                        "use a local directory, file:///path or s3://bucket/prefix".into(),
                    ))
                }
                None => url,
            };
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err(bad("a local vault must be an absolute path".into()));
            }
            std::fs::create_dir_all(path).map_err(|e| bad(e.to_string()))?;
            Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|e| bad(e.to_string()))?)
        };
        Ok(Vault {
            url: url.to_string(),
            store,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Streams a local file into the vault at `key`, returning its size and digest.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Stored, VaultError> {
        let mut reader = tokio::fs::File::open(file).await.map_err(|e| io(file, e))?;
        let upload = self.store.put_multipart(&ObjectPath::from(key)).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| io(file, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.write(&buf[..n]);
            bytes += n as u64;
        }
        writer.finish().await?;
        Ok(Stored {
            bytes,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Streams the object at `key` to a local file, checking it hashes to `sha256`. A
    /// mismatch removes the partial file and fails.
    pub async fn get_file(&self, key: &str, sha256: &str, to: &Path) -> Result<Stored, VaultError> {
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io(parent, e))?;
        }
        let partial = to.with_extension("partial");
        let mut out = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| io(&partial, e))?;
        let mut stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(|e| io(&partial, e))?;
        }
        out.sync_all().await.map_err(|e| io(&partial, e))?;
        drop(out);
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(VaultError::Checksum {
                key: key.to_string(),
                got,
                want: sha256.to_string(),
            });
        }
        tokio::fs::rename(&partial, to)
            .await
            .map_err(|e| io(to, e))?;
        Ok(Stored { bytes, sha256: got })
    }
}

impl Vault {
    /// Fetches every file of one upload of `dataset` into `dir`, each checked against its
    /// recorded digest.
    pub async fn get_upload(
        &self,
        dataset: &str,
        upload: &str,
        files: &[baygrid_api::VersionFile],
        dir: &Path,
    ) -> Result<(), VaultError> {
        for file in files {
            let key = object_key(dataset, upload, &file.name);
            self.get_file(&key, &file.sha256, &dir.join(&file.name))
                .await?;
        }
        Ok(())
    }

    /// Streams the object at `key` into `to` at `to_key`, checking it hashes to `sha256`;
    /// a mismatch deletes what was written there and fails. Writing the same key again
    /// replaces it, so a copy cut short can simply be run again.
    pub async fn copy_to(
        &self,
        key: &str,
        sha256: &str,
        to: &Vault,
        to_key: &str,
    ) -> Result<Stored, VaultError> {
        let target = ObjectPath::from(to_key);
        let mut stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
        let mut writer = WriteMultipart::new(to.store.put_multipart(&target).await?);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            writer.write(&chunk);
        }
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            writer.abort().await?;
            let _ = to.store.delete(&target).await;
            return Err(VaultError::Checksum {
                key: key.to_string(),
                got,
                want: sha256.to_string(),
            });
        }
        writer.finish().await?;
        Ok(Stored { bytes, sha256: got })
    }
}

/// Where an upload's file lives in its vault.
pub fn object_key(dataset: &str, upload: &str, file: &str) -> String {
    format!("datasets/{dataset}/uploads/{upload}/{file}")
}

/// A data file's format, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Csv,
    Parquet,
}

/// What a data file holds, once checked against the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub format: Format,
    pub rows: u64,
}

/// Distinct individuals are counted exactly up to this many; a version with more records
/// this many, a floor above the rule pack's largest threshold (1,000,000 individuals).
pub const SUBJECTS_COUNTED_UP_TO: u64 = 4_000_000;

/// The distinct values of a dataset's subject column, each kept as a 64-bit hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects(std::collections::HashSet<u64>);

impl Subjects {
    fn add(&mut self, value: &[u8]) {
        use std::hash::Hasher;
        if (self.0.len() as u64) < SUBJECTS_COUNTED_UP_TO {
            let mut hasher = std::hash::DefaultHasher::new();
            hasher.write(value);
            self.0.insert(hasher.finish());
        }
    }

    /// Adds another file's individuals (the same individual in two files counts once).
    pub fn merge(&mut self, other: Subjects) {
        for hash in other.0 {
            if (self.0.len() as u64) >= SUBJECTS_COUNTED_UP_TO {
                break;
            }
            self.0.insert(hash);
        }
    }

    /// Distinct individuals, at most [`SUBJECTS_COUNTED_UP_TO`].
    pub fn count(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Checks a CSV or Parquet file against a dataset's columns: the same names in the same
/// order (and for Parquet, physical types that can hold the declared ones). Returns the
/// row count. Errors name the file and the column.
pub fn inspect(file: &Path, schema: &[Column]) -> Result<Inspected, VaultError> {
    inspect_counting(file, schema, None).map(|(inspected, _)| inspected)
}

/// [`inspect`], counting the distinct values of `subject_column` as it reads.
pub fn inspect_counting(
    file: &Path,
    schema: &[Column],
    subject_column: Option<&str>,
) -> Result<(Inspected, Subjects), VaultError> {
    let name = file.display().to_string();
    let bad = |message: String| VaultError::File {
        file: name.clone(),
        message,
    };
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let subject =
        match subject_column {
            Some(column) => Some(schema.iter().position(|c| c.name == column).ok_or_else(
                || {
                    bad(format!(
                        "the subject column `{column}` is not in the schema"
                    ))
                },
            )?),
            None => None,
        };
    match extension.as_deref() {
        Some("csv") => inspect_csv(file, schema, subject).map_err(bad),
        Some("parquet") => inspect_parquet(file, schema, subject).map_err(bad),
        _ => Err(bad("is neither .csv nor .parquet".into())),
    }
}

fn expected(schema: &[Column]) -> String {
    schema
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn inspect_csv(
    file: &Path,
    schema: &[Column],
    subject: Option<usize>,
) -> Result<(Inspected, Subjects), String> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| e.to_string())?);
    let mut lines = reader.lines();
    let header = match lines.next() {
        Some(line) => line.map_err(|e| e.to_string())?,
        None => return Err("is empty: a CSV file starts with its header".into()),
    };
    let header = header.trim_start_matches('\u{feff}').trim_end_matches('\r');
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    if columns.len() != schema.len()
        || columns
            .iter()
            .zip(schema)
            .any(|(got, want)| *got != want.name)
    {
        let at = columns
            .iter()
            .zip(schema)
            .position(|(got, want)| *got != want.name)
            .unwrap_or(columns.len().min(schema.len()));
        return Err(format!(
            "header does not match the schema at column {} (file: `{header}`; schema: `{}`)",
            at + 1,
            expected(schema)
        ));
    }
    let mut rows = 0u64;
    let mut subjects = Subjects::default();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let mut fields = 0;
        for (j, field) in line.split(',').enumerate() {
            if Some(j) == subject {
                subjects.add(field.trim().as_bytes());
            }
            fields += 1;
        }
        if fields != schema.len() {
            return Err(format!(
                "line {}: {fields} fields, the schema has {}",
                i + 2,
                schema.len()
            ));
        }
        rows += 1;
    }
    Ok((
        Inspected {
            format: Format::Csv,
            rows,
        },
        subjects,
    ))
}

fn inspect_parquet(
    file: &Path,
    schema: &[Column],
    subject: Option<usize>,
) -> Result<(Inspected, Subjects), String> {
    use parquet::basic::Type as Physical;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(file).map_err(|e| e.to_string())?)
        .map_err(|e| format!("is not a Parquet file: {e}"))?;
    let metadata = reader.metadata().file_metadata();
    let descr = metadata.schema_descr();
    let columns: Vec<_> = descr.columns().iter().collect();
    if columns.len() != schema.len() {
        return Err(format!(
            "has {} columns, the schema has {} (`{}`)",
            columns.len(),
            schema.len(),
            expected(schema)
        ));
    }
    for (i, (got, want)) in columns.iter().zip(schema).enumerate() {
        if got.name() != want.name {
            return Err(format!(
                "column {} is `{}`, the schema says `{}`",
                i + 1,
                got.name(),
                want.name
            ));
        }
        let physical = got.physical_type();
        let fits = match want.kind {
            ColumnType::String => physical == Physical::BYTE_ARRAY,
            ColumnType::Int | ColumnType::Date | ColumnType::Timestamp => {
                matches!(
                    physical,
                    Physical::INT32 | Physical::INT64 | Physical::INT96
                )
            }
            ColumnType::Float => matches!(physical, Physical::FLOAT | Physical::DOUBLE),
            ColumnType::Bool => physical == Physical::BOOLEAN,
        };
        if !fits {
            return Err(format!(
                "column `{}` is stored as {physical}, which cannot hold the schema's {:?}",
                want.name, want.kind
            ));
        }
    }
    let mut subjects = Subjects::default();
    if let Some(i) = subject {
        use parquet::record::Field;
        // only the subject column is read
        let root = descr.root_schema();
        let column = root.get_fields()[i].clone();
        let projection = parquet::schema::types::Type::group_type_builder(root.name())
            .with_fields(vec![column])
            .build()
            .map_err(|e| e.to_string())?;
        let rows = reader
            .get_row_iter(Some(projection))
            .map_err(|e| format!("cannot read column `{}`: {e}", schema[i].name))?;
        for row in rows {
            let row = row.map_err(|e| format!("cannot read column `{}`: {e}", schema[i].name))?;
            for (_, field) in row.get_column_iter() {
                match field {
                    Field::Null => {}
                    Field::Str(text) => subjects.add(text.trim().as_bytes()),
                    Field::Bytes(bytes) => subjects.add(bytes.data()),
                    other => subjects.add(other.to_string().as_bytes()),
                }
            }
        }
    }
    Ok((
        Inspected {
            format: Format::Parquet,
            rows: metadata.num_rows().max(0) as u64,
        },
        subjects,
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Api(#[from] baygrid_api::ClientError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Input(String),
}

/// Uploads files as a dataset's next version, as its holder: every file is checked
/// against the schema before any byte moves, then streamed into the dataset's vault under
/// a fresh upload id with its SHA-256, and the version is recorded once all are in.
pub async fn upload(
    client: &baygrid_api::Client,
    dataset: &str,
    paths: &[std::path::PathBuf],
) -> Result<baygrid_api::DatasetVersion, UploadError> {
    let view: baygrid_api::DatasetView = client.get(&format!("/api/v1/datasets/{dataset}")).await?;
    upload_to(client, &view, paths).await
}

/// [`upload`], for a caller that has read the dataset already.
pub async fn upload_to(
    client: &baygrid_api::Client,
    view: &baygrid_api::DatasetView,
    paths: &[std::path::PathBuf],
) -> Result<baygrid_api::DatasetVersion, UploadError> {
    let dataset = view.spec.name.as_str();
    let vaults: Vec<baygrid_api::VaultView> = client.get("/api/v1/vaults").await?;
    let url = vaults
        .iter()
        .find(|v| v.site == view.spec.vault)
        .map(|v| v.url.clone())
        .ok_or_else(|| UploadError::Input(format!("site `{}` has no vault", view.spec.vault)))?;
    if paths.is_empty() {
        return Err(UploadError::Input("name at least one file".into()));
    }
    let mut checked: Vec<(String, &Path, Inspected)> = Vec::new();
    let mut subjects = Subjects::default();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| UploadError::Input(format!("{}: not a file name", path.display())))?
            .to_string();
        if checked.iter().any(|(n, _, _)| *n == name) {
            return Err(UploadError::Input(format!(
                "{}: two files named `{name}`",
                path.display()
            )));
        }
        let (inspected, in_file) =
            inspect_counting(path, &view.spec.schema, view.spec.subject_column.as_deref())?;
        subjects.merge(in_file);
        checked.push((name, path, inspected));
    }
    let vault = Vault::open(&url)?;
    let upload = format!(
        "up-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let mut files = Vec::new();
    for (name, path, inspected) in checked {
        let stored = vault
            .put_file(&object_key(dataset, &upload, &name), path)
            .await?;
        files.push(baygrid_api::VersionFile {
            name,
            bytes: stored.bytes,
            sha256: stored.sha256,
            rows: inspected.rows,
            format: match inspected.format {
                Format::Csv => "csv",
                Format::Parquet => "parquet",
            }
            .to_string(),
        });
    }
    Ok(client
        .post(
            &format!("/api/v1/datasets/{dataset}/versions"),
            &baygrid_api::NewVersion {
                upload,
                files,
                subjects: view.spec.subject_column.as_ref().map(|_| subjects.count()),
            },
        )
        .await?)
}

#[cfg(test)]
mod tests;
