//! Placement: which cluster may hold a job, what it would cost there, and which one to use.
//!
//! Pure: no I/O, no clock of its own ("now" is passed in), no randomness. The server's
//! scheduling loop and the quote endpoint call the same [`Placer`].

pub mod cost;
pub mod fairshare;
pub mod pack;
pub mod patience;
pub mod preempt;
pub mod quota;
pub mod replay;

use baygrid_core::catalog::{RoundTrips, TransferPrices, TransferTier};
use baygrid_core::{
    AcceleratorModel, Allocation, Cluster, EngineKind, ExchangeRates, JobSpec, Jurisdiction,
    Millis, Money, Offer, Site,
};
use serde::Serialize;

/// Latency-sensitive jobs run only within this round trip of the tenant's city.
pub const LATENCY_SENSITIVE_MAX_RTT_MS: u32 = 5;

/// What is free on one node right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFree {
    pub accelerators: u32,
    pub cpus: u32,
    pub memory_gb: u32,
}

/// One cluster as placement sees it: its catalog facts, what is free on each node, and
/// when running work is expected to free more.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub cluster: Cluster,
    pub site: Site,
    pub offer: Option<Offer>,
    pub model: Option<AcceleratorModel>,
    /// Whether an agent is connected and heartbeating.
    pub online: bool,
    pub free: Vec<NodeFree>,
    /// Per node, what running allocations are expected to give back and when, in time
    /// order (estimates, for the quote's start time).
    pub releases: Vec<Vec<(Millis, NodeFree)>>,
}

impl ClusterState {
    /// A cluster with every node empty.
    pub fn empty(
        cluster: Cluster,
        site: Site,
        offer: Option<Offer>,
        model: Option<AcceleratorModel>,
        online: bool,
    ) -> Self {
        let node = NodeFree {
            accelerators: cluster.accelerators_per_node,
            cpus: cluster.cpus_per_node,
            memory_gb: cluster.memory_gb_per_node,
        };
        let free = vec![node; cluster.nodes as usize];
        ClusterState {
            cluster,
            site,
            offer,
            model,
            online,
            releases: vec![Vec::new(); free.len()],
            free,
        }
    }

    /// Takes an allocation off its nodes, expected to end at `ends_at_ms` (unknown: `None`).
    pub fn take_until(&mut self, allocation: &Allocation, ends_at_ms: Option<Millis>) {
        self.take(allocation);
        let Some(at_ms) = ends_at_ms else { return };
        let back = NodeFree {
            accelerators: allocation.accelerators_per_node,
            cpus: allocation.cpus_per_node,
            memory_gb: allocation.memory_gb_per_node,
        };
        for &node in &allocation.nodes {
            if let Some(list) = self.releases.get_mut(node as usize) {
                let at = list.partition_point(|(t, _)| *t <= at_ms);
                list.insert(at, (at_ms, back));
            }
        }
    }

    /// When `nodes` nodes will each have room for the request, by the expected ends of
    /// running work; `None` when the known ends never free enough.
    fn earliest_start(
        &self,
        accelerators: u32,
        cpus: u32,
        memory_gb: u32,
        nodes: u32,
        now: Millis,
    ) -> Option<Millis> {
        let mut times: Vec<Millis> = Vec::new();
        for (index, node) in self.free.iter().enumerate() {
            let mut free = *node;
            let fits = |f: &NodeFree| {
                f.accelerators >= accelerators && f.cpus >= cpus && f.memory_gb >= memory_gb
            };
            if fits(&free) {
                times.push(now);
                continue;
            }
            for (at_ms, back) in self.releases.get(index).into_iter().flatten() {
                free.accelerators += back.accelerators;
                free.cpus += back.cpus;
                free.memory_gb += back.memory_gb;
                if fits(&free) {
                    times.push((*at_ms).max(now));
                    break;
                }
            }
        }
        if times.len() < nodes as usize {
            return None;
        }
        times.sort_unstable();
        times.get(nodes.max(1) as usize - 1).copied()
    }

    /// Gives an allocation's resources back to its nodes (a job stopped), at most each
    /// node's size.
    pub fn give_back(&mut self, allocation: &Allocation) {
        let cluster = &self.cluster;
        for &index in &allocation.nodes {
            if let Some(node) = self.free.get_mut(index as usize) {
                node.accelerators = (node.accelerators + allocation.accelerators_per_node)
                    .min(cluster.accelerators_per_node);
                node.cpus = (node.cpus + allocation.cpus_per_node).min(cluster.cpus_per_node);
                node.memory_gb = (node.memory_gb + allocation.memory_gb_per_node)
                    .min(cluster.memory_gb_per_node);
            }
        }
    }

    /// Takes an allocation's resources off its nodes. Nodes out of range are ignored
    /// (the cluster shrank); an over-commit saturates at zero.
    pub fn take(&mut self, allocation: &Allocation) {
        for &index in &allocation.nodes {
            if let Some(node) = self.free.get_mut(index as usize) {
                node.accelerators = node
                    .accelerators
                    .saturating_sub(allocation.accelerators_per_node);
                node.cpus = node.cpus.saturating_sub(allocation.cpus_per_node);
                node.memory_gb = node.memory_gb.saturating_sub(allocation.memory_gb_per_node);
            }
        }
    }

    /// `nodes` nodes that each have room for the request: the fullest that fit (fewest free
    /// accelerators, then CPUs), so whole nodes stay free for gangs; ties by index.
    fn fit(&self, accelerators: u32, cpus: u32, memory_gb: u32, nodes: u32) -> Option<Vec<u32>> {
        let mut chosen: Vec<(u32, u32, u32)> = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.accelerators >= accelerators && n.cpus >= cpus && n.memory_gb >= memory_gb
            })
            .map(|(i, n)| (n.accelerators, n.cpus, i as u32))
            .collect();
        if chosen.len() < nodes as usize {
            return None;
        }
        chosen.sort_unstable();
        chosen.truncate(nodes as usize);
        let mut indices: Vec<u32> = chosen.into_iter().map(|(_, _, i)| i).collect();
        indices.sort_unstable();
        Some(indices)
    }
}

/// The model a job's `estimated_duration` is for; on another model the duration scales by
/// the ratio of their BF16 TFLOPS.
pub const REFERENCE_MODEL: &str = "A800";

/// The region the placer sees.
#[derive(Debug, Clone, Default)]
pub struct Market {
    pub clusters: Vec<ClusterState>,
    pub rates: ExchangeRates,
    pub round_trips: RoundTrips,
    /// BF16 TFLOPS of [`REFERENCE_MODEL`], when the catalog lists it; without it durations
    /// are not scaled.
    pub reference_tflops: Option<u32>,
    /// The region's price per GB for staging inputs away from their vault's city; without
    /// it inputs cost nothing to stage.
    pub transfer_price_per_gb: Option<TransferPrices>,
    /// The green term's weight: CNY added per CNY of compute for each unit of a site's
    /// non-green power share (0 ignores it; 0.05 makes a site on 30% green power 3.5%
    /// dearer in the choice). It steers the choice and is never billed.
    pub green_weight: f64,
}

pub use cost::scale_by_tflops;

impl Market {
    /// The reference model's TFLOPS among `models`.
    pub fn reference_tflops<'a>(
        models: impl IntoIterator<Item = &'a AcceleratorModel>,
    ) -> Option<u32> {
        models
            .into_iter()
            .find(|m| m.model == REFERENCE_MODEL)
            .map(|m| m.bf16_tflops)
            .filter(|t| *t > 0)
    }
}

/// Who is asking: the tenant's party's location, and the clusters blocked for this job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub city: String,
    pub jurisdiction: Jurisdiction,
    /// Clusters that lost this job recently (failover): the job waits rather than go back
    /// to them before `until_ms`, and goes elsewhere when it can.
    pub blocked: Vec<BlockedCluster>,
    /// Sites the job's inputs may not go to under the cross-border rules, with why (the
    /// input and the rules that deny it). Decided outside placement, which stays pure.
    pub inputs_denied: std::collections::BTreeMap<String, String>,
    /// Where the job's inputs are kept: staging one at a cluster in another city costs
    /// the region's transfer price.
    pub inputs: Vec<InputSite>,
    /// Accelerator models the tenant's quota keeps the job from, now or ever, with why.
    pub over_quota: std::collections::BTreeMap<String, quota::QuotaBlock>,
}

/// One of a job's inputs: its vault's place and the size of the version a job stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSite {
    pub dataset: String,
    pub site: String,
    pub city: String,
    pub jurisdiction: Jurisdiction,
    pub bytes: u64,
}

/// A cluster blocked for one job until a time, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedCluster {
    pub cluster: String,
    pub until_ms: Millis,
    pub reason: String,
}

/// What placement thinks of one cluster for one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The cluster the job goes to.
    Chosen,
    /// It fits now, but another cluster is better.
    Fits,
    /// It could hold the job, but not now (busy or offline).
    Waits,
    /// It can never hold the job.
    Rejected,
}

/// One cluster's line in a quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Candidate {
    pub cluster: String,
    pub site: String,
    pub jurisdiction: Jurisdiction,
    pub engine: EngineKind,
    pub accelerator: Option<String>,
    pub accelerators: u32,
    pub nodes: u32,
    pub price_per_accelerator_hour: Option<Money>,
    /// The estimated duration on this cluster's model: the job's estimate (for the
    /// reference model, A800) × the reference's BF16 TFLOPS ÷ this model's.
    pub estimated_seconds: Option<u64>,
    /// Compute cost for the estimated duration on this cluster, in CNY.
    pub estimated_cost_cny: Option<Money>,
    /// Staging the job's inputs here from their vaults, in CNY: each input's GB × the
    /// region's price within a jurisdiction or across a border; none from the same city.
    pub transfer_cost_cny: Option<Money>,
    /// The green term, in CNY: the market's weight × the site's non-green power share ×
    /// compute. It steers the choice and is never billed.
    pub green_cost_cny: Option<Money>,
    /// What the choice minimises: compute + transfer + green, in CNY.
    pub total_cost_cny: Option<Money>,
    pub round_trip_ms: Option<u32>,
    /// When the job could start here (ms since the epoch): now when it fits now; for a busy
    /// cluster, when running work is expected to free enough; none when unknown (offline,
    /// or work with no estimate).
    pub estimated_start_ms: Option<Millis>,
    pub verdict: Verdict,
    pub reason: String,
    /// For a rejection: the spec field whose demand the cluster cannot meet.
    pub field: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    pub nodes_now: Option<Vec<u32>>,
}

/// Every cluster's verdict, best first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quote {
    pub candidates: Vec<Candidate>,
}

impl Quote {
    pub fn chosen(&self) -> Option<&Candidate> {
        self.candidates
            .iter()
            .find(|c| c.verdict == Verdict::Chosen)
    }

    /// Whether some cluster could hold the job, now or later.
    pub fn ever_feasible(&self) -> bool {
        self.candidates
            .iter()
            .any(|c| c.verdict != Verdict::Rejected)
    }

    /// Why no cluster can ever hold the job: each cluster's reason.
    pub fn rejection_summary(&self) -> String {
        if self.candidates.is_empty() {
            return "no cluster is published".to_string();
        }
        let reasons: Vec<String> = self
            .candidates
            .iter()
            .map(|c| format!("{}: {}", c.cluster, c.reason))
            .collect();
        format!("no cluster can ever hold this job ({})", reasons.join("; "))
    }

    /// The allocation for the chosen cluster.
    pub fn allocation(&self, spec: &JobSpec) -> Option<Allocation> {
        let chosen = self.chosen()?;
        Some(Allocation {
            cluster: chosen.cluster.clone(),
            accelerator: chosen.accelerator.clone(),
            accelerators_per_node: chosen.accelerators / chosen.nodes.max(1),
            cpus_per_node: spec.resources.cpus,
            memory_gb_per_node: spec.resources.memory_gb,
            nodes: chosen.nodes_now.clone()?,
            price_per_accelerator_hour: chosen.price_per_accelerator_hour?,
            estimated_seconds: chosen.estimated_seconds,
            staging_cny: chosen.transfer_cost_cny.filter(|m| m.minor > 0),
        })
    }
}

/// Decides where a job goes. The first placer is [`CheapestFeasible`]; the dispatch centre
/// replaces it behind this trait.
pub trait Placer: Send + Sync {
    /// Every cluster's verdict for `spec` at instant `now` (deadlines are judged from it).
    fn quote(&self, spec: &JobSpec, requester: &Requester, market: &Market, now: Millis) -> Quote;
}

/// The cheapest cluster, in CNY at the configured rates, that can hold the job now.
/// Ties go to the shorter round trip, then to the name.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheapestFeasible;

impl Placer for CheapestFeasible {
    fn quote(&self, spec: &JobSpec, requester: &Requester, market: &Market, now: Millis) -> Quote {
        let mut candidates: Vec<Candidate> = market
            .clusters
            .iter()
            .map(|state| {
                let candidate = assess(spec, requester, market, state, now);
                against_deadline(candidate, spec)
            })
            .collect();
        let best = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.verdict == Verdict::Fits)
            .min_by(|(_, a), (_, b)| {
                a.total_cost_cny
                    .map(|m| m.minor)
                    .cmp(&b.total_cost_cny.map(|m| m.minor))
                    .then(a.round_trip_ms.cmp(&b.round_trip_ms))
                    .then(a.cluster.cmp(&b.cluster))
            })
            .map(|(i, _)| i);
        if let Some(index) = best {
            let reason = chosen_reason(&candidates, index);
            candidates[index].verdict = Verdict::Chosen;
            candidates[index].reason = reason;
        }
        candidates.sort_by_key(|c| {
            let rank = match c.verdict {
                Verdict::Chosen => 0,
                Verdict::Fits => 1,
                Verdict::Waits => 2,
                Verdict::Rejected => 3,
            };
            (
                rank,
                c.total_cost_cny.map(|m| m.minor).unwrap_or(i64::MAX),
                c.cluster.clone(),
            )
        });
        Quote { candidates }
    }
}

/// Why the chosen cluster won: the runner-up it beat, and what ruled the others out.
fn chosen_reason(candidates: &[Candidate], chosen: usize) -> String {
    let mut reason = format!(
        "cheapest that fits now at {}",
        cost_text(&candidates[chosen])
    );
    let runner_up = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| *i != chosen && c.verdict != Verdict::Rejected)
        .min_by_key(|(_, c)| c.total_cost_cny.map(|m| m.minor).unwrap_or(i64::MAX));
    if let Some((_, next)) = runner_up {
        reason.push_str(&format!("; next {} at {}", next.cluster, cost_text(next)));
    }
    let mut ruled_out: Vec<&str> = candidates
        .iter()
        .filter_map(|c| c.field.as_deref())
        .collect();
    ruled_out.sort_unstable();
    ruled_out.dedup();
    if !ruled_out.is_empty() {
        let count = candidates
            .iter()
            .filter(|c| c.verdict == Verdict::Rejected)
            .count();
        reason.push_str(&format!("; {count} ruled out by {}", ruled_out.join(", ")));
    }
    reason
}

/// A candidate's total, with its parts when there is more than compute.
fn cost_text(c: &Candidate) -> String {
    let Some(total) = c.total_cost_cny else {
        return "-".into();
    };
    let mut parts = Vec::new();
    for (name, part) in [
        ("transfer", c.transfer_cost_cny),
        ("green", c.green_cost_cny),
    ] {
        if let Some(p) = part.filter(|p| p.minor != 0) {
            parts.push(format!("{name} {p}"));
        }
    }
    match (parts.is_empty(), c.estimated_cost_cny) {
        (false, Some(compute)) => format!("{total} (compute {compute}, {})", parts.join(", ")),
        _ => total.to_string(),
    }
}

/// Staging `inputs` at `site`: each input's bytes at the region's price (in CNY) for the
/// tier between where it is and the site ([`cost::transfer`]).
fn transfer_cost(inputs: &[InputSite], market: &Market, site: &Site) -> Result<Money, String> {
    let mut total = Money::zero(baygrid_core::Currency::CNY);
    let Some(prices) = market
        .transfer_price_per_gb
        .as_ref()
        .filter(|_| !inputs.is_empty())
    else {
        return Ok(total);
    };
    let prices = TransferPrices {
        within_jurisdiction: market
            .rates
            .to_cny(prices.within_jurisdiction)
            .map_err(|e| format!("transfer price within a jurisdiction: {e}"))?,
        across_border: market
            .rates
            .to_cny(prices.across_border)
            .map_err(|e| format!("transfer price across a border: {e}"))?,
    };
    for input in inputs {
        let tier = TransferTier::between(
            (&input.city, input.jurisdiction),
            (&site.city, site.jurisdiction),
        );
        total = cost::transfer(input.bytes, tier, &prices)
            .and_then(|c| total.checked_add(c))
            .map_err(|e| format!("transfer price for `{}`: {e}", input.dataset))?;
    }
    Ok(total)
}

/// A waiting candidate whose expected start leaves too little time says so: it is expected
/// to end after the job's deadline. It still waits (starts are estimates); the cycle fails
/// the job once no cluster could finish in time even starting now.
fn against_deadline(mut candidate: Candidate, spec: &JobSpec) -> Candidate {
    if let (Verdict::Waits, Some(deadline), Some(end)) = (
        &candidate.verdict,
        spec.deadline,
        candidate.expected_end_ms(),
    ) {
        if end > deadline.timestamp_millis() {
            candidate.reason.push_str(&format!(
                "; expected to end at {}, after the deadline {}",
                baygrid_core::millis_to_rfc3339(end),
                baygrid_core::millis_to_rfc3339(deadline.timestamp_millis())
            ));
        }
    }
    candidate
}

impl Candidate {
    /// When the job is expected to end here: its estimated start plus its estimated
    /// duration on this cluster's model; unknown without both.
    pub fn expected_end_ms(&self) -> Option<Millis> {
        Some(self.estimated_start_ms? + self.estimated_seconds? as i64 * 1000)
    }
}

impl Quote {
    /// With a deadline: no cluster fits now, and every one that might later is expected
    /// to end after it (or has no estimate).
    pub fn misses_deadline(&self, spec: &JobSpec) -> bool {
        let Some(deadline) = spec.deadline else {
            return false;
        };
        let deadline = deadline.timestamp_millis();
        let mut waiting = self
            .candidates
            .iter()
            .filter(|c| c.verdict != Verdict::Rejected)
            .peekable();
        waiting.peek().is_some()
            && waiting.all(|c| {
                c.verdict == Verdict::Waits && c.expected_end_ms().is_some_and(|end| end > deadline)
            })
    }
}

/// One cluster's verdict for one job, before choosing among them.
fn assess(
    spec: &JobSpec,
    requester: &Requester,
    market: &Market,
    state: &ClusterState,
    now: Millis,
) -> Candidate {
    let cluster = &state.cluster;
    let resources = &spec.resources;
    let round_trip_ms = market
        .round_trips
        .between(&requester.city, &state.site.city);
    let mut candidate = Candidate {
        cluster: cluster.name.clone(),
        site: state.site.name.clone(),
        jurisdiction: state.site.jurisdiction,
        engine: cluster.engine,
        accelerator: None,
        accelerators: 0,
        nodes: resources.nodes,
        price_per_accelerator_hour: state.offer.as_ref().map(|o| o.price_per_accelerator_hour),
        estimated_seconds: None,
        estimated_cost_cny: None,
        transfer_cost_cny: None,
        green_cost_cny: None,
        total_cost_cny: None,
        round_trip_ms,
        estimated_start_ms: None,
        verdict: Verdict::Rejected,
        reason: String::new(),
        field: None,
        nodes_now: None,
    };
    let reject = |mut c: Candidate, field: &str, reason: String| {
        c.verdict = Verdict::Rejected;
        c.reason = reason;
        c.field = Some(field.to_string());
        c
    };

    // accelerators: CPU-only work takes none; otherwise the cluster's model must be named
    let per_node = if resources.accelerators.is_none() {
        0
    } else {
        match spec.accelerators_for(&cluster.accelerator) {
            Some(count) => count,
            None => {
                let asked: Vec<&str> = resources
                    .accelerators
                    .alternatives
                    .iter()
                    .map(|(m, _)| m.as_str())
                    .collect();
                return reject(
                    candidate,
                    "resources.accelerators",
                    format!(
                        "has {}, job accepts {}",
                        cluster.accelerator,
                        asked.join(" or ")
                    ),
                );
            }
        }
    };
    if per_node > 0 {
        candidate.accelerator = Some(cluster.accelerator.clone());
    }
    candidate.accelerators = per_node * resources.nodes;
    if per_node > cluster.accelerators_per_node {
        return reject(
            candidate,
            "resources.accelerators",
            format!(
                "nodes have {} × {}, job asks {} per node",
                cluster.accelerators_per_node, cluster.accelerator, per_node
            ),
        );
    }
    if resources.nodes > cluster.nodes {
        return reject(
            candidate,
            "resources.nodes",
            format!(
                "has {} nodes, job asks a gang of {}",
                cluster.nodes, resources.nodes
            ),
        );
    }
    if resources.cpus > cluster.cpus_per_node {
        return reject(
            candidate,
            "resources.cpus",
            format!(
                "nodes have {} CPUs, job asks {}",
                cluster.cpus_per_node, resources.cpus
            ),
        );
    }
    if resources.memory_gb > cluster.memory_gb_per_node {
        return reject(
            candidate,
            "resources.memory_gb",
            format!(
                "nodes have {} GB memory, job asks {}",
                cluster.memory_gb_per_node, resources.memory_gb
            ),
        );
    }
    if let Some(allowed) = &spec.allowed_jurisdictions {
        if !allowed.contains(&state.site.jurisdiction) {
            return reject(
                candidate,
                "allowed_jurisdictions",
                format!(
                    "site is in {}, job may run only in {}",
                    state.site.jurisdiction,
                    join(allowed)
                ),
            );
        }
    }
    if let Some(sites) = spec
        .sites
        .as_ref()
        .filter(|s| !s.contains(&state.site.name))
    {
        return reject(
            candidate,
            "sites",
            format!(
                "site {} is not among the job's sites ({})",
                state.site.name,
                sites.join(", ")
            ),
        );
    }
    if let Some(why) = requester.inputs_denied.get(&state.site.name) {
        return reject(candidate, "inputs", why.clone());
    }
    if spec.latency_sensitive {
        match round_trip_ms {
            Some(ms) if ms <= LATENCY_SENSITIVE_MAX_RTT_MS => {}
            Some(ms) => {
                return reject(candidate, "latency_sensitive",
                    format!(
                        "latency-sensitive: {ms} ms round trip from {} (limit {LATENCY_SENSITIVE_MAX_RTT_MS} ms)",
                        requester.city
                    ),
                )
            }
            None => {
                return reject(candidate, "latency_sensitive",
                    format!("latency-sensitive: no known round trip from {}", requester.city),
                )
            }
        }
    }
    match (&spec.image, cluster.engine) {
        (None, EngineKind::Kubernetes) if cluster.default_image.is_none() => {
            return reject(
                candidate,
                "image",
                "kubernetes cluster needs an image and has no default".into(),
            )
        }
        (Some(_), EngineKind::Local | EngineKind::Slurm) if !cluster.container_runtime => {
            return reject(
                candidate,
                "image",
                format!(
                    "{} engine has no container runtime for `image`",
                    cluster.engine
                ),
            )
        }
        _ => {}
    }
    let Some(offer) = &state.offer else {
        return reject(
            candidate,
            "resources",
            "no offer published for this cluster".into(),
        );
    };
    let price_cny = match market.rates.to_cny(offer.price_per_accelerator_hour) {
        Ok(price) => price,
        Err(e) => return reject(candidate, "resources", format!("offer price: {e}")),
    };
    if let Some(cap) = spec.max_price_per_hour {
        match market.rates.to_cny(cap) {
            Ok(cap_cny) if price_cny.minor > cap_cny.minor => {
                return reject(
                    candidate,
                    "max_price_per_hour",
                    format!(
                        "price {} ({}) is above the job's cap {}",
                        offer.price_per_accelerator_hour, price_cny, cap
                    ),
                )
            }
            Ok(_) => {}
            Err(e) => {
                return reject(
                    candidate,
                    "max_price_per_hour",
                    format!("max_price_per_hour: {e}"),
                )
            }
        }
    }
    let reference_seconds = spec.estimated_duration.0.as_secs().max(1);
    let seconds = if per_node > 0 {
        scale_by_tflops(
            reference_seconds,
            market.reference_tflops,
            state.model.as_ref(),
        )
    } else {
        reference_seconds
    };
    candidate.estimated_seconds = Some(seconds);
    let transfer = match transfer_cost(&requester.inputs, market, &state.site) {
        Ok(t) => t,
        Err(e) => return reject(candidate, "inputs", e),
    };
    candidate.transfer_cost_cny = Some(transfer);
    if let Ok(run) = cost::RunCost::new(
        price_cny,
        u64::from(candidate.accelerators),
        seconds * 1000,
        transfer,
        market.green_weight,
        state.site.green_share_pct,
    ) {
        candidate.estimated_cost_cny = Some(run.compute);
        candidate.green_cost_cny = Some(run.green);
        candidate.total_cost_cny = run.total().ok();
    }
    if let Some(deadline) = spec.deadline {
        let earliest_finish = now + (seconds as i64) * 1000;
        if earliest_finish > deadline.timestamp_millis() {
            return reject(
                candidate,
                "deadline",
                format!(
                    "cannot finish by the deadline {}: it runs {} here, so even started now it \
                     ends at {}",
                    baygrid_core::millis_to_rfc3339(deadline.timestamp_millis()),
                    humantime::format_duration(std::time::Duration::from_secs(seconds)),
                    baygrid_core::millis_to_rfc3339(earliest_finish)
                ),
            );
        }
    }
    match requester.over_quota.get(&cluster.accelerator) {
        Some(quota::QuotaBlock::Never(why)) => {
            return reject(candidate, "resources.accelerators", why.clone())
        }
        Some(quota::QuotaBlock::NotNow(why)) => {
            candidate.verdict = Verdict::Waits;
            candidate.reason = why.clone();
            return candidate;
        }
        None => {}
    }
    if let Some(block) = requester
        .blocked
        .iter()
        .find(|b| b.cluster == cluster.name && b.until_ms > now)
    {
        candidate.verdict = Verdict::Waits;
        candidate.reason = format!(
            "blocked for this job for {} s more after losing it: {}",
            (block.until_ms - now + 999) / 1000,
            block.reason
        );
        candidate.estimated_start_ms = state
            .earliest_start(
                per_node,
                resources.cpus,
                resources.memory_gb,
                resources.nodes,
                block.until_ms,
            )
            .filter(|_| state.online);
        return candidate;
    }
    if !state.online {
        candidate.verdict = Verdict::Waits;
        candidate.reason = "no agent connected".into();
        return candidate;
    }
    match state.fit(
        per_node,
        resources.cpus,
        resources.memory_gb,
        resources.nodes,
    ) {
        Some(nodes) => {
            candidate.verdict = Verdict::Fits;
            candidate.reason = "fits now".into();
            candidate.nodes_now = Some(nodes);
            candidate.estimated_start_ms = Some(now);
        }
        None => {
            candidate.verdict = Verdict::Waits;
            candidate.estimated_start_ms = state.earliest_start(
                per_node,
                resources.cpus,
                resources.memory_gb,
                resources.nodes,
                now,
            );
            candidate.reason = match candidate.estimated_start_ms {
                Some(at) => format!(
                    "busy: not enough free nodes now; expected to start in {} s, when running work ends",
                    (at - now + 999) / 1000
                ),
                None => "busy: not enough free nodes now".into(),
            };
        }
    }
    candidate
}

fn join(items: &[Jurisdiction]) -> String {
    items
        .iter()
        .map(|j| j.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the market from a catalog with every cluster empty and online.
pub fn market_from_catalog(catalog: &baygrid_core::Catalog) -> Market {
    let clusters = catalog
        .clusters
        .iter()
        .map(|cluster| {
            let site = catalog
                .sites
                .iter()
                .find(|s| s.name == cluster.site)
                .cloned()
                .expect("validated catalog: every cluster's site exists");
            let offer = catalog
                .offers
                .iter()
                .find(|o| o.cluster == cluster.name)
                .cloned();
            let model = catalog
                .accelerators
                .iter()
                .find(|a| a.model == cluster.accelerator)
                .cloned();
            ClusterState::empty(cluster.clone(), site, offer, model, true)
        })
        .collect();
    Market {
        clusters,
        rates: catalog.exchange_rates.clone(),
        round_trips: catalog.round_trips(),
        reference_tflops: Market::reference_tflops(&catalog.accelerators),
        transfer_price_per_gb: Some(catalog.transfer_price_per_gb.clone()),
        green_weight: 0.0,
    }
}

#[cfg(test)]
mod tests;
