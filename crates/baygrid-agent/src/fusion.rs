//! Fusion workers at this agent's site, each the job the dispatcher placed here: a party
//! trains beside its vault on the dataset staged from it (digests checked) and saves its
//! copy of the final model back into the vault; the aggregator combines the parties'
//! updates. They reach each other only through the server's relay; the protocol is
//! `baygrid_fusion::fed`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baygrid_api::{
    Client, FusionReport, FusionRound, FusionTask, FusionWork, PartyDone, VersionFile,
};
use baygrid_exec::{Engine, ExecError, JobHandle, JobStatus, LaunchSpec, LogCursor, OutputLine};
use baygrid_fusion::data::Table;
use baygrid_fusion::fed::{self, FedError, Msg, Transport};
use baygrid_fusion::hetero::{apart, HeteroConfig};
use baygrid_fusion::homo::{self, Aggregation, HomoConfig};
use baygrid_fusion::psi::PsiSettings;
use tokio::runtime::Handle;

use crate::query::staged;

/// The engine name on the handles of the workers an agent runs itself.
pub(crate) const ENGINE: &str = "fusion";

/// The fusion workers this agent runs itself, each a task beside the agent's loop under
/// its job's lease: an engine of their own for the agent's bookkeeping (status, output,
/// cancel, the hold's time limit). A worker does not outlive its agent: one a restarted
/// agent finds gone is reported lost, and its run fails, since a worker cannot rejoin a
/// protocol midway.
pub(crate) struct Workers {
    client: Client,
    work_dir: PathBuf,
    tasks: Mutex<BTreeMap<(String, i64), Task>>,
}

struct Task {
    run: tokio::task::AbortHandle,
    shared: Arc<Mutex<Shared>>,
}

/// What a worker's task leaves for the agent: its output so far and how it ended.
#[derive(Default)]
struct Shared {
    output: Vec<u8>,
    ended: Option<JobStatus>,
}

impl Shared {
    fn note(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.push(b'\n');
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Workers {
    pub(crate) fn new(client: Client, work_dir: PathBuf) -> Self {
        Workers {
            client,
            work_dir,
            tasks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts the worker of job `job_id`'s lease `epoch`.
    pub(crate) fn start(&self, job_id: &str, epoch: i64, work: FusionWork) -> JobHandle {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let handle = JobHandle {
            job_id: job_id.to_string(),
            epoch,
            engine: ENGINE.into(),
            dir: self.work_dir.join("fusion"),
            detail: serde_json::json!({ "run": work.run, "index": work.index }),
        };
        let client = self.client.clone();
        let dir = self.work_dir.clone();
        let mine = shared.clone();
        let task = tokio::spawn(async move {
            lock(&mine).note(&format!(
                "worker {} of fusion run {} ({}) started",
                work.index,
                work.run,
                work.task.as_str()
            ));
            let (report, status) = match run(&client, &dir, &work).await {
                Ok(report) => (report, JobStatus::Succeeded),
                Err(error) => {
                    tracing::warn!(run = %work.run, index = work.index, %error, "fusion worker failed");
                    lock(&mine).note(&format!("failed: {error}"));
                    let status = JobStatus::Failed {
                        exit_code: Some(1),
                        reason: error.clone(),
                    };
                    let report = FusionReport {
                        error: Some(error),
                        ..FusionReport::default()
                    };
                    (report, status)
                }
            };
            let status = match send_report(&client, &work, &report).await {
                Ok(()) => status,
                Err(e) => {
                    tracing::warn!(run = %work.run, error = %e, "fusion report not delivered");
                    JobStatus::Failed {
                        exit_code: Some(1),
                        reason: format!("the worker's report was not delivered: {e}"),
                    }
                }
            };
            let mut shared = lock(&mine);
            shared.note(&format!("ended: {status:?}"));
            shared.ended = Some(status);
        });
        lock(&self.tasks).insert(
            (job_id.to_string(), epoch),
            Task {
                run: task.abort_handle(),
                shared,
            },
        );
        handle
    }

    /// Drops what is kept of a job's workers, once the agent has reported it.
    pub(crate) fn forget(&self, job_id: &str) {
        lock(&self.tasks).retain(|(job, _), task| {
            let keep = job != job_id;
            if !keep {
                task.run.abort();
            }
            keep
        });
    }

    fn shared(&self, handle: &JobHandle) -> Result<Option<Arc<Mutex<Shared>>>, ExecError> {
        if handle.engine != ENGINE {
            return Err(ExecError::ForeignHandle(handle.engine.clone()));
        }
        Ok(lock(&self.tasks)
            .get(&(handle.job_id.clone(), handle.epoch))
            .map(|t| t.shared.clone()))
    }
}

#[async_trait::async_trait]
impl Engine for Workers {
    fn kind(&self) -> &'static str {
        ENGINE
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<JobHandle, ExecError> {
        Err(ExecError::Refused(format!(
            "job {}: a fusion worker starts from its lease's work, not from a command",
            spec.job_id
        )))
    }

    async fn status(&self, handle: &JobHandle) -> Result<JobStatus, ExecError> {
        Ok(match self.shared(handle)? {
            None => JobStatus::Failed {
                exit_code: None,
                reason: "the worker ran inside this agent before it restarted".into(),
            },
            Some(shared) => lock(&shared).ended.clone().unwrap_or(JobStatus::Running),
        })
    }

    async fn read_output(
        &self,
        handle: &JobHandle,
        cursor: &mut LogCursor,
    ) -> Result<Vec<OutputLine>, ExecError> {
        let Some(shared) = self.shared(handle)? else {
            return Ok(vec![]);
        };
        let shared = lock(&shared);
        Ok(cursor
            .take_new_lines("stdout", &shared.output, shared.ended.is_some())
            .into_iter()
            .map(|line| OutputLine {
                stream: "stdout".into(),
                line,
            })
            .collect())
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<(), ExecError> {
        let Some(shared) = self.shared(handle)? else {
            return Ok(());
        };
        if let Some(task) = lock(&self.tasks).get(&(handle.job_id.clone(), handle.epoch)) {
            task.run.abort();
        }
        let mut shared = lock(&shared);
        if shared.ended.is_none() {
            shared.note("cancelled");
            shared.ended = Some(JobStatus::Cancelled {
                reason: "cancelled".into(),
            });
        }
        Ok(())
    }
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
    let mut resent = false;
    let sent = baygrid_api::patiently(
        baygrid_api::PATIENCE,
        || client.post::<_, serde_json::Value>(&path, report),
        |failure| {
            resent |= failure.is_some();
            crate::query::waiting_on_server(&work.run, failure)
        },
    )
    .await;
    match sent {
        // the first try was taken before its answer was lost, and it ended the run
        Err(e) if resent && e.status() == Some(409) && (report.done || report.error.is_some()) => {
            tracing::info!(run = %work.run, error = %e, "report resent after the run ended");
            Ok(())
        }
        sent => sent.map(|_| ()),
    }
}

fn aggregation_name(a: Aggregation) -> String {
    match a {
        Aggregation::Plain => "plain (two parties: the sum would reveal the other's update)".into(),
        Aggregation::Secure { threshold } => format!("secure (threshold {threshold})"),
    }
}

/// Reports each round's figures from a protocol thread.
fn round_reporter(client: &Client, work: &FusionWork) -> impl FnMut(FusionRound) + Send + 'static {
    let client = client.clone();
    let work = work.clone();
    let handle = Handle::current();
    move |round| {
        let report = FusionReport {
            round: Some(round),
            ..FusionReport::default()
        };
        if let Err(e) = handle.block_on(send_report(&client, &work, &report)) {
            tracing::warn!(error = %e, "round not reported");
        }
    }
}

/// Runs a protocol role on a blocking thread with the relay as its transport.
async fn on_relay<T: Send + 'static>(
    relay: Relay,
    role: impl FnOnce(&mut Relay) -> Result<T, FedError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || {
        let mut relay = relay;
        role(&mut relay)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

async fn run(client: &Client, work_dir: &Path, work: &FusionWork) -> Result<FusionReport, String> {
    let wait = Duration::from_millis(work.wait_ms);
    let relay = Relay {
        client: client.clone(),
        base: format!(
            "/api/v1/agent/fusion/{}/relay?index={}",
            work.run, work.index
        ),
        run: work.run.clone(),
        handle: Handle::current(),
        sent: BTreeMap::new(),
        next: 0,
        waiting: VecDeque::new(),
        bytes: 0,
    };
    if work.task == FusionTask::Psi {
        let settings: PsiSettings =
            serde_json::from_value(work.settings.clone()).map_err(|e| format!("settings: {e}"))?;
        let rows = party_rows(work_dir, work).await?;
        let index = work.index;
        let ids = rows.ids.clone();
        let outcome = on_relay(relay, move |r| {
            fed::run_psi(index, &ids, settings.reveal, r, wait)
        })
        .await?;
        let mut scores = serde_json::json!({
            "own_ids": outcome.own_size,
            "peer_ids": outcome.peer_size,
            "bytes": outcome.bytes_sent + outcome.bytes_received,
        });
        let Some(intersection) = outcome.intersection else {
            // the designated party alone learns it; this one keeps nothing
            return Ok(FusionReport {
                party: Some(PartyDone {
                    files: vec![],
                    scores,
                }),
                done: true,
                ..FusionReport::default()
            });
        };
        scores["intersection"] = intersection.len().into();
        let mut csv = String::from("id\n");
        for id in &intersection {
            csv.push_str(id);
            csv.push('\n');
        }
        return save_output(work_dir, work, "intersection.csv", csv.as_bytes(), scores).await;
    }
    let vertical = work.task == FusionTask::HeteroLr;
    if vertical {
        let cfg: HeteroConfig =
            serde_json::from_value(work.settings.clone()).map_err(|e| format!("settings: {e}"))?;
        if work.index == apart::DEALER {
            on_relay(relay, move |r| apart::run_dealer(&cfg, r, wait)).await?;
            return Ok(FusionReport {
                done: true,
                ..FusionReport::default()
            });
        }
        let rows = party_rows(work_dir, work).await?;
        let columns = rows.columns.clone();
        let index = work.index;
        let mut report_round = round_reporter(client, work);
        let outcome = on_relay(relay, move |r| {
            if index == apart::GUEST {
                apart::run_guest(&cfg, &rows, r, wait, |s| {
                    report_round(FusionRound {
                        round: s.iteration,
                        loss: None,
                        gradient_norm: Some(s.guest_gradient_norm),
                        seconds: s.seconds,
                        bytes: s.bytes,
                    })
                })
            } else {
                apart::run_host(&cfg, &rows, r, wait)
            }
        })
        .await?;
        let role = if index == apart::GUEST {
            "guest"
        } else {
            "host"
        };
        let model = serde_json::json!({
            "run": work.run,
            "task": work.task,
            "role": role,
            "settings": work.settings,
            "columns": columns,
            "weights": outcome.weights,
            "intercept": index == apart::GUEST,
            "aligned_rows": outcome.aligned,
        });
        let scores = match outcome.scores {
            Some(s) => serde_json::to_value(s).map_err(|e| e.to_string())?,
            None => serde_json::json!({ "aligned_rows": outcome.aligned }),
        };
        return save_output(work_dir, work, "model.json", &pretty(&model)?, scores).await;
    }
    let cfg: HomoConfig =
        serde_json::from_value(work.settings.clone()).map_err(|e| format!("settings: {e}"))?;
    if work.index == fed::AGGREGATOR {
        let parties = work.parties;
        let mut report_round = round_reporter(client, work);
        let outcome = on_relay(relay, move |r| {
            fed::run_aggregator(&cfg, parties, r, wait, |s| {
                report_round(FusionRound {
                    round: s.round,
                    loss: Some(s.loss),
                    gradient_norm: None,
                    seconds: s.seconds,
                    bytes: s.bytes,
                })
            })
        })
        .await?;
        return Ok(FusionReport {
            aggregation: Some(aggregation_name(outcome.aggregation)),
            done: true,
            ..FusionReport::default()
        });
    }
    let rows = party_rows(work_dir, work).await?;
    let index = work.index;
    let (outcome, scores, columns) = on_relay(relay, move |r| {
        let device = homo::device();
        let columns = rows.columns.clone();
        let outcome = fed::run_party(&cfg, rows.clone(), index, device.clone(), r, wait)?;
        let scores = homo::score(cfg.arch, &outcome.params, &rows, &device)?;
        Ok((outcome, scores, columns))
    })
    .await?;
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
    let mut scores = serde_json::to_value(scores).map_err(|e| e.to_string())?;
    if let (Some(epsilon), Some(all)) = (outcome.epsilon, scores.as_object_mut()) {
        // DP-SGD's spend at this party, at the settings' δ
        all.insert("dp_epsilon".into(), epsilon.into());
    }
    save_output(work_dir, work, "model.json", &pretty(&model)?, scores).await
}

/// A party's rows: its dataset's version staged from its vault (digests checked).
async fn party_rows(work_dir: &Path, work: &FusionWork) -> Result<Table, String> {
    let table = work
        .table
        .as_ref()
        .ok_or("a party's work carries its dataset")?;
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
    Ok(rows.ok_or("the dataset's version has no files")?)
}

fn pretty(model: &serde_json::Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(model).map_err(|e| e.to_string())
}

/// Writes the party's output (its copy of the model, or its intersection) into its vault,
/// and the report that says so.
async fn save_output(
    work_dir: &Path,
    work: &FusionWork,
    name: &str,
    bytes: &[u8],
    scores: serde_json::Value,
) -> Result<FusionReport, String> {
    let target = work
        .model
        .as_ref()
        .ok_or("a party's work says where its output goes")?;
    let scratch = work_dir
        .join("fusion")
        .join(format!("{}-{}", work.run, work.index));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let path = scratch.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let vault = baygrid_vault::Vault::open(&target.vault_url).map_err(|e| e.to_string())?;
    let stored = vault
        .put_file(
            &baygrid_vault::object_key(&target.dataset, &work.run, name),
            &path,
        )
        .await
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&scratch);
    let csv = name.ends_with(".csv");
    Ok(FusionReport {
        party: Some(PartyDone {
            files: vec![VersionFile {
                name: name.into(),
                bytes: stored.bytes,
                sha256: stored.sha256,
                rows: if csv {
                    bytes
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        .saturating_sub(1) as u64
                } else {
                    0
                },
                format: if csv { "csv" } else { "file" }.into(),
            }],
            scores,
        }),
        done: true,
        ..FusionReport::default()
    })
}

/// The server's relay as a blocking transport, for a worker's protocol thread. It rides
/// out a server restart: messages the server accepted are kept in its store, a message
/// resent after a lost answer carries its number again, and fetching from a number is
/// safe to repeat.
struct Relay {
    client: Client,
    base: String,
    run: String,
    handle: Handle,
    /// How many messages the server has accepted from this worker, by addressee.
    sent: BTreeMap<usize, u64>,
    /// The next message number to fetch.
    next: usize,
    waiting: VecDeque<(usize, Msg)>,
    bytes: usize,
}

impl Relay {
    /// Posts each message to its addressee, all at once: the server commits messages that
    /// arrive together in one write, so a fan-out costs about one commit. Each carries its
    /// number for its addressee, the same when resent.
    fn post<'m>(
        &mut self,
        messages: impl IntoIterator<Item = (usize, &'m Msg)>,
    ) -> Result<(), FedError> {
        let mut posts = Vec::new();
        for (to, msg) in messages {
            let body = serde_json::to_vec(msg).map_err(|e| FedError::Transport(e.to_string()))?;
            self.bytes += body.len();
            let n = self.sent.get(&to).copied().unwrap_or(0);
            posts.push((to, format!("{}&to={to}&n={n}", self.base), body));
        }
        let (client, run) = (&self.client, &self.run);
        self.handle
            .block_on(futures::future::try_join_all(posts.iter().map(
                |(_, path, body)| {
                    baygrid_api::patiently(
                        baygrid_api::PATIENCE,
                        || client.post_bytes(path, body.clone()),
                        |failure| crate::query::waiting_on_server(run, failure),
                    )
                },
            )))
            .map_err(|e| FedError::Transport(e.to_string()))?;
        for (to, _, _) in posts {
            *self.sent.entry(to).or_default() += 1;
        }
        Ok(())
    }
}

impl Transport for Relay {
    fn send(&mut self, to: usize, msg: &Msg) -> Result<(), FedError> {
        self.post([(to, msg)])
    }

    fn send_each(&mut self, messages: &[(usize, Msg)]) -> Result<(), FedError> {
        self.post(messages.iter().map(|(to, msg)| (*to, msg)))
    }

    fn recv(&mut self, wait: Duration) -> Result<Option<(usize, Msg)>, FedError> {
        let deadline = Instant::now() + wait;
        while self.waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let path = format!(
                "{}&from={}&wait_ms={}",
                self.base,
                self.next,
                left.as_millis().min(20_000)
            );
            let (client, run) = (&self.client, &self.run);
            let body = self
                .handle
                .block_on(baygrid_api::patiently(
                    baygrid_api::PATIENCE,
                    || client.get_bytes(&path),
                    |failure| crate::query::waiting_on_server(run, failure),
                ))
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
