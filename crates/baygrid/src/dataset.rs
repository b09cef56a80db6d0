//! `baygrid dataset …`: the data zone's catalog of datasets.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baygrid_api::{DatasetSpec, DatasetView};
use clap::Subcommand;

use crate::output::{emit, table};
use crate::Args;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Register a dataset from a YAML spec (its holder's data holder, or an operator).
    Register { file: PathBuf },
    /// The catalog: every dataset's metadata.
    Ls,
    /// One dataset's metadata and versions.
    Get { name: String },
    /// Upload CSV or Parquet files as the dataset's next version (its holder): each file is
    /// checked against the schema, streamed into the dataset's vault with its SHA-256, and
    /// the version recorded once every file is in.
    Upload {
        name: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Reads a dataset spec, naming the field at fault with the file's name.
pub fn read_dataset(file: &Path) -> anyhow::Result<DatasetSpec> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let deserializer = serde_yaml::Deserializer::from_str(&text);
    let spec: DatasetSpec = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { "spec".into() } else { field };
        anyhow::anyhow!("{}: {field}: {}", file.display(), e.inner())
    })?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(spec)
}

fn describe(view: &DatasetView) -> Vec<String> {
    let s = &view.spec;
    vec![
        s.name.clone(),
        s.holder.clone(),
        format!("{} ({})", s.vault, view.jurisdiction),
        format!("{:?}", s.level).to_lowercase(),
        format!("{:?}", s.personal).to_lowercase(),
        s.subjects.to_string(),
        s.purposes.join(","),
    ]
}

pub async fn dataset(args: &Args, cmd: &DatasetCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    let header = [
        "NAME", "HOLDER", "VAULT", "LEVEL", "PERSONAL", "SUBJECTS", "PURPOSES",
    ];
    match cmd {
        DatasetCommand::Register { file } => {
            let spec = read_dataset(file)?;
            let view: DatasetView = client.post("/api/v1/datasets", &spec).await?;
            emit(args.output, &view, |v| {
                println!(
                    "registered dataset {} held by {} in the vault at {} ({})",
                    v.spec.name, v.spec.holder, v.spec.vault, v.jurisdiction
                )
            });
        }
        DatasetCommand::Ls => {
            let views: Vec<DatasetView> = client.get("/api/v1/datasets").await?;
            emit(args.output, &views, |views| {
                table(&header, &views.iter().map(describe).collect::<Vec<_>>())
            });
        }
        DatasetCommand::Upload { name, paths } => {
            let version = baygrid_vault::upload(&client, name, paths).await?;
            emit(args.output, &version, |v| {
                println!(
                    "dataset {} version {}: {} file(s), {} rows, {} bytes (upload {})",
                    v.dataset,
                    v.version,
                    v.files.len(),
                    v.rows,
                    v.bytes,
                    v.upload
                );
                for f in &v.files {
                    println!("  {}  {}  {} rows", f.sha256, f.name, f.rows);
                }
            });
        }
        DatasetCommand::Get { name } => {
            let view: DatasetView = client.get(&format!("/api/v1/datasets/{name}")).await?;
            emit(args.output, &view, |v| {
                table(&header, &[describe(v)]);
                let columns: Vec<String> = v
                    .spec
                    .schema
                    .iter()
                    .map(|c| format!("{} {:?}", c.name, c.kind).to_lowercase())
                    .collect();
                println!("\ncolumns: {}", columns.join(", "));
                if let Some(column) = &v.spec.subject_column {
                    println!("subject column: {column}");
                }
                for version in &v.versions {
                    println!(
                        "version {}: {} file(s), {} rows, {} bytes, {}",
                        version.version,
                        version.files.len(),
                        version.rows,
                        version.bytes,
                        version.created_at
                    );
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
