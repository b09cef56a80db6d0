//! The agent against a real server: real processes run, are cancelled, are requeued when
//! their agent dies, and are re-attached when it comes back.

mod common;

use std::path::Path;
use std::time::Duration;

use baygrid_agent::AgentConfig;
use baygrid_api::{Client, JobView, LogsView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use baygrid_server::{RunningServer, ServerConfig};
use tokio::sync::watch;

struct Setup {
    server: RunningServer,
    operator: Client,
    tenant: Client,
}

async fn setup(dir: &Path) -> Setup {
    setup_with(dir, |c| c).await
}

async fn setup_with(dir: &Path, change: impl FnOnce(ServerConfig) -> ServerConfig) -> Setup {
    let config = change(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(3),
        grant_timeout: Duration::from_secs(5),
        // a cluster that loses a job is blocked for it this long (failover); one cluster here
        failover_backoff: Duration::from_millis(500),
        ..ServerConfig::default()
    });
    let server = baygrid_server::start(config).await.unwrap();
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    let tenant = operator
        .add_tenant(
            "gz-lab",
            Jurisdiction::CN,
            "guangzhou",
            "10000.00 CNY".parse().expect("literal budget"),
        )
        .await
        .unwrap();
    Setup {
        server,
        operator,
        tenant,
    }
}

/// Starts an agent for the Guangzhou A800 cluster working in `work_dir`.
async fn start_agent(
    setup: &Setup,
    work_dir: &Path,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    common::start_agent(
        &setup.server.url(),
        &setup.operator,
        "nansha-a800",
        work_dir,
    )
    .await
}

fn job(name: &str, command: &str) -> JobSpec {
    JobSpec::from_yaml(&format!(
        "name: {name}\nresources: {{accelerators: {{A800: 1}}}}\ncommand: |\n  {}\nestimated_duration: 1m\n",
        command.replace('\n', "\n  ")
    ))
    .unwrap()
}

async fn wait(client: &Client, id: &str, pred: impl Fn(&JobView) -> bool, what: &str) -> JobView {
    for _ in 0..400 {
        let view: JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
        if pred(&view) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view: JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
    panic!("job {id} never became {what}: {view:?}");
}

/// Submits a job that sleeps for a minute and waits until it runs at the agent working in
/// `dir/agent`: the job, and its process's pid.
async fn start_sleeper(setup: &Setup, dir: &Path, name: &str) -> (JobView, i32) {
    let submitted: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job(name, "echo $$ > pid\nexec sleep 60"))
        .await
        .unwrap();
    wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state == JobState::Running,
        "running",
    )
    .await;
    let pid = job_pid(&dir.join("agent/jobs")).await;
    (submitted, pid)
}

/// Whether process `pid` has gone within `within`.
async fn gone_within(pid: i32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !pid_alive(pid)
}

/// The pid a running job wrote to `pid` in its rank-0 directory under `jobs`.
async fn job_pid(jobs: &Path) -> i32 {
    for _ in 0..500 {
        let written = std::fs::read_dir(jobs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("rank-0/pid")).ok())
            .find_map(|t| t.trim().parse::<i32>().ok());
        if let Some(pid) = written {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no job wrote its pid under {}", jobs.display());
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test]
async fn runs_a_real_process_and_streams_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let spec = job(
        "hello",
        "echo hello from $BAYGRID_JOB_ID\necho warn >&2\npwd",
    );
    let submitted: JobView = setup.tenant.post("/api/v1/jobs", &spec).await.unwrap();
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.site.as_deref(), Some("guangzhou-nansha"));
    let logs: LogsView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    let lines: Vec<(String, String)> = logs
        .lines
        .iter()
        .map(|l| (l.stream.clone(), l.line.clone()))
        .collect();
    assert!(
        lines.contains(&("stdout".into(), format!("hello from {}", submitted.id))),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "warn".into())),
        "{lines:?}"
    );
    // each job has its own working directory
    let pwd = &lines
        .iter()
        .find(|(s, l)| s == "stdout" && l.starts_with('/'))
        .unwrap()
        .1;
    assert!(pwd.contains(&submitted.id), "{pwd}");
    setup.server.stop().await;
}

/// Every line of a job's output as shipped, page by page.
async fn all_lines(client: &Client, id: &str) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    let mut after = "0:0".to_string();
    loop {
        let page: LogsView = client
            .get(&format!("/api/v1/jobs/{id}/logs?after={after}&limit=10000"))
            .await
            .unwrap();
        if page.lines.is_empty() {
            return lines;
        }
        lines.extend(page.lines.into_iter().map(|l| (l.stream, l.line)));
        after = page.next;
    }
}

/// Submits `spec`, waits for it to succeed, and returns it with every line it shipped.
async fn run_to_success(setup: &Setup, spec: &JobSpec) -> (JobView, Vec<(String, String)>) {
    let submitted: JobView = setup.tenant.post("/api/v1/jobs", spec).await.unwrap();
    let done = common::wait_job_ended(&setup.tenant, &submitted.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    let lines = all_lines(&setup.tenant, &submitted.id).await;
    (done, lines)
}

#[tokio::test]
async fn a_flood_of_output_or_of_long_lines_is_shipped_within_bounds_and_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let limits = baygrid_exec::OutputLimits {
        head_bytes: 8 << 20,
        head_lines: 20_000,
        tail_bytes: 4 << 10,
    };
    let (_stop, _agent) = common::start_agent_with(
        &setup.server.url(),
        &setup.operator,
        "nansha-a800",
        &dir.path().join("agent"),
        |c| AgentConfig {
            output: limits,
            ..c
        },
    )
    .await;

    // 4 MB of 10 kB lines (a report of them all would pass the server's 2 MB body limit),
    // then lines of 100 kB, cut
    let wide = job(
        "wide",
        "python3 -c \"[print('x' * 10000) for _ in range(400)]; [print('y' * 100000) for _ in range(3)]; print('wide done')\"",
    );
    let (_, lines) = run_to_success(&setup, &wide).await;
    assert_eq!(lines.len(), 404, "{:?}", &lines[..3]);
    assert!(lines[..400].iter().all(|(_, l)| l == &"x".repeat(10_000)));
    for (_, line) in &lines[400..403] {
        assert_eq!(
            line.len(),
            baygrid_exec::LINE_BYTES + " … [line cut at 16 KiB]".len()
        );
        assert!(line.ends_with(" … [line cut at 16 KiB]"));
    }
    assert_eq!(lines[403].1, "wide done");

    // 3 MB of control characters, which JSON writes six bytes each, and of random bytes:
    // no report may pass the server's limit for it
    let random = job(
        "random",
        "head -c 3000000 /dev/zero | tr '\\0' '\\1' | fold -b -w 1000; head -c 3000000 /dev/urandom | tr -d '\\n' | fold -b -w 1000; echo; echo random done",
    );
    let (_, lines) = run_to_success(&setup, &random).await;
    assert_eq!(lines.last().map(|(_, l)| l.as_str()), Some("random done"));

    // 60 MB of one line again and again: the head and the tail are shipped, the middle
    // stays on the cluster, and the agent heartbeats throughout (no attempt is lost)
    let line = "a line of output that says the same thing again";
    let flood = job(
        "flood",
        &format!("yes '{line}' | head -c 60000000; echo; echo flood done"),
    );
    let (done, lines) = run_to_success(&setup, &flood).await;
    assert_eq!(done.attempts, 0, "{:?}", done.events);
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|(s, _)| s == "stdout")
        .map(|(_, l)| l.as_str())
        .collect();
    assert!(stdout[..20_000].iter().all(|l| *l == line));
    assert!(
        stdout[20_000].starts_with("[baygrid] output past the first 8 MiB or 20000 lines is not shipped while the job runs; each stream's last 4 KiB comes when it ends; all of it is in "),
        "{}",
        stdout[20_000]
    );
    let left_out = stdout[20_001];
    assert!(
        left_out.contains("bytes of this stream left out here; all of it is in "),
        "{left_out}"
    );
    let path = left_out
        .rsplit_once(" is in ")
        .unwrap()
        .1
        .trim_end_matches(" on the cluster");
    assert_eq!(std::fs::metadata(path).unwrap().len(), 60_000_000 + 1 + 11);
    // the tail: whole lines of the last 4 KiB, the end among them
    let tail = &stdout[20_002..];
    assert!(tail.len() < 4096 / line.len() + 3, "{}", tail.len());
    assert_eq!(tail.last(), Some(&"flood done"));
    setup.server.stop().await;
}

#[tokio::test]
async fn an_ended_jobs_output_is_deleted_past_the_log_retention_and_the_job_says_when() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup_with(dir.path(), |c| ServerConfig {
        log_retention: Some(Duration::from_secs(1)),
        ..c
    })
    .await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let spec = job("chatty", "seq 1 500");
    let submitted: JobView = setup.tenant.post("/api/v1/jobs", &spec).await.unwrap();
    let done = common::wait_job_ended(&setup.tenant, &submitted.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    let path = format!("/api/v1/jobs/{}/logs", submitted.id);
    let mut page: LogsView = setup.tenant.get(&path).await.unwrap();
    for _ in 0..100 {
        if page.purged_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = setup.tenant.get(&path).await.unwrap();
    }
    let purged_at = page.purged_at.clone().expect("purged within 10 s");
    assert!(page.lines.is_empty() && page.done, "{page:?}");
    assert!(
        purged_at >= done.finished_at.clone().unwrap(),
        "{purged_at}"
    );
    // the job, its history and its charge stay; the deletion is in the audit log
    let after: JobView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}", submitted.id))
        .await
        .unwrap();
    assert_eq!((after.state, after.cost), (done.state, done.cost));
    assert_eq!(after.events.len(), done.events.len());
    let outbox = setup
        .server
        .state
        .store
        .outbox_from(1, 100_000)
        .await
        .unwrap();
    let entry = outbox
        .iter()
        .find(|r| r.kind == "job.logs_purged")
        .expect("a job.logs_purged entry");
    assert_eq!(entry.payload["jobs"], serde_json::json!([submitted.id]));
    assert_eq!(entry.payload["lines"], 500);
    setup.server.stop().await;
}

#[tokio::test]
async fn an_ended_jobs_folder_goes_after_keep_job_folders_and_a_running_ones_stays() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let work = dir.path().join("agent");
    let (_stop, _agent) = common::start_agent_with(
        &setup.server.url(),
        &setup.operator,
        "nansha-a800",
        &work,
        |c| AgentConfig {
            keep_job_folders: Some(Duration::from_secs(1)),
            ..c
        },
    )
    .await;
    let quick: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job("quick", "echo done"))
        .await
        .unwrap();
    let long: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job("long", "sleep 8"))
        .await
        .unwrap();
    let done = common::wait_job_ended(&setup.tenant, &quick.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    wait(
        &setup.tenant,
        &long.id,
        |j| j.state == JobState::Running,
        "running",
    )
    .await;
    let folder = |id: &str| work.join("jobs").join(format!("{id}.1"));
    assert!(folder(&long.id).is_dir());
    for _ in 0..100 {
        if !folder(&quick.id).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !folder(&quick.id).exists(),
        "the ended job's folder is still there after 10 s"
    );
    // the running job's folder stays, however long it has been quiet
    let running: JobView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}", long.id))
        .await
        .unwrap();
    assert_eq!(running.state, JobState::Running);
    assert!(folder(&long.id).is_dir());
    setup.server.stop().await;
}

#[tokio::test]
async fn a_failing_command_fails_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let submitted: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job("broken", "exit 42"))
        .await
        .unwrap();
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(42));
    assert!(done.reason.contains("42"), "{}", done.reason);
    setup.server.stop().await;
}

#[tokio::test]
async fn a_job_is_stopped_when_its_hold_runs_out_and_charged_no_more_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    // 16.00 CNY/h × 1 A800 × 4 s × 150% holds 0.03 CNY: 6 s at nansha's 16.00 CNY/h
    let mut spec = job("overrun", "sleep 120");
    spec.estimated_duration.0 = Duration::from_secs(4);
    spec.max_price_per_hour = Some("16.00 CNY".parse().unwrap());
    let submitted: JobView = setup.tenant.post("/api/v1/jobs", &spec).await.unwrap();
    let wallet: serde_json::Value = setup
        .tenant
        .get("/api/v1/ledger/accounts/wallet:gz-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.03 CNY");
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Failed, "{}", done.reason);
    assert!(done.reason.contains("hold"), "{}", done.reason);
    let wallet: serde_json::Value = setup
        .tenant
        .get("/api/v1/ledger/accounts/wallet:gz-lab")
        .await
        .unwrap();
    assert_eq!(wallet["debits_pending"], "0.00 CNY");
    let spent: f64 = wallet["debits_posted"]
        .as_str()
        .unwrap()
        .trim_end_matches(" CNY")
        .parse()
        .unwrap();
    assert!(spent > 0.0 && spent <= 0.03, "charged {spent}");
    setup.server.stop().await;
}

#[tokio::test]
async fn cancel_kills_the_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let (submitted, pid) = start_sleeper(&setup, dir.path(), "sleeper").await;
    assert!(pid_alive(pid));
    let _: serde_json::Value = setup
        .tenant
        .post(
            &format!("/api/v1/jobs/{}/cancel", submitted.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Cancelled, "{}", done.reason);
    assert!(
        gone_within(pid, Duration::from_secs(1)).await,
        "the job's process was killed"
    );
    setup.server.stop().await;
}

#[tokio::test]
async fn a_dead_agent_loses_its_lease_and_the_job_is_requeued_and_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, first) = start_agent(&setup, &dir.path().join("agent-1")).await;
    let submitted: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job("survivor", "sleep 2\necho finished"))
        .await
        .unwrap();
    wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state == JobState::Running,
        "running",
    )
    .await;
    // the agent dies: no more heartbeats
    first.abort();
    let _ = first.await;
    let requeued = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.attempts == 1,
        "requeued",
    )
    .await;
    assert!(
        matches!(requeued.state, JobState::Queued | JobState::Placed),
        "{requeued:?}"
    );
    let detail: JobView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}", submitted.id))
        .await
        .unwrap();
    assert!(
        detail
            .events
            .iter()
            .any(|e| e.to == JobState::Queued && e.reason.contains("lease expired")),
        "{:?}",
        detail.events
    );
    // a new agent on another machine (work dir) takes it under a new epoch
    let (_stop2, _second) = start_agent(&setup, &dir.path().join("agent-2")).await;
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.attempts, 1);
    let logs: LogsView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    assert!(
        logs.lines
            .iter()
            .any(|l| l.attempt == 2 && l.line == "finished"),
        "{:?}",
        logs.lines
    );
    setup.server.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_reattaches_to_its_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let work = dir.path().join("agent");
    let (stop, first) = start_agent(&setup, &work).await;
    let submitted: JobView = setup
        .tenant
        .post("/api/v1/jobs", &job("steady", "sleep 1\necho still here"))
        .await
        .unwrap();
    wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state == JobState::Running,
        "running",
    )
    .await;
    let _ = stop.send(true);
    first.await.unwrap();
    let (_stop, _again) = start_agent(&setup, &work).await;
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.attempts, 0, "the job ran once, under its first lease");
    let logs: LogsView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    assert!(logs.lines.iter().any(|l| l.line == "still here"));
    setup.server.stop().await;
}

#[tokio::test]
async fn a_gang_runs_every_rank_together() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let spec = JobSpec::from_yaml(
        "name: gang\nresources: {accelerators: {A800: 8}, nodes: 3}\ncommand: echo rank $BAYGRID_RANK of $BAYGRID_WORLD_SIZE\nestimated_duration: 1m\n",
    )
    .unwrap();
    let submitted: JobView = setup.tenant.post("/api/v1/jobs", &spec).await.unwrap();
    let done = wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state.is_terminal(),
        "ended",
    )
    .await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.allocation.as_ref().unwrap().nodes.len(), 3);
    let logs: LogsView = setup
        .tenant
        .get(&format!("/api/v1/jobs/{}/logs", submitted.id))
        .await
        .unwrap();
    let mut lines: Vec<String> = logs.lines.iter().map(|l| l.line.clone()).collect();
    lines.sort();
    assert_eq!(lines, vec!["rank 0 of 3", "rank 1 of 3", "rank 2 of 3"]);
    setup.server.stop().await;
}

#[test]
fn config_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "server = 'http://x'\nwork_dir = '/tmp'\n").unwrap();
    let err = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("token"), "{err}");
    std::fs::write(
        &path,
        "server = 'http://x'\nwork_dir = '/tmp'\ntoken = 't'\nengine = 'mainframe'\n",
    )
    .unwrap();
    let err = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("mainframe"), "{err}");
    std::fs::write(
        &path,
        "server = 'http://x'\nwork_dir = '/tmp'\ntoken = 't'\nmax_runing = 3\n",
    )
    .unwrap();
    let err = AgentConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("max_runing"), "{err}");
}

#[tokio::test]
async fn an_agent_cut_off_from_the_server_stops_its_jobs_after_the_lease_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let (_stop, _agent) = start_agent(&setup, &dir.path().join("agent")).await;
    let (_, pid) = start_sleeper(&setup, dir.path(), "partitioned").await;
    // the server goes away; the agent cannot renew
    setup.server.stop().await;
    assert!(
        gone_within(pid, Duration::from_secs(15)).await,
        "the agent fenced itself and stopped the job"
    );
}

/// An agent whose token is revoked while its job runs stops the job at once and ends,
/// naming the refusal, instead of asking forever; the job's lease lapses and it is queued
/// again for another agent.
#[tokio::test]
async fn an_agent_whose_token_is_revoked_stops_its_jobs_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path()).await;
    let request = baygrid_api::IssueTokenRequest {
        role: Role::Agent,
        subject: Some("nansha-a800".into()),
        label: None,
        expires_in: None,
    };
    let issued: baygrid_api::IssuedToken = setup
        .operator
        .post("/api/v1/tokens", &request)
        .await
        .unwrap();
    let config = AgentConfig {
        poll_interval: Duration::from_millis(100),
        ..AgentConfig::local(
            setup.server.url(),
            Some(issued.token.clone()),
            dir.path().join("agent"),
        )
    };
    let (_stop, stopped) = watch::channel(false);
    let agent = tokio::spawn(baygrid_agent::run(config, stopped));
    let (submitted, pid) = start_sleeper(&setup, dir.path(), "revoked").await;
    let revoked = std::time::Instant::now();
    setup
        .operator
        .delete::<serde_json::Value>(&format!("/api/v1/tokens/{}", issued.id))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("the agent ended")
        .unwrap();
    let ended_after = revoked.elapsed();
    let err = ended.unwrap_err().to_string();
    assert!(err.contains("server refused the agent"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    // it ended well inside the lease's TTL (3 s), having stopped its job
    assert!(ended_after < Duration::from_secs(3), "{ended_after:?}");
    assert!(
        gone_within(pid, Duration::from_secs(2)).await,
        "the job still runs"
    );
    // the server takes the job back once the lease lapses
    wait(
        &setup.tenant,
        &submitted.id,
        |j| j.state == JobState::Queued && j.attempts == 1,
        "queued again",
    )
    .await;
}

#[test]
fn the_shipped_agent_configs_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    for name in [
        "agent-slurm.toml",
        "agent-local.toml",
        "agent-kubernetes.toml",
    ] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        // the token file is site-specific; the rest must parse as it stands
        let config: AgentConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(config.token_file.is_some());
        if name == "agent-kubernetes.toml" {
            assert_eq!(config.engine, "kubernetes");
            assert_eq!(
                config
                    .kubernetes
                    .resources
                    .get("Ascend910B")
                    .map(String::as_str),
                Some("huawei.com/Ascend910")
            );
            assert_eq!(config.kubernetes.scheduler_name, "volcano");
            assert!(matches!(
                config.kubernetes.work_volume,
                Some(baygrid_exec::WorkVolume::Nfs { .. })
            ));
        }
    }
}
