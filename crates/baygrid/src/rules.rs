//! `baygrid rules …`: the GBA cross-border rule pack, run locally on a flow request.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use baygrid_rules::{FlowRequest, RulePack};
use clap::Subcommand;

use crate::output::{emit, table};
use crate::Args;

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Record evidence of a legal basis (operator, or the exporter's data holder).
    Add {
        /// security_assessment | standard_contract | certification | gba_contract_hk |
        /// gba_contract_mo | separate_consent | hk_prescribed_consent | mo_authorisation |
        /// mo_consent
        #[arg(long)]
        kind: String,
        /// The party the data leaves from.
        #[arg(long)]
        exporter: String,
        /// The party the data goes to.
        #[arg(long)]
        recipient: String,
        /// YYYY-MM-DD
        #[arg(long)]
        effective: String,
        /// Contracts: the filing date (YYYY-MM-DD); leave out while unfiled.
        #[arg(long)]
        filed: Option<String>,
        /// The data set it covers (a security assessment must name one).
        #[arg(long)]
        dataset: Option<String>,
        /// A client-chosen id (lowercase letters, digits and `-`); made when absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// The evidence the caller may see.
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Ask the exchange to decide a flow (TOML or JSON: exporter, recipient, data, flow);
    /// the decision is recorded in the audit log and counted in the exporter's totals.
    Decide {
        /// The flow (TOML or JSON).
        file: PathBuf,
    },
    /// Copy a dataset's latest version to a site's vault under an active copy contract:
    /// the rules decide and the holder's totals count now; the source site's agent copies.
    Request {
        /// The dataset to copy.
        #[arg(long)]
        dataset: String,
        /// The destination site.
        #[arg(long)]
        to: String,
        /// What the copy is for: the purpose of an active copy contract for the site.
        #[arg(long)]
        purpose: String,
        /// The copy's dataset name at the destination (default `<dataset>-<site>`).
        #[arg(long = "as")]
        copy_as: Option<String>,
        /// For operators: the tenant to request for.
        #[arg(long)]
        tenant: Option<String>,
        /// Wait until the copy is done or failed.
        #[arg(long)]
        wait: bool,
    },
    /// The copies the caller is a party to.
    Ls,
    /// One copy: its decision, state and files.
    Get {
        /// The copy's id.
        id: String,
    },
}

pub async fn evidence(args: &Args, cmd: &EvidenceCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    match cmd {
        EvidenceCommand::Add {
            kind,
            exporter,
            recipient,
            effective,
            filed,
            dataset,
            id,
        } => {
            let body = serde_json::json!({
                "id": id.clone().unwrap_or_default(),
                "kind": kind,
                "exporter": exporter,
                "recipient": recipient,
                "effective": effective,
                "filed": filed.clone().unwrap_or_default(),
                "dataset": dataset,
            });
            let record: baygrid_api::EvidenceRecord =
                client.post("/api/v1/evidence", &body).await?;
            emit(args.output, &record, |r| {
                println!(
                    "evidence {}: {} from {} to {}, effective {}",
                    r.id,
                    r.kind.as_str(),
                    r.exporter,
                    r.recipient,
                    r.effective
                )
            });
        }
        EvidenceCommand::Ls => {
            let records: Vec<baygrid_api::EvidenceRecord> = client.get("/api/v1/evidence").await?;
            emit(args.output, &records, |records| {
                let rows = records
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.kind.as_str().to_string(),
                            r.exporter.clone(),
                            r.recipient.clone(),
                            r.effective.to_string(),
                            r.filed
                                .clone()
                                .filter(|f| !f.is_empty())
                                .unwrap_or_else(|| "-".into()),
                            r.dataset.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(
                    &[
                        "ID",
                        "KIND",
                        "EXPORTER",
                        "RECIPIENT",
                        "EFFECTIVE",
                        "FILED",
                        "DATASET",
                    ],
                    &rows,
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn flow(args: &Args, cmd: &FlowCommand) -> anyhow::Result<ExitCode> {
    let client = crate::cli::client(args)?;
    let file = match cmd {
        FlowCommand::Decide { file } => file,
        FlowCommand::Request {
            dataset,
            to,
            purpose,
            copy_as,
            tenant,
            wait,
        } => {
            let body = baygrid_api::FlowRequestBody {
                dataset: dataset.clone(),
                site: to.clone(),
                purpose: purpose.clone(),
                copy_as: copy_as.clone(),
            };
            let path = match tenant {
                Some(t) => format!("/api/v1/flows?tenant={t}"),
                None => "/api/v1/flows".into(),
            };
            let mut view: baygrid_api::FlowView = client.post(&path, &body).await?;
            while *wait
                && matches!(
                    view.state,
                    baygrid_api::FlowState::Pending | baygrid_api::FlowState::Copying
                )
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                view =
                    crate::cli::get_patiently(&client, &format!("/api/v1/flows/{}", view.id), None)
                        .await?;
            }
            emit(args.output, &view, print_flow);
            return Ok(match view.state {
                baygrid_api::FlowState::Denied => ExitCode::from(3),
                baygrid_api::FlowState::Failed => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            });
        }
        FlowCommand::Ls => {
            let all: Vec<baygrid_api::FlowView> = client.get("/api/v1/flows").await?;
            emit(args.output, &all, |all| {
                for f in all {
                    println!(
                        "{}  {:?}  {} v{} {} -> {} as {} ({})",
                        f.id,
                        f.state,
                        f.dataset,
                        f.version,
                        f.source_site,
                        f.site,
                        f.copy_as,
                        f.tenant
                    );
                }
            });
            return Ok(ExitCode::SUCCESS);
        }
        FlowCommand::Get { id } => {
            let view: baygrid_api::FlowView = client.get(&format!("/api/v1/flows/{id}")).await?;
            emit(args.output, &view, print_flow);
            return Ok(ExitCode::SUCCESS);
        }
    };
    let ask: baygrid_api::FlowAsk = read_file(file)?;
    let view: baygrid_api::FlowDecisionView = client.post("/api/v1/flows/decide", &ask).await?;
    emit(args.output, &view, |v| {
        println!(
            "decided on {} with {} non-sensitive and {} sensitive individuals already exported this year",
            v.today, v.exported_personal, v.exported_sensitive
        );
        print_decision(&v.decision);
    });
    Ok(ExitCode::SUCCESS)
}

fn print_flow(f: &baygrid_api::FlowView) {
    println!(
        "flow {}: {} v{} from {} to {} as {}, for {} under {}: {}",
        f.id,
        f.dataset,
        f.version,
        f.source_site,
        f.site,
        f.copy_as,
        f.purpose,
        f.contract,
        format!("{:?}", f.state).to_lowercase()
    );
    if let Some((category, subjects)) = &f.counted {
        println!(
            "counted: {subjects} individuals ({category}) in {}'s totals",
            f.holder
        );
    }
    if let Some(error) = &f.error {
        println!("error: {error}");
    }
    print_decision(&f.decision);
}

fn print_decision(d: &baygrid_rules::Decision) {
    println!(
        "{} (rule pack {})",
        if d.allowed { "ALLOW" } else { "DENY" },
        d.pack_version
    );
    println!("rules applied: {}", d.rules.join(", "));
    if !d.denied_by.is_empty() {
        println!("denied by: {}", d.denied_by.join(", "));
    }
    for remedy in &d.remedies {
        println!("to allow it: {remedy}");
    }
    for o in &d.obligations {
        match o.due {
            Some(due) => println!("obligation: {} ({}), due {due}", o.id, o.rule),
            None => println!("obligation: {} ({})", o.id, o.rule),
        }
    }
    if !d.evidence_used.is_empty() {
        println!("evidence used: {}", d.evidence_used.join(", "));
    }
    for note in &d.notes {
        println!("note: {note}");
    }
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// List the pack's rule ids.
    Ls,
    /// Decide a flow request (TOML or JSON: today, exporter, recipient, data, flow,
    /// evidence) and explain the decision.
    Decide {
        /// The flow request (TOML or JSON).
        file: PathBuf,
        /// A rule-pack parameters file instead of the built-in one.
        #[arg(long)]
        pack: Option<PathBuf>,
    },
    /// Run every case of a cases file (the rule pack's `[[case]]` format with `expect`)
    /// through the rules; exits non-zero on any mismatch.
    Check {
        /// The cases file.
        file: PathBuf,
        /// A rule-pack parameters file instead of the built-in one.
        #[arg(long)]
        pack: Option<PathBuf>,
    },
}

/// A TOML or (by extension) JSON file; errors name the file and the field.
fn read_file<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
    } else {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

pub fn run(args: &Args, cmd: &RulesCommand) -> anyhow::Result<ExitCode> {
    let pack = match cmd {
        RulesCommand::Decide {
            pack: Some(path), ..
        }
        | RulesCommand::Check {
            pack: Some(path), ..
        } => RulePack::from_file(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        _ => RulePack::load()?,
    };
    match cmd {
        RulesCommand::Ls => {
            let ids = pack.rule_ids().to_vec();
            emit(args.output, &ids, |ids| {
                table(
                    &["RULE"],
                    &ids.iter().map(|i| vec![i.clone()]).collect::<Vec<_>>(),
                )
            });
        }
        RulesCommand::Check { file, .. } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let results = pack
                .check_cases(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let failed = results.iter().filter(|r| !r.matches).count();
            emit(args.output, &results, |results| {
                let rows = results
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.decision.clone(),
                            if r.matches {
                                "ok".into()
                            } else {
                                format!("MISMATCH: {}", r.problem.clone().unwrap_or_default())
                            },
                            r.rules.join(","),
                        ]
                    })
                    .collect::<Vec<_>>();
                table(&["CASE", "DECISION", "MATCHES", "RULES"], &rows);
                println!(
                    "{} cases, {} match, {failed} mismatch",
                    results.len(),
                    results.len() - failed
                );
            });
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        RulesCommand::Decide { file, .. } => {
            let request: FlowRequest = read_file(file)?;
            let decision = pack.decide(&request)?;
            emit(args.output, &decision, print_decision);
        }
    }
    Ok(ExitCode::SUCCESS)
}
