//! `kill -9` of the server while jobs are being submitted and deposits made: after a
//! restart every acknowledged job and transfer is there, no job runs twice, every hold is
//! settled once, and the audit log still verifies. And in the middle of a fusion run: the
//! run goes on, every relay message delivered once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baygrid_api::{Client, FusionState, FusionView, JobView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use common::*;

fn write_server_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nsites_file = \"sample\"\nschedule_interval = \"100ms\"\n",
            dir.join("server").display()
        ),
    )
    .unwrap();
    path
}

/// `baygrid server` on `port` with its store under `dir/server`, its output in `dir/LOG`,
/// once it answers.
fn start_server(dir: &std::path::Path, port: u16, log: &str) -> Spawned {
    let config = write_server_config(dir, port);
    let server = spawn(
        &["server", "--config", config.to_str().unwrap()],
        &dir.join(log),
    );
    wait_healthy(&format!("http://127.0.0.1:{port}"), Duration::from_secs(30));
    server
}

/// The operator token the server under `dir/server` wrote.
fn operator_token(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("server/operator.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `baygrid agent` for `cluster`, with a token the operator issues, working in `dir/CLUSTER`
/// (its output in `dir/CLUSTER.log`); `more` is added to its config.
async fn start_agent(
    dir: &std::path::Path,
    url: &str,
    operator: &Client,
    cluster: &str,
    more: &str,
) -> Spawned {
    let issued = operator.issue(Role::Agent, Some(cluster)).await.unwrap();
    let config = dir.join(format!("{cluster}.toml"));
    std::fs::write(
        &config,
        format!(
            "server = \"{url}\"\ntoken = \"{}\"\nwork_dir = \"{}\"\npoll_interval = \"100ms\"\n{more}",
            issued.token().unwrap_or_default(),
            dir.join(cluster).display()
        ),
    )
    .unwrap();
    spawn(
        &["agent", "--config", config.to_str().unwrap()],
        &dir.join(format!("{cluster}.log")),
    )
}

/// `kill -9` of `server`, waited for.
fn kill_dash_nine(server: &mut Spawned) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_no_acknowledged_job_and_runs_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start_server(dir.path(), port, "server-1.log");
    let operator = Client::new(&url, Some(operator_token(dir.path())));
    let tenant = operator
        .add_tenant(
            "crash-lab",
            Jurisdiction::CN,
            "guangzhou",
            "1000000.00 CNY".parse().expect("literal budget"),
        )
        .await
        .unwrap();
    let mut agent = start_agent(
        dir.path(),
        &url,
        &operator,
        "nansha-a800",
        "max_running = 128\n",
    )
    .await;

    // every run appends its job id: a job that ran twice shows up twice
    let runs = dir.path().join("runs.txt");
    let spec = JobSpec::from_yaml(&format!(
        "name: crash\nresources: {{accelerators: {{A800: 1}}}}\ncommand: echo $BAYGRID_JOB_ID >> {}; sleep 0.3\nestimated_duration: 1m\n",
        runs.display()
    ))
    .unwrap();
    // a user waits through the crash on a job that ends once the server is back:
    // `job submit --wait` keeps asking
    let waiter_spec = dir.path().join("waiter.yaml");
    let go = dir.path().join("go");
    std::fs::write(
        &waiter_spec,
        format!(
            "name: waiter\nresources: {{accelerators: {{A800: 1}}}}\ncommand: echo $BAYGRID_JOB_ID >> {}; while [ ! -e {} ]; do sleep 0.1; done\nestimated_duration: 1m\n",
            runs.display(),
            go.display()
        ),
    )
    .unwrap();
    let waiter_log = dir.path().join("waiter.log");
    let log = std::fs::File::create(&waiter_log).unwrap();
    let mut waiter = Spawned(
        std::process::Command::new(BIN)
            .args(["job", "submit", waiter_spec.to_str().unwrap(), "--wait"])
            .env("BAYGRID_SERVER", &url)
            .env("BAYGRID_TOKEN", tenant.token().unwrap())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the waiter's job never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut submitters = Vec::new();
    for worker in 0..16 {
        let tenant = tenant.clone();
        let spec = spec.clone();
        let acknowledged = acknowledged.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{worker}-{i}");
                match tenant
                    .post_idempotent::<_, JobView>("/api/v1/jobs", &spec, &key)
                    .await
                {
                    Ok(job) => acknowledged.lock().unwrap().push(job.id),
                    Err(_) => break,
                }
            }
        }));
    }
    let deposited = Arc::new(Mutex::new(Vec::<String>::new()));
    for worker in 0..4 {
        let operator = operator.clone();
        let deposited = deposited.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("crash-{worker}-{i}");
                let body = serde_json::json!({"account": "wallet:crash-lab", "amount": "1.00 CNY", "id": id});
                match operator
                    .post::<_, serde_json::Value>("/api/v1/ledger/deposits", &body)
                    .await
                {
                    Ok(_) => deposited.lock().unwrap().push(format!("deposit:{id}")),
                    Err(_) => break,
                }
            }
        }));
    }
    // kill the server mid-stream
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < 400 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_dash_nine(&mut server);
    for s in submitters {
        s.await.unwrap();
    }
    let acknowledged: Vec<String> = acknowledged.lock().unwrap().clone();
    let deposited: Vec<String> = deposited.lock().unwrap().clone();
    assert!(
        !deposited.is_empty(),
        "no deposit acknowledged before the kill"
    );
    assert!(
        acknowledged.len() >= 400,
        "only {} acknowledged before the kill",
        acknowledged.len()
    );

    // down long enough for the waiter to find it gone, then restarted on the same directory
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut server = start_server(dir.path(), port, "server-2.log");
    std::fs::write(&go, "").unwrap();
    for id in &acknowledged {
        let job: JobView = operator
            .get(&format!("/api/v1/jobs/{id}"))
            .await
            .unwrap_or_else(|e| panic!("acknowledged job {id} lost: {e}"));
        assert_eq!(&job.id, id);
    }
    let statement: serde_json::Value = operator
        .get("/api/v1/ledger/accounts/wallet:crash-lab/statement")
        .await
        .unwrap();
    let recorded: BTreeSet<&str> = statement["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["id"].as_str())
        .collect();
    for id in &deposited {
        assert!(
            recorded.contains(id.as_str()),
            "acknowledged deposit {id} lost"
        );
    }
    // every job in the store runs to completion, once
    let deadline = Instant::now() + Duration::from_secs(240);
    let jobs: Vec<JobView> = loop {
        let jobs: Vec<JobView> = operator.get("/api/v1/jobs?limit=100000").await.unwrap();
        if jobs.iter().all(|j| j.state.is_terminal()) {
            break jobs;
        }
        assert!(Instant::now() < deadline, "jobs did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(jobs.len() >= acknowledged.len());
    assert!(
        jobs.iter()
            .all(|j| j.state == JobState::Succeeded && j.attempts == 0),
        "{:?}",
        jobs.iter()
            .find(|j| j.state != JobState::Succeeded || j.attempts != 0)
    );
    let text = std::fs::read_to_string(&runs).unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    // the waiter saw the server go and come back, and its job end as it ran, once
    let status = waiter.wait().unwrap();
    let said = std::fs::read_to_string(&waiter_log).unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("cannot reach the server"), "{said}");
    assert!(said.contains("asking again for up to 5m"), "{said}");
    assert!(said.contains("the server answers again"), "{said}");
    assert!(said.contains("succeeded"), "{said}");
    assert!(twice.is_empty(), "jobs ran twice: {twice:?}");
    let ran: BTreeSet<&str> = counts.keys().copied().collect();
    for job in &jobs {
        assert!(ran.contains(job.id.as_str()), "job {} never ran", job.id);
    }
    // every hold was settled once: the wallet was charged exactly the jobs' metered cost
    let wallet: serde_json::Value = operator
        .get("/api/v1/ledger/accounts/wallet:crash-lab")
        .await
        .unwrap();
    let minor = |v: &serde_json::Value| -> i64 {
        v.as_str()
            .unwrap()
            .trim_end_matches(" CNY")
            .replace('.', "")
            .parse()
            .unwrap()
    };
    let metered: i64 = jobs.iter().filter_map(|j| j.cost).map(|c| c.minor).sum();
    assert_eq!(minor(&wallet["debits_pending"]), 0, "{wallet}");
    assert_eq!(minor(&wallet["debits_posted"]), metered, "{wallet}");
    let deposits_in_store = recorded
        .iter()
        .filter(|id| id.starts_with("deposit:"))
        .count() as i64;
    assert_eq!(
        minor(&wallet["credits_posted"]),
        100_000_000 + 100 * deposits_in_store,
        "{wallet}"
    );
    // and the log, exported after the crash, verifies offline
    let export = dir.path().join("export");
    let token = operator_token(dir.path());
    let out = baygrid(
        &["audit", "export", export.to_str().unwrap()],
        &[
            ("BAYGRID_SERVER", url.as_str()),
            ("BAYGRID_TOKEN", token.as_str()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = baygrid(&["audit", "verify", export.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    eprintln!(
        "crash test: {} jobs and {} deposits acknowledged before kill -9; {} jobs and {} deposits in the store, {} runs, none twice; wallet settled; log verifies",
        acknowledged.len(),
        deposited.len(),
        jobs.len(),
        deposits_in_store,
        counts.len()
    );
    let _ = agent.kill();
    let _ = server.kill();
    let _ = agent.wait();
    let _ = server.wait();
}

/// Waits until the `baygrid up` writing `log` says it is up: tenants, tokens and agents.
fn wait_up(log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("Ctrl-C stops everything")
    {
        assert!(
            Instant::now() < deadline,
            "`up` did not come up: see {log:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `baygrid up` on `data_dir`, which must fail within 40 s; what it printed.
fn up_refused(data_dir: &str, log: &std::path::Path) -> String {
    let mut up = spawn(
        &["up", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        log,
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!(
                "`up` started where it should have been refused: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    std::fs::read_to_string(log).unwrap()
}

/// Whether process `pid` is still running (a zombie has ended).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_up_stops_its_agents_and_up_starts_again_on_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (mut up, url) = spawn_up(data_arg, &dir.path().join("up-1.log"));
    wait_up(&dir.path().join("up-1.log"));
    let token = |name: &str| {
        std::fs::read_to_string(data.join("tokens").join(format!("{name}.token")))
            .unwrap()
            .trim()
            .to_string()
    };
    let lab = Client::new(&url, Some(token("gz-ai-lab")));
    let runs = dir.path().join("runs.txt");
    let spec = JobSpec::from_yaml(&format!(
        "name: outlives-up\nresources: {{accelerators: {{A800: 1}}}}\nsites: [guangzhou-nansha]\ncommand: echo $BAYGRID_JOB_ID >> {}; for i in $(seq 1 12); do echo tick $i; sleep 1; done\nestimated_duration: 5m\n",
        runs.display()
    ))
    .unwrap();
    let job: JobView = lab.post("/api/v1/jobs", &spec).await.unwrap();
    let state = |client: &Client| {
        let client = client.clone();
        let path = format!("/api/v1/jobs/{}", job.id);
        async move { client.get::<JobView>(&path).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&lab).await.state != JobState::Running {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // each agent holds its work directory: a second agent on one is refused at once
    let agents = data.join("agents");
    let pids: Vec<u32> = std::fs::read_dir(&agents)
        .unwrap()
        .filter_map(|entry| {
            let lock = entry.unwrap().path().join("agent.lock");
            std::fs::read_to_string(lock).ok()
        })
        .map(|text| text.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 6, "one lock per agent: {pids:?}");
    assert!(pids.iter().all(|pid| alive(*pid)));
    let config = agents.join("nansha-a800.toml");
    let out = baygrid(&["agent", "--config", config.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is in use by another agent (pid"),
        "{}",
        stderr(&out)
    );

    // nor does a second server start on the store the first one serves
    let out = up_refused(data_arg, &dir.path().join("up-refused-1.log"));
    assert!(
        out.contains(&format!(
            "another baygrid server (pid {}) is running on",
            up.id()
        )),
        "{out}"
    );

    // kill -9 of `up`: its agents stop too, and the job keeps running
    up.kill().unwrap();
    up.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "agents outlived `up`: {:?}",
            pids.iter().filter(|pid| alive(**pid)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // an agent left holding a work directory stops the next `up` at once, named
    let mut holder = spawn(
        &["agent", "--config", config.to_str().unwrap()],
        &dir.path().join("holder.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(agents.join("nansha-a800").join("agent.lock"))
        .unwrap_or_default()
        .contains(&holder.id().to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the agent never took its work directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let out = up_refused(data_arg, &dir.path().join("up-refused-2.log"));
    assert!(
        out.contains("the agent for nansha-a800 exited")
            && out.contains(&format!("in use by another agent (pid {})", holder.id())),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    holder.kill().unwrap();
    holder.wait().unwrap();

    // a new `up` on the same directory takes the job back, and it ends once
    let (mut up, url) = spawn_up(data_arg, &dir.path().join("up-2.log"));
    wait_up(&dir.path().join("up-2.log"));
    let lab = Client::new(&url, Some(token("gz-ai-lab")));
    let deadline = Instant::now() + Duration::from_secs(90);
    let ended = loop {
        let view = state(&lab).await;
        if view.state.is_terminal() {
            break view;
        }
        assert!(Instant::now() < deadline, "the job never ended: {view:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ended.state, JobState::Succeeded, "{ended:?}");
    assert_eq!(ended.attempts, 0, "{ended:?}");
    let ran = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(ran.lines().collect::<Vec<_>>(), [job.id.as_str()]);
    let log = std::fs::read_to_string(agents.join("nansha-a800.log")).unwrap();
    assert!(!log.contains("cannot persist"), "{log}");
    let _ = up.kill();
    let _ = up.wait();
}

/// A file of the repository.
fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn yaml<T: serde::de::DeserializeOwned>(path: &str) -> T {
    serde_yaml::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

/// `kill -9` of the server in the middle of a vertical fusion run between a Hong Kong and a
/// Guangzhou hospital's vaults, each site's agent a process of its own: the restarted
/// server delivers the relay messages it had accepted, once each (a worker whose answer the
/// kill lost sends again under the same number), the run ends with every round once, and
/// `fusion run` waits through the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_in_a_fusion_run_loses_no_relay_message() {
    const ITERATIONS: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = start_server(dir.path(), port, "server-1.log");
    let operator = Client::new(&url, Some(operator_token(dir.path())));
    // the hospitals' datasets (FATE's breast_hetero) in their vaults, with federated offers
    for (name, jurisdiction, city, dataset, file) in [
        (
            "hk-hospital",
            "HK",
            "hong-kong",
            "hk-tumour-diagnoses",
            "breast_hetero_guest.csv",
        ),
        (
            "gz-hospital",
            "CN",
            "guangzhou",
            "gz-tumour-imaging",
            "breast_hetero_host.csv",
        ),
    ] {
        let party = serde_json::json!({"name": name, "jurisdiction": jurisdiction, "city": city});
        let _: serde_json::Value = operator.post("/api/v1/parties", &party).await.unwrap();
        let holder = operator.issue(Role::DataHolder, Some(name)).await.unwrap();
        let spec: baygrid_api::DatasetSpec = yaml(&format!("examples/datasets/{dataset}.yaml"));
        let _: serde_json::Value = holder.post("/api/v1/datasets", &spec).await.unwrap();
        baygrid_vault::upload(
            &holder,
            dataset,
            &[repo(&format!("../shared/data/fate/{file}"))],
        )
        .await
        .unwrap();
        let offer: serde_json::Value = yaml(&format!("examples/data-offers/{dataset}.yaml"));
        let _: serde_json::Value = holder.post("/api/v1/data-offers", &offer).await.unwrap();
    }
    let lab = operator
        .add_tenant(
            "gba-oncology-lab",
            Jurisdiction::HK,
            "hong-kong",
            "10000.00 CNY".parse().expect("literal budget"),
        )
        .await
        .unwrap();
    for offer in [
        "hk-tumour-diagnoses-federated",
        "gz-tumour-imaging-federated",
    ] {
        let contract = serde_json::json!({"offer": offer, "mode": "federated", "purpose": "medical_research", "site": "hk-cyberport"});
        let c: serde_json::Value = lab.post("/api/v1/contracts", &contract).await.unwrap();
        assert_eq!(c["state"], "active", "{c}");
    }
    let mut agents = Vec::new();
    for cluster in ["cyberport-h800", "nansha-a800"] {
        agents.push(start_agent(dir.path(), &url, &operator, cluster, "").await);
    }

    // the lab starts the run and waits for it with `fusion run`
    let mut run: serde_json::Value = yaml("examples/fusion/breast-hetero-lr-exchange.yaml");
    run["settings"]["iterations"] = serde_json::json!(ITERATIONS);
    let run_file = dir.path().join("run.yaml");
    std::fs::write(&run_file, serde_yaml::to_string(&run).unwrap()).unwrap();
    let waiter_log = dir.path().join("fusion-run.log");
    let mut waiter = Spawned(
        std::process::Command::new(BIN)
            .args(["fusion", "run", run_file.to_str().unwrap()])
            .env("BAYGRID_SERVER", &url)
            .env("BAYGRID_TOKEN", lab.token().unwrap())
            .stdout(std::fs::File::create(&waiter_log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("fusion-run.err")).unwrap())
            .spawn()
            .unwrap(),
    );

    // kill -9 once training is under way
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = loop {
        assert!(
            Instant::now() < deadline,
            "the run never got to its third round"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Ok(runs) = lab.get::<Vec<FusionView>>("/api/v1/fusion").await else {
            continue;
        };
        if let Some(view) = runs.first() {
            assert_eq!(view.state, FusionState::Running, "{view:#?}");
            if view.rounds.len() >= 3 {
                break view.id.clone();
            }
        }
    };
    kill_dash_nine(&mut server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = chrono::Utc::now();
    let mut server = start_server(dir.path(), port, "server-2.log");

    let status = waiter.wait().unwrap();
    let said = std::fs::read_to_string(&waiter_log).unwrap();
    let err = std::fs::read_to_string(dir.path().join("fusion-run.err")).unwrap();
    assert!(status.success(), "{said}{err}");
    assert!(err.contains("asking again for up to 5m"), "{err}");
    let view: FusionView = lab.get(&format!("/api/v1/fusion/{id}")).await.unwrap();
    assert_eq!(view.state, FusionState::Succeeded, "{view:#?}");
    let mut rounds: Vec<usize> = view.rounds.iter().map(|r| r.round).collect();
    rounds.dedup();
    assert_eq!(rounds.len(), ITERATIONS, "each round once: {rounds:?}");
    let events: Vec<baygrid_api::FusionEvent> =
        lab.get(&format!("/api/v1/fusion/{id}/logs")).await.unwrap();
    assert!(
        events.iter().any(|e| e.line.starts_with("round ")
            && chrono::DateTime::parse_from_rfc3339(&e.at).unwrap() > killed_at),
        "no round after the restart: {events:#?}"
    );
    let (guest, host) = (&view.workers[1], &view.workers[2]);
    assert!(guest.scores.as_ref().unwrap()["auc"].as_f64().unwrap() > 0.97);
    assert_eq!(host.scores.as_ref().unwrap()["aligned_rows"], 569);
    // each worker's job ends as it ran, once
    for w in &view.workers {
        let path = format!("/api/v1/jobs/{}", w.job.as_ref().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let job: JobView = lab.get(&path).await.unwrap();
            if job.state.is_terminal() || Instant::now() > deadline {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (job.state, job.attempts),
            (JobState::Succeeded, 0),
            "{job:#?}"
        );
    }
    // nothing of the run is left in the relay: its mailboxes went with its ending
    let store = baygrid_store::Store::open(&format!(
        "sqlite://{}",
        dir.path().join("server/baygrid.db").display()
    ))
    .await
    .unwrap();
    assert_eq!(store.count("relay_messages").await.unwrap(), 0);
    drop(agents);
    let _ = server.kill();
    let _ = server.wait();
}
