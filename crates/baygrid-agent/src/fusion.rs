//! Fusion workers at this agent's site: a party trains beside its vault on the dataset
//! staged from it (digests checked) and saves its copy of the final model back into the
//! vault; the aggregator combines the parties' updates. They reach each other only through
//! the server's relay; the protocol is `baygrid_fusion::fed`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baygrid_api::{Client, FusionReport, FusionRound, FusionWork, PartyDone, VersionFile};
use baygrid_fusion::data::Table;
use baygrid_fusion::fed::{self, FedError, Msg, Transport};
use baygrid_fusion::homo::{self, Aggregation, HomoConfig};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::query::{serve_claims, staged};

/// Serves fusion workers until shutdown.
pub(crate) async fn serve(client: Client, work_dir: PathBuf, shutdown: watch::Receiver<bool>) {
    let worker = client.clone();
    serve_claims(
        client,
        "/api/v1/agent/fusion/claim",
        shutdown,
        move |work: FusionWork| {
            let client = worker.clone();
            let dir = work_dir.clone();
            async move {
                let outcome = run(&client, &dir, &work).await;
                let report = match outcome {
                    Ok(report) => report,
                    Err(error) => {
                        tracing::warn!(run = %work.run, index = work.index, %error, "fusion worker failed");
                        FusionReport {
                            error: Some(error),
                            ..FusionReport::default()
                        }
                    }
                };
                if let Err(e) = send_report(&client, &work, &report).await {
                    tracing::warn!(run = %work.run, error = %e, "fusion report not delivered");
                }
            }
        },
    )
    .await
}

async fn send_report(
    client: &Client,
    work: &FusionWork,
    report: &FusionReport,
) -> Result<(), baygrid_api::ClientError> {
    let path = format!(
        "/api/v1/agent/fusion/{}/report?index={}",
        work.run, work.index
    );
    client
        .post::<_, serde_json::Value>(&path, report)
        .await
        .map(|_| ())
}

fn aggregation_name(a: Aggregation) -> String {
    match a {
        Aggregation::Plain => "plain (two parties: the sum would reveal the other's update)".into(),
        Aggregation::Secure { threshold } => format!("secure (threshold {threshold})"),
    }
}

async fn run(client: &Client, work_dir: &Path, work: &FusionWork) -> Result<FusionReport, String> {
    let cfg: HomoConfig =
        serde_json::from_value(work.settings.clone()).map_err(|e| format!("settings: {e}"))?;
    let wait = Duration::from_millis(work.wait_ms);
    let relay = Relay {
        client: client.clone(),
        base: format!(
            "/api/v1/agent/fusion/{}/relay?index={}",
            work.run, work.index
        ),
        handle: Handle::current(),
        next: 0,
        waiting: VecDeque::new(),
        bytes: 0,
    };
    if work.index == fed::AGGREGATOR {
        let reporter = client.clone();
        let handle = Handle::current();
        let the_work = work.clone();
        let parties = work.parties;
        let outcome = tokio::task::spawn_blocking(move || {
            let mut relay = relay;
            fed::run_aggregator(&cfg, parties, &mut relay, wait, |stats| {
                let round = FusionReport {
                    round: Some(FusionRound {
                        round: stats.round,
                        loss: stats.loss,
                        seconds: stats.seconds,
                        bytes: stats.bytes,
                    }),
                    ..FusionReport::default()
                };
                if let Err(e) = handle.block_on(send_report(&reporter, &the_work, &round)) {
                    tracing::warn!(error = %e, "round not reported");
                }
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        return Ok(FusionReport {
            aggregation: Some(aggregation_name(outcome.aggregation)),
            done: true,
            ..FusionReport::default()
        });
    }
    let table = work
        .table
        .as_ref()
        .ok_or("a party's work carries its dataset")?;
    let target = work
        .model
        .as_ref()
        .ok_or("a party's work says where its model goes")?;
    let dir = staged(
        work_dir,
        &table.dataset,
        &table.upload,
        &table.files,
        &table.vault_url,
    )
    .await?;
    let mut rows: Option<Table> = None;
    for file in &table.files {
        let t = Table::read_csv(&dir.join(&file.name)).map_err(|e| e.to_string())?;
        rows = Some(match rows {
            None => t,
            Some(all) => all.concat(&t).map_err(|e| e.to_string())?,
        });
    }
    let rows = rows.ok_or("the dataset's version has no files")?;
    let index = work.index;
    let (outcome, scores, columns) = tokio::task::spawn_blocking(move || {
        let mut relay = relay;
        let device = homo::device();
        let columns = rows.columns.clone();
        let outcome = fed::run_party(&cfg, rows.clone(), index, device.clone(), &mut relay, wait)?;
        let scores = homo::score(cfg.arch, &outcome.params, &rows, &device)?;
        Ok::<_, FedError>((outcome, scores, columns))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let model = serde_json::json!({
        "run": work.run,
        "task": work.task,
        "settings": work.settings,
        "columns": columns,
        "params": outcome.params,
        "aggregation": outcome.aggregation,
        "rounds": outcome.rounds,
        "dp_epsilon": outcome.epsilon,
    });
    let scratch = work_dir
        .join("fusion")
        .join(format!("{}-{}", work.run, work.index));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let path = scratch.join("model.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&model).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let vault = baygrid_vault::Vault::open(&target.vault_url).map_err(|e| e.to_string())?;
    let stored = vault
        .put_file(
            &baygrid_vault::object_key(&target.dataset, &work.run, "model.json"),
            &path,
        )
        .await
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(FusionReport {
        party: Some(PartyDone {
            files: vec![VersionFile {
                name: "model.json".into(),
                bytes: stored.bytes,
                sha256: stored.sha256,
                rows: 0,
                format: "file".into(),
            }],
            scores: serde_json::to_value(scores).map_err(|e| e.to_string())?,
        }),
        done: true,
        ..FusionReport::default()
    })
}

/// The server's relay as a blocking transport, for a worker's protocol thread.
struct Relay {
    client: Client,
    base: String,
    handle: Handle,
    /// The next message number to fetch.
    next: usize,
    waiting: VecDeque<(usize, Msg)>,
    bytes: usize,
}

impl Transport for Relay {
    fn send(&mut self, to: usize, msg: &Msg) -> Result<(), FedError> {
        let body = serde_json::to_vec(msg).map_err(|e| FedError::Transport(e.to_string()))?;
        self.bytes += body.len();
        self.handle
            .block_on(
                self.client
                    .post_bytes(&format!("{}&to={to}", self.base), body),
            )
            .map_err(|e| FedError::Transport(e.to_string()))
    }

    fn recv(&mut self, wait: Duration) -> Result<Option<(usize, Msg)>, FedError> {
        let deadline = Instant::now() + wait;
        while self.waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let body = self
                .handle
                .block_on(self.client.get_bytes(&format!(
                    "{}&from={}&wait_ms={}",
                    self.base,
                    self.next,
                    left.as_millis().min(20_000)
                )))
                .map_err(|e| FedError::Transport(e.to_string()))?;
            for framed in baygrid_api::relay::unframe(&body).map_err(FedError::Transport)? {
                self.next += 1;
                self.bytes += framed.len();
                let Some((sender, message)) = framed.split_first_chunk::<4>() else {
                    return Err(FedError::Transport(
                        "a relayed message without its sender".into(),
                    ));
                };
                let msg: Msg = serde_json::from_slice(message)
                    .map_err(|e| FedError::Transport(format!("a relayed message: {e}")))?;
                self.waiting
                    .push_back((u32::from_le_bytes(*sender) as usize, msg));
            }
        }
        Ok(self.waiting.pop_front())
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}
