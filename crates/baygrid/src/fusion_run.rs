//! `baygrid fusion run|ls|get|logs|cancel`: fusion runs through the exchange, each party's
//! worker beside its own vault.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baygrid_api::{FusionEvent, FusionRequest, FusionState, FusionView};
use baygrid_core::SpecError;

use crate::output::{emit, or_dash, table, ListArgs};
use crate::Args;

/// A run file as the API takes it: `task`, `parties` (name and dataset), `purpose`,
/// `settings`, `max_minutes`, `priority_class`. An error names the file and the field.
pub(crate) fn read_request(path: &Path) -> anyhow::Result<FusionRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let de = serde_yaml::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let e = SpecError::at(e.path(), &e.inner().to_string(), "spec");
        anyhow::anyhow!("{}: {e}", path.display())
    })
}

fn outcome(view: &FusionView) -> ExitCode {
    match view.state {
        FusionState::Succeeded | FusionState::Running => ExitCode::SUCCESS,
        FusionState::Failed | FusionState::Cancelled => ExitCode::FAILURE,
    }
}

/// A run as the CLI (and the demo) shows it.
pub(crate) fn show(view: &FusionView) {
    println!(
        "fusion run {} by {}  {}  {:?}  ({})",
        view.id,
        view.tenant,
        view.task.as_str(),
        view.state,
        view.purpose
    );
    let rows: Vec<Vec<String>> = view
        .workers
        .iter()
        .map(|w| {
            let auc = w
                .scores
                .as_ref()
                .and_then(|s| s["auc"].as_f64())
                .map(|a| format!("{a:.6}"));
            vec![
                w.role.clone(),
                w.site.clone(),
                w.jurisdiction.to_string(),
                or_dash(w.job.clone()),
                or_dash(w.cluster.clone()),
                format!("{:?}", w.state).to_lowercase(),
                format!("{:.1}", w.seconds),
                or_dash(auc),
                or_dash(w.model.clone()),
            ]
        })
        .collect();
    table(
        &[
            "WORKER", "SITE", "JUR", "JOB", "CLUSTER", "STATE", "SECONDS", "AUC", "MODEL",
        ],
        &rows,
    );
    for p in &view.placement {
        println!("  aggregator candidate {p}");
    }
    if let Some(a) = &view.aggregation {
        println!("  aggregation: {a}");
    }
    if let (Some(first), Some(last)) = (view.rounds.first(), view.rounds.last()) {
        let bytes: usize = view.rounds.iter().map(|r| r.bytes).sum();
        let trend = match (first.loss, last.loss, last.gradient_norm) {
            (Some(a), Some(b), _) => format!("loss {a:.5} → {b:.5}"),
            (_, _, Some(g)) => format!("guest gradient norm {g:.5} at the end"),
            _ => String::new(),
        };
        println!(
            "  {} rounds: {trend}, {bytes} bytes through the relay",
            view.rounds.len()
        );
    }
    if !view.rules.is_empty() {
        println!("  model_update flows under {}", view.rules.join(", "));
    }
    match &view.charged {
        Some(c) => println!(
            "  held {}, charged {c} for the data (each worker's job settles its compute)",
            view.held
        ),
        None => println!("  held {}", view.held),
    }
    if let Some(e) = &view.error {
        println!("  {e}");
    }
}

fn print_events(events: &[FusionEvent]) {
    for e in events {
        println!("{}  {}", e.at, e.line);
    }
}

/// Submits a run and follows its log until it ends.
pub(crate) async fn run_file(
    client: &baygrid_api::Client,
    request: &FusionRequest,
    tenant: Option<&str>,
    follow: bool,
) -> anyhow::Result<FusionView> {
    let path = match tenant {
        Some(t) => format!("/api/v1/fusion?tenant={t}"),
        None => "/api/v1/fusion".into(),
    };
    let started: FusionView = client.post(&path, request).await?;
    if !follow {
        return Ok(started);
    }
    let mut seen = 0;
    loop {
        let events: Vec<FusionEvent> =
            crate::cli::get_patiently(client, &format!("/api/v1/fusion/{}/logs", started.id), None)
                .await?;
        if events.len() > seen {
            print_events(&events[seen..]);
            seen = events.len();
        }
        let view: FusionView =
            crate::cli::get_patiently(client, &format!("/api/v1/fusion/{}", started.id), None)
                .await?;
        if view.state != FusionState::Running {
            let events: Vec<FusionEvent> = client
                .get(&format!("/api/v1/fusion/{}/logs", started.id))
                .await?;
            print_events(&events[seen.min(events.len())..]);
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum RunCommand {
    /// Start a run through the exchange (see examples/fusion/*-exchange.yaml): each party's
    /// worker trains beside its own vault; follows the run's log until it ends.
    Run {
        /// The run (YAML): task, parties and their datasets, settings.
        file: std::path::PathBuf,
        /// Print the run and return at once.
        #[arg(long)]
        no_wait: bool,
        /// For operators: the tenant to act for.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Your runs, newest first (operators and regulators: everyone's); their states:
    /// running, succeeded, failed, cancelled.
    Ls(ListArgs),
    /// One run: its workers, placement, rounds, models and charge.
    Get {
        /// The run's id.
        id: String,
    },
    /// A run's log: placement, workers, every round, the release.
    Logs {
        /// The run's id.
        id: String,
    },
    /// Stop a running run; nothing is charged.
    Cancel {
        /// The run's id.
        id: String,
    },
}

pub async fn run(args: &Args, cmd: &RunCommand) -> anyhow::Result<ExitCode> {
    // a run file is checked before anything else
    let request = match cmd {
        RunCommand::Run { file, .. } => Some(read_request(file)?),
        _ => None,
    };
    let client = crate::cli::client(args)?;
    match cmd {
        RunCommand::Run {
            no_wait, tenant, ..
        } => {
            let request = request.expect("read above");
            let view = run_file(&client, &request, tenant.as_deref(), !no_wait).await?;
            emit(args.output, &view, show);
            Ok(outcome(&view))
        }
        RunCommand::Ls(list) => {
            let path = list.path("/api/v1/fusion");
            let all: Vec<FusionView> = client.get(&path).await?;
            emit(args.output, &all, |all| {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|v| {
                        vec![
                            v.id.clone(),
                            v.task.as_str().into(),
                            format!("{:?}", v.state).to_lowercase(),
                            v.workers.len().saturating_sub(1).to_string(),
                            v.rounds.len().to_string(),
                            or_dash(v.charged),
                            v.created_at.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID", "TASK", "STATE", "PARTIES", "ROUNDS", "CHARGED", "CREATED",
                    ],
                    &rows,
                );
            });
            list.hint_next(
                args.output,
                all.len(),
                all.last().map(|v| v.id.as_str()),
                "baygrid fusion ls",
            );
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Get { id } => {
            let view: FusionView = client.get(&format!("/api/v1/fusion/{id}")).await?;
            emit(args.output, &view, show);
            Ok(outcome(&view))
        }
        RunCommand::Logs { id } => {
            let events: Vec<FusionEvent> = client.get(&format!("/api/v1/fusion/{id}/logs")).await?;
            emit(args.output, &events, |e| print_events(e));
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Cancel { id } => {
            let view: FusionView = client
                .post(
                    &format!("/api/v1/fusion/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            emit(args.output, &view, show);
            Ok(ExitCode::SUCCESS)
        }
    }
}
