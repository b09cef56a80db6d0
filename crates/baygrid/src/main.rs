//! The one baygrid binary: parse flags, set up logging, dispatch, exit with a code.

mod audit;
mod bench;
mod bench_query;
mod cli;
mod dataset;
mod fusion;
mod fusion_run;
mod output;
mod query;
mod rules;
mod sim;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "baygrid",
    version,
    about = "Compute-and-data exchange for the Greater Bay Area"
)]
pub struct Args {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "BAYGRID_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub server: String,
    /// Bearer token; defaults to the operator token in the data directory.
    #[arg(long, global = true, env = "BAYGRID_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where `baygrid up` keeps its state and the operator token the CLI uses by default
    /// (`.baygrid`); for `demo`, a fresh temporary directory unless given.
    #[arg(long, global = true, env = "BAYGRID_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// The data directory: `--data-dir`, or `.baygrid` in the current directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".baygrid"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the main scenario on embedded defaults: server, agents, ~20 real jobs, a summary.
    Demo {
        /// Keep the exchange running after the summary.
        #[arg(long)]
        keep: bool,
    },
    /// Server, embedded store and one local agent per sample cluster, on 127.0.0.1:7700.
    Up {
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: std::net::SocketAddr,
        /// A sites file to publish instead of the built-in sample region.
        #[arg(long)]
        sites: Option<PathBuf>,
    },
    /// The server process.
    Server {
        /// The server's TOML config; embedded defaults without it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The agent process beside one cluster.
    Agent {
        /// The agent's TOML config: the server, its agent token (which names the cluster), a
        /// work folder and the engine (local, slurm, kubernetes).
        #[arg(long)]
        config: PathBuf,
    },
    /// Sites.
    #[command(subcommand)]
    Site(cli::ListOnly),
    /// Clusters and their agents.
    #[command(subcommand)]
    Cluster(cli::ListOnly),
    /// Compute offers.
    #[command(subcommand)]
    Offer(cli::ListOnly),
    /// Parties: legal entities behind tenants, providers and data holders.
    #[command(subcommand)]
    Party(cli::PartyCommand),
    /// Tenants and their budgets.
    #[command(subcommand)]
    Tenant(cli::TenantCommand),
    /// Bearer tokens.
    #[command(subcommand)]
    Token(cli::TokenCommand),
    /// Jobs.
    #[command(subcommand)]
    Job(cli::JobCommand),
    /// The audit log: checkpoints, proofs, export and offline verification.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Settlement: balances, deposits, statements, invoices.
    #[command(subcommand)]
    Ledger(cli::LedgerCommand),
    /// The GBA cross-border data rule pack, run locally: decide a flow and explain why.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// Evidence of legal bases for cross-border flows (data zone).
    #[command(subcommand)]
    Evidence(rules::EvidenceCommand),
    /// Cross-border flows decided by the exchange, recorded and counted.
    #[command(subcommand)]
    Flow(rules::FlowCommand),
    /// Datasets in the data zone's vaults: register, list, inspect.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Data offers: what a holder lets others do with a dataset, at what price.
    #[command(subcommand, name = "data-offer")]
    DataOffer(dataset::DataOfferCommand),
    /// Contracts on data offers: request (the rules decide), approve, revoke, list.
    #[command(subcommand)]
    Contract(dataset::ContractCommand),
    /// What allowed flows oblige the parties to do: due, overdue and standing.
    #[command(subcommand)]
    Obligations(dataset::ObligationsCommand),
    /// Aggregate questions asked at a dataset's vault (可用不可见): only noisy aggregates
    /// that pass the offer's privacy terms come back.
    Query(query::QueryArgs),
    /// Sample-data fusion training (样本数据融合训练): PSI, federated and vertical models.
    #[command(subcommand)]
    Fusion(fusion::FusionCommand),
    /// The simulator: the dispatcher and its baselines on traces, deterministic per seed.
    Sim(sim::SimArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let default_level = match args.command {
        Command::Server { .. } | Command::Agent { .. } | Command::Up { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BAYGRID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors already quote their
/// source in their own message (`work directory X: No such file or directory`), which
/// `{:#}` would print again after it.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Demo { keep } => up::demo(&args, *keep).await,
        Command::Up { listen, sites } => up::up(&args, *listen, sites.clone()).await,
        Command::Server { config } => up::server(config.clone()).await,
        Command::Agent { config } => up::agent(config).await,
        Command::Site(cmd) => cli::sites(&args, cmd).await,
        Command::Cluster(cmd) => cli::clusters(&args, cmd).await,
        Command::Offer(cmd) => cli::offers(&args, cmd).await,
        Command::Party(cmd) => cli::party(&args, cmd).await,
        Command::Tenant(cmd) => cli::tenant(&args, cmd).await,
        Command::Token(cmd) => cli::token(&args, cmd).await,
        Command::Job(cmd) => cli::job(&args, cmd).await,
        Command::Audit(cmd) => audit::run(&args, cmd).await,
        Command::Ledger(cmd) => cli::ledger(&args, cmd).await,
        Command::Rules(cmd) => rules::run(&args, cmd),
        Command::Evidence(cmd) => rules::evidence(&args, cmd).await,
        Command::Flow(cmd) => rules::flow(&args, cmd).await,
        Command::Dataset(cmd) => dataset::dataset(&args, cmd).await,
        Command::DataOffer(cmd) => dataset::data_offer(&args, cmd).await,
        Command::Contract(cmd) => dataset::contract(&args, cmd).await,
        Command::Obligations(cmd) => dataset::obligations(&args, cmd).await,
        Command::Query(q) => query::run(&args, q).await,
        Command::Fusion(cmd) => fusion::run(&args, cmd).await,
        Command::Sim(sim) => sim::run(&args, sim),
        Command::Bench(cmd) => bench::run(&args, cmd).await,
    }
}

#[cfg(test)]
mod describe_tests {
    use anyhow::Context;

    /// An error that quotes its source in its own message, as many do.
    #[derive(Debug)]
    struct Quoting {
        source: std::io::Error,
    }

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "work directory /x: {}", self.source)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let quoting = anyhow::Error::new(Quoting { source: io() });
        assert_eq!(
            super::describe(&quoting),
            "work directory /x: entity not found"
        );
        let wrapped: anyhow::Result<()> = Err(io()).context("reading the sites file");
        assert_eq!(
            super::describe(&wrapped.unwrap_err()),
            "reading the sites file: entity not found"
        );
    }
}
