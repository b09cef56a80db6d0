//! `baygrid sim`: the simulator. Both modes call the same placement code the server uses
//! and are deterministic for a given seed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use baygrid_core::Catalog;
use baygrid_sched::pack::{self, PackHarness, PackPolicy, PackRun};
use baygrid_sched::patience::Patience;
use baygrid_sched::replay::{self, DispatchConfig, ReplayPolicy, ReplayResult};
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
    /// Pack: bestfit, fgd, baygrid. Replay: baygrid, fifo-first-fit, greedy-cheapest.
    #[arg(long, default_value = "baygrid")]
    pub policy: String,
    /// Replay: the region (a sites file); the built-in sample region by default.
    #[arg(long)]
    pub sites: Option<PathBuf>,
    /// Replay: generate the jobs instead of reading a trace.
    #[arg(long, conflicts_with = "trace")]
    pub synthetic: bool,
    /// Replay, synthetic: the offered load (accelerator-seconds asked ÷ capacity).
    #[arg(long)]
    pub load: Option<f64>,
    /// Replay, synthetic: how many jobs.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Replay, synthetic: the runtimes durations are drawn from (one column, `runtime`).
    #[arg(
        long,
        default_value = "../shared/data/traces/philly/philly_runtime.csv"
    )]
    pub runtimes: PathBuf,
    /// Replay: the green term's weight (CNY per CNY of compute per unit of non-green power).
    #[arg(long, default_value_t = 0.0)]
    pub green_weight: f64,
    /// Replay: a blocked job reserves nodes only when it could start within this many
    /// seconds.
    #[arg(long, default_value_t = 86_400.0)]
    pub reservation_horizon_s: f64,
    /// Replay, synthetic: the share of latency-insensitive jobs that are preemptible (drawn
    /// from their own stream: the jobs are otherwise the same).
    #[arg(long, default_value_t = 0.0)]
    pub preemptible: f64,
    /// Replay: a blocked job that cannot start within this many seconds may evict
    /// preemptible jobs of a lower priority or of a tenant above its fair share (inf: never).
    #[arg(long, default_value_t = 3_600.0)]
    pub preemption_wait_s: f64,
    /// Replay: how long an evicted job runs on to checkpoint before its nodes are free.
    #[arg(long, default_value_t = 30.0)]
    pub grace_s: f64,
    /// Replay: give each tenant a nominal quota of this × its weight of every model's
    /// capacity (1 divides the region by weight); the dispatcher admits within it.
    #[arg(long)]
    pub quota: Option<f64>,
    /// Replay, with --quota: tenants may not borrow the cohort's unused quota.
    #[arg(long, requires = "quota")]
    pub no_borrowing: bool,
    /// Replay: a latency-insensitive job may wait up to this share of its run time for a
    /// cheaper pool expected to free up (0: never waits).
    #[arg(long, default_value_t = Patience::default().share)]
    pub patience_share: f64,
    /// Replay: the longest such wait, in seconds.
    #[arg(long, default_value_t = Patience::default().cap_s)]
    pub patience_cap_s: f64,
    /// Replay: the least saving (a share of the cost now) worth that wait.
    #[arg(long, default_value_t = Patience::default().saving)]
    pub patience_saving: f64,
}

pub fn run(args: &Args, sim: &SimArgs) -> anyhow::Result<ExitCode> {
    match sim.mode {
        SimMode::Pack => run_pack(args, sim),
        SimMode::Replay => run_replay(args, sim),
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

/// One policy's replay with the lower bound beside it.
#[derive(Debug, Serialize)]
struct ReplayReport {
    #[serde(flatten)]
    result: ReplayResult,
    seed: u64,
    lower_bound_cny: f64,
    cost_to_lower_bound: f64,
}

fn run_replay(args: &Args, sim: &SimArgs) -> anyhow::Result<ExitCode> {
    let catalog = match &sim.sites {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--sites {}: cannot read", path.display()))?;
            Catalog::from_yaml(&text).with_context(|| format!("--sites {}", path.display()))?
        }
        None => Catalog::sample(),
    };
    let region = replay::Region::from_catalog(&catalog)?;
    let seeds = parse_seeds(sim)?;
    if seeds.len() != 1 {
        bail!("--seeds: replay mode takes one seed (--seed S)");
    }
    let seed = seeds[0];
    let (mut tenants, jobs) = if sim.synthetic {
        let Some(load) = sim.load else {
            bail!("--load L is required with --synthetic");
        };
        let Some(count) = sim.jobs else {
            bail!("--jobs N is required with --synthetic");
        };
        let text = std::fs::read_to_string(&sim.runtimes).with_context(|| {
            format!(
                "--runtimes {}: cannot read (the Philly runtimes)",
                sim.runtimes.display()
            )
        })?;
        let runtimes = parse_runtimes(&label(&sim.runtimes), &text)?;
        let tenants = replay::synthetic_tenants(&region);
        let mut jobs = replay::synthetic_jobs(&region, &tenants, &runtimes, load, count, seed)?;
        replay::mark_preemptible(&mut jobs, sim.preemptible, seed)?;
        (tenants, jobs)
    } else {
        let (trace_label, text) =
            read("--trace", &sim.trace).context("replay mode needs --trace FILE or --synthetic")?;
        replay::parse_trace(&trace_label, &text, &region)?
    };
    let policies = sim
        .policy
        .split(',')
        .map(|p| p.trim().parse::<ReplayPolicy>())
        .collect::<Result<Vec<_>, _>>()?;
    let config = DispatchConfig {
        green_weight: sim.green_weight,
        reservation_horizon_s: sim.reservation_horizon_s,
        preemption_wait_s: sim.preemption_wait_s,
        grace_s: sim.grace_s,
        borrowing: !sim.no_borrowing,
        patience: Patience {
            share: sim.patience_share,
            cap_s: sim.patience_cap_s,
            saving: sim.patience_saving,
        },
    };
    config.patience.validate().map_err(|(field, problem)| {
        anyhow::anyhow!("--patience-{}: {problem}", field.replace('_', "-"))
    })?;
    if let Some(scale) = sim.quota {
        replay::set_quotas(&mut tenants, scale)?;
    }
    if !(config.green_weight.is_finite() && config.green_weight >= 0.0) {
        bail!("--green-weight: must be 0 or more");
    }
    if config.reservation_horizon_s.is_nan() || config.reservation_horizon_s < 0.0 {
        bail!("--reservation-horizon-s: must be 0 or more (inf for no limit)");
    }
    if config.preemption_wait_s.is_nan() || config.preemption_wait_s < 0.0 {
        bail!("--preemption-wait-s: must be 0 or more (inf never preempts)");
    }
    if !(config.grace_s.is_finite() && config.grace_s >= 0.0) {
        bail!("--grace-s: must be 0 or more");
    }
    let mut results = Vec::new();
    for &policy in &policies {
        results.push(replay::simulate(&region, &tenants, &jobs, policy, &config)?);
    }
    // the bound's horizon is the dispatcher's own makespan
    let dispatcher = match results.iter().find(|r| r.policy == ReplayPolicy::Baygrid) {
        Some(r) => r.clone(),
        None => replay::simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config)?,
    };
    let bound = replay::lower_bound(&region, &dispatcher);
    if bound.unserved_work > 0 {
        eprintln!(
            "warning: the lower bound could not place {} reference accelerator-seconds within the dispatcher's makespan",
            bound.unserved_work
        );
    }
    let reports: Vec<ReplayReport> = results
        .into_iter()
        .map(|result| ReplayReport {
            cost_to_lower_bound: result.total_cost_cny / bound.cost_cny.max(1e-9),
            lower_bound_cny: bound.cost_cny,
            seed,
            result,
        })
        .collect();
    let render = |reports: &[ReplayReport]| {
        let first = &reports[0].result;
        println!(
            "replay: {} jobs, {} rejected as never feasible, {} clusters with {} accelerators, seed {seed}",
            first.jobs,
            first.rejected,
            region.pools.len(),
            region.accelerators()
        );
        for reason in &first.rejections {
            println!("  rejected {reason}");
        }
        let mut rows = Vec::new();
        let figure = |name: &str, f: &dyn Fn(&ReplayReport) -> String| {
            let mut row = vec![name.to_string()];
            row.extend(reports.iter().map(f));
            row
        };
        rows.push(figure("makespan", &|r| hours(r.result.makespan_s)));
        rows.push(figure("mean wait", &|r| {
            format!("{:.0} s", r.result.mean_wait_s)
        }));
        rows.push(figure("p99 wait", &|r| {
            format!("{:.0} s", r.result.p99_wait_s)
        }));
        rows.push(figure("mean completion", &|r| {
            hours(r.result.mean_completion_s)
        }));
        rows.push(figure("total cost", &|r| {
            format!("{:.0} CNY", r.result.total_cost_cny)
        }));
        rows.push(figure("cost ÷ lower bound", &|r| {
            format!("{:.3}", r.cost_to_lower_bound)
        }));
        rows.push(figure("fairness (Jain)", &|r| {
            format!("{:.3}", r.result.jain_fairness)
        }));
        rows.push(figure("fairness while jobs arrive", &|r| {
            format!("{:.3}", r.result.jain_fairness_arriving)
        }));
        rows.push(figure("preemptions", &|r| {
            format!(
                "{} ({:.0} acc·h lost)",
                r.result.preemptions,
                r.result.lost_accelerator_s / 3600.0
            )
        }));
        rows.push(figure("deadlines missed", &|r| {
            r.result.deadlines_missed.to_string()
        }));
        rows.push(figure("decisions/s", &|r| {
            format!("{:.0}", r.result.decisions_per_s)
        }));
        for site in first.utilisation.keys() {
            rows.push(figure(&format!("utilisation {site}"), &|r| {
                format!("{:.1}%", 100.0 * r.result.utilisation[site])
            }));
        }
        let mut headers = vec!["figure"];
        headers.extend(reports.iter().map(|r| r.result.policy.name()));
        table(&headers, &rows);
        println!(
            "lower bound: {:.0} CNY (min-cost flow over {} slots of the dispatcher's makespan)",
            reports[0].lower_bound_cny,
            replay::BOUND_SLOTS
        );
    };
    if reports.len() == 1 {
        emit(args.output, &reports[0], |r| {
            render(std::slice::from_ref(r))
        });
    } else {
        emit(args.output, &reports, |r| render(r));
    }
    Ok(ExitCode::SUCCESS)
}

fn hours(seconds: f64) -> String {
    format!("{:.2} h", seconds / 3600.0)
}

/// One column, `runtime`, in seconds.
pub fn parse_runtimes(file: &str, text: &str) -> anyhow::Result<Vec<f64>> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("runtime") {
        bail!("{file}: the header must be `runtime`");
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            l.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .with_context(|| {
                    format!("{file} line {}: `{l}` is not a runtime in seconds", i + 2)
                })
        })
        .collect()
}
