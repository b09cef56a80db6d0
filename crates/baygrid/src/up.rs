//! `baygrid server`, `agent`, `up` and `demo`: starting the exchange on this machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baygrid_api::{Client, ClientError, IssueTokenRequest, IssuedToken, JobView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Money, Party, Role, Tenant};
use baygrid_server::{RunningServer, ServerConfig};
use tokio::process::Child;

use crate::cli::wait_for;
use crate::output::{emit, or_dash, table};
use crate::{Args, Output};

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn server(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = match config {
        Some(path) => ServerConfig::load(&path)?,
        None => ServerConfig::default(),
    };
    let running = baygrid_server::start(config).await?;
    eprintln!(
        "baygrid server on {} (store: {})",
        running.url(),
        running.state.store.backend().durability()
    );
    stop_signal().await;
    running.stop().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn agent(config: &Path) -> anyhow::Result<ExitCode> {
    let config = baygrid_agent::AgentConfig::load(config)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut agent = tokio::spawn(baygrid_agent::run(config, stopped));
    tokio::select! {
        _ = stop_signal() => {
            let _ = stop.send(true);
            agent.await??;
        }
        finished = &mut agent => finished??,
    }
    Ok(ExitCode::SUCCESS)
}

/// The sample tenants of the demo and of `baygrid up`: a Guangzhou AI lab, a Hong Kong
/// fintech and a Macao university.
pub const SAMPLE_TENANTS: [(&str, Jurisdiction, &str, &str); 3] = [
    ("gz-ai-lab", Jurisdiction::CN, "guangzhou", "50000.00 CNY"),
    ("hk-fintech", Jurisdiction::HK, "hong-kong", "50000.00 CNY"),
    ("macao-uni", Jurisdiction::MO, "macao", "20000.00 CNY"),
];

/// A running exchange: the server in this process, one agent process per cluster.
pub struct Exchange {
    pub server: RunningServer,
    pub operator: Client,
    /// Tenant name → client with that tenant's token.
    pub tenants: Vec<(String, Client)>,
    agents: Vec<Child>,
}

impl Exchange {
    pub fn tenant(&self, name: &str) -> &Client {
        &self
            .tenants
            .iter()
            .find(|(n, _)| n == name)
            .expect("sample tenant")
            .1
    }

    pub async fn stop(mut self) {
        for agent in &mut self.agents {
            let _ = agent.start_kill();
        }
        for agent in &mut self.agents {
            let _ = agent.wait().await;
        }
        self.server.stop().await;
    }
}

/// Reuses a token kept in `path` when it still works, or issues a new one there.
async fn token_file(
    operator: &Client,
    server: &RunningServer,
    path: &Path,
    request: IssueTokenRequest,
) -> anyhow::Result<String> {
    if let Ok(secret) = std::fs::read_to_string(path) {
        let secret = secret.trim().to_string();
        let hash = baygrid_server::auth::hash_secret(&secret);
        if server.state.store.find_token(&hash).await?.is_some() {
            return Ok(secret);
        }
    }
    let issued: IssuedToken = operator.post("/api/v1/tokens", &request).await?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, &issued.token)?;
    Ok(issued.token)
}

/// Has the child sent SIGTERM when this process ends, however it ends. Dropping the
/// `Child` kills it on an orderly stop; this also covers `kill -9`, a panic that aborts,
/// or the OOM killer, which would otherwise leave the agents running with nobody to stop
/// them, holding their work directories against the next `baygrid up`. The agent stops
/// as on Ctrl-C: its jobs keep running and the next agent on its work directory
/// re-attaches them. The kernel sends the signal when the forking *thread* ends: here the
/// main thread (`up` and `demo` run in `block_on`) or a runtime worker, both of which last
/// as long as the process.
fn stops_with_this_process(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            // this process may have ended between the fork and the prctl
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::other("baygrid up ended while starting"));
            }
            Ok(())
        });
    }
}

/// Starts the server on `listen` with the sample region, the sample tenants and one local
/// agent process per cluster, all under `data_dir`.
pub async fn start_exchange(
    data_dir: &Path,
    listen: SocketAddr,
    sites: Option<PathBuf>,
) -> anyhow::Result<Exchange> {
    let config = ServerConfig {
        listen,
        data_dir: data_dir.to_path_buf(),
        sites_file: sites
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "sample".into()),
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config)
        .await
        .context("starting the server")?;
    let url = server.url();
    let operator = Client::new(&url, Some(server.operator_token.clone()));

    let mut tenants = Vec::new();
    for (name, jurisdiction, city, budget) in SAMPLE_TENANTS {
        let party = Party {
            name: name.into(),
            jurisdiction,
            city: city.into(),
            ciio: false,
        };
        let _: Party = operator.post("/api/v1/parties", &party).await?;
        let budget: Money = budget.parse().expect("literal budget");
        let tenant = Tenant {
            name: name.into(),
            party: name.into(),
            budget,
        };
        let _: Tenant = operator.post("/api/v1/tenants", &tenant).await?;
        let request = IssueTokenRequest {
            role: Role::Tenant,
            subject: Some(name.into()),
            label: Some("sample tenant".into()),
            expires_in: None,
        };
        let secret = token_file(
            &operator,
            &server,
            &data_dir.join("tokens").join(format!("{name}.token")),
            request,
        )
        .await?;
        tenants.push((name.to_string(), Client::new(&url, Some(secret))));
    }

    let clusters: Vec<baygrid_api::ClusterView> = operator.get("/api/v1/clusters").await?;
    let exe = std::env::current_exe().context("finding the baygrid binary")?;
    // a cluster counts as up once one of these agents has been seen: an agent of an `up`
    // that ended moments ago is still "online" for its lease's length
    let spawned_at = chrono::Utc::now() - chrono::Duration::milliseconds(1);
    let mut agents = Vec::new();
    for cluster in clusters
        .iter()
        .filter(|c| c.cluster.engine == baygrid_core::EngineKind::Local)
    {
        let name = &cluster.cluster.name;
        let agents_dir = data_dir.join("agents");
        let token_path = agents_dir.join(format!("{name}.token"));
        let request = IssueTokenRequest {
            role: Role::Agent,
            subject: Some(name.clone()),
            label: Some("local agent".into()),
            expires_in: None,
        };
        token_file(&operator, &server, &token_path, request).await?;
        let work_dir = agents_dir.join(name).canonicalize().or_else(|_| {
            std::fs::create_dir_all(agents_dir.join(name))?;
            agents_dir.join(name).canonicalize()
        })?;
        let config = baygrid_agent::AgentConfig {
            token_file: Some(token_path.canonicalize()?),
            poll_interval: Duration::from_millis(250),
            ..baygrid_agent::AgentConfig::local(url.clone(), None, work_dir)
        };
        let config_path = agents_dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        let log = std::fs::File::create(agents_dir.join(format!("{name}.log")))?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("agent")
            .arg("--config")
            .arg(&config_path)
            .env("BAYGRID_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        stops_with_this_process(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting the agent for {name}"))?;
        agents.push((name.clone(), child));
    }
    // wait until every agent has registered
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let clusters: Vec<baygrid_api::ClusterView> = operator.get("/api/v1/clusters").await?;
        let seen_since_spawned = |c: &baygrid_api::ClusterView| {
            c.agent_seen_at
                .as_deref()
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                .is_some_and(|at| at >= spawned_at)
        };
        if clusters.iter().all(|c| c.online && seen_since_spawned(c)) {
            break;
        }
        for (name, child) in &mut agents {
            if let Some(status) = child.try_wait()? {
                let log = data_dir.join("agents").join(format!("{name}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let last = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                anyhow::bail!(
                    "the agent for {name} exited ({status}) before registering: {} (log: {})",
                    last.trim(),
                    log.display()
                );
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "agents did not register within 30 s (see {}/agents/*.log)",
            data_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Exchange {
        server,
        operator,
        tenants,
        agents: agents.into_iter().map(|(_, child)| child).collect(),
    })
}

pub async fn up(
    args: &Args,
    listen: SocketAddr,
    sites: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir();
    let exchange = start_exchange(&data_dir, listen, sites).await?;
    println!("baygrid is up on {}", exchange.server.url());
    println!(
        "  operator token: {}",
        data_dir.join("operator.token").display()
    );
    for (name, _) in &exchange.tenants {
        println!(
            "  tenant {name}: BAYGRID_TOKEN=$(cat {})",
            data_dir
                .join("tokens")
                .join(format!("{name}.token"))
                .display()
        );
    }
    println!(
        "  agents: {} (logs in {})",
        exchange.agents.len(),
        data_dir.join("agents").display()
    );
    println!(
        "  console: {url}/console (sign in with a token); API docs: {url}/api/v1/docs/",
        url = exchange.server.url()
    );
    println!("Ctrl-C stops everything.");
    stop_signal().await;
    exchange.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// One demo job: who submits it and what it should end as.
struct DemoJob {
    tenant: &'static str,
    spec: String,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Succeed,
    Fail,
    Cancel,
    Reject,
}

fn spec(
    name: &str,
    accelerators: &str,
    nodes: u32,
    duration: &str,
    command: &str,
    extra: &str,
) -> String {
    let accelerators = if accelerators.is_empty() {
        String::new()
    } else {
        format!("  accelerators: {accelerators}\n")
    };
    format!(
        "name: {name}\nresources:\n{accelerators}  nodes: {nodes}\n  cpus: 1\n  memory_gb: 1\ncommand: |\n  {}\nestimated_duration: {duration}\n{extra}",
        command.replace('\n', "\n  ")
    )
}

fn demo_jobs() -> Vec<DemoJob> {
    let mut jobs = Vec::new();
    let sweep = r#"echo "sweep lr=$LR"
for epoch in 1 2 3; do awk -v e=$epoch -v lr=$LR 'BEGIN { printf "epoch %d loss %.4f\n", e, 2.0 / (1 + e * lr * 40) }'; sleep 0.4; done"#;
    for (i, lr) in ["0.01", "0.03", "0.1", "0.3"].iter().enumerate() {
        jobs.push(DemoJob {
            tenant: "gz-ai-lab",
            spec: spec(
                &format!("resnet-sweep-{}", i + 1),
                "[{A800: 1}, {Ascend910B: 1}]",
                1,
                "30m",
                sweep,
                &format!("env: {{LR: \"{lr}\"}}\n"),
            ),
            expect: Expect::Succeed,
        });
    }
    let serve = r#"for q in 1 2 3 4 5; do awk -v q=$q 'BEGIN { srand(q); printf "served request %d in %d ms\n", q, 10 + int(rand() * 40) }'; sleep 0.2; done"#;
    jobs.push(DemoJob {
        tenant: "gz-ai-lab",
        spec: spec(
            "chatbot-serving",
            "{H800: 1}",
            1,
            "10m",
            serve,
            "latency_sensitive: true\npriority: 10\n",
        ),
        expect: Expect::Succeed,
    });
    let primes = r#"awk 'BEGIN { n = 0; for (i = 2; i < 30000; i++) { p = 1; for (j = 2; j * j <= i; j++) if (i % j == 0) { p = 0; break }; n += p }; print "primes below 30000:", n }'"#;
    jobs.push(DemoJob {
        tenant: "gz-ai-lab",
        spec: spec("vision-finetune", "{A800: 8}", 1, "2h", primes, ""),
        expect: Expect::Succeed,
    });
    let gang = r#"echo "rank $BAYGRID_RANK of $BAYGRID_WORLD_SIZE, master $BAYGRID_MASTER_ADDR, node $BAYGRID_NODE_INDEX"; sleep 1; echo "rank $BAYGRID_RANK all-reduce done""#;
    jobs.push(DemoJob {
        tenant: "gz-ai-lab",
        spec: spec("llm-pretrain-gang", "{Ascend910B: 8}", 2, "6h", gang, ""),
        expect: Expect::Succeed,
    });
    let digest = r#"head -c 16000000 /dev/zero | sha256sum | cut -c1-16 | sed 's/^/digest /'"#;
    for i in 1..=2 {
        jobs.push(DemoJob {
            tenant: "gz-ai-lab",
            spec: spec(&format!("log-compaction-{i}"), "", 1, "5m", digest, ""),
            expect: Expect::Succeed,
        });
    }
    let score = r#"awk 'BEGIN { srand(7); for (i = 1; i <= 3; i++) printf "portfolio %d value-at-risk %.2f%%\n", i, 1 + rand() * 4 }'"#;
    for i in 1..=3 {
        jobs.push(DemoJob {
            tenant: "hk-fintech",
            spec: spec(
                &format!("risk-scoring-{i}"),
                "[{Ascend910B: 1}, {A100: 1}]",
                1,
                "15m",
                score,
                "latency_sensitive: true\n",
            ),
            expect: Expect::Succeed,
        });
    }
    for i in 1..=2 {
        jobs.push(DemoJob {
            tenant: "hk-fintech",
            spec: spec(&format!("backtest-{i}"), "{H800: 2}", 1, "1h", primes, ""),
            expect: Expect::Succeed,
        });
    }
    jobs.push(DemoJob {
        tenant: "hk-fintech",
        spec: spec(
            "hk-only-report",
            "{H800: 1}",
            1,
            "20m",
            "echo 'quarterly report rendered'",
            "allowed_jurisdictions: [HK]\n",
        ),
        expect: Expect::Succeed,
    });
    jobs.push(DemoJob {
        tenant: "hk-fintech",
        spec: spec(
            "flaky-etl",
            "{H800: 1}",
            1,
            "10m",
            "echo 'loading batch 1'\necho 'schema mismatch in column amount' >&2\nexit 3",
            "",
        ),
        expect: Expect::Fail,
    });
    jobs.push(DemoJob {
        tenant: "macao-uni",
        spec: spec(
            "thesis-train",
            "{A100: 4}",
            1,
            "3h",
            sweep,
            "latency_sensitive: true\nenv: {LR: \"0.05\"}\n",
        ),
        expect: Expect::Succeed,
    });
    jobs.push(DemoJob {
        tenant: "macao-uni",
        spec: spec(
            "protein-fold",
            "[{A100: 8}, {Ascend910B: 8}]",
            1,
            "12h",
            primes,
            "",
        ),
        expect: Expect::Succeed,
    });
    jobs.push(DemoJob {
        tenant: "macao-uni",
        spec: spec(
            "long-simulation",
            "{A100: 1}",
            1,
            "8h",
            "echo 'simulation started'\nsleep 300",
            "",
        ),
        expect: Expect::Cancel,
    });
    jobs.push(DemoJob {
        tenant: "gz-ai-lab",
        spec: spec("giant-model", "{H800: 16}", 1, "24h", "echo never", ""),
        expect: Expect::Reject,
    });
    jobs
}

/// One line of the demo's summary.
#[derive(Debug, serde::Serialize)]
struct SummaryRow {
    job: String,
    id: Option<String>,
    tenant: String,
    site: Option<String>,
    engine: Option<String>,
    state: String,
    cost: Option<Money>,
    why: String,
    expected: String,
    as_expected: bool,
}

/// Checks the ledger against the jobs: each tenant's invoices carry every job that ran at
/// its metered cost, the wallets were charged exactly that, and the clearing account holds
/// nothing once the charges are split between providers and fees. `Err` names the mismatch.
async fn reconcile(
    exchange: &Exchange,
    rows: &[SummaryRow],
) -> anyhow::Result<Result<String, String>> {
    let mut months = std::collections::BTreeSet::new();
    let mut tenants = std::collections::BTreeSet::new();
    let mut costs = std::collections::BTreeMap::new();
    for row in rows {
        if let Some(id) = &row.id {
            let job: JobView = exchange.operator.get(&format!("/api/v1/jobs/{id}")).await?;
            if let Some(finished) = &job.finished_at {
                months.insert(finished[..7].to_string());
            }
            tenants.insert(row.tenant.clone());
            costs.insert(id.clone(), job.cost.map(|c| c.minor).unwrap_or(0));
        }
    }
    let mut lines = 0;
    let mut invoiced = 0i64;
    for tenant in &tenants {
        let mut total = 0i64;
        for month in &months {
            let invoice: baygrid_api::InvoiceView = exchange
                .operator
                .get(&format!("/api/v1/ledger/invoices/{tenant}?month={month}"))
                .await?;
            for line in &invoice.lines {
                let Some(cost) = costs.get(&line.job) else {
                    return Ok(Err(format!("invoice line for unknown job {}", line.job)));
                };
                if line.amount.minor != *cost {
                    return Ok(Err(format!(
                        "job {} was metered at {} but invoiced at {}",
                        line.job,
                        Money::new(*cost, baygrid_core::Currency::CNY),
                        line.amount
                    )));
                }
                lines += 1;
            }
            total += invoice.total.minor;
        }
        let wallet: baygrid_api::AccountView = exchange
            .operator
            .get(&format!("/api/v1/ledger/accounts/wallet:{tenant}"))
            .await?;
        if wallet.debits_posted.minor != total || wallet.debits_pending.minor != 0 {
            return Ok(Err(format!(
                "wallet:{tenant} was charged {} with {} still held; its invoices total {}",
                wallet.debits_posted,
                wallet.debits_pending,
                Money::new(total, baygrid_core::Currency::CNY)
            )));
        }
        invoiced += total;
    }
    let ran = costs.len();
    if lines != ran {
        return Ok(Err(format!(
            "{ran} jobs ended but the invoices have {lines} lines"
        )));
    }
    let clearing: baygrid_api::AccountView = exchange
        .operator
        .get("/api/v1/ledger/accounts/clearing:CNY")
        .await?;
    if clearing.balance.minor != 0 || clearing.credits_pending.minor != 0 {
        return Ok(Err(format!(
            "clearing:CNY still holds {} ({} pending)",
            clearing.balance, clearing.credits_pending
        )));
    }
    Ok(Ok(format!(
        "settled: {} invoices with {lines} lines total {}, the jobs' metered cost; every hold resolved; clearing is empty",
        tenants.len(),
        Money::new(invoiced, baygrid_core::Currency::CNY)
    )))
}

/// The data zone's queries at the data: a Hong Kong bank's card holders (FATE's
/// default_credit guest table) in the Cyberport vault and a Shenzhen card issuer's spending
/// (the host table) in the Qianhai vault, each with a seeded 25% of card holders dropped;
/// hk-fintech asks a grouped question of one and a question across both (PSI-aligned).
/// Returns whether both were released.
async fn demo_queries(exchange: &Exchange, data_dir: &Path, show: bool) -> anyhow::Result<bool> {
    let fate = Path::new("../shared/data/fate");
    if !fate.join("default_credit_hetero_guest.csv").exists() {
        if show {
            println!(
                "
queries at the data skipped: ../shared/data/fate is not beside this checkout"
            );
        }
        return Ok(true);
    }
    let operator = &exchange.operator;
    let parts = data_dir.join("query-data");
    std::fs::create_dir_all(&parts)?;
    for (party, city, jurisdiction, dataset, offer, file, seed) in [
        (
            "hk-bank",
            "hong-kong",
            "HK",
            include_str!("../../../examples/datasets/hk-credit-history.yaml"),
            include_str!("../../../examples/data-offers/hk-credit-history.yaml"),
            "default_credit_hetero_guest.csv",
            1u64,
        ),
        (
            "sz-card-issuer",
            "shenzhen",
            "CN",
            include_str!("../../../examples/datasets/sz-card-spend.yaml"),
            include_str!("../../../examples/data-offers/sz-card-spend.yaml"),
            "default_credit_hetero_host.csv",
            2u64,
        ),
    ] {
        let part = parts.join(file);
        baygrid_query::drop_subjects(&fate.join(file), &part, "id", 0.25, seed)?;
        publish_holding(operator, (party, jurisdiction, city), dataset, offer, &part).await?;
    }
    let lab = exchange.tenant("hk-fintech");
    for offer in ["hk-credit-history-query", "sz-card-spend-query"] {
        let _: serde_json::Value = lab
            .post("/api/v1/contracts", &serde_json::json!({"offer": offer, "mode": "query", "purpose": "credit_risk", "site": "hk-cyberport"}))
            .await?;
    }
    let mut released = true;
    for (dataset, sql) in [
        ("hk-credit-history", "SELECT y AS defaulted, COUNT(*) AS card_holders, AVG(x1) AS mean_x1 FROM hk_credit_history GROUP BY y"),
        ("hk-credit-history", "SELECT COUNT(*) AS card_holders, AVG(hk_credit_history.x1) AS history_x1, AVG(sz_card_spend.x3) AS spend_x3 FROM hk_credit_history JOIN sz_card_spend ON hk_credit_history.id = sz_card_spend.id"),
    ] {
        let view: baygrid_api::QueryView = lab
            .post("/api/v1/queries", &serde_json::json!({"dataset": dataset, "sql": sql, "epsilon": 1.0, "wait_ms": 60000}))
            .await?;
        released &= view.state == baygrid_api::QueryState::Released;
        if show {
            println!();
            crate::query::show(&view);
        }
    }
    Ok(released)
}

/// A data holder joins: its party, its dataset (a spec of examples/datasets), the file
/// uploaded into its vault, and its offer (of examples/data-offers).
pub(crate) async fn publish_holding(
    operator: &Client,
    party: (&str, &str, &str),
    dataset: &str,
    offer: &str,
    file: &Path,
) -> anyhow::Result<()> {
    let (name, jurisdiction, city) = party;
    let _: serde_json::Value = operator
        .post(
            "/api/v1/parties",
            &serde_json::json!({"name": name, "jurisdiction": jurisdiction, "city": city}),
        )
        .await?;
    let holder = operator.issue(Role::DataHolder, Some(name)).await?;
    let spec: baygrid_api::DatasetSpec = serde_yaml::from_str(dataset)?;
    let _: serde_json::Value = holder.post("/api/v1/datasets", &spec).await?;
    baygrid_vault::upload(&holder, &spec.name, &[file.to_path_buf()]).await?;
    let offer: serde_json::Value = serde_yaml::from_str(offer)?;
    let _: serde_json::Value = holder.post("/api/v1/data-offers", &offer).await?;
    Ok(())
}

/// Waits for a fusion run to end (at most `limit`).
pub(crate) async fn fusion_ended(
    client: &Client,
    id: &str,
    limit: Duration,
) -> anyhow::Result<baygrid_api::FusionView> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let view: baygrid_api::FusionView = client.get(&format!("/api/v1/fusion/{id}")).await?;
        if view.state != baygrid_api::FusionState::Running || std::time::Instant::now() > deadline {
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fusion training through the exchange: a Hong Kong and a Guangzhou hospital publish their
/// breast-tumour cases (FATE's breast_homo) for federated training; hk-fintech trains one
/// logistic regression on both, each party's worker beside its own vault. Returns whether
/// the run succeeded.
async fn demo_fusion(exchange: &Exchange, show: bool) -> anyhow::Result<bool> {
    let fate = Path::new("../shared/data/fate");
    if !fate.join("breast_homo_guest.csv").exists() {
        if show {
            println!("\nfusion training skipped: ../shared/data/fate is not beside this checkout");
        }
        return Ok(true);
    }
    let operator = &exchange.operator;
    for (party, city, jurisdiction, dataset, offer, file) in [
        (
            "hk-hospital",
            "hong-kong",
            "HK",
            include_str!("../../../examples/datasets/hk-breast-clinic.yaml"),
            include_str!("../../../examples/data-offers/hk-breast-clinic.yaml"),
            "breast_homo_guest.csv",
        ),
        (
            "gz-hospital",
            "guangzhou",
            "CN",
            include_str!("../../../examples/datasets/gz-breast-clinic.yaml"),
            include_str!("../../../examples/data-offers/gz-breast-clinic.yaml"),
            "breast_homo_host.csv",
        ),
    ] {
        publish_holding(
            operator,
            (party, jurisdiction, city),
            dataset,
            offer,
            &fate.join(file),
        )
        .await?;
    }
    let lab = exchange.tenant("hk-fintech");
    for offer in ["hk-breast-clinic-federated", "gz-breast-clinic-federated"] {
        let _: serde_json::Value = lab
            .post("/api/v1/contracts", &serde_json::json!({"offer": offer, "mode": "federated", "purpose": "medical_research", "site": "hk-cyberport"}))
            .await?;
    }
    let request: baygrid_api::FusionRequest = serde_yaml::from_str(include_str!(
        "../../../examples/fusion/breast-homo-lr-exchange.yaml"
    ))?;
    let started: baygrid_api::FusionView = lab.post("/api/v1/fusion", &request).await?;
    let view = fusion_ended(lab, &started.id, Duration::from_secs(300)).await?;
    // each worker was a job the dispatcher placed at its site; each settles its compute
    let ids: Vec<String> = view.workers.iter().filter_map(|w| w.job.clone()).collect();
    let jobs = tokio::time::timeout(Duration::from_secs(60), wait_for(lab, &ids, false))
        .await
        .map_err(|_| anyhow::anyhow!("the fusion run's worker jobs did not end within 60 s"))??;
    if show {
        println!();
        crate::fusion_run::show(&view);
        let compute: i64 = jobs.iter().filter_map(|j| j.cost).map(|c| c.minor).sum();
        println!(
            "  the workers' jobs: {}; their compute {}",
            jobs.iter()
                .map(|j| format!(
                    "{} {} on {}",
                    j.name,
                    j.state,
                    j.cluster.as_deref().unwrap_or("-")
                ))
                .collect::<Vec<_>>()
                .join(", "),
            Money::new(compute, baygrid_core::Currency::CNY)
        );
    }
    Ok(view.state == baygrid_api::FusionState::Succeeded
        && jobs.len() == view.workers.len()
        && jobs.iter().all(|j| j.state == JobState::Succeeded))
}

pub async fn demo(args: &Args, keep: bool) -> anyhow::Result<ExitCode> {
    let (data_dir, _temp) = match &args.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new().prefix("baygrid-demo-").tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let table_output = args.output == Output::Table;
    if table_output {
        println!("starting the exchange in {} ...", data_dir.display());
    }
    let exchange = start_exchange(&data_dir, "127.0.0.1:0".parse().expect("literal"), None).await?;
    if table_output {
        let clusters: Vec<baygrid_api::ClusterView> =
            exchange.operator.get("/api/v1/clusters").await?;
        println!(
            "server {} with {} sites and {} agents online\n",
            exchange.server.url(),
            clusters.len(),
            clusters.iter().filter(|c| c.online).count()
        );
    }

    let mut rows = Vec::new();
    let mut submitted: Vec<(String, &'static str, Expect, String)> = Vec::new();
    let mut cancel_target = None;
    for job in demo_jobs() {
        let spec = JobSpec::from_yaml(&job.spec).map_err(|e| anyhow::anyhow!("demo spec: {e}"))?;
        let client = exchange.tenant(job.tenant);
        match client.post::<_, JobView>("/api/v1/jobs", &spec).await {
            Ok(view) => {
                if job.expect == Expect::Cancel {
                    cancel_target = Some(view.id.clone());
                }
                submitted.push((view.id, job.tenant, job.expect, spec.name));
            }
            Err(ClientError::Api {
                status,
                message,
                field,
                ..
            }) => {
                let rejected_as_expected = job.expect == Expect::Reject && status == 422;
                rows.push(SummaryRow {
                    job: spec.name.clone(),
                    id: None,
                    tenant: job.tenant.into(),
                    site: None,
                    engine: None,
                    state: "rejected".into(),
                    cost: None,
                    why: format!("{}: {message}", field.unwrap_or_default()),
                    expected: format!("{:?}", job.expect).to_lowercase(),
                    as_expected: rejected_as_expected,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    if table_output {
        println!(
            "submitted {} jobs ({} rejected at submit)",
            submitted.len(),
            rows.len()
        );
    }
    if let Some(id) = &cancel_target {
        let client = exchange.tenant("macao-uni");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let view: JobView = client.get(&format!("/api/v1/jobs/{id}")).await?;
            if view.state == JobState::Running || view.state.is_terminal() {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the job to cancel never started"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _: baygrid_api::CancelView = client
            .post(&format!("/api/v1/jobs/{id}/cancel"), &serde_json::json!({}))
            .await?;
        if table_output {
            println!("cancelled long-simulation while it ran");
        }
    }
    let ids: Vec<String> = submitted.iter().map(|(id, ..)| id.clone()).collect();
    let finished = wait_for(&exchange.operator, &ids, table_output).await?;
    for (view, (_, tenant, expect, name)) in finished.iter().zip(&submitted) {
        let detail: JobView = exchange
            .operator
            .get(&format!("/api/v1/jobs/{}", view.id))
            .await?;
        let why = detail
            .events
            .iter()
            .rev()
            .find(|e| e.to == JobState::Placed)
            .map(|e| e.reason.clone())
            .unwrap_or_else(|| detail.reason.clone());
        let as_expected = matches!(
            (expect, detail.state),
            (Expect::Succeed, JobState::Succeeded)
                | (Expect::Fail, JobState::Failed)
                | (Expect::Cancel, JobState::Cancelled)
        );
        let why = match detail.state {
            JobState::Succeeded => why,
            _ => format!("{why}; ended: {}", detail.reason),
        };
        rows.push(SummaryRow {
            job: name.clone(),
            id: Some(detail.id.clone()),
            tenant: tenant.to_string(),
            site: detail.site.clone(),
            engine: detail.engine.clone(),
            state: detail.state.to_string(),
            cost: detail.cost,
            why,
            expected: format!("{expect:?}").to_lowercase(),
            as_expected,
        });
    }
    rows.sort_by_key(|r| r.state == "rejected");
    // the jobs' settlement is reconciled before queries charge the same wallets
    let settled = reconcile(&exchange, &rows).await?;
    let queries_released = demo_queries(&exchange, &data_dir, table_output).await?;
    let trained = demo_fusion(&exchange, table_output).await?;
    let all_as_expected =
        rows.iter().all(|r| r.as_expected) && settled.is_ok() && queries_released && trained;
    emit(args.output, &rows, |rows| {
        println!();
        let cells = rows
            .iter()
            .map(|r| {
                vec![
                    r.job.clone(),
                    r.tenant.clone(),
                    or_dash(r.site.clone()),
                    or_dash(r.engine.clone()),
                    if r.as_expected {
                        r.state.clone()
                    } else {
                        format!("{} (expected {})", r.state, r.expected)
                    },
                    or_dash(r.cost),
                    r.why.clone(),
                ]
            })
            .collect::<Vec<_>>();
        table(
            &[
                "JOB",
                "TENANT",
                "SITE",
                "ENGINE",
                "STATE",
                "COST",
                "WHY THERE",
            ],
            &cells,
        );
        let total: i64 = rows.iter().filter_map(|r| r.cost).map(|c| c.minor).sum();
        let sites: std::collections::BTreeSet<&str> =
            rows.iter().filter_map(|r| r.site.as_deref()).collect();
        match &settled {
            Ok(line) => println!("\n{line}"),
            Err(problem) => println!("\nSETTLEMENT DOES NOT RECONCILE: {problem}"),
        }
        println!(
            "\n{} jobs on {} sites, metered cost {}; {}",
            rows.len(),
            sites.len(),
            Money::new(total, baygrid_core::Currency::CNY),
            if all_as_expected {
                "every job ended as expected"
            } else {
                "SOME JOBS DID NOT END AS EXPECTED"
            }
        );
    });
    if keep {
        println!(
            "\nthe exchange stays up on {} (data in {}); Ctrl-C stops it",
            exchange.server.url(),
            data_dir.display()
        );
        println!(
            "  BAYGRID_SERVER={} BAYGRID_DATA_DIR={} baygrid job ls",
            exchange.server.url(),
            data_dir.display()
        );
        stop_signal().await;
    }
    exchange.stop().await;
    Ok(if all_as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
