//! `baygrid bench …`: commands that measure and print figures. Nothing here asserts a time.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baygrid_api::{Client, JobView};
use baygrid_core::{JobSpec, JobState, Jurisdiction, Role};
use baygrid_server::ServerConfig;
use clap::Subcommand;

use crate::Args;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The audit log: durable appends per second with group commit, and inclusion proofs
    /// produced and verified at a large tree size.
    Audit {
        /// Entries in the in-memory tree for the proof figures.
        #[arg(long, default_value_t = 10_000_000)]
        entries: u64,
        /// Durable appends measured per store.
        #[arg(long, default_value_t = 200_000)]
        appends: usize,
        /// Entries per append batch.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// A PostgreSQL URL ending in an existing database (a new database is made beside it).
        #[arg(long, env = "BAYGRID_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
    },
    /// Durable ledger transfers per second, batched through the store's group writer, with
    /// plain INSERTs of the same rows into a table of the same shape as the anchor.
    Ledger {
        /// Transfers measured per store.
        #[arg(long, default_value_t = 400_000)]
        transfers: usize,
        /// Transfers per batch (one store change each).
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Concurrent submitters.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// A PostgreSQL URL ending in an existing database (a new database is made beside it).
        #[arg(long, env = "BAYGRID_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
    },
    /// Flow decisions by the rule pack: the full path (facts, evidence, Cedar, explanation)
    /// against a bare Cedar evaluation of the same request, and durable decisions through
    /// the store (counters and audit entry in one transaction).
    Rules {
        /// Decisions timed per figure.
        #[arg(long, default_value_t = 20_000)]
        decisions: usize,
        /// Durable decisions through the store.
        #[arg(long, default_value_t = 2_000)]
        durable: usize,
    },
    /// One scheduling cycle of the dispatcher over many pending jobs on a large region:
    /// fair-share ordering, gang fit, cost of every eligible cluster (the quote), backfill
    /// reservation; the same cycle of fifo-first-fit in the same run.
    Dispatch {
        /// Clusters in the region (models and prices cycle through the sample's).
        #[arg(long, default_value_t = 20)]
        clusters: usize,
        /// Nodes per cluster, 8 accelerators each.
        #[arg(long, default_value_t = 500)]
        nodes: u32,
        /// Pending jobs, from the synthetic generator's size mix, all waiting at once.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Durations are drawn from these runtimes (one column, `runtime`).
        #[arg(
            long,
            default_value = "../shared/data/traces/philly/philly_runtime.csv"
        )]
        runtimes: std::path::PathBuf,
    },
    /// ECDH private set intersection (ristretto255) of two id sets, both parties on this
    /// machine over loopback TCP; with `--anchor`, openmined-psi (P-256) on the same sets in
    /// the same run.
    Psi {
        /// Ids per party; the sets overlap by half.
        #[arg(long, default_value_t = 1_000_000)]
        ids: usize,
        /// Points per streamed batch.
        #[arg(long, default_value_t = baygrid_fusion::psi::DEFAULT_BATCH)]
        batch: usize,
        /// Also time openmined-psi with this script (scripts/psi-anchor.py).
        #[arg(long)]
        anchor: Option<std::path::PathBuf>,
        /// Time each step of the curve arithmetic per id instead (over this many ids).
        #[arg(long)]
        ops: Option<usize>,
    },
    /// Queries at the data: enforcement and noise over plain DataFusion on the same
    /// aggregate over a seeded Parquet table, then small queries end to end through the API.
    Query {
        /// Rows in the generated table (3 to 5 per card holder).
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        /// Runs of each of the two, interleaved; the medians are compared.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Small queries timed through the API (0: skip).
        #[arg(long, default_value_t = 50)]
        api_queries: usize,
        /// Write the table's rows in a seeded random order instead of card holder by card
        /// holder (the bounding pass then hashes every holder).
        #[arg(long)]
        shuffled: bool,
    },
    /// Secure aggregation's cost per round against plain FedAvg, on default_credit_homo's
    /// three parties (logistic regression and an MLP), in the same run.
    Fusion {
        /// The directory holding FATE's example CSVs.
        #[arg(long, default_value = "../shared/data/fate")]
        data: std::path::PathBuf,
        /// Rounds per run.
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// Hidden units of the MLP.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Also run both models through an exchange on this machine (server and one agent
        /// process per site, every message through the server's relay).
        #[arg(long)]
        exchange: bool,
    },
    /// Durable job submissions per second over HTTP (SQLite, and PostgreSQL when given),
    /// and trivial jobs run to completion through the local engine.
    Submit {
        /// Submissions measured per store.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Concurrent HTTP clients.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// A PostgreSQL URL ending in an existing database (a new database is made beside it).
        #[arg(long, env = "BAYGRID_BENCH_POSTGRES_URL")]
        postgres: Option<String>,
        /// Trivial jobs (`true`) to submit and run to completion on the local engine; 0 skips.
        #[arg(long, default_value_t = 200)]
        run_jobs: usize,
        /// `sbatch` submissions to time in the same run, when Slurm is installed; 0 skips.
        #[arg(long, default_value_t = 500)]
        slurm_jobs: usize,
    },
}

pub async fn run(_args: &Args, cmd: &BenchCommand) -> anyhow::Result<ExitCode> {
    if let BenchCommand::Audit {
        entries,
        appends,
        batch,
        postgres,
    } = cmd
    {
        return audit_bench(*entries, *appends, *batch, postgres.as_deref()).await;
    }
    if let BenchCommand::Dispatch {
        clusters,
        nodes,
        jobs,
        runtimes,
    } = cmd
    {
        return dispatch(*clusters, *nodes, *jobs, runtimes);
    }
    if let BenchCommand::Query {
        rows,
        repeats,
        api_queries,
        shuffled,
    } = cmd
    {
        crate::bench_query::run(*rows, *repeats, *api_queries, *shuffled).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let BenchCommand::Fusion {
        data,
        rounds,
        hidden,
        exchange,
    } = cmd
    {
        let code = fusion_bench(data, *rounds, *hidden)?;
        if *exchange {
            fusion_exchange_bench(data, *rounds, *hidden).await?;
        }
        return Ok(code);
    }
    if let BenchCommand::Psi {
        ids,
        batch,
        anchor,
        ops,
    } = cmd
    {
        if let Some(n) = ops {
            anyhow::ensure!(*n > 0, "--ops: need at least one id");
            println!("curve arithmetic per id, single thread, {n} ids:");
            for (step, seconds) in baygrid_fusion::psi::step_costs(*n) {
                println!("  {step:<30} {:>7.2} us", seconds * 1e6);
            }
            return Ok(ExitCode::SUCCESS);
        }
        return psi_bench(*ids, *batch, anchor.as_deref());
    }
    if let BenchCommand::Rules { decisions, durable } = cmd {
        return rules_bench(*decisions, *durable).await;
    }
    if let BenchCommand::Ledger {
        transfers,
        batch,
        concurrency,
        postgres,
    } = cmd
    {
        return ledger_bench(*transfers, *batch, *concurrency, postgres.as_deref()).await;
    }
    let BenchCommand::Submit {
        jobs,
        concurrency,
        postgres,
        run_jobs,
        slurm_jobs,
    } = cmd
    else {
        unreachable!("audit handled above");
    };
    println!(
        "machine: {} CPUs; {} submissions per store, {} concurrent clients\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        jobs,
        concurrency
    );
    let mut figures = Vec::new();
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    figures.push(submit_bench(&sqlite, dir.path(), *jobs, *concurrency).await?);
    if let Some(admin) = postgres {
        let url = baygrid_store::testing::create_database(admin, "baygrid_bench")
            .await
            .context("creating the bench database")?;
        let pg_dir = tempfile::tempdir()?;
        figures.push(submit_bench(&url, pg_dir.path(), *jobs, *concurrency).await?);
    } else {
        println!("postgresql: skipped (pass --postgres URL or BAYGRID_BENCH_POSTGRES_URL)\n");
    }
    let slurm_note = if *slurm_jobs == 0 {
        "slurm: skipped (--slurm-jobs 0)"
    } else {
        "slurm: sbatch not available on this machine; no ratio"
    };
    let slurm = if *slurm_jobs > 0 {
        sbatch_rate(*slurm_jobs).await
    } else {
        None
    };
    println!(
        "{:<12} {:>10} {:>10} {:>10}  durability",
        "store", "jobs/s", "p50 ms", "p99 ms"
    );
    for f in &figures {
        println!(
            "{:<12} {:>10.0} {:>10.2} {:>10.2}  {}",
            f.store, f.rate, f.p50_ms, f.p99_ms, f.durability
        );
    }
    match slurm {
        Some(rate) => {
            println!(
                "{:<12} {:>10.0}  (sbatch --wrap true, one submitter, same run)",
                "slurm", rate
            );
            for f in &figures {
                println!("ratio {} / slurm sbatch: {:.1}×", f.store, f.rate / rate);
            }
        }
        None => println!("{slurm_note}"),
    }
    if *run_jobs > 0 {
        let run_dir = tempfile::tempdir()?;
        let (seconds, rate) = run_to_completion(run_dir.path(), *run_jobs).await?;
        println!("\nlocal engine: {run_jobs} trivial jobs (`true`) submitted and run to completion in {seconds:.2} s = {rate:.1} jobs/s");
    }
    Ok(ExitCode::SUCCESS)
}

struct Figure {
    store: &'static str,
    durability: &'static str,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A server on an ephemeral port with the sample sites, a bench tenant, and its token.
async fn bench_server(
    store: &str,
    dir: &std::path::Path,
    schedule_interval: Duration,
) -> anyhow::Result<(baygrid_server::RunningServer, Client)> {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("literal"),
        data_dir: dir.to_path_buf(),
        store: store.to_string(),
        sites_file: "sample".into(),
        schedule_interval,
        ..ServerConfig::default()
    };
    let server = baygrid_server::start(config).await?;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    let client = operator
        .add_tenant(
            "bench",
            Jurisdiction::CN,
            "guangzhou",
            "100000000.00 CNY".parse().expect("literal budget"),
        )
        .await?;
    Ok((server, client))
}

async fn submit_bench(
    store: &str,
    dir: &std::path::Path,
    jobs: usize,
    concurrency: usize,
) -> anyhow::Result<Figure> {
    // placement is not part of this figure: the scheduler waits an hour between cycles
    let (server, client) = bench_server(store, dir, Duration::from_secs(3600)).await?;
    let backend = server.state.store.backend();
    let spec = JobSpec::from_yaml("name: bench\nresources: {accelerators: {H800: 1}}\ncommand: 'true'\nestimated_duration: 1m\n")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let warmup = (jobs / 10).min(1000);
    let spec = Arc::new(spec);
    let mut latencies = submit_many(&client, &spec, warmup, concurrency).await?.1;
    let (elapsed, mut measured) = submit_many(&client, &spec, jobs, concurrency).await?;
    latencies.clear();
    measured.sort_unstable();
    let rate = jobs as f64 / elapsed.as_secs_f64();
    let quantile = |q: f64| percentile(&measured, q) / 1000.0;
    let stored = server.state.store.count("jobs").await?;
    anyhow::ensure!(
        stored as usize == jobs + warmup,
        "store holds {stored} jobs, expected {}",
        jobs + warmup
    );
    let figure = Figure {
        store: match backend {
            baygrid_store::Backend::Sqlite => "sqlite",
            baygrid_store::Backend::Postgres => "postgresql",
        },
        durability: backend.durability(),
        rate,
        p50_ms: quantile(0.50),
        p99_ms: quantile(0.99),
    };
    println!(
        "{}: {jobs} durable submissions in {:.2} s ({} stored, all acknowledged)",
        figure.store,
        elapsed.as_secs_f64(),
        stored
    );
    server.stop().await;
    Ok(figure)
}

/// Submits `count` jobs from `concurrency` workers; returns wall time and each latency.
async fn submit_many(
    client: &Client,
    spec: &Arc<JobSpec>,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let spec = spec.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let sent = Instant::now();
                let _: JobView = client.post("/api/v1/jobs", &*spec).await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for worker in workers {
        all.extend(worker.await??);
    }
    Ok((started.elapsed(), all))
}

/// Submits `count` trivial jobs and waits until every one has succeeded on a local agent.
async fn run_to_completion(dir: &std::path::Path, count: usize) -> anyhow::Result<(f64, f64)> {
    let store = format!("sqlite://{}", dir.join("run.db").display());
    let (server, client) = bench_server(&store, dir, Duration::from_millis(50)).await?;
    let operator = Client::new(&server.url(), Some(server.operator_token.clone()));
    // CPU-only jobs cost nothing anywhere, so they go to the nearest site: guangzhou-nansha
    let cluster = "nansha-a800";
    let issued = operator.issue(Role::Agent, Some(cluster)).await?;
    let config = baygrid_agent::AgentConfig {
        max_running: 256,
        poll_interval: Duration::from_millis(50),
        ..baygrid_agent::AgentConfig::local(
            server.url(),
            issued.token().map(str::to_string),
            dir.join("agent"),
        )
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(baygrid_agent::run(config, stopped));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clusters: Vec<baygrid_api::ClusterView> = operator.get("/api/v1/clusters").await?;
        if clusters
            .iter()
            .any(|c| c.cluster.name == cluster && c.online)
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "agent did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spec = JobSpec::from_yaml("name: trivial\nresources: {cpus: 1, memory_gb: 1}\ncommand: 'true'\nestimated_duration: 10s\n")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    submit_many(&client, &Arc::new(spec), count, 16).await?;
    loop {
        let done: Vec<JobView> = operator
            .get(&format!("/api/v1/jobs?state=succeeded&limit={}", count + 1))
            .await?;
        if done.len() >= count {
            break;
        }
        let failed: Vec<JobView> = operator.get("/api/v1/jobs?state=failed&limit=10").await?;
        anyhow::ensure!(
            failed.is_empty(),
            "a trivial job failed: {}",
            failed[0].reason
        );
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "jobs did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = agent.await;
    let jobs: Vec<JobView> = operator
        .get(&format!("/api/v1/jobs?limit={}", count + 1))
        .await?;
    anyhow::ensure!(
        jobs.iter()
            .all(|j| j.state == JobState::Succeeded && j.attempts == 0),
        "every job ran once and succeeded"
    );
    server.stop().await;
    Ok((seconds, count as f64 / seconds))
}

/// `sbatch --wrap true` submissions per second from one submitter, when Slurm answers.
async fn sbatch_rate(count: usize) -> Option<f64> {
    let probe = tokio::process::Command::new("sbatch")
        .arg("--version")
        .output()
        .await
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    let started = Instant::now();
    for _ in 0..count {
        let out = tokio::process::Command::new("sbatch")
            .args(["--wrap", "true", "--output", "/dev/null", "--parsable"])
            .output()
            .await
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "slurm: sbatch failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
    }
    Some(count as f64 / started.elapsed().as_secs_f64())
}

/// The `p` quantile of sorted latencies, in microseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

async fn rules_bench(decisions: usize, durable: usize) -> anyhow::Result<ExitCode> {
    let pack = Arc::new(baygrid_rules::RulePack::load()?);
    // the pack's own GBA case: personal data, a filed GBA contract, consent, a running total
    let request: baygrid_rules::FlowRequest = toml::from_str(include_str!(
        "../../../examples/flows/sz-clinic-to-hk-lab.toml"
    ))?;
    let cedar = pack.cedar_request(&request)?;
    anyhow::ensure!(pack.evaluate_bare(&cedar), "the example flow is allowed");
    let time = |f: &dyn Fn()| {
        let mut samples = Vec::with_capacity(decisions);
        for _ in 0..decisions / 10 {
            f();
        }
        let started = Instant::now();
        for _ in 0..decisions {
            let t = Instant::now();
            f();
            samples.push(t.elapsed());
        }
        let total = started.elapsed().as_secs_f64();
        samples.sort_unstable();
        (
            total / decisions as f64 * 1e6,
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
        )
    };
    let bare = time(&|| {
        std::hint::black_box(pack.evaluate_bare(&cedar));
    });
    let merged = time(&|| {
        std::hint::black_box(pack.evaluate_merged(&cedar));
    });
    let prepare = time(&|| {
        std::hint::black_box(pack.prepare(&request).expect("prepares"));
    });
    let full = time(&|| {
        std::hint::black_box(pack.decide(&request).expect("decides"));
    });
    println!(
        "machine: {} CPUs; {decisions} decisions per figure, one thread\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>12}",
        "path", "mean µs", "p50 µs", "p99 µs", "decisions/s"
    );
    for (name, (mean, p50, p99)) in [
        ("bare Cedar evaluation (prebuilt request)", bare),
        ("the decision's one evaluation (all policies)", merged),
        ("facts weighed and the Cedar request built", prepare),
        (
            "full decision (facts, evidence, one Cedar evaluation, explanation)",
            full,
        ),
    ] {
        println!(
            "{name:<44} {mean:>10.1} {p50:>10.1} {p99:>10.1} {:>12.0}",
            1e6 / mean
        );
    }
    println!("ratio full / bare (mean): {:.2}", full.0 / bare.0);

    // durable: each decision read the exporter's totals, decided, and wrote its audit entry
    // and counter in one group-committed transaction
    let dir = tempfile::tempdir()?;
    let store = baygrid_store::Store::open(&format!(
        "sqlite://{}",
        dir.path().join("rules.db").display()
    ))
    .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..durable {
        let store = store.clone();
        let pack = pack.clone();
        let mut request = request.clone();
        request.data.subjects = 1;
        tasks.push(tokio::spawn(async move {
            store
                .decide_flow(request.exporter.name.clone(), 2026, "bench".into(), i as i64, move |personal, sensitive| {
                    request.flow.exported_personal = personal as u64;
                    request.flow.exported_sensitive = sensitive as u64;
                    let decision = pack.decide(&request).map_err(|e| e.to_string())?;
                    let counts = decision.counts.map(|(_, n)| ("personal".to_string(), n as i64));
                    Ok(baygrid_store::FlowRecord {
                        payload: serde_json::json!({"allowed": decision.allowed, "rules": decision.rules}),
                        counts,
                        answer: serde_json::Value::Null,
                        obligations: decision
                            .obligations
                            .iter()
                            .map(|o| (o.id.clone(), o.rule.clone(), o.due.map(|d| d.to_string()).unwrap_or_default()))
                            .collect(),
                        exporter: request.exporter.name.clone(),
                        recipient: request.recipient.name.clone(),
                        dataset: request.data.name.clone(),
                    })
                })
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let totals = store.export_totals(&request.exporter.name, 2026).await?;
    anyhow::ensure!(totals.0 == durable as i64, "counted {totals:?}");
    println!(
        "durable decisions (SQLite, synchronous=FULL, group commit): {durable} in {elapsed:.2} s = {:.0}/s; counter {} as expected",
        durable as f64 / elapsed,
        totals.0
    );
    Ok(ExitCode::SUCCESS)
}

/// One measured run: transfers per second and the p99 latency of a batch, in ms.
struct Rate {
    per_second: f64,
    p99_ms: f64,
}

/// The p99 of some latencies, in milliseconds.
fn p99_ms(mut latencies: Vec<Duration>) -> f64 {
    latencies.sort_unstable();
    percentile(&latencies, 0.99) / 1000.0
}

async fn ledger_bench(
    transfers: usize,
    batch: usize,
    concurrency: usize,
    postgres: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use baygrid_core::Currency;
    use baygrid_ledger::{names, Transfer, TransferKind};
    anyhow::ensure!(
        batch >= 1 && concurrency >= 1,
        "batch and concurrency must be at least 1"
    );
    let mut stores = vec![("sqlite", None::<String>)];
    if let Some(admin) = postgres {
        stores.push((
            "postgresql",
            Some(baygrid_store::testing::create_database(admin, "baygrid_bench").await?),
        ));
    }
    println!(
        "machine: {} CPUs; {transfers} transfers per store in batches of {batch}, {concurrency} submitters\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<12} {:>14} {:>10} {:>16} {:>10} {:>7}  durability",
        "store", "transfers/s", "p99 ms", "plain INSERT/s", "p99 ms", "ratio"
    );
    const WALLETS: usize = 1_000;
    for (name, url) in stores {
        let dir = tempfile::tempdir()?;
        let url =
            url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("ledger.db").display()));
        let store = baygrid_store::Store::open(&url).await?;
        let mut accounts = names::platform();
        accounts.extend((0..WALLETS).map(|i| names::wallet(&format!("t{i}"))));
        store.open_accounts(accounts, 0).await?;
        let funding = names::funding(Currency::CNY).id;
        let transfer = move |i: usize| Transfer {
            id: format!("deposit:{i:012}"),
            debit_account: funding.clone(),
            credit_account: format!("wallet:t{}", i % WALLETS),
            amount: 100 + (i % 997) as i64,
            currency: Currency::CNY,
            kind: TransferKind::Single,
            linked: false,
            reference: format!("bench {}", i / batch),
        };

        // the ledger: each batch one change through the group writer, every transfer checked
        let batches = transfers.div_ceil(batch);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let store = store.clone();
            let next = next.clone();
            let transfer = transfer.clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        break;
                    }
                    let rows: Vec<Transfer> = (b * batch..((b + 1) * batch).min(transfers))
                        .map(&transfer)
                        .collect();
                    let sent = Instant::now();
                    store.transfer(rows, "bench".into(), 1).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await??);
        }
        let ledger = Rate {
            per_second: transfers as f64 / started.elapsed().as_secs_f64(),
            p99_ms: p99_ms(latencies),
        };
        let stored = store.count("ledger_transfers").await?;
        anyhow::ensure!(
            stored as usize == transfers,
            "the ledger holds {stored} transfers"
        );
        let totals = store.ledger_totals().await?;
        let expected: i128 = (0..transfers).map(|i| 100 + (i % 997) as i128).sum();
        anyhow::ensure!(
            totals == vec![(Currency::CNY, expected)],
            "totals {totals:?}"
        );

        // the anchor: the same rows, plain multi-row INSERTs into a table of the same shape
        let pool = store.pool().clone();
        for statement in [
            "CREATE TABLE bench_plain (seq BIGINT PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, debit TEXT NOT NULL, credit TEXT NOT NULL, amount BIGINT NOT NULL, currency TEXT NOT NULL, pending_id TEXT, expires_ms BIGINT, linked BIGINT NOT NULL, reference TEXT NOT NULL, at_ms BIGINT NOT NULL)",
            "CREATE INDEX bench_plain_debit ON bench_plain (debit, at_ms)",
            "CREATE INDEX bench_plain_credit ON bench_plain (credit, at_ms)",
            "CREATE INDEX bench_plain_pending ON bench_plain (pending_id) WHERE pending_id IS NOT NULL",
        ] {
            sqlx::query(statement).execute(&pool).await?;
        }
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let pool = pool.clone();
            let next = next.clone();
            let transfer = transfer.clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        break;
                    }
                    let range = b * batch..((b + 1) * batch).min(transfers);
                    let sent = Instant::now();
                    let mut tx = pool.begin().await?;
                    let indices: Vec<usize> = range.collect();
                    for chunk in indices.chunks(50) {
                        let sql = baygrid_store::multi_row_insert(
                            "INSERT INTO bench_plain (seq, id, kind, debit, credit, amount, currency, pending_id, expires_ms, linked, reference, at_ms) VALUES ",
                            "({1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12})",
                            12,
                            chunk.len(),
                        );
                        let mut query = sqlx::query(&sql);
                        for &i in chunk {
                            let t = transfer(i);
                            query = query
                                .bind(i as i64 + 1)
                                .bind(t.id)
                                .bind("single")
                                .bind(t.debit_account)
                                .bind(t.credit_account)
                                .bind(t.amount)
                                .bind("CNY")
                                .bind(None::<String>)
                                .bind(None::<i64>)
                                .bind(0i64)
                                .bind(t.reference)
                                .bind(1i64);
                        }
                        query.execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await??);
        }
        let plain = Rate {
            per_second: transfers as f64 / started.elapsed().as_secs_f64(),
            p99_ms: p99_ms(latencies),
        };
        println!(
            "{name:<12} {:>14.0} {:>10.1} {:>16.0} {:>10.1} {:>7.2}  {}",
            ledger.per_second,
            ledger.p99_ms,
            plain.per_second,
            plain.p99_ms,
            ledger.per_second / plain.per_second,
            store.backend().durability()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit_bench(
    entries: u64,
    appends: usize,
    batch: usize,
    postgres: Option<&str>,
) -> anyhow::Result<ExitCode> {
    // durable appends: 4 concurrent appenders, each committing batches through the group writer
    let mut stores = vec![("sqlite", None::<String>)];
    if let Some(admin) = postgres {
        stores.push((
            "postgresql",
            Some(baygrid_store::testing::create_database(admin, "baygrid_bench").await?),
        ));
    }
    println!(
        "{:<12} {:>12} {:>8} {:>14}  durability",
        "store", "appends/s", "batch", "p99 commit ms"
    );
    for (name, url) in stores {
        let dir = tempfile::tempdir()?;
        let url =
            url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("audit.db").display()));
        let store = baygrid_store::Store::open(&url).await?;
        let payload = serde_json::json!({"job": "job_01jexampleexampleexample00", "from": "queued", "to": "placed", "reason": "placed on shaoguan-910b"});
        let batches = appends.div_ceil(batch);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            let next = next.clone();
            let payload = payload.clone();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < batches {
                    let rows = (0..batch)
                        .map(|_| {
                            (
                                0i64,
                                "job.transition".to_string(),
                                "scheduler".to_string(),
                                payload.clone(),
                            )
                        })
                        .collect();
                    let sent = Instant::now();
                    store.append_outbox(rows).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let p99 = p99_ms(latencies);
        let stored = store.count("outbox").await?;
        anyhow::ensure!(stored as usize == batches * batch, "outbox holds {stored}");
        println!(
            "{name:<12} {:>12.0} {batch:>8} {p99:>14.1}  {}",
            stored as f64 / elapsed,
            store.backend().durability()
        );
    }

    // proofs at `entries`
    println!("\nbuilding a tree of {entries} entries in memory ...");
    let started = Instant::now();
    let mut tree = baygrid_audit::Tree::new();
    for i in 0..entries {
        tree.push(&i.to_le_bytes());
    }
    println!("built in {:.1} s", started.elapsed().as_secs_f64());
    let root = tree.root();
    let samples = 20_000u64;
    let indices: Vec<u64> = (0..samples)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % entries)
        .collect();
    let started = Instant::now();
    let proofs: Vec<Vec<baygrid_audit::Hash>> = indices
        .iter()
        .map(|&i| tree.inclusion_proof(i, entries).expect("in range"))
        .collect();
    let produce = started.elapsed().as_secs_f64() / samples as f64 * 1e6;
    let leaves: Vec<baygrid_audit::Hash> = indices
        .iter()
        .map(|&i| tree.leaf(i).expect("in range"))
        .collect();
    let started = Instant::now();
    for ((index, proof), leaf) in indices.iter().zip(&proofs).zip(&leaves) {
        baygrid_audit::verify_inclusion(leaf, *index, entries, proof, &root)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let verify = started.elapsed().as_secs_f64() / samples as f64 * 1e6;
    println!("inclusion proof at {entries} entries ({} hashes): produce {produce:.1} µs, verify {verify:.1} µs (mean of {samples})", proofs[0].len());
    Ok(ExitCode::SUCCESS)
}

/// `bench dispatch`: one cycle over every pending job, per policy, in one run.
fn dispatch(
    clusters: usize,
    nodes: u32,
    count: usize,
    runtimes: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    use baygrid_sched::replay::{self, DispatchConfig, ReplayPolicy};
    if clusters == 0 || clusters > 64 || nodes == 0 || count == 0 {
        anyhow::bail!("--clusters must be 1 to 64, --nodes and --jobs at least 1");
    }
    let sample = replay::Region::from_catalog(&baygrid_core::Catalog::sample())?;
    let mut region = sample.clone();
    region.pools = (0..clusters)
        .map(|i| {
            let template = &sample.pools[i % sample.pools.len()];
            replay::Pool {
                name: format!("{}-{i}", template.name),
                nodes,
                per_node: 8,
                ..template.clone()
            }
        })
        .collect();
    let text = std::fs::read_to_string(runtimes)
        .with_context(|| format!("--runtimes {}: cannot read", runtimes.display()))?;
    let durations = crate::sim::parse_runtimes(&runtimes.display().to_string(), &text)?;
    let tenants = replay::synthetic_tenants(&region);
    let mut jobs = replay::synthetic_jobs(&region, &tenants, &durations, 1.0, count, 42)?;
    for job in &mut jobs {
        job.arrival_s = 0.0;
    }
    println!(
        "dispatch: {clusters} clusters × {nodes} nodes × 8 accelerators, {count} pending jobs, one cycle (median of 3)"
    );
    let mut rows = Vec::new();
    let mut cycle = Vec::new();
    let config = DispatchConfig::default();
    // one cycle discarded to warm the allocator and caches, then the median of three
    replay::simulate_until(
        &region,
        &tenants,
        &jobs,
        ReplayPolicy::Baygrid,
        &config,
        0.0,
    )?;
    for policy in [
        ReplayPolicy::Baygrid,
        ReplayPolicy::FifoFirstFit,
        ReplayPolicy::GreedyCheapest,
    ] {
        let mut walls = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let started = Instant::now();
            last = Some(replay::simulate_until(
                &region, &tenants, &jobs, policy, &config, 0.0,
            )?);
            walls.push(started.elapsed().as_secs_f64());
        }
        walls.sort_by(f64::total_cmp);
        let wall = walls[1];
        let result = last.expect("three cycles ran");
        cycle.push(wall);
        rows.push(vec![
            policy.to_string(),
            result.placements.to_string(),
            format!("{:.1} ms", wall * 1e3),
            format!("{:.0}", count as f64 / wall),
            format!("{:.0}", result.placements as f64 / wall),
        ]);
    }
    crate::output::table(
        &[
            "policy",
            "placed",
            "cycle",
            "jobs considered/s",
            "placements/s",
        ],
        &rows,
    );
    println!(
        "cycle time baygrid ÷ fifo-first-fit: {:.2}",
        cycle[0] / cycle[1]
    );
    Ok(ExitCode::SUCCESS)
}

fn psi_bench(n: usize, batch: usize, anchor: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    use baygrid_fusion::psi::{run_loopback, Reveal};
    anyhow::ensure!(n >= 2, "--ids: need at least 2 ids per party, got {n}");
    let guest: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let host: Vec<String> = (n / 2..n / 2 + n).map(|i| i.to_string()).collect();
    let start = std::time::Instant::now();
    let (g, h) = run_loopback(&guest, &host, Reveal::Both, batch)?;
    let seconds = start.elapsed().as_secs_f64();
    let found = g.intersection.as_ref().map_or(0, Vec::len);
    anyhow::ensure!(
        found == n - n / 2 && h.intersection.as_ref().map_or(0, Vec::len) == found,
        "intersection has {found} ids, expected {}",
        n - n / 2
    );
    println!(
        "baygrid psi (ristretto255, both learn): {n} x {n} ids, intersection {found}: {seconds:.2} s, \
         {:.1} us per id per party, {:.1} MB each way",
        seconds * 1e6 / n as f64,
        g.bytes_sent as f64 / 1e6
    );
    if let Some(script) = anchor {
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(n.to_string())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "anchor failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let anchor: serde_json::Value = serde_json::from_str(line.trim())?;
        let anchor_s = anchor["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "openmined-psi (P-256, in one process): {anchor_s:.2} s; baygrid / anchor = {:.3}",
            seconds / anchor_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Plain against secure aggregation through an exchange on this machine: the three card
/// issuers' workers in Hong Kong, Shenzhen and Macao, every message through the relay.
async fn fusion_exchange_bench(
    data: &std::path::Path,
    rounds: usize,
    hidden: usize,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("baygrid-bench-fusion-")
        .tempdir()?;
    let exchange =
        crate::up::start_exchange(dir.path(), "127.0.0.1:0".parse().expect("literal"), None)
            .await?;
    for (party, dataset, offer, file) in [
        (
            ("hk-issuer", "HK", "hong-kong"),
            include_str!("../../../examples/datasets/hk-issuer-cards.yaml"),
            include_str!("../../../examples/data-offers/hk-issuer-cards.yaml"),
            "default_credit_homo_guest.csv",
        ),
        (
            ("sz-issuer", "CN", "shenzhen"),
            include_str!("../../../examples/datasets/sz-issuer-cards.yaml"),
            include_str!("../../../examples/data-offers/sz-issuer-cards.yaml"),
            "default_credit_homo_host_1.csv",
        ),
        (
            ("mo-issuer", "MO", "macao"),
            include_str!("../../../examples/datasets/mo-issuer-cards.yaml"),
            include_str!("../../../examples/data-offers/mo-issuer-cards.yaml"),
            "default_credit_homo_host_2.csv",
        ),
    ] {
        crate::up::publish_holding(&exchange.operator, party, dataset, offer, &data.join(file))
            .await?;
    }
    let lab = exchange.tenant("hk-fintech");
    for offer in [
        "hk-issuer-cards-federated",
        "sz-issuer-cards-federated",
        "mo-issuer-cards-federated",
    ] {
        let _: serde_json::Value = lab
            .post(
                "/api/v1/contracts",
                &serde_json::json!({"offer": offer, "mode": "federated", "purpose": "credit_risk", "site": "hk-cyberport"}),
            )
            .await?;
    }
    let base: baygrid_api::FusionRequest = serde_yaml::from_str(include_str!(
        "../../../examples/fusion/default-credit-homo-lr-exchange.yaml"
    ))?;
    println!(
        "\nthrough the exchange: 3 agent processes (hk-cyberport, shenzhen-qianhai, macao), server relay, {rounds} rounds"
    );
    println!("model       aggregation  s/round   bytes/round  run s    time x   bytes x");
    for (name, task) in [
        ("logistic", baygrid_api::FusionTask::HomoLr),
        ("mlp", baygrid_api::FusionTask::HomoMlp),
    ] {
        let mut request = base.clone();
        request.task = task;
        request.settings.insert("rounds".into(), rounds.into());
        if task == baygrid_api::FusionTask::HomoMlp {
            request.settings.insert("hidden".into(), hidden.into());
        }
        let mut plain_figures = None;
        for plain in [true, false] {
            request.settings.insert("plain".into(), plain.into());
            let started: baygrid_api::FusionView = lab.post("/api/v1/fusion", &request).await?;
            let view =
                crate::up::fusion_ended(lab, &started.id, std::time::Duration::from_secs(1800))
                    .await?;
            anyhow::ensure!(
                view.state == baygrid_api::FusionState::Succeeded,
                "run {} ended {:?}: {}",
                view.id,
                view.state,
                view.error.unwrap_or_default()
            );
            let n = view.rounds.len().max(1) as f64;
            let secs = view.rounds.iter().map(|r| r.seconds).sum::<f64>() / n;
            let bytes = view.rounds.iter().map(|r| r.bytes as f64).sum::<f64>() / n;
            let run_s = view.workers[0].seconds;
            let (tx, bx) = match plain_figures {
                None => (String::new(), String::new()),
                Some((s0, b0)) => (format!("{:.2}", secs / s0), format!("{:.2}", bytes / b0)),
            };
            println!(
                "{name:<11} {:<12} {secs:<9.4} {bytes:<12.0} {run_s:<8.1} {tx:<8} {bx}",
                if plain { "plain" } else { "secure" }
            );
            plain_figures.get_or_insert((secs, bytes));
        }
    }
    exchange.stop().await;
    Ok(())
}

fn fusion_bench(data: &std::path::Path, rounds: usize, hidden: usize) -> anyhow::Result<ExitCode> {
    use baygrid_fusion::data::Table;
    use baygrid_fusion::homo::{self, Arch, HomoConfig};
    let parties: Vec<Table> = [
        "default_credit_homo_guest.csv",
        "default_credit_homo_host_1.csv",
        "default_credit_homo_host_2.csv",
    ]
    .iter()
    .map(|f| Table::read_csv(&data.join(f)))
    .collect::<Result<_, _>>()?;
    let device = homo::device();
    println!(
        "default_credit_homo, 3 parties x 8000 rows, {rounds} rounds, full-batch local step, device {device:?}"
    );
    println!("model       aggregation  s/round   agg s/round  bytes/round  time x   bytes x");
    for (name, arch) in [("logistic", Arch::Logistic), ("mlp", Arch::Mlp { hidden })] {
        let mut figures = Vec::new();
        for plain in [true, false] {
            let cfg = HomoConfig {
                arch,
                rounds,
                plain,
                seed: 1,
                ..HomoConfig::fate_lr()
            };
            let report = homo::train(&cfg, &parties, &device, |_| {})?;
            let n = report.rounds.len() as f64;
            let secs = report.rounds.iter().map(|r| r.seconds).sum::<f64>() / n;
            let agg = report
                .rounds
                .iter()
                .map(|r| r.aggregation_seconds)
                .sum::<f64>()
                / n;
            let bytes = report.rounds.iter().map(|r| r.bytes as f64).sum::<f64>() / n;
            figures.push((secs, bytes));
            let (ts, tb) = if plain {
                (String::new(), String::new())
            } else {
                (
                    format!("{:.2}", secs / figures[0].0),
                    format!("{:.2}", bytes / figures[0].1),
                )
            };
            println!(
                "{name:<11} {:<12} {secs:<9.4} {agg:<12.5} {bytes:<12.0} {ts:<8} {tb}",
                if plain { "plain" } else { "secure" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
