//! Preemption in the server's cycle: which running jobs to stop so that a blocked job can
//! start. A running job may be stopped for another only if its spec says `preemptible`,
//! it has run at least the grace period, and either
//! - the other job has a higher priority (an urgent class), or
//! - at the same priority, the other job's tenant is below the victim's tenant in
//!   dominant share ÷ weight, and stays below once the victim has stopped and the job has
//!   started (so the shares never flip back: the eviction restores fair share).
//!
//! With quotas and borrowing, a job that the cohort's quota holds back while its own tenant
//! stays within its own nominal quota may also stop borrowers' preemptible jobs (tenants
//! holding more than their own quota of the model), at its priority or below, until the
//! cohort has room for it: borrowed quota is reclaimed (Kueue's reclaim within a cohort).
//!
//! Among the clusters where stopping eligible jobs would let the job fit now, the one
//! that throws the least work away is chosen (accelerators × seconds run, then fewest
//! jobs); within a cluster the victims are the lowest priority first, then those that
//! have run least, and any not needed once the job fits are spared.

use baygrid_core::{Allocation, JobSpec, Millis};

use crate::fairshare::Usage;
use crate::quota::{QuotaBlock, Quotas};
use crate::{Market, Quote, Requester, Verdict};

/// A job holding nodes now.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub job_id: String,
    pub tenant: String,
    pub priority: i64,
    pub preemptible: bool,
    /// Already being stopped for another job.
    pub stopping: bool,
    /// `None` while placed and not yet started.
    pub started_ms: Option<Millis>,
    pub allocation: Allocation,
}

/// The jobs to stop on one cluster, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub cluster: String,
    pub victims: Vec<String>,
    pub reason: String,
}

/// The job that wants room.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    pub job_id: &'a str,
    pub tenant: &'a str,
    pub priority: i64,
    pub spec: &'a JobSpec,
    /// Who asks, with the clusters blocked for the job and its quota's verdicts.
    pub requester: &'a Requester,
    /// The job's quote on the market the eviction is judged on (what is free now).
    pub quote: &'a Quote,
}

/// The eviction that lets `claimant` start now, if any. Clusters blocked for the job,
/// offline, or over its quota (unless it may reclaim borrowed quota there) are not
/// considered, nor is any cluster while a job there is already being stopped.
pub fn eviction(
    claimant: Claimant<'_>,
    market: &Market,
    running: &[Running],
    usage: &Usage,
    quotas: &Quotas,
    now: Millis,
    grace_ms: Millis,
) -> Option<Eviction> {
    let resources = &claimant.spec.resources;
    let requester = claimant.requester;
    let mut best: Option<(u128, usize, Eviction)> = None;
    for candidate in claimant
        .quote
        .candidates
        .iter()
        .filter(|c| c.verdict == Verdict::Waits)
    {
        let Some(state) = market
            .clusters
            .iter()
            .find(|s| s.cluster.name == candidate.cluster)
        else {
            continue;
        };
        let model = &state.cluster.accelerator;
        let blocked = requester
            .blocked
            .iter()
            .any(|b| b.cluster == candidate.cluster && b.until_ms > now);
        if !state.online || blocked {
            continue;
        }
        let per_node = candidate.accelerators / candidate.nodes.max(1);
        let asked = u64::from(candidate.accelerators);
        // over the cohort's quota but within its own: it may reclaim what others borrow
        let cohort = quotas.cohort(model);
        let reclaiming = match requester.over_quota.get(model.as_str()) {
            None => false,
            Some(QuotaBlock::NotNow(_))
                if quotas.borrowing
                    && quotas
                        .own(claimant.tenant, model)
                        .is_some_and(|own| usage.held(claimant.tenant, model) + asked <= own) =>
            {
                true
            }
            Some(_) => continue,
        };
        let here: Vec<&Running> = running
            .iter()
            .filter(|r| r.allocation.cluster == candidate.cluster)
            .collect();
        if here.iter().any(|r| r.stopping) {
            continue;
        }
        let mut eligible: Vec<&Running> = here
            .into_iter()
            .filter(|r| {
                r.preemptible
                    && r.started_ms.is_some_and(|s| now - s >= grace_ms)
                    && r.priority <= claimant.priority
            })
            .collect();
        // lowest priority first, then the one that has run least
        eligible.sort_by_key(|r| (r.priority, std::cmp::Reverse(r.started_ms)));
        let mut trial = state.clone();
        let mut shares = usage.clone();
        // what the cohort holds without the claimant, as victims are chosen
        let mut quota_trial = usage.clone();
        shares.add(claimant.tenant, model, asked);
        let mut chosen: Vec<&Running> = Vec::new();
        let room = |s: &crate::ClusterState, held: &Usage| {
            s.fit(
                per_node,
                resources.cpus,
                resources.memory_gb,
                resources.nodes,
            )
            .is_some()
                && (!reclaiming || quotas.cohort_used(held, model) + asked <= cohort)
        };
        for victim in eligible {
            if room(&trial, &quota_trial) {
                break;
            }
            let victim_model = victim.allocation.accelerator.as_deref().unwrap_or(model);
            let victim_accelerators = u64::from(victim.allocation.total_accelerators());
            let reclaim = reclaiming
                && victim.tenant != claimant.tenant
                && quotas.borrows(&quota_trial, &victim.tenant, model);
            if reclaiming && !reclaim {
                // the claimant needs quota back: only a borrower's job returns it
                continue;
            }
            if victim.priority == claimant.priority && !reclaim {
                // fair share: the victim's tenant must stay above the claimant's
                if victim.tenant == claimant.tenant {
                    continue;
                }
                let mut after = shares.clone();
                after.remove(&victim.tenant, victim_model, victim_accelerators);
                if after.weighted_share(&victim.tenant) <= after.weighted_share(claimant.tenant) {
                    continue;
                }
            }
            shares.remove(&victim.tenant, victim_model, victim_accelerators);
            quota_trial.remove(&victim.tenant, victim_model, victim_accelerators);
            trial.give_back(&victim.allocation);
            chosen.push(victim);
        }
        if !room(&trial, &quota_trial) {
            continue;
        }
        // spare any victim not needed, last chosen first
        let mut i = chosen.len();
        while i > 0 {
            i -= 1;
            let mut without = state.clone();
            let mut held = usage.clone();
            for (j, v) in chosen.iter().enumerate() {
                if j != i {
                    without.give_back(&v.allocation);
                    held.remove(
                        &v.tenant,
                        v.allocation.accelerator.as_deref().unwrap_or(model),
                        u64::from(v.allocation.total_accelerators()),
                    );
                }
            }
            if room(&without, &held) {
                chosen.remove(i);
            }
        }
        let lost: u128 = chosen
            .iter()
            .map(|v| {
                let ran = (now - v.started_ms.unwrap_or(now)).max(0) as u128;
                ran * u128::from(v.allocation.total_accelerators())
            })
            .sum();
        let why = chosen
            .iter()
            .map(|v| {
                if reclaiming {
                    format!(
                        "{} ({} borrows {}'s quota of {model})",
                        v.job_id, v.tenant, claimant.tenant
                    )
                } else if v.priority < claimant.priority {
                    format!(
                        "{} (priority {} < {})",
                        v.job_id, v.priority, claimant.priority
                    )
                } else {
                    format!(
                        "{} ({} is above {}'s fair share)",
                        v.job_id, v.tenant, claimant.tenant
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let eviction = Eviction {
            cluster: candidate.cluster.clone(),
            victims: chosen.iter().map(|v| v.job_id.clone()).collect(),
            reason: format!(
                "for job {} of {} on {}: {why}",
                claimant.job_id, claimant.tenant, candidate.cluster
            ),
        };
        let key = (lost, eviction.victims.len());
        if best.as_ref().is_none_or(|(l, n, _)| key < (*l, *n)) {
            best = Some((key.0, key.1, eviction));
        }
    }
    best.map(|(_, _, e)| e).filter(|e| !e.victims.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{market_from_catalog, CheapestFeasible, Placer};
    use baygrid_core::{Catalog, Currency, Jurisdiction, Money};
    use std::collections::BTreeMap;

    fn spec(extra: &str) -> JobSpec {
        JobSpec::from_yaml(&format!(
            "name: j\nresources:\n  accelerators: {{A100: 8}}\ncommand: 'true'\nestimated_duration: 1h\n{extra}"
        ))
        .unwrap()
    }

    fn requester() -> Requester {
        Requester {
            city: "macao".into(),
            jurisdiction: Jurisdiction::MO,
            blocked: vec![],
            inputs_denied: Default::default(),
            inputs: vec![],
            over_quota: Default::default(),
        }
    }

    /// Macao's four A100 nodes, each held by one of tenant `a`'s jobs, started at 0, 100,
    /// 200 and 300 s; `preemptible` for each.
    fn full(preemptible: [bool; 4]) -> (crate::Market, Vec<Running>, Usage) {
        let mut market = market_from_catalog(&Catalog::sample());
        let macao = market
            .clusters
            .iter_mut()
            .find(|c| c.cluster.name == "macao-a100")
            .unwrap();
        let mut running = Vec::new();
        let mut usage = Usage::new(BTreeMap::from([("A100".to_string(), 32)]));
        for node in 0..4u32 {
            let allocation = Allocation {
                cluster: "macao-a100".into(),
                accelerator: Some("A100".into()),
                accelerators_per_node: 8,
                cpus_per_node: 1,
                memory_gb_per_node: 1,
                nodes: vec![node],
                price_per_accelerator_hour: Money::new(2800, Currency::MOP),
                estimated_seconds: Some(3600),
                staging_cny: None,
            };
            macao.take(&allocation);
            usage.add("a", "A100", 8);
            running.push(Running {
                job_id: format!("job-{node}"),
                tenant: "a".into(),
                priority: 0,
                preemptible: preemptible[node as usize],
                stopping: false,
                started_ms: Some(i64::from(node) * 100_000),
                allocation,
            });
        }
        (market, running, usage)
    }

    fn evict(
        tenant: &str,
        job: &JobSpec,
        state: &(crate::Market, Vec<Running>, Usage),
        now: Millis,
    ) -> Option<Eviction> {
        let (market, running, usage) = state;
        let quote = CheapestFeasible.quote(job, &requester(), market, now);
        assert!(quote.chosen().is_none(), "the region is full");
        let requester = requester();
        eviction(
            Claimant {
                job_id: "claimant",
                tenant,
                priority: i64::from(job.priority),
                spec: job,
                requester: &requester,
                quote: &quote,
            },
            market,
            running,
            usage,
            &Quotas::default(),
            now,
            60_000,
        )
    }

    #[test]
    fn an_urgent_job_stops_the_preemptible_job_that_has_run_least() {
        let state = full([true; 4]);
        let urgent = spec("priority: 500");
        let e = evict("a", &urgent, &state, 1_000_000).unwrap();
        assert_eq!(e.cluster, "macao-a100");
        assert_eq!(e.victims, ["job-3"]);
        assert!(e.reason.contains("priority 0 < 500"), "{}", e.reason);
        // one that has run less than the grace period is spared: the next least run goes
        let e = evict("a", &urgent, &state, 340_000).unwrap();
        assert_eq!(e.victims, ["job-2"]);
        // nothing preemptible, nothing stopped
        assert!(evict("a", &urgent, &full([false; 4]), 1_000_000).is_none());
        // a gang of two stops two
        let gang = JobSpec::from_yaml(
            "name: g\nresources: {accelerators: {A100: 8}, nodes: 2}\ncommand: x\nestimated_duration: 1h\npriority: 500\n",
        )
        .unwrap();
        let e = evict("a", &gang, &state, 1_000_000).unwrap();
        assert_eq!(e.victims, ["job-3", "job-2"]);
        // while a job is being stopped there, no more are
        let mut stopping = full([true; 4]);
        stopping.1[0].stopping = true;
        assert!(evict("a", &urgent, &stopping, 1_000_000).is_none());
    }

    #[test]
    fn at_equal_priority_only_a_tenant_above_its_fair_share_gives_way() {
        let state = full([true; 4]);
        let job = spec("");
        // b holds nothing and a everything: a gives back one node
        let e = evict("b", &job, &state, 1_000_000).unwrap();
        assert_eq!(e.victims, ["job-3"]);
        assert!(
            e.reason.contains("a is above b's fair share"),
            "{}",
            e.reason
        );
        // a's own job at its own priority stops none of a's
        assert!(evict("a", &job, &state, 1_000_000).is_none());
        // b already holds more than a would keep: no flip-flop
        let (market, running, mut usage) = full([true; 4]);
        usage.add("b", "A100", 24);
        assert!(evict("b", &job, &(market, running, usage), 1_000_000).is_none());
    }

    #[test]
    fn a_tenant_within_its_quota_reclaims_what_a_borrower_holds() {
        // a's quota is 8 A100s, b's 24; a holds all four nodes (24 of them borrowed), all
        // preemptible. b, within its own quota, may stop a's jobs until the cohort has room
        // for its 8; a job of a's own may not (a already holds more than its quota).
        let state = full([true; 4]);
        let (market, running, usage) = &state;
        let a100 = |n: u64| BTreeMap::from([("A100".to_string(), n)]);
        let mut quotas = Quotas {
            nominal: BTreeMap::from([("a".to_string(), a100(8)), ("b".to_string(), a100(24))]),
            borrowing: true,
        };
        let job = spec("");
        let claim = |tenant: &str, quotas: &Quotas| {
            let mut asking = requester();
            asking.over_quota = quotas.blocks(usage, tenant, &job);
            let quote = CheapestFeasible.quote(&job, &asking, market, 1_000_000);
            eviction(
                Claimant {
                    job_id: "claimant",
                    tenant,
                    priority: 0,
                    spec: &job,
                    requester: &asking,
                    quote: &quote,
                },
                market,
                running,
                usage,
                quotas,
                1_000_000,
                60_000,
            )
        };
        let e = claim("b", &quotas).unwrap();
        assert_eq!(e.victims, ["job-3"], "the one that has run least");
        assert!(
            e.reason.contains("a borrows b's quota of A100"),
            "{}",
            e.reason
        );
        // a tenant past its own quota reclaims nothing (and fair share stops nothing for a
        // job its quota holds back)
        quotas.nominal.insert("c".to_string(), a100(0));
        let none = claim("c", &quotas);
        assert!(none.is_none(), "{none:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn victims_are_eligible_sufficient_and_none_spare(
            jobs in proptest::collection::vec(
                (proptest::bool::ANY, -1i64..=1, 0i64..600_000, 0usize..2), 4),
            claimant_tenant in 0usize..3,
            claimant_priority in -1i64..=2,
            nodes in 1u32..=2,
        ) {
            let tenants = ["a", "b", "c"];
            let (market, mut running, _) = full([true; 4]);
            let mut usage = Usage::new(BTreeMap::from([("A100".to_string(), 32)]));
            for (r, (preemptible, priority, started, tenant)) in running.iter_mut().zip(&jobs) {
                r.preemptible = *preemptible;
                r.priority = priority * 100;
                r.started_ms = Some(*started);
                r.tenant = tenants[*tenant].into();
                usage.add(&r.tenant, "A100", 8);
            }
            let job = JobSpec::from_yaml(&format!(
                "name: j\nresources: {{accelerators: {{A100: 8}}, nodes: {nodes}}}\ncommand: x\nestimated_duration: 1h\npriority: {}\n",
                claimant_priority * 100
            ))
            .unwrap();
            let now = 600_000;
            let Some(e) = evict(tenants[claimant_tenant], &job, &(market.clone(), running.clone(), usage), now) else {
                return Ok(());
            };
            let victims: Vec<&Running> = e
                .victims
                .iter()
                .map(|id| running.iter().find(|r| &r.job_id == id).unwrap())
                .collect();
            let mut ids = e.victims.clone();
            ids.dedup();
            proptest::prop_assert_eq!(ids.len(), victims.len());
            for v in &victims {
                proptest::prop_assert!(v.preemptible);
                proptest::prop_assert!(now - v.started_ms.unwrap() >= 60_000);
                proptest::prop_assert!(v.priority <= claimant_priority * 100);
                if v.priority == claimant_priority * 100 {
                    proptest::prop_assert_ne!(v.tenant.as_str(), tenants[claimant_tenant]);
                }
            }
            let macao = market.clusters.iter().find(|c| c.cluster.name == "macao-a100").unwrap();
            let fits_without = |skip: Option<usize>| {
                let mut state = macao.clone();
                for (i, v) in victims.iter().enumerate() {
                    if Some(i) != skip {
                        state.give_back(&v.allocation);
                    }
                }
                state.fit(8, job.resources.cpus, job.resources.memory_gb, nodes).is_some()
            };
            proptest::prop_assert!(fits_without(None), "the claimant fits once they stop");
            for i in 0..victims.len() {
                proptest::prop_assert!(!fits_without(Some(i)), "victim {} was not needed", i);
            }
        }
    }
}
