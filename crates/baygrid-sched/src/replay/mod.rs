//! Replay: jobs arriving over time at the region's clusters, run to completion, with the
//! dispatcher or a baseline deciding where and when each starts. Queueing, cost and fairness
//! over time; deterministic for a seed.
//!
//! The dispatcher (`baygrid`):
//! - **order**: tenants by dominant-resource share over their weight (the share of each
//!   accelerator model's capacity they hold now; the largest counts), least served first;
//!   within a tenant, oldest first;
//! - **fit**: a job of N nodes takes N nodes of one pool, each with its accelerators per
//!   node free, all at once (gangs are never split); the nodes chosen are the fullest that
//!   fit, so whole nodes stay free for gangs;
//! - **choice**: among the pools it fits now, the least total cost: compute (the offer's
//!   price in CNY × accelerators × the duration scaled by the reference model's BF16 TFLOPS
//!   over the pool's), plus data transfer, plus a green term (weight × the site's non-green
//!   share × compute); ties go to the shorter round trip;
//! - **patience**: a latency-insensitive job that fits now only on a dearer pool may wait
//!   for a cheaper one expected to free up by a share of its run time after it arrived
//!   ([`crate::patience`]); it waits only when it can hold the backfill reservation on the
//!   cheaper pool's nodes meanwhile (so backfill cannot take them and leave it waiting for
//!   nothing);
//! - **backfill** (EASY, one reservation per pool): a job in order that fits nowhere gets
//!   the reservation of the pool where it can start earliest, computed from running jobs'
//!   estimated ends, among the pools no job ahead of it has reserved, when that start is
//!   within the reservation horizon (a day by default); it keeps it until it starts (or a
//!   job of a higher class takes it over). Later jobs may use the reserved nodes only if
//!   they end before the reservation starts. With one reservation in the whole region, a
//!   gang blocked on one pool left every other pool's gangs unprotected;
//! - **fail fast**: a job no pool could ever hold (models, jurisdictions, latency, gang
//!   size) is rejected at arrival with the reason, under every policy.
//!
//! The baselines scan the queue in arrival order and start every job that fits now, with
//! no head-of-line blocking: `fifo-first-fit` on the first pool in catalog order,
//! `greedy-cheapest` on the cheapest (same cost model as the dispatcher, without the green
//! term).

pub mod bound;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::str::FromStr;

use baygrid_core::catalog::{RoundTrips, TransferPrices, TransferTier};
use baygrid_core::{AcceleratorModel, Catalog, Jurisdiction, Money};

use crate::patience::{Later, Patience};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The model durations are given for.
pub const REFERENCE_MODEL: &str = "A800";
/// Latency-sensitive jobs run only within this round trip of their tenant's city.
pub const LATENCY_SENSITIVE_MAX_RTT_MS: u32 = crate::LATENCY_SENSITIVE_MAX_RTT_MS;
/// The longest run a job may ask for, in seconds on the reference model (ten years).
pub const MAX_DURATION_S: f64 = 10.0 * 365.0 * 86_400.0;
/// The most input data a job may name, in GB (an exabyte).
pub const MAX_DATA_GB: f64 = 1e9;
/// Slots in the lower bound's time grid.
pub const BOUND_SLOTS: usize = 120;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplayError {
    #[error("sites: {0}")]
    Region(String),
    #[error("`{field}`: {problem}")]
    Argument { field: String, problem: String },
    #[error("{file} record {record}: `{field}`: {problem}")]
    Trace {
        file: String,
        record: usize,
        field: String,
        problem: String,
    },
}

fn argument(field: &str, problem: impl Into<String>) -> ReplayError {
    ReplayError::Argument {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A cluster as the replay sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub site: String,
    pub city: String,
    pub jurisdiction: Jurisdiction,
    pub model: String,
    pub vendor: String,
    pub nodes: u32,
    pub per_node: u32,
    /// Per accelerator-hour, converted to CNY at the catalog's rates.
    pub price_cny: Money,
    /// The accelerator model, for run times ([`crate::cost::scale_by_tflops`]).
    pub accelerator: AcceleratorModel,
    /// BF16 TFLOPS over the reference model's.
    pub speed: f64,
    pub green_share_pct: u8,
}

impl Pool {
    /// The price per accelerator-hour as a number of CNY (for the lower bound).
    pub fn price_cny_per_hour(&self) -> f64 {
        as_cny(self.price_cny)
    }
}

/// The region: pools in catalog order, round trips and transfer prices.
#[derive(Debug, Clone)]
pub struct Region {
    pub pools: Vec<Pool>,
    pub round_trips: RoundTrips,
    /// Per GB, converted to CNY at the catalog's rates.
    pub transfer_prices: TransferPrices,
    /// BF16 TFLOPS of the reference model, which durations are given for.
    pub reference_tflops: u32,
    /// Cities with a site, in catalog order, and their jurisdiction.
    pub cities: Vec<(String, Jurisdiction)>,
}

impl Region {
    pub fn from_catalog(catalog: &Catalog) -> Result<Region, ReplayError> {
        let cny = |m| {
            catalog
                .exchange_rates
                .to_cny(m)
                .map_err(|e| ReplayError::Region(e.to_string()))
        };
        let reference = catalog
            .accelerators
            .iter()
            .find(|a| a.model == REFERENCE_MODEL)
            .ok_or_else(|| {
                ReplayError::Region(format!(
                    "accelerators: the reference model {REFERENCE_MODEL} is not listed"
                ))
            })?;
        let mut pools = Vec::new();
        for cluster in &catalog.clusters {
            let Some(offer) = catalog.offers.iter().find(|o| o.cluster == cluster.name) else {
                continue;
            };
            let site = catalog
                .sites
                .iter()
                .find(|s| s.name == cluster.site)
                .ok_or_else(|| ReplayError::Region(format!("cluster {}: no site", cluster.name)))?;
            let model = catalog
                .accelerators
                .iter()
                .find(|a| a.model == cluster.accelerator)
                .ok_or_else(|| {
                    ReplayError::Region(format!(
                        "cluster {}: accelerator {} is not listed",
                        cluster.name, cluster.accelerator
                    ))
                })?;
            pools.push(Pool {
                name: cluster.name.clone(),
                site: site.name.clone(),
                city: site.city.clone(),
                jurisdiction: site.jurisdiction,
                model: model.model.clone(),
                vendor: model.vendor.clone(),
                nodes: cluster.nodes,
                per_node: cluster.accelerators_per_node,
                price_cny: cny(offer.price_per_accelerator_hour)?,
                accelerator: model.clone(),
                speed: f64::from(model.bf16_tflops) / f64::from(reference.bf16_tflops),
                green_share_pct: site.green_share_pct,
            });
        }
        if pools.is_empty() || pools.len() > 64 {
            return Err(ReplayError::Region(format!(
                "{} clusters with offers; the replay takes 1 to 64",
                pools.len()
            )));
        }
        let mut cities: Vec<(String, Jurisdiction)> = Vec::new();
        for site in &catalog.sites {
            if !cities.iter().any(|(c, _)| *c == site.city) {
                cities.push((site.city.clone(), site.jurisdiction));
            }
        }
        Ok(Region {
            pools,
            round_trips: catalog.round_trips(),
            transfer_prices: TransferPrices {
                within_jurisdiction: cny(catalog.transfer_price_per_gb.within_jurisdiction)?,
                across_border: cny(catalog.transfer_price_per_gb.across_border)?,
            },
            reference_tflops: reference.bf16_tflops,
            cities,
        })
    }

    pub fn accelerators(&self) -> u64 {
        self.pools
            .iter()
            .map(|p| u64::from(p.nodes * p.per_node))
            .sum()
    }
}

/// Which accelerator models a job accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acceptance {
    Any,
    Nvidia,
    Ascend,
    /// These models only.
    Models(Vec<String>),
}

impl Acceptance {
    fn accepts(&self, pool: &Pool) -> bool {
        match self {
            Acceptance::Any => true,
            Acceptance::Nvidia => pool.vendor == "nvidia",
            Acceptance::Ascend => pool.vendor == "huawei",
            Acceptance::Models(models) => models.contains(&pool.model),
        }
    }
}

impl FromStr for Acceptance {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim() {
            "" | "any" => Acceptance::Any,
            "nvidia" => Acceptance::Nvidia,
            "ascend" => Acceptance::Ascend,
            list => Acceptance::Models(list.split('|').map(|m| m.trim().to_string()).collect()),
        })
    }
}

/// A tenant: its city (for latency and transfer) and its fair-share weight.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimTenant {
    pub name: String,
    pub city: String,
    pub jurisdiction: Jurisdiction,
    pub weight: f64,
    /// Nominal quota: this share of each accelerator model's capacity (`None`: no quota).
    pub quota: Option<f64>,
}

/// Gives each tenant a nominal quota of `scale` × its weight of every model's capacity (at
/// most all of it); with weights summing to 1, a scale of 1 divides the region among them.
pub fn set_quotas(tenants: &mut [SimTenant], scale: f64) -> Result<(), ReplayError> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(argument("quota", format!("{scale} must be above 0")));
    }
    for tenant in tenants {
        tenant.quota = Some((scale * tenant.weight).min(1.0));
    }
    Ok(())
}

/// Whether a tenant may take `accelerators` more of model `model`: within its nominal quota,
/// or, with borrowing, within the unused quota of the whole cohort (every tenant with a
/// quota), whose total never exceeds the quotas' sum. `freed` lists tenants' accelerators
/// of that model about to be given back.
fn admitted(
    nominal: &[Option<Vec<f64>>],
    held: &[Vec<f64>],
    tenant: usize,
    model: usize,
    accelerators: f64,
    borrowing: bool,
    freed: &[(usize, f64)],
) -> bool {
    let Some(mine) = &nominal[tenant] else {
        return true;
    };
    let holds =
        |t: usize| held[t][model] - freed.iter().filter(|f| f.0 == t).map(|f| f.1).sum::<f64>();
    if !borrowing {
        return holds(tenant) + accelerators <= mine[model] + 1e-9;
    }
    // even within its own quota a tenant waits while others borrow it: the cohort never
    // holds more than its quotas' sum (reclaim evicts the borrowers first)
    let (used, total) = nominal
        .iter()
        .enumerate()
        .filter_map(|(t, n)| n.as_ref().map(|n| (holds(t), n[model])))
        .fold((0.0, 0.0), |(u, c), (h, n)| (u + h, c + n));
    used + accelerators <= total + 1e-9
}

/// One job of a replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimJob {
    /// Seconds from the start of the replay.
    pub arrival_s: f64,
    pub nodes: u32,
    /// Accelerators on each node.
    pub per_node: u32,
    pub accepts: Acceptance,
    /// On the reference model.
    pub duration_s: f64,
    /// Index into the tenants.
    pub tenant: usize,
    pub latency_sensitive: bool,
    /// Where the job may run; `None` anywhere.
    pub jurisdictions: Option<Vec<Jurisdiction>>,
    /// Input data to move to the pool's site.
    #[serde(default)]
    pub data_gb: f64,
    /// Its priority class's priority: higher goes first and may preempt lower.
    #[serde(default)]
    pub priority: i32,
    /// Whether the dispatcher may evict it (after the grace period) and requeue it.
    #[serde(default)]
    pub preemptible: bool,
    /// When it must have ended, in seconds from the start of the replay: no pool where it
    /// would end later even starting on arrival is used, and the dispatcher puts a job due
    /// sooner first among its tenant's.
    #[serde(default)]
    pub deadline_s: Option<f64>,
}

impl SimJob {
    pub fn accelerators(&self) -> u32 {
        self.nodes * self.per_node
    }

    /// The limits on a job's figures, whoever made it: a run of at most ten years, input
    /// from 0 to an exabyte, a deadline after its arrival. `Err` names the field and the
    /// problem.
    pub fn check_limits(&self) -> Result<(), (&'static str, String)> {
        if self.duration_s > MAX_DURATION_S {
            return Err((
                "duration_s",
                format!("{} is above {MAX_DURATION_S} (ten years)", self.duration_s),
            ));
        }
        if !(0.0..=MAX_DATA_GB).contains(&self.data_gb) {
            return Err((
                "data_gb",
                format!("{} must be from 0 to {MAX_DATA_GB}", self.data_gb),
            ));
        }
        match self.deadline_s {
            Some(deadline) if !(deadline.is_finite() && deadline > self.arrival_s) => Err((
                "deadline_s",
                format!("{deadline} must be after the arrival {}", self.arrival_s),
            )),
            _ => Ok(()),
        }
    }
}

/// The job sizes of the synthetic mix (Helios-like, mean about 3.9): accelerators and share.
pub const SIZE_MIX: [(u32, f64); 8] = [
    (1, 0.70),
    (2, 0.06),
    (4, 0.08),
    (8, 0.10),
    (16, 0.03),
    (32, 0.02),
    (64, 0.007),
    (128, 0.003),
];

/// Tenants of the synthetic workload: eight, with Zipf weights (1, 1/2, … 1/8, normalised),
/// in the region's cities in turn.
pub fn synthetic_tenants(region: &Region) -> Vec<SimTenant> {
    let raw: Vec<f64> = (1..=8).map(|i| 1.0 / f64::from(i)).collect();
    let total: f64 = raw.iter().sum();
    raw.iter()
        .enumerate()
        .map(|(i, w)| {
            let (city, jurisdiction) = region.cities[i % region.cities.len()].clone();
            SimTenant {
                name: format!("tenant-{}", i + 1),
                city,
                jurisdiction,
                weight: w / total,
                quota: None,
            }
        })
        .collect()
}

fn draw_weighted<T: Copy>(rng: &mut StdRng, items: &[(T, f64)]) -> T {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.gen::<f64>() * total;
    for &(item, w) in items {
        if x < w {
            return item;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

/// `count` jobs with Poisson arrivals at the rate that makes the offered load (accelerator
/// seconds asked ÷ the region's accelerator seconds) equal `load`. Durations are drawn from
/// `runtimes` (seconds; the real Philly runtimes); tenants by weight.
pub fn synthetic_jobs(
    region: &Region,
    tenants: &[SimTenant],
    runtimes: &[f64],
    load: f64,
    count: usize,
    seed: u64,
) -> Result<Vec<SimJob>, ReplayError> {
    if !(load.is_finite() && load > 0.0) {
        return Err(argument("load", format!("{load} must be above 0")));
    }
    if count == 0 {
        return Err(argument("jobs", "must be at least 1"));
    }
    let runtimes: Vec<f64> = runtimes.iter().map(|r| r.max(1.0)).collect();
    if runtimes.is_empty() {
        return Err(argument("runtimes", "no runtimes to draw from"));
    }
    let mean_runtime = runtimes.iter().sum::<f64>() / runtimes.len() as f64;
    let mean_size: f64 = SIZE_MIX.iter().map(|(s, p)| f64::from(*s) * p).sum::<f64>()
        / SIZE_MIX.iter().map(|(_, p)| p).sum::<f64>();
    let rate = load * region.accelerators() as f64 / (mean_size * mean_runtime);
    let mut rng = StdRng::seed_from_u64(seed);
    let tenant_weights: Vec<(usize, f64)> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.weight))
        .collect();
    let mut now = 0.0;
    let mut jobs = Vec::with_capacity(count);
    for _ in 0..count {
        now += -(1.0 - rng.gen::<f64>()).ln() / rate;
        let size = draw_weighted(&mut rng, &SIZE_MIX);
        let (nodes, per_node) = if size > 8 { (size / 8, 8) } else { (1, size) };
        let accepts = draw_weighted(&mut rng, &[(0u8, 0.5), (1, 0.3), (2, 0.2)]);
        let tenant = draw_weighted(&mut rng, &tenant_weights);
        let latency_sensitive = rng.gen::<f64>() < 0.3;
        let restricted = rng.gen::<f64>() < 0.1;
        jobs.push(SimJob {
            arrival_s: now,
            nodes,
            per_node,
            accepts: match accepts {
                0 => Acceptance::Any,
                1 => Acceptance::Nvidia,
                _ => Acceptance::Ascend,
            },
            duration_s: runtimes[rng.gen_range(0..runtimes.len())],
            tenant,
            latency_sensitive,
            jurisdictions: restricted.then(|| vec![tenants[tenant].jurisdiction]),
            data_gb: 0.0,
            priority: 0,
            preemptible: false,
            deadline_s: None,
        });
    }
    Ok(jobs)
}

/// Marks each latency-insensitive job preemptible with probability `share` (batch training
/// that checkpoints; latency-sensitive jobs are interactive and never are). The draws come
/// from their own stream, so the jobs themselves are the same for a seed whatever the share.
pub fn mark_preemptible(jobs: &mut [SimJob], share: f64, seed: u64) -> Result<(), ReplayError> {
    if !(0.0..=1.0).contains(&share) {
        return Err(argument(
            "preemptible",
            format!("{share} must be from 0 to 1"),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7072_6565_6d70_7421);
    for job in jobs {
        let draw = rng.gen::<f64>();
        job.preemptible = !job.latency_sensitive && draw < share;
    }
    Ok(())
}

/// The policies in the replay harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayPolicy {
    Baygrid,
    FifoFirstFit,
    GreedyCheapest,
}

impl ReplayPolicy {
    pub const ALL: [ReplayPolicy; 3] = [
        ReplayPolicy::Baygrid,
        ReplayPolicy::FifoFirstFit,
        ReplayPolicy::GreedyCheapest,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ReplayPolicy::Baygrid => "baygrid",
            ReplayPolicy::FifoFirstFit => "fifo-first-fit",
            ReplayPolicy::GreedyCheapest => "greedy-cheapest",
        }
    }
}

impl fmt::Display for ReplayPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReplayPolicy {
    type Err = ReplayError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ReplayPolicy::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| {
                argument(
                    "policy",
                    format!("unknown replay policy `{text}` (baygrid, fifo-first-fit or greedy-cheapest)"),
                )
            })
    }
}

/// Knobs of the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DispatchConfig {
    /// CNY added per CNY of compute for each unit of non-green power share (0, the default,
    /// ignores it; 0.05 makes a site on 30% green power 3.5% dearer in the choice).
    pub green_weight: f64,
    /// A blocked job reserves nodes only when it could start on them within this many
    /// seconds; a reservation further out would keep its nodes from long jobs for longer than
    /// it can save (on the sample region at load 0.85, one day: mean wait 217 s; no limit:
    /// 322 s).
    pub reservation_horizon_s: f64,
    /// A blocked job that could not start within this many seconds by running jobs' ends
    /// may evict preemptible jobs instead: of a lower priority class, or of a tenant that
    /// would still hold a larger weighted dominant share than the job's own afterwards
    /// (back to fair share). Infinite: never.
    pub preemption_wait_s: f64,
    /// An evicted job runs this long to checkpoint and stop before its nodes are free; then
    /// it is requeued, once per eviction.
    pub grace_s: f64,
    /// Tenants with a quota may borrow the cohort's unused quota (every tenant with a quota
    /// is in one cohort); borrowed capacity is reclaimed by preempting the borrower's
    /// preemptible jobs when a tenant within its own quota needs it.
    pub borrowing: bool,
    /// How long a latency-insensitive job may wait for a cheaper pool expected to free up
    /// (the dispatcher only; share 0: never).
    pub patience: Patience,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            green_weight: 0.0,
            reservation_horizon_s: 86_400.0,
            preemption_wait_s: 3_600.0,
            grace_s: 30.0,
            borrowing: true,
            patience: Patience::default(),
        }
    }
}

/// Where a job may ever run: a bit per pool, or every pool's reason it may run nowhere.
pub fn eligible_pools(region: &Region, tenant: &SimTenant, job: &SimJob) -> Result<u64, String> {
    let rtts: Vec<Option<u32>> = region
        .pools
        .iter()
        .map(|p| region.round_trips.between(&tenant.city, &p.city))
        .collect();
    eligible_with(region, tenant, job, &rtts)
}

/// Why `pool` can never hold `job`, or `None` when it can (`rtt`: tenant to pool). The
/// check allocates nothing; [`refusal_text`] words it for a rejected job.
fn refusal(job: &SimJob, pool: &Pool, rtt: Option<u32>) -> Option<Refusal> {
    if !job.accepts.accepts(pool) {
        Some(Refusal::Model)
    } else if job.per_node > pool.per_node {
        Some(Refusal::PerNode)
    } else if job.nodes > pool.nodes {
        Some(Refusal::Gang)
    } else if job
        .jurisdictions
        .as_ref()
        .is_some_and(|allowed| !allowed.contains(&pool.jurisdiction))
    {
        Some(Refusal::Jurisdiction)
    } else if job.latency_sensitive && rtt.is_none_or(|ms| ms > LATENCY_SENSITIVE_MAX_RTT_MS) {
        Some(Refusal::Latency)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Model,
    PerNode,
    Gang,
    Jurisdiction,
    Latency,
}

fn refusal_text(refusal: Refusal, job: &SimJob, pool: &Pool, tenant: &SimTenant) -> String {
    match refusal {
        Refusal::Model => format!("{} is not accepted", pool.model),
        Refusal::PerNode => format!("{} per node, nodes have {}", job.per_node, pool.per_node),
        Refusal::Gang => format!("a gang of {} nodes, the pool has {}", job.nodes, pool.nodes),
        Refusal::Jurisdiction => format!("in {}, not allowed", pool.jurisdiction),
        Refusal::Latency => {
            format!(
                "more than {LATENCY_SENSITIVE_MAX_RTT_MS} ms from {}",
                tenant.city
            )
        }
    }
}

/// [`eligible_pools`] with the tenant's round trips to each pool already looked up.
fn eligible_with(
    region: &Region,
    tenant: &SimTenant,
    job: &SimJob,
    rtts: &[Option<u32>],
) -> Result<u64, String> {
    let mut mask = 0u64;
    let mut refused = Vec::new();
    for (i, (pool, rtt)) in region.pools.iter().zip(rtts).enumerate() {
        match refusal(job, pool, *rtt) {
            None => mask |= 1u64 << i,
            Some(why) => refused.push((pool, why)),
        }
    }
    if mask != 0 {
        return Ok(mask);
    }
    let reasons: Vec<String> = refused
        .into_iter()
        .map(|(pool, why)| format!("{}: {}", pool.name, refusal_text(why, job, pool, tenant)))
        .collect();
    Err(format!(
        "no cluster can ever hold this job ({})",
        reasons.join("; ")
    ))
}

/// The cost of running `job` on `pool`, in CNY: compute, transfer and the green term.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostBreakdown {
    pub compute_cny: f64,
    pub transfer_cny: f64,
    pub green_cny: f64,
    pub runtime_s: f64,
}

impl CostBreakdown {
    pub fn total(&self) -> f64 {
        self.compute_cny + self.transfer_cny + self.green_cny
    }
}

pub fn cost_on(
    region: &Region,
    tenant: &SimTenant,
    job: &SimJob,
    pool: &Pool,
    config: &DispatchConfig,
) -> Result<CostBreakdown, ReplayError> {
    let reference_ms = (job.duration_s * 1000.0).round().max(1.0) as u64;
    let millis = crate::cost::scale_by_tflops(
        reference_ms,
        Some(region.reference_tflops),
        Some(&pool.accelerator),
    );
    let tier = TransferTier::between(
        (&tenant.city, tenant.jurisdiction),
        (&pool.city, pool.jurisdiction),
    );
    let bytes = (job.data_gb * 1e9).round() as u64;
    let run = crate::cost::transfer(bytes, tier, &region.transfer_prices)
        .and_then(|transfer| {
            crate::cost::RunCost::new(
                pool.price_cny,
                u64::from(job.accelerators()),
                millis,
                transfer,
                config.green_weight,
                pool.green_share_pct,
            )
        })
        .map_err(|e| argument("job", format!("its cost on {}: {e}", pool.name)))?;
    Ok(CostBreakdown {
        compute_cny: as_cny(run.compute),
        transfer_cny: as_cny(run.transfer),
        green_cny: as_cny(run.green),
        runtime_s: millis as f64 / 1000.0,
    })
}

fn as_cny(amount: Money) -> f64 {
    amount.minor as f64 / 100.0
}

/// Each job's cost on each pool it may use (`None` elsewhere), a row of `pools` per job.
struct CostTable {
    pools: usize,
    cells: Vec<Option<CostBreakdown>>,
}

impl CostTable {
    fn row(&self, job: usize) -> &[Option<CostBreakdown>] {
        &self.cells[job * self.pools..(job + 1) * self.pools]
    }

    fn rows(&self, jobs: usize) -> impl Iterator<Item = &[Option<CostBreakdown>]> {
        (0..jobs).map(|job| self.row(job))
    }
}

/// One pool's live state.
#[derive(Debug, Clone)]
struct PoolState {
    free: Vec<u32>,
    free_total: u32,
    /// Nodes by how many accelerators they have free (index = free count), in index order.
    levels: Vec<BTreeSet<u32>>,
    /// Running jobs on each node: (job, estimated end, accelerators it holds there).
    running: Vec<Vec<(usize, f64, u32)>>,
}

impl PoolState {
    fn new(pool: &Pool) -> Self {
        let mut levels = vec![BTreeSet::new(); pool.per_node as usize + 1];
        levels[pool.per_node as usize] = (0..pool.nodes).collect();
        PoolState {
            free: vec![pool.per_node; pool.nodes as usize],
            free_total: pool.nodes * pool.per_node,
            levels,
            running: vec![Vec::new(); pool.nodes as usize],
        }
    }

    fn set_free(&mut self, node: u32, free: u32) {
        let old = self.free[node as usize];
        self.levels[old as usize].remove(&node);
        self.levels[free as usize].insert(node);
        self.free[node as usize] = free;
        self.free_total = self.free_total + free - old;
    }

    /// Nodes for a gang, not using `excluded` ones: the fullest that fit (`pack`), or the
    /// lowest-numbered.
    fn fit(&self, job: &SimJob, excluded: &[u32], pack: bool) -> Option<Vec<u32>> {
        let wanted = job.nodes as usize;
        if job.accelerators() > self.free_total || job.per_node as usize >= self.levels.len() {
            return None;
        }
        let usable = self.levels[job.per_node as usize..]
            .iter()
            .map(|l| l.len())
            .sum::<usize>();
        if usable < wanted {
            return None;
        }
        let mut chosen = Vec::with_capacity(wanted);
        for level in &self.levels[job.per_node as usize..] {
            let take = level.iter().filter(|n| !excluded.contains(n));
            if pack {
                chosen.extend(take.take(wanted - chosen.len()));
                if chosen.len() == wanted {
                    break;
                }
            } else {
                chosen.extend(take.take(wanted));
            }
        }
        if chosen.len() < wanted {
            return None;
        }
        if !pack {
            chosen.sort_unstable();
            chosen.truncate(wanted);
        }
        Some(chosen)
    }

    /// When `count` nodes will each have `per_node` free, by running jobs' estimated ends:
    /// the time and the nodes.
    fn earliest(&self, count: u32, per_node: u32, capacity: u32, now: f64) -> (f64, Vec<u32>) {
        let mut when: Vec<(f64, u32)> = self
            .running
            .iter()
            .enumerate()
            .map(|(n, jobs)| {
                if self.free[n] >= per_node {
                    return (now, n as u32);
                }
                // the node frees in order of its jobs' ends
                let mut ends: Vec<(f64, u32)> = jobs.iter().map(|(_, e, a)| (*e, *a)).collect();
                ends.sort_by(|a, b| a.0.total_cmp(&b.0));
                let mut free = self.free[n];
                let mut at = now;
                for (end, accelerators) in ends {
                    if free >= per_node {
                        break;
                    }
                    at = end;
                    free = (free + accelerators).min(capacity);
                }
                (at.max(now), n as u32)
            })
            .collect();
        when.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        when.truncate(count as usize);
        let at = when.last().map(|w| w.0).unwrap_or(now);
        (at, when.into_iter().map(|w| w.1).collect())
    }
}

/// Gives `r.job` the reservation of `r.pool`, in place of any it held elsewhere.
fn reserve(reservations: &mut [Option<Reservation>], r: Reservation) {
    for slot in reservations.iter_mut() {
        if slot.as_ref().is_some_and(|s| s.job == r.job) {
            *slot = None;
        }
    }
    let pool = r.pool;
    reservations[pool] = Some(r);
}

/// A pool's reservation for a blocked job: pool, start, nodes.
#[derive(Debug, Clone)]
struct Reservation {
    job: usize,
    pool: usize,
    start: f64,
    nodes: Vec<u32>,
}

/// What one replay measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayResult {
    pub policy: ReplayPolicy,
    pub jobs: usize,
    pub rejected: usize,
    pub makespan_s: f64,
    /// Busy accelerator-seconds ÷ the site's accelerator-seconds over the makespan.
    pub utilisation: BTreeMap<String, f64>,
    pub mean_wait_s: f64,
    pub p99_wait_s: f64,
    pub max_wait_s: f64,
    pub mean_completion_s: f64,
    pub total_cost_cny: f64,
    /// Time-weighted Jain's index over the tenants' dominant shares ÷ weights, while jobs
    /// wait.
    pub jain_fairness: f64,
    /// The same index over the time before the last job arrives only (the queue's steady
    /// state, without the drain, when the last few long jobs wait alone).
    pub jain_fairness_arriving: f64,
    pub placements: usize,
    /// Placements per second of wall time of the whole replay.
    pub decisions_per_s: f64,
    /// Accepted jobs' (pools they may use, arrival second, reference accelerator-seconds)
    /// for the lower bound.
    #[serde(skip)]
    pub demand: Vec<(u64, f64, f64)>,
    /// Reservation starts that a later placement pushed back (backfill's invariant: 0).
    pub reservations_delayed: usize,
    /// Running jobs evicted, and evicted jobs put back in the queue (one per eviction).
    pub preemptions: usize,
    pub requeues: usize,
    /// Accelerator-seconds evicted jobs had run (and will run again).
    pub lost_accelerator_s: f64,
    /// Evicted runs: job, pool, start, stop.
    #[serde(skip)]
    pub preempted_runs: Vec<(usize, usize, f64, f64)>,
    /// The first rejection reasons, for the report.
    pub rejections: Vec<String>,
    /// Accepted jobs with a deadline that ended after it.
    pub deadlines_missed: usize,
    /// Each accepted job's start and end, by index (`None` for rejected).
    #[serde(skip)]
    pub schedule: Vec<Option<(usize, f64, f64)>>,
}

/// Runs `jobs` (sorted by arrival) on the region with one policy, to the end.
pub fn simulate(
    region: &Region,
    tenants: &[SimTenant],
    jobs: &[SimJob],
    policy: ReplayPolicy,
    config: &DispatchConfig,
) -> Result<ReplayResult, ReplayError> {
    simulate_until(region, tenants, jobs, policy, config, f64::INFINITY)
}

/// Runs `jobs` (sorted by arrival) with one policy, handling no event after `until_s`
/// (with every job arriving at 0 and `until_s` 0, exactly one scheduling cycle).
pub fn simulate_until(
    region: &Region,
    tenants: &[SimTenant],
    jobs: &[SimJob],
    policy: ReplayPolicy,
    config: &DispatchConfig,
    until_s: f64,
) -> Result<ReplayResult, ReplayError> {
    let started = std::time::Instant::now();
    for (i, pair) in jobs.windows(2).enumerate() {
        if pair[1].arrival_s < pair[0].arrival_s {
            return Err(argument(
                "trace",
                format!("job {} arrives before job {i}", i + 1),
            ));
        }
    }
    for (i, job) in jobs.iter().enumerate() {
        if job.tenant >= tenants.len() {
            return Err(argument(
                "tenant",
                format!("job {i} names tenant {} of {}", job.tenant, tenants.len()),
            ));
        }
        if job.nodes == 0 || job.per_node == 0 || job.duration_s.is_nan() || job.duration_s <= 0.0 {
            return Err(argument(
                "job",
                format!("job {i} asks no accelerators or no time"),
            ));
        }
        job.check_limits()
            .map_err(|(field, problem)| argument(field, format!("job {i}: {problem}")))?;
    }
    let pools = &region.pools;
    let mut state: Vec<PoolState> = pools.iter().map(PoolState::new).collect();
    let rtts: Vec<Vec<Option<u32>>> = tenants
        .iter()
        .map(|t| {
            pools
                .iter()
                .map(|p| region.round_trips.between(&t.city, &p.city))
                .collect()
        })
        .collect();
    let masks: Vec<Result<u64, String>> = jobs
        .iter()
        .map(|j| eligible_with(region, &tenants[j.tenant], j, &rtts[j.tenant]))
        .collect();
    // every job's price on every pool it may use, in one table: a row per job
    let mut cells = Vec::with_capacity(jobs.len() * pools.len());
    for (j, mask) in jobs.iter().zip(&masks) {
        for (p, pool) in pools.iter().enumerate() {
            cells.push(match mask {
                Ok(m) if m & (1 << p) != 0 => {
                    Some(cost_on(region, &tenants[j.tenant], j, pool, config)?)
                }
                _ => None,
            });
        }
    }
    let costs = CostTable {
        pools: pools.len(),
        cells,
    };
    // model capacities for dominant shares
    let mut models: Vec<String> = pools.iter().map(|p| p.model.clone()).collect();
    models.sort();
    models.dedup();
    let pool_model: Vec<usize> = pools
        .iter()
        .map(|p| models.iter().position(|m| *m == p.model).expect("listed"))
        .collect();
    let mut model_capacity = vec![0f64; models.len()];
    for (p, pool) in pools.iter().enumerate() {
        model_capacity[pool_model[p]] += f64::from(pool.nodes * pool.per_node);
    }
    let mut held = vec![vec![0f64; models.len()]; tenants.len()];
    // quotas bind the dispatcher; the baselines have none
    let nominal: Vec<Option<Vec<f64>>> = tenants
        .iter()
        .map(|t| {
            t.quota
                .filter(|_| policy == ReplayPolicy::Baygrid)
                .map(|q| model_capacity.iter().map(|c| (q * c).floor()).collect())
        })
        .collect();
    let quota_admits = |held: &[Vec<f64>], j: &SimJob, p: usize| {
        let acc = f64::from(j.accelerators());
        admitted(
            &nominal,
            held,
            j.tenant,
            pool_model[p],
            acc,
            config.borrowing,
            &[],
        )
    };
    // fail fast: a job larger than its tenant's quota (or, borrowing, the cohort's) on every
    // pool it may use could never be admitted
    let masks: Vec<Result<u64, String>> = masks
        .into_iter()
        .zip(jobs)
        .map(|(mask, j)| {
            let mask = mask?;
            let Some(mine) = &nominal[j.tenant] else {
                return Ok(mask);
            };
            let acc = f64::from(j.accelerators());
            let mut within = 0u64;
            for (p, &m) in pool_model.iter().enumerate() {
                let limit = if config.borrowing {
                    nominal.iter().flatten().map(|n| n[m]).sum()
                } else {
                    mine[m]
                };
                if mask & (1 << p) != 0 && acc <= limit + 1e-9 {
                    within |= 1 << p;
                }
            }
            if within == 0 {
                Err(format!(
                    "no cluster can ever hold this job ({acc} accelerators exceed {}'s quota{} on every cluster it may use)",
                    tenants[j.tenant].name,
                    if config.borrowing { " and what its cohort could lend" } else { "" }
                ))
            } else {
                Ok(within)
            }
        })
        .collect();

    // fail fast: a job that could end by its deadline on no pool it may use, even starting
    // the moment it arrives; the others keep only the pools where it could
    let masks: Vec<Result<u64, String>> = masks
        .into_iter()
        .zip(jobs)
        .zip(costs.rows(jobs.len()))
        .map(|((mask, j), cost)| {
            let mask = mask?;
            let Some(deadline) = j.deadline_s else {
                return Ok(mask);
            };
            let mut in_time = 0u64;
            let mut soonest = f64::INFINITY;
            for (p, c) in cost.iter().enumerate() {
                if let Some(c) = c.filter(|_| mask & (1 << p) != 0) {
                    let end = j.arrival_s + c.runtime_s;
                    soonest = soonest.min(end);
                    if end <= deadline {
                        in_time |= 1 << p;
                    }
                }
            }
            if in_time == 0 {
                Err(format!(
                    "no cluster it may use can end it by its deadline ({deadline:.0} s; started on arrival, the soonest ends at {soonest:.0} s)"
                ))
            } else {
                Ok(in_time)
            }
        })
        .collect();

    let mut schedule: Vec<Option<(usize, f64, f64)>> = vec![None; jobs.len()];
    let mut pending: Vec<usize> = Vec::new();
    // (end, job, run): an eviction pushes an earlier end; the run's old entry is then stale
    let mut completions: BinaryHeap<Reverse<(u64, usize, u32)>> = BinaryHeap::new();
    let mut runs = vec![0u32; jobs.len()];
    let mut evicting = vec![false; jobs.len()];
    let mut preempted_runs: Vec<(usize, usize, f64, f64)> = Vec::new();
    let mut requeues = 0;
    let mut busy = vec![0f64; pools.len()];
    let mut rejected = 0;
    let mut rejections = Vec::new();
    let mut next = 0;
    let mut now: f64;
    let mut last_event = jobs.first().map(|j| j.arrival_s).unwrap_or(0.0);
    let mut fairness_area = 0.0;
    let mut fairness_time = 0.0;
    let (mut arriving_area, mut arriving_time) = (0.0, 0.0);
    let last_arrival = jobs.last().map_or(0.0, |j| j.arrival_s);
    let mut placements = 0;
    // at most one reservation per pool, and one per job
    let mut reservations: Vec<Option<Reservation>> = vec![None; pools.len()];
    let mut reservations_delayed = 0;
    let mut preemptions = 0;
    let mut lost_accelerator_s = 0.0;
    let mut preemptible_running = 0usize;
    let key = |t: f64| (t * 1000.0).round() as u64;
    let mut pending_per_tenant = vec![0usize; tenants.len()];
    // a job without a deadline is due last
    let due = |j: usize| jobs[j].deadline_s.unwrap_or(f64::INFINITY);
    // the cycle in which each job was last looked at
    let mut cycle = 0u64;
    let mut seen = vec![0u64; jobs.len()];
    loop {
        let next_arrival = jobs.get(next).map(|j| j.arrival_s);
        let next_end = completions
            .peek()
            .map(|Reverse((t, _, _))| *t as f64 / 1000.0);
        now = match (next_arrival, next_end) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(e)) => e,
            (Some(a), Some(e)) => a.min(e),
        };
        if now > until_s {
            break;
        }
        // fairness over the interval just ended
        if !pending.is_empty() && now > last_event {
            if let Some(jain) = jain_index(&held, tenants, &model_capacity, &pending_per_tenant) {
                fairness_area += jain * (now - last_event);
                fairness_time += now - last_event;
                let arriving = now.min(last_arrival) - last_event;
                if arriving > 0.0 {
                    arriving_area += jain * arriving;
                    arriving_time += arriving;
                }
            }
        }
        last_event = now;
        while let Some(Reverse((t, job, run))) = completions.peek().copied() {
            if t > key(now) {
                break;
            }
            completions.pop();
            let Some((p, start, end)) = schedule[job] else {
                continue;
            };
            if run != runs[job] || key(end) != t {
                // an eviction moved this run's end
                continue;
            }
            let j = &jobs[job];
            let pool = &mut state[p];
            let mut freed = Vec::new();
            for (node, running) in pool.running.iter_mut().enumerate() {
                let before = running.len();
                running.retain(|(id, _, _)| *id != job);
                if running.len() != before {
                    freed.push(node as u32);
                }
            }
            for node in freed {
                let free = pool.free[node as usize] + j.per_node;
                pool.set_free(node, free);
            }
            held[j.tenant][pool_model[p]] -= f64::from(j.accelerators());
            if j.preemptible {
                preemptible_running -= 1;
            }
            if evicting[job] {
                // stopped after its grace period: back in the queue, once
                evicting[job] = false;
                preempted_runs.push((job, p, start, end));
                schedule[job] = None;
                debug_assert!(!pending.contains(&job), "requeued once");
                pending.push(job);
                pending_per_tenant[j.tenant] += 1;
                requeues += 1;
            }
        }
        while next < jobs.len() && jobs[next].arrival_s <= now {
            match &masks[next] {
                Ok(_) => {
                    pending.push(next);
                    pending_per_tenant[jobs[next].tenant] += 1;
                }
                Err(reason) => {
                    rejected += 1;
                    if rejections.len() < 5 {
                        rejections.push(format!("job {next}: {reason}"));
                    }
                }
            }
            next += 1;
        }
        if pending.is_empty() {
            continue;
        }
        // the order the policy looks at the queue in
        if policy == ReplayPolicy::Baygrid {
            let share = |t: usize| {
                held[t]
                    .iter()
                    .zip(&model_capacity)
                    .map(|(h, c)| h / c)
                    .fold(0.0f64, f64::max)
                    / tenants[t].weight
            };
            let shares: Vec<f64> = (0..tenants.len()).map(share).collect();
            pending.sort_by(|&a, &b| {
                jobs[b]
                    .priority
                    .cmp(&jobs[a].priority)
                    .then(shares[jobs[a].tenant].total_cmp(&shares[jobs[b].tenant]))
                    .then(due(a).total_cmp(&due(b)))
                    .then(a.cmp(&b))
            });
        }
        for slot in &mut reservations {
            if slot.as_ref().is_some_and(|r| schedule[r.job].is_some()) {
                *slot = None;
            }
        }
        let mut started_now = Vec::new();
        // jobs ahead of a reservation's holder in this cycle's order may preempt to take its
        // pool over; one preemption per cycle, and none while nothing preemptible runs
        cycle += 1;
        let mut preempted_this_cycle = false;
        for &job in &pending {
            let j = &jobs[job];
            seen[job] = cycle;
            let before_holder = reservations.iter().flatten().any(|r| seen[r.job] != cycle);
            // a pool's reservation this job may take: free, its own, a lower class's, or
            // one of its tenant's jobs of its class that is due later
            let may_reserve = |reservations: &[Option<Reservation>], p: usize| {
                reservations[p].as_ref().is_none_or(|r| {
                    let holder = &jobs[r.job];
                    r.job == job
                        || holder.priority < j.priority
                        || (holder.priority == j.priority
                            && holder.tenant == j.tenant
                            && due(job) < due(r.job))
                })
            };
            let mask = *masks[job].as_ref().expect("pending jobs are eligible");
            let mut best: Option<(f64, u32, usize, Vec<u32>)> = None;
            for p in 0..pools.len() {
                if mask & (1 << p) == 0 || state[p].free_total < j.accelerators() {
                    continue;
                }
                if !quota_admits(&held, j, p) {
                    continue;
                }
                let cost = costs.row(job)[p].expect("eligible pools are costed");
                // the nodes another job reserved, unless it may take the reservation over
                let excluded: &[u32] = match &reservations[p] {
                    Some(r)
                        if r.job != job
                            && now + cost.runtime_s > r.start
                            && !may_reserve(&reservations, p) =>
                    {
                        &r.nodes
                    }
                    _ => &[],
                };
                let pack = policy == ReplayPolicy::Baygrid;
                let Some(nodes) = state[p].fit(j, excluded, pack) else {
                    continue;
                };
                let rtt = rtts[j.tenant][p].unwrap_or(u32::MAX);
                let score = match policy {
                    ReplayPolicy::FifoFirstFit => p as f64,
                    ReplayPolicy::GreedyCheapest => cost.compute_cny + cost.transfer_cny,
                    ReplayPolicy::Baygrid => cost.total(),
                };
                let better = best.as_ref().is_none_or(|(s, r, _, _)| {
                    score < *s - 1e-9 || ((score - *s).abs() <= 1e-9 && rtt < *r)
                });
                if better {
                    best = Some((score, rtt, p, nodes));
                }
                if policy == ReplayPolicy::FifoFirstFit {
                    break;
                }
            }
            // a latency-insensitive job may wait a little for a cheaper pool it can reserve
            let patient = best
                .as_ref()
                .filter(|_| policy == ReplayPolicy::Baygrid && !j.latency_sensitive)
                .and_then(|(_, _, now_pool, _)| {
                    let now_cost = costs.row(job)[*now_pool].expect("costed");
                    let patience = &config.patience;
                    if patience.until(j.arrival_s, now_cost.runtime_s) <= now {
                        return None;
                    }
                    // only pools cheap enough are asked when they free up (it is costly)
                    let worth = patience.worth(now_cost.total());
                    let mut later: Vec<(usize, Later, Vec<u32>)> = (0..pools.len())
                        .filter(|&p| {
                            mask & (1 << p) != 0
                                && pools[p].nodes >= j.nodes
                                // it waits only where it can hold the nodes meanwhile
                                && may_reserve(&reservations, p)
                                && costs.row(job)[p].is_some_and(|c| c.total() < worth)
                                && quota_admits(&held, j, p)
                        })
                        .map(|p| {
                            let (at, nodes) =
                                state[p].earliest(j.nodes, j.per_node, pools[p].per_node, now);
                            let cost = costs.row(job)[p].expect("costed");
                            let later = Later {
                                start_s: at,
                                cost: cost.total(),
                            };
                            (p, later, nodes, cost.runtime_s)
                        })
                        // never waiting past its deadline
                        .filter(|(_, later, _, runtime_s)| {
                            j.deadline_s.is_none_or(|d| later.start_s + runtime_s <= d)
                        })
                        .map(|(p, later, nodes, _)| (p, later, nodes))
                        .collect();
                    let (i, _) = patience.wait_for(
                        j.arrival_s,
                        now_cost.runtime_s,
                        now_cost.total(),
                        later.iter().enumerate().map(|(i, l)| (i, l.1)),
                    )?;
                    Some(later.swap_remove(i))
                });
            if let Some((pool, later, nodes)) = patient {
                // it keeps the cheaper pool's nodes as a blocked job would
                reserve(
                    &mut reservations,
                    Reservation {
                        job,
                        pool,
                        start: later.start_s,
                        nodes,
                    },
                );
                continue;
            }
            if let Some((_, _, p, nodes)) = best {
                let cost = costs.row(job)[p].expect("costed");
                // times are kept to the millisecond, so an end and the start it frees agree
                let end = key(now + cost.runtime_s) as f64 / 1000.0;
                let overlaps = reservations[p].as_ref().is_some_and(|r| {
                    r.job != job && end > r.start && nodes.iter().any(|n| r.nodes.contains(n))
                });
                if overlaps {
                    if may_reserve(&reservations, p) {
                        // taken over: its holder reserves afresh when its turn comes
                        reservations[p] = None;
                    } else {
                        reservations_delayed += 1;
                    }
                }
                for &n in &nodes {
                    let free = state[p].free[n as usize] - j.per_node;
                    state[p].set_free(n, free);
                    state[p].running[n as usize].push((job, end, j.per_node));
                }
                held[j.tenant][pool_model[p]] += f64::from(j.accelerators());
                busy[p] += f64::from(j.accelerators()) * cost.runtime_s;
                schedule[job] = Some((p, now, end));
                runs[job] += 1;
                completions.push(Reverse((key(end), job, runs[job])));
                if j.preemptible {
                    preemptible_running += 1;
                }
                started_now.push(job);
                placements += 1;
                for slot in &mut reservations {
                    if slot.as_ref().is_some_and(|r| r.job == job) {
                        *slot = None;
                    }
                }
            } else if policy == ReplayPolicy::Baygrid && {
                let reservable =
                    (0..pools.len()).any(|p| mask & (1 << p) != 0 && may_reserve(&reservations, p));
                reservable || (before_holder && preemptible_running > 0 && !preempted_this_cycle)
            } {
                // backfill: each pool's reservation goes to the first blocked job in order
                // that starts there first (a job of a higher priority class takes one over);
                // a job ahead of a holder takes its pool only by preempting
                let mut choice: Option<(f64, f64, usize, Vec<u32>)> = None;
                let mut soonest: Option<f64> = None;
                for p in 0..pools.len() {
                    if mask & (1 << p) == 0 || !quota_admits(&held, j, p) {
                        // a job held back by its quota reserves nothing there
                        continue;
                    }
                    let (at, nodes) =
                        state[p].earliest(j.nodes, j.per_node, pools[p].per_node, now);
                    soonest = Some(soonest.map_or(at, |s: f64| s.min(at)));
                    if !may_reserve(&reservations, p) {
                        continue;
                    }
                    let cost = costs.row(job)[p].expect("costed").total();
                    if choice
                        .as_ref()
                        .is_none_or(|(t, c, _, _)| at < *t || (at == *t && cost < *c))
                    {
                        choice = Some((at, cost, p, nodes));
                    }
                }
                let within =
                    |c: &(f64, f64, usize, Vec<u32>)| c.0 - now <= config.reservation_horizon_s;
                let waits_long = soonest.is_none_or(|at| at - now > config.preemption_wait_s);
                let view = PreemptView {
                    jobs,
                    tenants,
                    state: &state,
                    schedule: &schedule,
                    evicting: &evicting,
                    held: &held,
                    model_capacity: &model_capacity,
                    pool_model: &pool_model,
                    nominal: &nominal,
                    borrowing: config.borrowing,
                };
                let plan = (waits_long && preemptible_running > 0 && !preempted_this_cycle)
                    .then(|| {
                        plan_preemption(
                            &view,
                            job,
                            mask,
                            &reservations,
                            costs.row(job),
                            now,
                            config,
                        )
                    })
                    .flatten();
                if let Some(plan) = plan {
                    // evict: each victim stops at the end of its grace period and is requeued
                    let stop = key(now + config.grace_s) as f64 / 1000.0;
                    for &v in &plan.victims {
                        let (vp, start, end) = schedule[v].expect("victims are running");
                        schedule[v] = Some((vp, start, stop));
                        for running in &mut state[vp].running {
                            for entry in running.iter_mut().filter(|e| e.0 == v) {
                                entry.1 = stop;
                            }
                        }
                        busy[vp] -= f64::from(jobs[v].accelerators()) * (end - stop);
                        evicting[v] = true;
                        completions.push(Reverse((key(stop), v, runs[v])));
                        preemptions += 1;
                        lost_accelerator_s += f64::from(jobs[v].accelerators()) * (stop - start);
                    }
                    reserve(
                        &mut reservations,
                        Reservation {
                            job,
                            pool: plan.pool,
                            start: stop,
                            nodes: plan.nodes,
                        },
                    );
                    preempted_this_cycle = true;
                } else if let Some((start, _, pool, nodes)) = choice.filter(within) {
                    reserve(
                        &mut reservations,
                        Reservation {
                            job,
                            pool,
                            start,
                            nodes,
                        },
                    );
                }
            }
        }
        if !started_now.is_empty() {
            for &job in &started_now {
                pending_per_tenant[jobs[job].tenant] -= 1;
            }
            pending.retain(|j| schedule[*j].is_none());
        }
        if policy != ReplayPolicy::Baygrid {
            // baselines keep arrival order
            debug_assert!(pending.windows(2).all(|w| w[0] < w[1]));
        }
    }
    let accepted: Vec<(usize, f64, f64)> = schedule.iter().flatten().copied().collect();
    let first_arrival = jobs.first().map(|j| j.arrival_s).unwrap_or(0.0);
    let makespan = accepted.iter().map(|s| s.2).fold(first_arrival, f64::max) - first_arrival;
    let mut waits: Vec<f64> = Vec::new();
    let mut completion_sum = 0.0;
    let deadlines_missed = schedule
        .iter()
        .zip(jobs)
        .filter(|(entry, j)| {
            entry.is_some_and(|(_, _, end)| j.deadline_s.is_some_and(|d| end > d + 1e-3))
        })
        .count();
    let mut total_cost = 0.0;
    for (job, entry) in schedule.iter().enumerate() {
        if let Some((p, start, end)) = entry {
            waits.push(start - jobs[job].arrival_s);
            completion_sum += end - jobs[job].arrival_s;
            let c = costs.row(job)[*p].expect("costed");
            total_cost += c.compute_cny + c.transfer_cny;
        }
    }
    for &(job, p, start, end) in &preempted_runs {
        // the work an eviction threw away is paid for too
        let c = costs.row(job)[p].expect("costed");
        total_cost += c.compute_cny * (end - start) / c.runtime_s;
    }
    waits.sort_by(f64::total_cmp);
    let n = waits.len().max(1) as f64;
    let mut site_busy: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (p, pool) in pools.iter().enumerate() {
        let entry = site_busy.entry(pool.site.clone()).or_default();
        entry.0 += busy[p];
        entry.1 += f64::from(pool.nodes * pool.per_node);
    }
    let utilisation = site_busy
        .into_iter()
        .map(|(site, (b, cap))| {
            (
                site,
                if makespan > 0.0 {
                    b / (cap * makespan)
                } else {
                    0.0
                },
            )
        })
        .collect();
    let demand = jobs
        .iter()
        .zip(&masks)
        .filter_map(|(j, m)| {
            m.as_ref().ok().map(|mask| {
                (
                    *mask,
                    j.arrival_s - first_arrival,
                    f64::from(j.accelerators()) * j.duration_s,
                )
            })
        })
        .collect();
    let wall = started.elapsed().as_secs_f64();
    Ok(ReplayResult {
        policy,
        jobs: jobs.len(),
        rejected,
        makespan_s: makespan,
        utilisation,
        mean_wait_s: waits.iter().sum::<f64>() / n,
        p99_wait_s: percentile(&waits, 0.99),
        max_wait_s: waits.last().copied().unwrap_or(0.0),
        mean_completion_s: completion_sum / n,
        total_cost_cny: total_cost,
        jain_fairness: if fairness_time > 0.0 {
            fairness_area / fairness_time
        } else {
            1.0
        },
        jain_fairness_arriving: if arriving_time > 0.0 {
            arriving_area / arriving_time
        } else {
            1.0
        },
        placements,
        decisions_per_s: placements as f64 / wall.max(1e-9),
        demand,
        reservations_delayed,
        preemptions,
        requeues,
        lost_accelerator_s,
        preempted_runs,
        rejections,
        deadlines_missed,
        schedule,
    })
}

/// What the dispatcher sees when it weighs evicting running jobs for a blocked one.
struct PreemptView<'a> {
    jobs: &'a [SimJob],
    tenants: &'a [SimTenant],
    state: &'a [PoolState],
    schedule: &'a [Option<(usize, f64, f64)>],
    evicting: &'a [bool],
    held: &'a [Vec<f64>],
    model_capacity: &'a [f64],
    pool_model: &'a [usize],
    nominal: &'a [Option<Vec<f64>>],
    borrowing: bool,
}

/// Evictions that make room for a blocked job: the pool, the nodes it will take when the
/// victims have stopped, and the victims.
#[derive(Debug)]
struct Preemption {
    pool: usize,
    nodes: Vec<u32>,
    victims: Vec<usize>,
}

/// The eviction that makes room for `job` throwing away the least work (accelerator-seconds
/// already run), ties to the cheaper pool. A victim must be preemptible, not already
/// stopping, and due to run past the grace period; and either of a lower priority class, or
/// of the same class and of another tenant whose weighted dominant share, without all its
/// victims here, stays above the job's tenant's with the job (so the two never trade places
/// back and forth). Nodes other jobs hold reserved are not taken.
fn plan_preemption(
    view: &PreemptView<'_>,
    job: usize,
    mask: u64,
    reservations: &[Option<Reservation>],
    costs: &[Option<CostBreakdown>],
    now: f64,
    config: &DispatchConfig,
) -> Option<Preemption> {
    let j = &view.jobs[job];
    let weighted = |tenant: usize, model: usize, delta: f64| {
        view.held[tenant]
            .iter()
            .zip(view.model_capacity)
            .enumerate()
            .map(|(m, (h, c))| (h + if m == model { delta } else { 0.0 }) / c)
            .fold(0.0f64, f64::max)
            / view.tenants[tenant].weight
    };
    let lost = |v: usize| {
        let start = view.schedule[v].expect("victims are running").1;
        f64::from(view.jobs[v].accelerators()) * (now - start)
    };
    let mut best: Option<(f64, f64, Preemption)> = None;
    for (p, state) in view.state.iter().enumerate() {
        if mask & (1 << p) == 0 {
            continue;
        }
        let model = view.pool_model[p];
        let acc = f64::from(j.accelerators());
        let mine_after = weighted(j.tenant, model, acc);
        // reclaim: the job stays within its own quota, and the victim's tenant borrows
        let within_quota = view.nominal[j.tenant]
            .as_ref()
            .is_some_and(|n| view.held[j.tenant][model] + acc <= n[model] + 1e-9);
        let borrows = |t: usize| {
            view.nominal[t]
                .as_ref()
                .is_some_and(|n| view.held[t][model] > n[model] + 1e-9)
        };
        let reclaims = |v: usize| {
            within_quota && view.jobs[v].tenant != j.tenant && borrows(view.jobs[v].tenant)
        };
        let may_evict = |v: usize| {
            let victim = &view.jobs[v];
            victim.preemptible
                && !view.evicting[v]
                && (victim.priority < j.priority
                    || reclaims(v)
                    || (victim.priority == j.priority
                        && victim.tenant != j.tenant
                        && weighted(victim.tenant, model, -f64::from(victim.accelerators()))
                            > mine_after))
        };
        let excluded: &[u32] = match &reservations[p] {
            Some(r) if r.job != job => &r.nodes,
            _ => &[],
        };
        // per node: the work lost to make room there, and the victims
        let mut options: Vec<(f64, u32, Vec<usize>)> = Vec::new();
        for (n, running) in state.running.iter().enumerate() {
            let node = n as u32;
            if excluded.contains(&node) {
                continue;
            }
            let mut free = state.free[n];
            let mut candidates: Vec<(f64, usize, u32)> = running
                .iter()
                .filter(|(v, end, _)| *end > now + config.grace_s && may_evict(*v))
                .map(|&(v, _, accelerators)| (lost(v), v, accelerators))
                .collect();
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut chosen = Vec::new();
            let mut thrown = 0.0;
            for (l, v, accelerators) in candidates {
                if free >= j.per_node {
                    break;
                }
                free += accelerators;
                thrown += l;
                chosen.push(v);
            }
            if free >= j.per_node {
                options.push((thrown, node, chosen));
            }
        }
        if options.len() < j.nodes as usize {
            continue;
        }
        options.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        options.truncate(j.nodes as usize);
        let mut victims: Vec<usize> = options.iter().flat_map(|o| o.2.clone()).collect();
        victims.sort_unstable();
        victims.dedup();
        if victims.is_empty() {
            continue;
        }
        // the fair-share condition over all of one tenant's victims together (victims of a
        // lower class, or reclaimed from a borrower, need none)
        let mut taken: BTreeMap<usize, f64> = BTreeMap::new();
        for &v in &victims {
            if view.jobs[v].priority == j.priority && !reclaims(v) {
                *taken.entry(view.jobs[v].tenant).or_default() +=
                    f64::from(view.jobs[v].accelerators());
            }
        }
        if taken
            .iter()
            .any(|(&tenant, &gone)| weighted(tenant, model, -gone) <= mine_after)
        {
            continue;
        }
        // and the job must be admitted by the quotas once the victims have gone
        let freed: Vec<(usize, f64)> = victims
            .iter()
            .filter(|&&v| view.pool_model[view.schedule[v].expect("running").0] == model)
            .map(|&v| (view.jobs[v].tenant, f64::from(view.jobs[v].accelerators())))
            .collect();
        if !admitted(
            view.nominal,
            view.held,
            j.tenant,
            model,
            acc,
            view.borrowing,
            &freed,
        ) {
            continue;
        }
        let thrown: f64 = victims.iter().map(|&v| lost(v)).sum();
        let cost = costs[p].expect("eligible pools are costed").total();
        if best.as_ref().is_none_or(|(l, c, _)| {
            thrown < *l - 1e-9 || ((thrown - *l).abs() <= 1e-9 && cost < *c)
        }) {
            let mut nodes: Vec<u32> = options.iter().map(|o| o.1).collect();
            nodes.sort_unstable();
            best = Some((
                thrown,
                cost,
                Preemption {
                    pool: p,
                    nodes,
                    victims,
                },
            ));
        }
    }
    best.map(|(_, _, plan)| plan)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Jain's index, over the tenants with jobs waiting, of dominant share ÷ weight.
fn jain_index(
    held: &[Vec<f64>],
    tenants: &[SimTenant],
    capacity: &[f64],
    pending: &[usize],
) -> Option<f64> {
    let xs: Vec<f64> = held
        .iter()
        .zip(tenants)
        .zip(pending)
        .filter(|(_, p)| **p > 0)
        .map(|((h, t), _)| {
            h.iter()
                .zip(capacity)
                .map(|(v, c)| v / c)
                .fold(0.0f64, f64::max)
                / t.weight
        })
        .collect();
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    (xs.len() > 1 && squares > 0.0).then(|| sum * sum / (xs.len() as f64 * squares))
}

/// The cost lower bound for a replay's accepted jobs over its makespan.
pub fn lower_bound(region: &Region, result: &ReplayResult) -> bound::Bound {
    let slots = BOUND_SLOTS;
    let horizon = result.makespan_s.max(1.0);
    let slot = horizon / slots as f64;
    let demands: Vec<bound::Demand> = result
        .demand
        .iter()
        .map(|&(pools, arrival, work)| bound::Demand {
            pools,
            slot: ((arrival / slot) as usize).min(slots - 1),
            work: work.ceil() as u64,
        })
        .collect();
    let supplies: Vec<bound::Supply> = region
        .pools
        .iter()
        .map(|p| bound::Supply {
            per_slot: (f64::from(p.nodes * p.per_node) * slot * p.speed).ceil() as u64,
            cost: (p.price_cny_per_hour() / 3600.0 / p.speed * 1e6).floor() as i64,
        })
        .collect();
    bound::lower_bound(&demands, &supplies, slots)
}

/// Reads a job list (CSV with a header, or a JSON array of [`SimJob`]-shaped objects with
/// tenant names). CSV columns: `arrival_s, accelerators, nodes, accepts, duration_s, tenant,
/// latency_sensitive, jurisdictions` (and optionally `data_gb`, `priority` and
/// `preemptible`); `accepts` is `any`,
/// `nvidia`, `ascend` or models joined by `|`; `jurisdictions` is empty or joined by `|`.
/// Tenants are named; each new name becomes a tenant of weight 1, in the region's cities in
/// turn. Jobs are returned sorted by arrival.
pub fn parse_trace(
    file: &str,
    text: &str,
    region: &Region,
) -> Result<(Vec<SimTenant>, Vec<SimJob>), ReplayError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Row {
        arrival_s: f64,
        accelerators: u32,
        #[serde(default = "one")]
        nodes: u32,
        #[serde(default)]
        accepts: String,
        duration_s: f64,
        tenant: String,
        #[serde(default)]
        latency_sensitive: bool,
        #[serde(default)]
        jurisdictions: String,
        #[serde(default)]
        data_gb: f64,
        #[serde(default)]
        priority: i32,
        #[serde(default)]
        preemptible: bool,
        #[serde(default)]
        deadline_s: Option<f64>,
    }
    fn one() -> u32 {
        1
    }
    let bad = |record: usize, field: &str, problem: String| ReplayError::Trace {
        file: file.into(),
        record,
        field: field.into(),
        problem,
    };
    let rows: Vec<Row> = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Row>>(text).map_err(|e| bad(0, "json", e.to_string()))?
    } else {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines
            .next()
            .ok_or_else(|| bad(0, "header", "empty file".into()))?
            .split(',')
            .map(str::trim)
            .collect();
        let mut rows = Vec::new();
        for (i, line) in lines.enumerate() {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != header.len() {
                return Err(bad(
                    i + 1,
                    "row",
                    format!("{} fields, the header has {}", cells.len(), header.len()),
                ));
            }
            let mut object = serde_json::Map::new();
            for (column, cell) in header.iter().zip(&cells) {
                let value = match *column {
                    "deadline_s" if cell.is_empty() => serde_json::Value::Null,
                    "accepts" | "tenant" | "jurisdictions" => {
                        serde_json::Value::String(cell.to_string())
                    }
                    "latency_sensitive" | "preemptible" => match *cell {
                        "true" | "1" | "yes" => serde_json::Value::Bool(true),
                        "false" | "0" | "no" | "" => serde_json::Value::Bool(false),
                        other => {
                            return Err(bad(
                                i + 1,
                                column,
                                format!("`{other}` is not true or false"),
                            ))
                        }
                    },
                    "accelerators" | "nodes" => {
                        let number: u32 = cell.parse().map_err(|_| {
                            bad(i + 1, column, format!("`{cell}` is not a whole number"))
                        })?;
                        serde_json::json!(number)
                    }
                    "priority" => {
                        let number: i32 = cell.parse().map_err(|_| {
                            bad(i + 1, column, format!("`{cell}` is not a whole number"))
                        })?;
                        serde_json::json!(number)
                    }
                    _ => {
                        let number: f64 = cell
                            .parse()
                            .ok()
                            .filter(|n: &f64| n.is_finite())
                            .ok_or_else(|| {
                                bad(i + 1, column, format!("`{cell}` is not a finite number"))
                            })?;
                        serde_json::json!(number)
                    }
                };
                object.insert(column.to_string(), value);
            }
            let row: Row = serde_json::from_value(serde_json::Value::Object(object))
                .map_err(|e| bad(i + 1, "row", e.to_string()))?;
            rows.push(row);
        }
        rows
    };
    let mut tenants: Vec<SimTenant> = Vec::new();
    let mut jobs = Vec::new();
    for (i, row) in rows.into_iter().enumerate() {
        let record = i + 1;
        if row.arrival_s.is_nan() || row.arrival_s < 0.0 {
            return Err(bad(record, "arrival_s", "must be 0 or more".into()));
        }
        if row.duration_s.is_nan() || row.duration_s <= 0.0 {
            return Err(bad(record, "duration_s", "must be above 0".into()));
        }
        if row.nodes == 0 || row.accelerators == 0 || row.accelerators % row.nodes != 0 {
            return Err(bad(
                record,
                "accelerators",
                format!(
                    "{} accelerators cannot be split evenly over {} nodes",
                    row.accelerators, row.nodes
                ),
            ));
        }
        let jurisdictions = if row.jurisdictions.trim().is_empty() {
            None
        } else {
            Some(
                row.jurisdictions
                    .split('|')
                    .map(|j| {
                        j.trim().parse::<Jurisdiction>().map_err(|_| {
                            bad(
                                record,
                                "jurisdictions",
                                format!("`{j}` is not CN, HK, MO or INTL"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let tenant = match tenants.iter().position(|t| t.name == row.tenant) {
            Some(t) => t,
            None => {
                if row.tenant.is_empty() {
                    return Err(bad(record, "tenant", "is empty".into()));
                }
                let (city, jurisdiction) =
                    region.cities[tenants.len() % region.cities.len()].clone();
                tenants.push(SimTenant {
                    name: row.tenant.clone(),
                    city,
                    jurisdiction,
                    weight: 1.0,
                    quota: None,
                });
                tenants.len() - 1
            }
        };
        let job = SimJob {
            arrival_s: row.arrival_s,
            nodes: row.nodes,
            per_node: row.accelerators / row.nodes,
            accepts: row.accepts.parse().expect("infallible"),
            duration_s: row.duration_s,
            tenant,
            latency_sensitive: row.latency_sensitive,
            jurisdictions,
            data_gb: row.data_gb,
            priority: row.priority,
            preemptible: row.preemptible,
            deadline_s: row.deadline_s,
        };
        job.check_limits()
            .map_err(|(field, problem)| bad(record, field, problem))?;
        jobs.push(job);
    }
    if jobs.is_empty() {
        return Err(bad(0, "jobs", "the trace has no jobs".into()));
    }
    let total: f64 = tenants.len() as f64;
    for t in &mut tenants {
        t.weight /= total;
    }
    jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok((tenants, jobs))
}

#[cfg(test)]
mod tests;
