//! `baygrid sim`: the simulator. Both modes call the same placement code the server uses
//! and are deterministic for a given seed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use baygrid_sched::pack::{self, PackHarness, PackPolicy, PackRun};
use clap::ValueEnum;
use serde::Serialize;

use crate::output::{emit, table};
use crate::Args;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimMode {
    /// Queueing and cost over time, across the region's sites.
    Replay,
    /// Fragmentation: tasks placed onto GPU nodes one by one, never leaving.
    Pack,
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[arg(long, value_enum)]
    pub mode: SimMode,
    /// Pack: the node list (`sn,cpu_milli,memory_mib,gpu,model`). Replay: unused.
    #[arg(long)]
    pub nodes: Option<PathBuf>,
    /// Pack: the task list (an openb pod list). Replay: a job list (CSV or JSON).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Pack: draw extra tasks until the requested GPUs would pass this × the cluster's GPUs.
    #[arg(long, default_value_t = 1.3)]
    pub inflate: f64,
    /// One seed.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// A range of seeds, `FIRST-LAST` (pack mode reports each and the mean).
    #[arg(long)]
    pub seeds: Option<String>,
    /// The policy, or several separated by commas to compare them in one run.
    /// Pack: bestfit, fgd, baygrid.
    #[arg(long, default_value = "baygrid")]
    pub policy: String,
}

pub fn run(args: &Args, sim: &SimArgs) -> anyhow::Result<ExitCode> {
    match sim.mode {
        SimMode::Pack => run_pack(args, sim),
        SimMode::Replay => bail!("--mode replay: not built yet; use --mode pack"),
    }
}

/// `42-51` or `42`.
fn parse_seeds(sim: &SimArgs) -> anyhow::Result<Vec<u64>> {
    if let Some(seed) = sim.seed {
        return Ok(vec![seed]);
    }
    let Some(range) = &sim.seeds else {
        bail!("--seed or --seeds is required (a simulation is deterministic for its seed)");
    };
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .with_context(|| format!("--seeds `{range}`: `{s}` is not a whole number"))
    };
    let seeds = match range.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (parse(first)?, parse(last)?);
            if last < first {
                bail!("--seeds `{range}`: the last seed is below the first");
            }
            (first..=last).collect()
        }
        None => vec![parse(range)?],
    };
    Ok(seeds)
}

fn read(flag: &str, path: &Option<PathBuf>) -> anyhow::Result<(String, String)> {
    let Some(path) = path else {
        bail!("{flag} FILE is required in this mode");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read", path.display()))?;
    Ok((label(path), text))
}

fn label(path: &Path) -> String {
    path.display().to_string()
}

/// One policy's runs over the seeds, with the means the paper reports.
#[derive(Debug, Serialize)]
struct PackReport {
    mode: &'static str,
    policy: PackPolicy,
    nodes: String,
    trace: String,
    inflate: f64,
    gpus: f64,
    typical_shapes: usize,
    seeds: Vec<u64>,
    /// Mean over the seeds.
    alloc_at_100: f64,
    alloc_at_130: f64,
    failed_tasks: f64,
    runs: Vec<PackRun>,
    wall_s: f64,
    placements_per_s: f64,
}

fn run_pack(args: &Args, sim: &SimArgs) -> anyhow::Result<ExitCode> {
    let (nodes_label, nodes_text) = read("--nodes", &sim.nodes)?;
    let (trace_label, trace_text) = read("--trace", &sim.trace)?;
    let nodes = pack::parse_nodes(&nodes_label, &nodes_text)?;
    let trace = pack::parse_tasks(&trace_label, &trace_text)?;
    let seeds = parse_seeds(sim)?;
    let policies = sim
        .policy
        .split(',')
        .map(|p| p.trim().parse::<PackPolicy>())
        .collect::<Result<Vec<_>, _>>()?;
    let harness = PackHarness::new(&nodes, &trace)?;
    let mut reports = Vec::new();
    for policy in policies {
        let started = Instant::now();
        let runs = seeds
            .iter()
            .map(|&seed| harness.run(policy, sim.inflate, seed))
            .collect::<Result<Vec<_>, _>>()?;
        let wall = started.elapsed().as_secs_f64();
        let tasks: usize = runs.iter().map(|r| r.tasks).sum();
        reports.push(PackReport {
            mode: "pack",
            policy,
            nodes: nodes_label.clone(),
            trace: trace_label.clone(),
            inflate: sim.inflate,
            gpus: harness.capacity_milli() as f64 / f64::from(pack::MILLI),
            typical_shapes: harness.typical_shapes(),
            seeds: seeds.clone(),
            alloc_at_100: pack::mean(&runs, |r| r.alloc_at_100),
            alloc_at_130: pack::mean(&runs, |r| r.alloc_at_130),
            failed_tasks: pack::mean(&runs, |r| r.failed_tasks as f64),
            runs,
            wall_s: wall,
            placements_per_s: tasks as f64 / wall.max(1e-9),
        });
    }
    let render = |reports: &[PackReport]| {
        let first = &reports[0];
        println!(
            "pack: {} nodes, {} GPUs, {} tasks in the trace ({} typical shapes), inflate {}, seeds {}",
            nodes.len(),
            first.gpus,
            trace.len(),
            first.typical_shapes,
            first.inflate,
            describe_seeds(&first.seeds)
        );
        let mut rows = Vec::new();
        for report in reports {
            if report.runs.len() > 1 {
                for run in &report.runs {
                    rows.push(vec![
                        report.policy.to_string(),
                        run.seed.to_string(),
                        format!("{:.2}", run.alloc_at_100),
                        format!("{:.2}", run.alloc_at_130),
                        run.failed_tasks.to_string(),
                        run.tasks.to_string(),
                    ]);
                }
            }
            rows.push(vec![
                report.policy.to_string(),
                if report.runs.len() > 1 {
                    "mean".into()
                } else {
                    report.seeds[0].to_string()
                },
                format!("{:.2}", report.alloc_at_100),
                format!("{:.2}", report.alloc_at_130),
                format!("{:.1}", report.failed_tasks),
                format!("{:.0}", pack::mean(&report.runs, |r| r.tasks as f64)),
            ]);
        }
        table(
            &[
                "policy",
                "seed",
                "alloc@100%",
                "alloc@130%",
                "failed",
                "tasks",
            ],
            &rows,
        );
        for report in reports {
            println!(
                "{}: {:.0} placements/s ({:.2} s for {} runs)",
                report.policy,
                report.placements_per_s,
                report.wall_s,
                report.runs.len()
            );
        }
        if let Some(fgd) = reports.iter().find(|r| r.policy == PackPolicy::Fgd) {
            for report in reports.iter().filter(|r| r.policy != PackPolicy::Fgd) {
                println!(
                    "{} − fgd: {:+.2} at 100%, {:+.2} at 130%",
                    report.policy,
                    report.alloc_at_100 - fgd.alloc_at_100,
                    report.alloc_at_130 - fgd.alloc_at_130
                );
            }
        }
    };
    if reports.len() == 1 {
        let report = reports.pop().expect("one report");
        emit(args.output, &report, |r| render(std::slice::from_ref(r)));
    } else {
        emit(args.output, &reports, |r| render(r));
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_seeds(seeds: &[u64]) -> String {
    match seeds {
        [one] => one.to_string(),
        [first, .., last] => format!("{first}-{last}"),
        [] => "-".into(),
    }
}
