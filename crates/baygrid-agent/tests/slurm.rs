//! Real jobs through the baygrid agent on a real Slurm (munged, slurmctld and slurmd on this
//! node, started by scripts/start-slurm.sh): success, failure with its exit code, timeout,
//! cancel, a 2-task job, and a slurmctld restart during a job.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baygrid_agent::AgentConfig;
use baygrid_api::{Client, JobView, LogsView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use baygrid_exec::SlurmConfig;
use baygrid_server::{RunningServer, ServerConfig};
use serde_json::json;
use tokio::sync::watch;

/// Whether Slurm answers here. Under CI a missing Slurm is a failure, never a skip.
fn slurm_available() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            let states = String::from_utf8_lossy(&o.stdout);
            o.status.success()
                && (states.contains("idle") || states.contains("mix") || states.contains("alloc"))
        });
    if !up {
        if std::env::var_os("CI").is_some() {
            panic!("Slurm is not running: CI must run the Slurm tests (scripts/test.sh starts it)");
        }
        eprintln!("\n!!! SKIPPING Slurm tests: no idle Slurm node. Run scripts/start-slurm.sh (or scripts/test.sh). !!!\n");
    }
    up
}

struct Setup {
    server: RunningServer,
    tenant: Client,
    /// Per cluster: the agent's stop switch, its task and its config (to start it again).
    agents: Vec<(
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
        AgentConfig,
    )>,
}

/// A server with two Slurm-backed clusters on this node: `slurm-h800` runs one task per
/// node, `slurm-a800` two (both map to the node's `gpu:h800` gres).
async fn setup(dir: &Path, h800_partition: &str) -> Setup {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        sites_file: "sample".into(),
        schedule_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(20),
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config).await.unwrap();
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    let tenant = operator
        .add_tenant(
            "sg-lab",
            Jurisdiction::CN,
            "shaoguan",
            "10000.00 CNY".parse().expect("literal budget"),
        )
        .await
        .unwrap();
    let mut agents = Vec::new();
    for (name, model, tasks) in [("slurm-h800", "H800", 1), ("slurm-a800", "A800", 2)] {
        let cluster = json!({"name": name, "site": "shaoguan", "provider": "shaoguan-hub-dc", "engine": "slurm", "nodes": 1,
            "accelerator": model, "accelerators_per_node": 8, "cpus_per_node": 2, "memory_gb_per_node": 8});
        let _: serde_json::Value = operator.post("/api/v1/clusters", &cluster).await.unwrap();
        let _: serde_json::Value = operator
            .post(
                "/api/v1/offers",
                &json!({"cluster": name, "price_per_accelerator_hour": "1.00 CNY"}),
            )
            .await
            .unwrap();
        let issued = operator.issue(Role::Agent, Some(name)).await.unwrap();
        let slurm = SlurmConfig {
            partition: if model == "H800" {
                h800_partition.to_string()
            } else {
                String::new()
            },
            ntasks_per_node: tasks,
            gres_types: [(model.to_string(), "h800".to_string())].into(),
            ..SlurmConfig::default()
        };
        let config = AgentConfig {
            engine: "slurm".into(),
            slurm,
            max_running: 16,
            poll_interval: Duration::from_millis(250),
            ..AgentConfig::local(
                server.url(),
                issued.token().map(str::to_string),
                dir.join(name),
            )
        };
        let (stop, stopped) = watch::channel(false);
        let again = config.clone();
        let task = tokio::spawn(async move { baygrid_agent::run(config, stopped).await.unwrap() });
        agents.push((stop, task, again));
    }
    Setup {
        server,
        tenant,
        agents,
    }
}

fn spec(name: &str, model: &str, duration: &str, command: &str) -> JobSpec {
    JobSpec::from_yaml(&format!(
        "name: {name}\nresources: {{accelerators: {{{model}: 1}}, cpus: 1, memory_gb: 1}}\ncommand: |\n  {}\nestimated_duration: {duration}\n",
        command.replace('\n', "\n  ")
    ))
    .unwrap()
}

async fn wait(
    client: &Client,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&JobView) -> bool,
) -> JobView {
    let started = Instant::now();
    loop {
        let view: JobView = client.get(&format!("/api/v1/jobs/{id}")).await.unwrap();
        if pred(&view) {
            return view;
        }
        assert!(
            started.elapsed() < timeout,
            "job {id} timed out in state {} ({})",
            view.state,
            view.reason
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn logs(client: &Client, id: &str) -> Vec<(String, String)> {
    let page: LogsView = client
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .unwrap();
    page.lines.into_iter().map(|l| (l.stream, l.line)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_slurm_jobs_through_the_agent() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut setup = setup(dir.path(), "").await;
    let tenant_client = setup.tenant.clone();
    let tenant = &tenant_client;
    let submit = |spec: JobSpec| async move {
        tenant
            .post::<_, JobView>("/api/v1/jobs", &spec)
            .await
            .unwrap()
            .id
    };

    let timeout_job = submit(spec("overrun", "H800", "10s", "echo started\nsleep 600")).await;
    let ok = submit(spec(
        "hello",
        "H800",
        "1m",
        "echo hello from rank $BAYGRID_RANK of $BAYGRID_WORLD_SIZE on $BAYGRID_MASTER_ADDR",
    ))
    .await;
    let failing = submit(spec("broken", "H800", "1m", "echo about to fail\nexit 7")).await;
    let pair = submit(spec(
        "pair",
        "A800",
        "1m",
        "echo task $BAYGRID_RANK of $BAYGRID_WORLD_SIZE",
    ))
    .await;
    let doomed = submit(spec("doomed", "H800", "5m", "echo waiting\nsleep 300")).await;

    // success, with the rank variables and output streamed back
    let done = wait(tenant, &ok, Duration::from_secs(60), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.engine.as_deref(), Some("slurm"));
    let lines = logs(tenant, &ok).await;
    assert!(
        lines
            .iter()
            .any(|(s, l)| s == "stdout" && l.starts_with("hello from rank 0 of 1 on ")),
        "{lines:?}"
    );

    // failure with the exit code
    let done = wait(tenant, &failing, Duration::from_secs(60), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(7), "{}", done.reason);
    assert!(done.reason.contains("FAILED"), "{}", done.reason);

    // a 2-task job: both tasks run, each with its rank
    let done = wait(tenant, &pair, Duration::from_secs(60), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    let mut lines: Vec<String> = logs(tenant, &pair)
        .await
        .into_iter()
        .filter(|(s, _)| s.starts_with("stdout"))
        .map(|(_, l)| l)
        .collect();
    lines.sort();
    assert_eq!(lines, vec!["task 0 of 2", "task 1 of 2"]);

    // cancel a running job: scancel
    wait(tenant, &doomed, Duration::from_secs(60), |j| {
        j.state == JobState::Running
    })
    .await;
    let _: serde_json::Value = tenant
        .post(&format!("/api/v1/jobs/{doomed}/cancel"), &json!({}))
        .await
        .unwrap();
    let done = wait(tenant, &doomed, Duration::from_secs(60), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Cancelled, "{}", done.reason);

    // slurmctld restarts while a job runs: the job survives and is tracked to its end
    let survivor = submit(spec("survivor", "H800", "1m", "sleep 6\necho survived")).await;
    wait(tenant, &survivor, Duration::from_secs(60), |j| {
        j.state == JobState::Running
    })
    .await;
    assert!(Command::new("pkill")
        .args(["-x", "slurmctld"])
        .status()
        .unwrap()
        .success());
    for _ in 0..50 {
        if !Command::new("pgrep")
            .args(["-x", "slurmctld"])
            .status()
            .unwrap()
            .success()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        Command::new("/usr/sbin/slurmctld")
            .status()
            .unwrap()
            .success(),
        "slurmctld restarts"
    );
    let done = wait(tenant, &survivor, Duration::from_secs(90), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.attempts, 0, "the job was not lost or requeued");
    assert!(logs(tenant, &survivor)
        .await
        .iter()
        .any(|(_, l)| l == "survived"));

    // the agent restarts while a Slurm job runs: the new agent re-attaches to it by its
    // Slurm job id and tracks it to its end
    let reattached = submit(spec("reattached", "H800", "1m", "sleep 6\necho reattached")).await;
    wait(tenant, &reattached, Duration::from_secs(60), |j| {
        j.state == JobState::Running
    })
    .await;
    let (stop, task, config) = setup.agents.remove(0);
    let _ = stop.send(true);
    task.await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let again = config.clone();
    let task = tokio::spawn(async move { baygrid_agent::run(config, stopped).await.unwrap() });
    setup.agents.insert(0, (stop, task, again));
    let done = wait(tenant, &reattached, Duration::from_secs(90), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.attempts, 0, "the job ran once, under its first lease");
    assert!(logs(tenant, &reattached)
        .await
        .iter()
        .any(|(_, l)| l == "reattached"));

    // the time limit (estimated 10 s × 1.5, rounded up to Slurm's one minute) ends the overrun
    let done = wait(tenant, &timeout_job, Duration::from_secs(240), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Failed, "{}", done.reason);
    assert!(done.reason.contains("TIMEOUT"), "{}", done.reason);

    // capacity came from sinfo
    let clusters: Vec<serde_json::Value> = Client::new(
        &setup.server.url(),
        Some(setup.server.operator_token.clone()),
    )
    .get("/api/v1/clusters")
    .await
    .unwrap();
    let slurm = clusters.iter().find(|c| c["name"] == "slurm-h800").unwrap();
    assert_eq!(slurm["online"], true);
    // the declared cluster says 2 CPUs per node; sinfo on the test node says 8, and its
    // gpu:h800:8 gres gives 8 accelerators
    let reported = &slurm["reported"];
    assert_eq!(reported["engine"], "slurm", "{slurm}");
    assert_eq!(reported["nodes"], 1, "{slurm}");
    assert_eq!(reported["cpus_per_node"], 8, "{slurm}");
    assert_eq!(reported["accelerators_per_node"], 8, "{slurm}");
    assert!(
        reported["memory_gb_per_node"].as_u64().unwrap() > 0,
        "{slurm}"
    );
    setup.server.stop().await;
}

#[tokio::test]
async fn sbatch_rejections_reach_the_user_as_the_failure_reason() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // this agent submits to a partition the cluster does not have: sbatch refuses
    let setup = setup(dir.path(), "nowhere").await;
    let id = setup
        .tenant
        .post::<_, JobView>("/api/v1/jobs", &spec("refused", "H800", "1m", "true"))
        .await
        .unwrap()
        .id;
    let done = wait(&setup.tenant, &id, Duration::from_secs(60), |j| {
        j.state.is_terminal()
    })
    .await;
    assert_eq!(done.state, JobState::Failed);
    assert!(
        done.reason.contains("slurm engine") && done.reason.contains("sbatch: error"),
        "{}",
        done.reason
    );
    assert!(
        done.reason.to_lowercase().contains("partition"),
        "{}",
        done.reason
    );
    setup.server.stop().await;
}

#[tokio::test]
async fn a_slurm_job_without_network_sees_only_a_loopback() {
    use baygrid_exec::{Engine, JobStatus, LaunchSpec, LogCursor};
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = baygrid_exec::SlurmEngine::new(dir.path().join("jobs"), SlurmConfig::default());
    let interfaces = "echo interfaces $(tail -n +3 /proc/net/dev | wc -l)";
    let mut outputs = Vec::new();
    for (id, no_network) in [("job_isolated", true), ("job_connected", false)] {
        let spec = LaunchSpec {
            job_id: id.into(),
            tenant: "sg-lab".into(),
            epoch: 1,
            command: interfaces.into(),
            env: Default::default(),
            image: None,
            nodes: 1,
            node_indices: vec![0],
            accelerator: None,
            accelerators_per_node: 0,
            cpus_per_node: 1,
            memory_gb_per_node: 1,
            time_limit: Some(Duration::from_secs(60)),
            held: None,
            no_network,
            folders: vec![],
        };
        let handle = engine.launch(&spec).await.unwrap();
        let started = Instant::now();
        let status = loop {
            let status = engine.status(&handle).await.unwrap();
            if status.is_final() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{id} never ended"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(status, JobStatus::Succeeded, "{id}");
        let lines = engine
            .read_output(&handle, &mut LogCursor::default())
            .await
            .unwrap();
        outputs.push(
            lines
                .iter()
                .find(|l| l.line.starts_with("interfaces"))
                .map(|l| l.line.clone())
                .unwrap_or_else(|| panic!("{id}: {lines:?}")),
        );
    }
    assert_eq!(outputs[0], "interfaces 1", "only the loopback");
    assert_ne!(outputs[1], "interfaces 1", "the node's own interfaces");
}
