//! `baygrid dataset …`: the data zone's catalog of datasets.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baygrid_api::{DatasetSpec, DatasetView};
use baygrid_core::SpecError;
use clap::Subcommand;

use crate::output::{emit, hint_next, query_path, table};
use crate::Args;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Register a dataset from a YAML spec (its holder's data holder, or an operator).
    Register {
        /// The dataset spec (YAML): name, holder, vault, level, personal, subjects, purposes, ….
        file: PathBuf,
    },
    /// The catalog: every dataset's metadata.
    Ls,
    /// One dataset's metadata and versions.
    Get {
        /// The dataset's name.
        name: String,
    },
    /// Upload CSV or Parquet files as the dataset's next version (its holder): each file is
    /// checked against the schema, streamed into the dataset's vault with its SHA-256, and
    /// the version recorded once every file is in.
    Upload {
        /// The dataset's name.
        name: String,
        /// The CSV or Parquet files of the version.
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
        let e = SpecError::at(e.path(), &e.inner().to_string(), "spec");
        anyhow::anyhow!("{}: {e}", file.display())
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
        subjects(view),
        s.purposes.join(","),
    ]
}

/// The individuals the rules count, and what the holder declared where that is fewer.
fn subjects(view: &DatasetView) -> String {
    let counted = view.spec.subjects_in(&view.versions);
    if counted > view.spec.subjects {
        format!("{counted} (declared {})", view.spec.subjects)
    } else {
        counted.to_string()
    }
}

/// `, N individuals` where the version's were counted.
fn individuals(version: &baygrid_api::DatasetVersion) -> String {
    version
        .subjects
        .map(|n| format!(", {n} individuals"))
        .unwrap_or_default()
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
            let view: DatasetView = client.get(&format!("/api/v1/datasets/{name}")).await?;
            let version = baygrid_vault::upload_to(&client, &view, paths).await?;
            if let (Some(counted), Some(column)) = (version.subjects, &view.spec.subject_column) {
                if counted > view.spec.subjects {
                    eprintln!(
                        "note: the files hold {counted} distinct `{column}` values, more than the {} individuals `{name}` declares; the rules count {counted} from now on",
                        view.spec.subjects
                    );
                }
            }
            emit(args.output, &version, |v| {
                println!(
                    "dataset {} version {}: {} file(s), {} rows{}, {} bytes (upload {})",
                    v.dataset,
                    v.version,
                    v.files.len(),
                    v.rows,
                    individuals(v),
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
                        "version {}: {} file(s), {} rows{}, {} bytes, {}",
                        version.version,
                        version.files.len(),
                        version.rows,
                        individuals(version),
                        version.bytes,
                        version.created_at
                    );
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum DataOfferCommand {
    /// Publish a data offer from a YAML file (the dataset's holder).
    Publish {
        /// The offer (YAML): name, dataset, modes, purposes, destinations, price, expires, ….
        file: PathBuf,
    },
    /// Every data offer's terms.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum ContractCommand {
    /// Ask for a contract on a data offer; the rules decide at once.
    Request {
        /// The data offer's id.
        #[arg(long)]
        offer: String,
        /// copy | remote_access | query | federated
        #[arg(long)]
        mode: String,
        /// What the data is for: one of the offer's purposes.
        #[arg(long)]
        purpose: String,
        /// The site the data (or its results) goes to.
        #[arg(long)]
        site: String,
        /// For operators: the tenant to request for.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Approve a pending contract (the holder).
    Approve {
        /// The contract's id.
        id: String,
    },
    /// End a pending or active contract (either side).
    Revoke {
        /// The contract's id.
        id: String,
    },
    /// The contracts the caller is a party to.
    Ls,
}

pub async fn data_offer(args: &Args, cmd: &DataOfferCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    match cmd {
        DataOfferCommand::Publish { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let deserializer = serde_yaml::Deserializer::from_str(&text);
            let spec: baygrid_api::DataOfferSpec = serde_path_to_error::deserialize(deserializer)
                .map_err(|e| {
                anyhow::anyhow!("{}: {}: {}", file.display(), e.path(), e.inner())
            })?;
            let view: baygrid_api::DataOfferView =
                client.post("/api/v1/data-offers", &spec).await?;
            emit(args.output, &view, |v| {
                println!(
                    "published offer {} on {} (held by {} at {})",
                    v.spec.name, v.spec.dataset, v.holder, v.vault
                )
            });
        }
        DataOfferCommand::Ls => {
            let offers: Vec<baygrid_api::DataOfferView> = client.get("/api/v1/data-offers").await?;
            emit(args.output, &offers, |offers| {
                let rows: Vec<Vec<String>> = offers
                    .iter()
                    .map(|o| {
                        let s = &o.spec;
                        vec![
                            s.name.clone(),
                            s.dataset.clone(),
                            o.holder.clone(),
                            s.modes
                                .iter()
                                .map(|m| m.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                            s.purposes.join(","),
                            s.destinations
                                .iter()
                                .map(|d| d.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            match (&s.price.per_use, &s.price.per_gb) {
                                (Some(p), _) => format!("{p}/use"),
                                (_, Some(p)) => format!("{p}/GB"),
                                _ => "-".into(),
                            },
                            s.expires.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME", "DATASET", "HOLDER", "MODES", "PURPOSES", "TO", "PRICE", "EXPIRES",
                    ],
                    &rows,
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn contract_line(c: &baygrid_api::ContractView) -> String {
    let mut line = format!(
        "contract {}: {} of {} by {} for {} at {}: {:?}",
        c.id,
        c.request.mode.as_str(),
        c.dataset,
        c.tenant,
        c.request.purpose,
        c.request.site,
        c.state
    )
    .to_lowercase();
    if !c.decision.allowed {
        line.push_str(&format!(
            "\n  denied by {}; would allow: {}",
            c.decision.denied_by.join(", "),
            c.decision.remedies.join("; ")
        ));
    }
    for o in &c.decision.obligations {
        line.push_str(&format!(
            "\n  obligation {} ({}){}",
            o.id,
            o.rule,
            o.due.map(|d| format!(" due {d}")).unwrap_or_default()
        ));
    }
    line
}

pub async fn contract(args: &Args, cmd: &ContractCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    let view: baygrid_api::ContractView = match cmd {
        ContractCommand::Request {
            offer,
            mode,
            purpose,
            site,
            tenant,
        } => {
            let body = serde_json::json!({
                "offer": offer, "mode": mode, "purpose": purpose, "site": site,
            });
            let path = match tenant {
                Some(t) => format!("/api/v1/contracts?tenant={t}"),
                None => "/api/v1/contracts".into(),
            };
            client.post(&path, &body).await?
        }
        ContractCommand::Approve { id } => {
            client
                .post(
                    &format!("/api/v1/contracts/{id}/approve"),
                    &serde_json::json!({}),
                )
                .await?
        }
        ContractCommand::Revoke { id } => {
            client
                .post(
                    &format!("/api/v1/contracts/{id}/revoke"),
                    &serde_json::json!({}),
                )
                .await?
        }
        ContractCommand::Ls => {
            let all: Vec<baygrid_api::ContractView> = client.get("/api/v1/contracts").await?;
            emit(args.output, &all, |all| {
                for c in all {
                    println!("{}", contract_line(c));
                }
            });
            return Ok(ExitCode::SUCCESS);
        }
    };
    emit(args.output, &view, |c| println!("{}", contract_line(c)));
    // a request the rules denied is recorded, but the caller did not get a contract
    if view.state == baygrid_api::ContractState::Denied {
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum ObligationsCommand {
    /// What allowed flows oblige the caller's party (operators, regulators: everyone) to
    /// do, and where each stands today.
    Ls {
        /// due | overdue | standing
        #[arg(long)]
        status: Option<String>,
        /// At most this many, oldest first (the server's default: 1000)
        #[arg(long)]
        limit: Option<i64>,
        /// The next page: those after this id, the previous page's last
        #[arg(long)]
        after: Option<i64>,
    },
}

pub async fn obligations(args: &Args, cmd: &ObligationsCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    let ObligationsCommand::Ls {
        status,
        limit,
        after,
    } = cmd;
    let path = query_path(
        "/api/v1/obligations",
        &[
            ("status", status.clone()),
            ("limit", limit.map(|l| l.to_string())),
            ("after", after.map(|a| a.to_string())),
        ],
    );
    let all: Vec<baygrid_api::ObligationView> = client.get(&path).await?;
    emit(args.output, &all, |all| {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|o| {
                vec![
                    o.status.clone(),
                    o.due.clone().unwrap_or_else(|| "-".into()),
                    o.obligation.clone(),
                    o.rule.clone(),
                    o.exporter.clone(),
                    o.recipient.clone(),
                    o.dataset.clone(),
                    o.decided_at.clone(),
                ]
            })
            .collect();
        table(
            &[
                "STATUS",
                "DUE",
                "OBLIGATION",
                "RULE",
                "EXPORTER",
                "RECIPIENT",
                "DATASET",
                "DECIDED",
            ],
            &rows,
        )
    });
    hint_next(
        args.output,
        *limit,
        all.len(),
        ("--after", all.last().map(|o| o.id.to_string())),
        "baygrid obligations ls",
    );
    Ok(ExitCode::SUCCESS)
}
