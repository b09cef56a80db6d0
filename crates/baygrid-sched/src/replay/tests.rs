use super::*;
use proptest::prelude::*;

fn region() -> Region {
    Region::from_catalog(&Catalog::sample()).unwrap()
}

fn job(arrival_s: f64, nodes: u32, per_node: u32, accepts: Acceptance, duration_s: f64) -> SimJob {
    SimJob {
        arrival_s,
        nodes,
        per_node,
        accepts,
        duration_s,
        tenant: 0,
        latency_sensitive: false,
        jurisdictions: None,
        data_gb: 0.0,
        priority: 0,
        preemptible: false,
        deadline_s: None,
    }
}

/// A job of the synthetic size mix (`size` indexes it; above 8, gangs of 8-accelerator
/// nodes), accepting any model, NVIDIA or Ascend (`accepts` 0, 1, 2).
fn mixed_job(at: u32, size: usize, duration: u32, accepts: u8) -> SimJob {
    let accelerators = SIZE_MIX[size].0;
    let (nodes, per_node) = if accelerators > 8 {
        (accelerators / 8, 8)
    } else {
        (1, accelerators)
    };
    let accepts =
        [Acceptance::Any, Acceptance::Nvidia, Acceptance::Ascend][accepts as usize].clone();
    job(f64::from(at), nodes, per_node, accepts, f64::from(duration))
}

/// Checks a finished replay against the region: at no instant does a pool run more
/// accelerators than it has (evicted runs included), no job starts before it arrives or runs
/// for a different time than its duration on the pool it got, and each eviction is followed
/// by exactly one requeue.
fn check_schedule(region: &Region, jobs: &[SimJob], result: &ReplayResult) {
    let mut events: Vec<(f64, i64, usize)> = Vec::new();
    assert_eq!(result.preemptions, result.requeues);
    assert_eq!(result.preemptions, result.preempted_runs.len());
    for &(i, p, start, end) in &result.preempted_runs {
        assert!(
            jobs[i].preemptible,
            "job {i} was evicted but is not preemptible"
        );
        assert!(start >= jobs[i].arrival_s - 1e-9 && end >= start);
        assert!(end - start < jobs[i].duration_s / region.pools[p].speed);
        let (_, again, _) = result.schedule[i].expect("an evicted job runs again");
        assert!(again >= end, "job {i} restarts after it stopped");
        events.push((start, i64::from(jobs[i].accelerators()), p));
        events.push((end, -i64::from(jobs[i].accelerators()), p));
    }
    for (i, entry) in result.schedule.iter().enumerate() {
        let Some((p, start, end)) = *entry else {
            continue;
        };
        assert!(start >= jobs[i].arrival_s - 1e-9);
        let expected = jobs[i].duration_s / region.pools[p].speed;
        assert!(((end - start) - expected).abs() < 2e-3);
        events.push((start, i64::from(jobs[i].accelerators()), p));
        events.push((end, -i64::from(jobs[i].accelerators()), p));
    }
    // ends before starts at the same instant
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut in_use = vec![0i64; region.pools.len()];
    for (_, delta, p) in events {
        in_use[p] += delta;
        let capacity = i64::from(region.pools[p].nodes * region.pools[p].per_node);
        assert!(in_use[p] <= capacity, "pool {p} over capacity");
    }
}

#[test]
fn the_sample_region_costs_in_cny_and_scales_by_tflops() {
    let region = region();
    let h800 = region
        .pools
        .iter()
        .find(|p| p.name == "qianhai-h800")
        .unwrap();
    assert!((h800.speed - 990.0 / 312.0).abs() < 1e-9);
    let cyberport = region
        .pools
        .iter()
        .find(|p| p.name == "cyberport-h800")
        .unwrap();
    assert!((cyberport.price_cny_per_hour() - 27.6).abs() < 1e-9);
    let tenants = synthetic_tenants(&region);
    // an hour of 8 A800-equivalents: on an H800 it takes 312/990 of the time
    let j = job(0.0, 1, 8, Acceptance::Any, 3600.0);
    let cost = cost_on(&region, &tenants[0], &j, h800, &DispatchConfig::default()).unwrap();
    // to the fen, on a run time rounded up to the millisecond
    assert!((cost.compute_cny - 22.0 * 8.0 * 312.0 / 990.0).abs() < 0.006);
    assert_eq!(cost.runtime_s, 1134.546);
    let a800 = region.pools.iter().find(|p| p.model == "A800").unwrap();
    let dearer = cost_on(&region, &tenants[0], &j, a800, &DispatchConfig::default()).unwrap();
    assert!(
        cost.total() < dearer.total(),
        "the faster card is cheaper in total"
    );
}

#[test]
fn never_feasible_jobs_are_rejected_with_every_clusters_reason() {
    let region = region();
    let tenants = synthetic_tenants(&region);
    let mut ascend_in_hk = job(0.0, 1, 1, Acceptance::Ascend, 60.0);
    ascend_in_hk.jurisdictions = Some(vec![Jurisdiction::HK]);
    let reason = eligible_pools(&region, &tenants[0], &ascend_in_hk).unwrap_err();
    assert!(
        reason.contains("shaoguan-910b: in CN, not allowed"),
        "{reason}"
    );
    assert!(
        reason.contains("cyberport-h800: H800 is not accepted"),
        "{reason}"
    );
    let too_big = job(0.0, 65, 8, Acceptance::Any, 60.0);
    assert!(eligible_pools(&region, &tenants[0], &too_big)
        .unwrap_err()
        .contains("a gang of 65 nodes, the pool has 64"));
    for policy in ReplayPolicy::ALL {
        let result = simulate(
            &region,
            &tenants,
            &[ascend_in_hk.clone(), job(1.0, 1, 1, Acceptance::Any, 60.0)],
            policy,
            &DispatchConfig::default(),
        )
        .unwrap();
        assert_eq!(result.rejected, 1, "{policy}");
        assert_eq!(result.placements, 1, "{policy}");
    }
}

#[test]
fn each_policy_chooses_as_described() {
    let region = region();
    let tenants = synthetic_tenants(&region);
    let jobs = [job(0.0, 1, 8, Acceptance::Any, 3600.0)];
    let pool_of = |policy| {
        let r = simulate(&region, &tenants, &jobs, policy, &DispatchConfig::default()).unwrap();
        region.pools[r.schedule[0].unwrap().0].name.clone()
    };
    // the first cluster in catalog order
    assert_eq!(pool_of(ReplayPolicy::FifoFirstFit), "shaoguan-910b");
    // the least total cost: H800 runs the hour in a third of the time
    assert_eq!(pool_of(ReplayPolicy::GreedyCheapest), "qianhai-h800");
    assert_eq!(pool_of(ReplayPolicy::Baygrid), "qianhai-h800");
    // a latency-sensitive job from Shaoguan cannot leave Shaoguan's 5 ms radius
    let mut near = jobs[0].clone();
    near.latency_sensitive = true;
    near.tenant = 0; // tenant-1 is in Shaoguan, the first city
    assert_eq!(tenants[0].city, "shaoguan");
    let r = simulate(
        &region,
        &tenants,
        &[near],
        ReplayPolicy::Baygrid,
        &DispatchConfig::default(),
    )
    .unwrap();
    let chosen = &region.pools[r.schedule[0].unwrap().0];
    assert!(
        region
            .round_trips
            .between("shaoguan", &chosen.city)
            .unwrap()
            <= 5
    );
}

#[test]
fn a_blocked_gang_gets_a_reservation_that_backfill_never_delays() {
    // Macao has 4 nodes of 8 A100s. A long job holds one node; a gang of 4 nodes must wait
    // for it. A short job may run beside it in the meantime; a long one may not take the
    // reserved nodes.
    let region = region();
    let tenants = synthetic_tenants(&region);
    let a100 = || Acceptance::Models(vec!["A100".into()]);
    let jobs = vec![
        job(0.0, 1, 8, a100(), 10_000.0),
        job(1.0, 4, 8, a100(), 1000.0),
        job(2.0, 1, 8, a100(), 500.0),
        job(3.0, 1, 8, a100(), 50_000.0),
    ];
    let r = dispatch(&tenants, &jobs);
    let start = |i: usize| r.schedule[i].unwrap().1;
    assert_eq!(
        start(1),
        10_000.0,
        "the gang starts when the first job ends"
    );
    assert_eq!(start(2), 2.0, "the short job backfills");
    assert!(
        start(3) >= 11_000.0,
        "the long job waits behind the reservation"
    );
    assert_eq!(r.reservations_delayed, 0);
    check_schedule(&region, &jobs, &r);
    // a start further out than the reservation horizon reserves nothing: the long job runs
    let near_only = DispatchConfig {
        reservation_horizon_s: 1000.0,
        ..DispatchConfig::default()
    };
    let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &near_only).unwrap();
    assert_eq!(r.schedule[3].unwrap().1, 3.0);
    check_schedule(&region, &jobs, &r);
    // the baselines start what fits: the long job takes a node and the gang waits longer
    let fifo = simulate(
        &region,
        &tenants,
        &jobs,
        ReplayPolicy::FifoFirstFit,
        &DispatchConfig::default(),
    )
    .unwrap();
    assert_eq!(fifo.schedule[3].unwrap().1, 3.0);
    assert!(fifo.schedule[1].unwrap().1 > 10_000.0);
}

#[test]
fn min_cost_flow_bound_on_a_hand_example() {
    // two pools: cheap (1 µCNY/unit, 10 units a slot) and dear (5, 100 a slot); 3 slots.
    let supplies = [
        bound::Supply {
            per_slot: 10,
            cost: 1,
        },
        bound::Supply {
            per_slot: 100,
            cost: 5,
        },
    ];
    // 25 units that may use both, arriving in slot 0: 30 cheap units exist over 3 slots
    let both = bound::Demand {
        pools: 0b11,
        slot: 0,
        work: 25,
    };
    assert_eq!(
        bound::lower_bound(&[both], &supplies, 3).cost_cny,
        25.0 / 1e6
    );
    // arriving in slot 2, only 10 cheap units remain: 10×1 + 15×5
    let late = bound::Demand { slot: 2, ..both };
    assert_eq!(
        bound::lower_bound(&[late], &supplies, 3).cost_cny,
        85.0 / 1e6
    );
    // a class that may use only the dear pool, plus the flexible one competing for cheap
    let dear_only = bound::Demand {
        pools: 0b10,
        slot: 0,
        work: 5,
    };
    let b = bound::lower_bound(&[late, dear_only], &supplies, 3);
    assert_eq!(b.cost_cny, (10.0 + 15.0 * 5.0 + 25.0) / 1e6);
    assert_eq!(b.unserved_work, 0);
    // more than the horizon holds
    let flood = bound::Demand {
        pools: 0b01,
        slot: 0,
        work: 40,
    };
    assert_eq!(bound::lower_bound(&[flood], &supplies, 3).unserved_work, 10);
}

#[test]
fn traces_parse_and_bad_records_are_named() {
    let region = region();
    let csv =
        "arrival_s,accelerators,nodes,accepts,duration_s,tenant,latency_sensitive,jurisdictions\n\
               10,16,2,nvidia,3600,alpha,false,\n\
               0,1,1,any,60,beta,true,CN|HK\n";
    let (tenants, jobs) = parse_trace("t.csv", csv, &region).unwrap();
    assert_eq!(tenants.len(), 2);
    assert_eq!(jobs[0].arrival_s, 0.0, "sorted by arrival");
    assert_eq!(jobs[1].per_node, 8);
    assert_eq!(
        jobs[0].jurisdictions,
        Some(vec![Jurisdiction::CN, Jurisdiction::HK])
    );
    let classes = "arrival_s,accelerators,tenant,duration_s,priority,preemptible\n\
                   0,1,a,60,-1,true\n";
    let (_, jobs) = parse_trace("t.csv", classes, &region).unwrap();
    assert_eq!((jobs[0].priority, jobs[0].preemptible), (-1, true));
    let error = parse_trace(
        "t.csv",
        "arrival_s,accelerators,tenant,duration_s,priority\n0,1,a,60,high\n",
        &region,
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "t.csv record 1: `priority`: `high` is not a whole number"
    );
    let json = r#"[{"arrival_s": 0, "accelerators": 8, "accepts": "H800|A800", "duration_s": 5, "tenant": "x"}]"#;
    let (_, jobs) = parse_trace("t.json", json, &region).unwrap();
    assert_eq!(
        jobs[0].accepts,
        Acceptance::Models(vec!["H800".into(), "A800".into()])
    );
    let cases = [
        (
            "10,3,2,any,60,a,false,",
            "t.csv record 1: `accelerators`: 3 accelerators cannot be split evenly over 2 nodes",
        ),
        (
            "10,1,1,any,0,a,false,",
            "t.csv record 1: `duration_s`: must be above 0",
        ),
        (
            "10,1,1,any,inf,a,false,",
            "t.csv record 1: `duration_s`: `inf` is not a finite number",
        ),
        (
            "10,1,1,any,4e8,a,false,",
            "t.csv record 1: `duration_s`: 400000000 is above 315360000 (ten years)",
        ),
        (
            "10,1,1,any,60,a,maybe,",
            "t.csv record 1: `latency_sensitive`: `maybe` is not true or false",
        ),
        (
            "10,1,1,any,60,a,false,XX",
            "t.csv record 1: `jurisdictions`: `XX` is not CN, HK, MO or INTL",
        ),
        (
            "soon,1,1,any,60,a,false,",
            "t.csv record 1: `arrival_s`: `soon` is not a finite number",
        ),
    ];
    let header =
        "arrival_s,accelerators,nodes,accepts,duration_s,tenant,latency_sensitive,jurisdictions\n";
    for (row, message) in cases {
        let error = parse_trace("t.csv", &format!("{header}{row}\n"), &region).unwrap_err();
        assert_eq!(error.to_string(), message);
    }
    let negative = format!(
        "{}data_gb\n10,1,1,any,60,a,false,,-1\n",
        header.trim_end().to_owned() + ","
    );
    assert_eq!(
        parse_trace("t.csv", &negative, &region)
            .unwrap_err()
            .to_string(),
        "t.csv record 1: `data_gb`: -1 must be from 0 to 1000000000"
    );
    assert!("nearest".parse::<ReplayPolicy>().is_err());
}

fn runtimes() -> Vec<f64> {
    vec![
        30.0, 60.0, 600.0, 1200.0, 3600.0, 7200.0, 36_000.0, 100_000.0,
    ]
}

#[test]
fn synthetic_workloads_follow_the_mix_and_the_load() {
    let region = region();
    let tenants = synthetic_tenants(&region);
    assert_eq!(tenants.len(), 8);
    assert!((tenants.iter().map(|t| t.weight).sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(tenants[0].weight > tenants[7].weight);
    let jobs = synthetic_jobs(&region, &tenants, &runtimes(), 0.85, 20_000, 7).unwrap();
    let share = |f: &dyn Fn(&SimJob) -> bool| {
        jobs.iter().filter(|j| f(j)).count() as f64 / jobs.len() as f64
    };
    assert!((share(&|j| j.accelerators() == 1) - 0.70).abs() < 0.02);
    assert!((share(&|j| j.latency_sensitive) - 0.30).abs() < 0.02);
    assert!((share(&|j| j.jurisdictions.is_some()) - 0.10).abs() < 0.02);
    assert!((share(&|j| j.accepts == Acceptance::Ascend) - 0.20).abs() < 0.02);
    assert!(jobs
        .iter()
        .filter(|j| j.accelerators() > 8)
        .all(|j| j.per_node == 8));
    // offered load: accelerator-seconds asked ÷ capacity over the arrival window
    let asked: f64 = jobs
        .iter()
        .map(|j| f64::from(j.accelerators()) * j.duration_s)
        .sum();
    let window = jobs.last().unwrap().arrival_s;
    let load = asked / (region.accelerators() as f64 * window);
    assert!((load - 0.85).abs() < 0.15, "load {load}");
    assert_eq!(
        jobs,
        synthetic_jobs(&region, &tenants, &runtimes(), 0.85, 20_000, 7).unwrap()
    );
    assert!(synthetic_jobs(&region, &tenants, &runtimes(), 0.0, 10, 7).is_err());
}

#[test]
fn the_replay_is_deterministic_and_the_bound_is_below_every_policy() {
    let region = region();
    let tenants = synthetic_tenants(&region);
    let jobs = synthetic_jobs(&region, &tenants, &runtimes(), 0.9, 2_000, 11).unwrap();
    let config = DispatchConfig::default();
    let dispatcher = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config).unwrap();
    let again = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config).unwrap();
    assert_eq!(dispatcher.schedule, again.schedule);
    let bound = lower_bound(&region, &dispatcher);
    assert_eq!(bound.unserved_work, 0);
    for policy in ReplayPolicy::ALL {
        let r = simulate(&region, &tenants, &jobs, policy, &config).unwrap();
        check_schedule(&region, &jobs, &r);
        assert!(bound.cost_cny <= r.total_cost_cny + 1e-6, "{policy}");
        assert_eq!(
            r.placements + r.rejected,
            jobs.len(),
            "{policy}: every job ends up somewhere"
        );
    }
    // on a region four times oversubscribed, half the batch jobs preemptible: the same jobs
    // otherwise, evictions happen, and the schedule still holds
    let jobs = synthetic_jobs(&region, &tenants, &runtimes(), 4.0, 2_000, 11).unwrap();
    let mut batch = jobs.clone();
    mark_preemptible(&mut batch, 0.5, 11).unwrap();
    assert!(batch.iter().any(|j| j.preemptible));
    assert!(batch.iter().zip(&jobs).all(|(b, j)| SimJob {
        preemptible: false,
        ..b.clone()
    } == *j));
    assert!(batch
        .iter()
        .all(|j| !(j.preemptible && j.latency_sensitive)));
    let r = simulate(&region, &tenants, &batch, ReplayPolicy::Baygrid, &config).unwrap();
    check_schedule(&region, &batch, &r);
    assert!(r.preemptions > 0, "a loaded region evicts for fair share");
    assert_eq!(r.placements - r.requeues + r.rejected, batch.len());
    assert!(mark_preemptible(&mut batch, 1.5, 11).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Capacity is never exceeded, gangs run whole on one pool, every accepted job runs
    /// exactly once, and backfill never pushes a reservation back.
    #[test]
    fn replays_respect_capacity_and_reservations(
        specs in prop::collection::vec((0u32..5000, 0usize..8, 1u32..40_000, 0u8..3), 1..60),
    ) {
        let region = region();
        let tenants = synthetic_tenants(&region);
        let mut jobs: Vec<SimJob> = specs
            .iter()
            .map(|&(at, size, duration, accepts)| {
                SimJob {
                    tenant: size % 8,
                    ..mixed_job(at, size, duration, accepts)
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        for policy in ReplayPolicy::ALL {
            let r = simulate(&region, &tenants, &jobs, policy, &DispatchConfig::default()).unwrap();
            check_schedule(&region, &jobs, &r);
            prop_assert_eq!(r.placements + r.rejected, jobs.len());
            prop_assert_eq!(r.reservations_delayed, 0);
        }
    }

    /// With priority classes and preemptible jobs: capacity is never exceeded (evicted runs
    /// included), every accepted job finishes exactly once, each eviction is requeued exactly
    /// once, only preemptible jobs are evicted, and backfill still never delays a
    /// reservation.
    #[test]
    fn preemption_requeues_each_evicted_job_once(
        specs in prop::collection::vec(
            (0u32..5000, 0usize..8, 1u32..40_000, 0u8..3, 0i32..3, any::<bool>()),
            1..60,
        ),
        wait in prop::sample::select(vec![0.0, 600.0, 3600.0]),
    ) {
        let region = region();
        let tenants = synthetic_tenants(&region);
        let mut jobs: Vec<SimJob> = specs
            .iter()
            .map(|&(at, size, duration, accepts, priority, preemptible)| {
                SimJob {
                    tenant: (at as usize + size) % 8,
                    priority,
                    preemptible,
                    ..mixed_job(at, size, duration, accepts)
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        let config = DispatchConfig { preemption_wait_s: wait, ..DispatchConfig::default() };
        let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config).unwrap();
        check_schedule(&region, &jobs, &r);
        prop_assert_eq!(r.placements - r.requeues + r.rejected, jobs.len());
        prop_assert_eq!(r.schedule.iter().flatten().count() + r.rejected, jobs.len());
        prop_assert_eq!(r.reservations_delayed, 0);
    }
}

/// Macao's pool: 4 nodes of 8 A100s, the only A100s in the sample region.
fn a100() -> Acceptance {
    Acceptance::Models(vec!["A100".into()])
}

/// Macao's four A100 nodes, each taken by one of tenant-1's preemptible jobs, arriving at
/// 0, 1, 2 and 3 s and running `duration` seconds.
fn macao_filled(duration: f64) -> Vec<SimJob> {
    (0..4)
        .map(|i| SimJob {
            preemptible: true,
            ..job(f64::from(i), 1, 8, a100(), duration)
        })
        .collect()
}

/// The dispatcher's replay of `jobs` on the sample region, with its default knobs.
fn dispatch(tenants: &[SimTenant], jobs: &[SimJob]) -> ReplayResult {
    simulate(
        &region(),
        tenants,
        jobs,
        ReplayPolicy::Baygrid,
        &DispatchConfig::default(),
    )
    .unwrap()
}

#[test]
fn an_urgent_job_evicts_the_preemptible_job_that_has_run_least() {
    let region = region();
    let tenants = synthetic_tenants(&region);
    let mut jobs = macao_filled(100_000.0);
    jobs.push(SimJob {
        priority: 10,
        ..job(100.0, 1, 8, a100(), 1000.0)
    });
    let r = dispatch(&tenants, &jobs);
    check_schedule(&region, &jobs, &r);
    assert_eq!((r.preemptions, r.requeues), (1, 1));
    let (victim, _, start, stop) = r.preempted_runs[0];
    assert_eq!(victim, 3, "the job that started last loses the least work");
    assert_eq!((start, stop), (3.0, 130.0), "it stops after its 30 s grace");
    assert_eq!(
        r.schedule[4].unwrap().1,
        130.0,
        "the urgent job starts then"
    );
    assert_eq!(
        r.schedule[3].unwrap().1,
        1130.0,
        "the victim runs again when the urgent job ends"
    );
    // a job that is not preemptible is never evicted: the urgent one waits
    for j in &mut jobs[..4] {
        j.preemptible = false;
    }
    let r = dispatch(&tenants, &jobs);
    assert_eq!(r.preemptions, 0);
    assert_eq!(r.schedule[4].unwrap().1, 100_000.0);
    // nor when preemption is off
    jobs[3].preemptible = true;
    let never = DispatchConfig {
        preemption_wait_s: f64::INFINITY,
        ..DispatchConfig::default()
    };
    let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &never).unwrap();
    assert_eq!(r.preemptions, 0);
}

#[test]
fn preemption_restores_fair_share_and_never_flips_back() {
    // tenant-1 (the heaviest weight) fills Macao's A100s with preemptible jobs; tenant-2,
    // holding nothing, asks for one node
    let region = region();
    let tenants = synthetic_tenants(&region);
    let mut jobs = macao_filled(100_000.0);
    jobs.push(SimJob {
        tenant: 1,
        preemptible: true,
        ..job(100.0, 1, 8, a100(), 50_000.0)
    });
    let r = dispatch(&tenants, &jobs);
    check_schedule(&region, &jobs, &r);
    assert_eq!(r.preemptions, 1, "one eviction restores the balance");
    assert_eq!(r.schedule[4].unwrap().1, 130.0);
    // the evicted job, requeued, does not evict tenant-2's in turn: it waits for a node
    assert!(r.schedule[3].unwrap().1 >= 50_130.0 - 1e-6);
    // the same tenant never evicts its own jobs for fair share
    jobs[4].tenant = 0;
    let r = dispatch(&tenants, &jobs);
    assert_eq!(r.preemptions, 0);
    // nor does a light tenant that would end up above the heavy one: tenant-8's weight is an
    // eighth of tenant-1's, so a quarter of the A100s is more than its due
    jobs[4].tenant = 7;
    let r = dispatch(&tenants, &jobs);
    assert_eq!(r.preemptions, 0);
}

/// Every tenant's accelerators of each model over time (evicted runs included) stay within
/// its nominal quota, or, borrowing, the quota-holders' total stays within the cohort's.
fn check_quotas(
    region: &Region,
    tenants: &[SimTenant],
    jobs: &[SimJob],
    r: &ReplayResult,
    borrowing: bool,
) {
    let mut models: Vec<String> = region.pools.iter().map(|p| p.model.clone()).collect();
    models.sort();
    models.dedup();
    let model_of = |p: usize| {
        models
            .iter()
            .position(|m| *m == region.pools[p].model)
            .unwrap()
    };
    let mut capacity = vec![0.0; models.len()];
    for (p, pool) in region.pools.iter().enumerate() {
        capacity[model_of(p)] += f64::from(pool.nodes * pool.per_node);
    }
    let nominal = |t: usize, m: usize| tenants[t].quota.map(|q| (q * capacity[m]).floor());
    let mut events: Vec<(f64, f64, usize, usize)> = Vec::new();
    let runs = r
        .schedule
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.map(|(p, s, end)| (i, p, s, end)))
        .chain(r.preempted_runs.iter().copied());
    for (i, p, start, end) in runs {
        let acc = f64::from(jobs[i].accelerators());
        events.push((start, acc, jobs[i].tenant, model_of(p)));
        events.push((end, -acc, jobs[i].tenant, model_of(p)));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut held = vec![vec![0.0; models.len()]; tenants.len()];
    for (_, delta, t, m) in events {
        held[t][m] += delta;
        if borrowing {
            let (used, total) = (0..tenants.len())
                .filter_map(|u| nominal(u, m).map(|n| (held[u][m], n)))
                .fold((0.0, 0.0), |(a, b), (h, n)| (a + h, b + n));
            assert!(used <= total + 1e-9, "{}: cohort over its quota", models[m]);
        } else if let Some(n) = nominal(t, m) {
            assert!(
                held[t][m] <= n + 1e-9,
                "{} over its quota of {}",
                tenants[t].name,
                models[m]
            );
        }
    }
}

#[test]
fn quotas_cap_a_tenant_borrowing_lends_idle_quota_and_reclaim_takes_it_back() {
    let region = region();
    let mut tenants = synthetic_tenants(&region);
    // the first two tenants hold half of every model each (16 of Macao's 32 A100s)
    tenants[0].quota = Some(0.5);
    tenants[1].quota = Some(0.5);
    let mut jobs = macao_filled(10_000.0);
    let strict = DispatchConfig {
        borrowing: false,
        ..DispatchConfig::default()
    };
    let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &strict).unwrap();
    check_quotas(&region, &tenants, &jobs, &r, false);
    let starts: Vec<f64> = r.schedule.iter().map(|s| s.unwrap().1).collect();
    assert_eq!(
        starts,
        [0.0, 1.0, 10_000.0, 10_001.0],
        "two nodes at a time"
    );
    // borrowing: the idle half is lent
    let lend = DispatchConfig::default();
    let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &lend).unwrap();
    check_quotas(&region, &tenants, &jobs, &r, true);
    let starts: Vec<f64> = r.schedule.iter().map(|s| s.unwrap().1).collect();
    assert_eq!(starts, [0.0, 1.0, 2.0, 3.0]);
    // the lender comes back for its quota: the borrower's latest job is evicted
    jobs.push(SimJob {
        tenant: 1,
        ..job(100.0, 1, 8, a100(), 1000.0)
    });
    let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &lend).unwrap();
    check_schedule(&region, &jobs, &r);
    check_quotas(&region, &tenants, &jobs, &r, true);
    assert_eq!(r.preemptions, 1);
    assert_eq!(r.preempted_runs[0].0, 3);
    assert_eq!(r.schedule[4].unwrap().1, 130.0);
    // the evicted job cannot borrow again until the cohort has room: when the lender ends
    assert_eq!(r.schedule[3].unwrap().1, 1130.0);
    // a job larger than the cohort could ever lend is refused at arrival
    let mut huge = job(0.0, 5, 8, a100(), 60.0);
    huge.tenant = 1;
    let r = simulate(
        &region,
        &tenants,
        &[huge.clone()],
        ReplayPolicy::Baygrid,
        &lend,
    )
    .unwrap();
    assert_eq!(r.rejected, 1);
    huge.nodes = 3;
    let r = simulate(&region, &tenants, &[huge], ReplayPolicy::Baygrid, &strict).unwrap();
    assert_eq!(r.rejected, 1);
    assert!(
        r.rejections[0].contains("exceed tenant-2's quota on every cluster"),
        "{:?}",
        r.rejections
    );
    assert!(set_quotas(&mut tenants, 0.0).is_err());
    set_quotas(&mut tenants, 1.0).unwrap();
    assert!((tenants[0].quota.unwrap() - tenants[0].weight).abs() < 1e-12);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Quotas are honoured at every instant, with and without borrowing, with evictions
    /// for reclaim; every job is placed or rejected.
    #[test]
    fn quotas_are_honoured(
        specs in prop::collection::vec((0u32..5000, 0usize..6, 1u32..40_000, 0u8..3, 0usize..4, any::<bool>()), 1..50),
        scale in 0.5f64..4.0,
        borrowing in any::<bool>(),
    ) {
        let region = region();
        let mut tenants = synthetic_tenants(&region);
        set_quotas(&mut tenants, scale).unwrap();
        let mut jobs: Vec<SimJob> = specs
            .iter()
            .map(|&(at, size, duration, accepts, tenant, preemptible)| {
                SimJob {
                    tenant,
                    preemptible,
                    ..mixed_job(at, size, duration, accepts)
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        let config = DispatchConfig { borrowing, ..DispatchConfig::default() };
        let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config).unwrap();
        check_schedule(&region, &jobs, &r);
        check_quotas(&region, &tenants, &jobs, &r, borrowing);
        prop_assert_eq!(r.schedule.iter().flatten().count() + r.rejected, jobs.len());
    }
}

#[test]
fn a_latency_insensitive_job_waits_a_little_for_a_cheaper_pool() {
    // Qianhai's 32 H800 nodes are taken for about 1,000 s; a ten-hour job that accepts any
    // model would be cheapest there. It waits for Qianhai rather than start now on a dearer
    // pool; a short job, or one with no patience, starts now elsewhere.
    let region = region();
    let tenants = synthetic_tenants(&region);
    let qianhai = region
        .pools
        .iter()
        .position(|p| p.name == "qianhai-h800")
        .unwrap();
    let h800 = || Acceptance::Models(vec!["H800".into()]);
    let filler: Vec<SimJob> = (0..32)
        .map(|_| job(0.0, 1, 8, h800(), 1000.0 * region.pools[qianhai].speed))
        .collect();
    let with = |late: SimJob, config: &DispatchConfig| {
        let mut jobs = filler.clone();
        jobs.push(late);
        let r = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, config).unwrap();
        check_schedule(&region, &jobs, &r);
        assert_eq!(r.reservations_delayed, 0);
        r.schedule[32].unwrap()
    };
    let long = job(10.0, 1, 8, Acceptance::Any, 36_000.0);
    let freed = with(long.clone(), &DispatchConfig::default());
    assert_eq!(freed.0, qianhai);
    assert!(
        (freed.1 - 1000.0).abs() < 2e-3,
        "it starts when Qianhai frees (run times are rounded up to the millisecond)"
    );
    // worth it: the pool it would have had now costs at least the saving more
    let now_pool = with(
        long.clone(),
        &DispatchConfig {
            patience: Patience {
                share: 0.0,
                ..Patience::default()
            },
            ..DispatchConfig::default()
        },
    );
    assert_ne!(now_pool.0, qianhai);
    assert_eq!(now_pool.1, 10.0);
    let cost = |p: usize| {
        cost_on(
            &region,
            &tenants[0],
            &long,
            &region.pools[p],
            &DispatchConfig::default(),
        )
        .unwrap()
        .total()
    };
    assert!(cost(qianhai) < cost(now_pool.0) * (1.0 - Patience::default().saving));
    // a short job may wait a fifth of its run time: not enough for Qianhai
    let short = with(
        job(10.0, 1, 8, Acceptance::Any, 600.0),
        &DispatchConfig::default(),
    );
    assert_eq!(short.1, 10.0);
    assert_ne!(short.0, qianhai);
    // an interactive one never waits
    let mut interactive = long.clone();
    interactive.latency_sensitive = true;
    interactive.tenant = 1; // tenant-2 is in Shenzhen, beside Qianhai
    let r = with(interactive, &DispatchConfig::default());
    assert_eq!(r.1, 10.0);
    // nor does the baseline: greedy-cheapest takes what is free now
    let mut jobs = filler.clone();
    jobs.push(long);
    let greedy = simulate(
        &region,
        &tenants,
        &jobs,
        ReplayPolicy::GreedyCheapest,
        &DispatchConfig::default(),
    )
    .unwrap();
    assert_eq!(greedy.schedule[32].unwrap().1, 10.0);
}

#[test]
fn blocked_gangs_on_different_pools_each_keep_a_reservation() {
    // Macao's gang waits for one long A100 job, Qianhai's 32-node gang for one long H800
    // job. Both reserve, so a long A100 job waits behind the first and a long H800 job goes
    // to Cyberport instead of taking a Qianhai node from the second.
    let region = region();
    let tenants = synthetic_tenants(&region);
    let h800 = || Acceptance::Models(vec!["H800".into()]);
    let pool = |name: &str| region.pools.iter().position(|p| p.name == name).unwrap();
    let jobs = vec![
        job(0.0, 1, 8, a100(), 10_000.0),
        job(0.0, 1, 8, h800(), 20_000.0),
        job(1.0, 4, 8, a100(), 1_000.0),
        job(2.0, 32, 8, h800(), 1_000.0),
        job(3.0, 1, 8, a100(), 50_000.0),
        job(4.0, 1, 8, h800(), 50_000.0),
    ];
    let r = dispatch(&tenants, &jobs);
    check_schedule(&region, &jobs, &r);
    assert_eq!(r.reservations_delayed, 0);
    let run = |i: usize| r.schedule[i].unwrap();
    assert_eq!(run(1).0, pool("qianhai-h800"));
    assert_eq!(
        run(2).1,
        run(0).2,
        "Macao's gang starts when the A100 job ends"
    );
    assert_eq!(
        run(3).1,
        run(1).2,
        "Qianhai's gang starts when the H800 job ends"
    );
    assert!(
        run(4).1 >= run(2).2,
        "the long A100 job waits behind Macao's gang"
    );
    assert_eq!(run(5).0, pool("cyberport-h800"));
    assert_eq!(run(5).1, 4.0);
}

#[test]
fn fairness_is_jains_index_while_tenants_wait_and_apart_while_jobs_arrive() {
    // two tenants of equal weight each hold half of Macao's A100s and each wait for all four
    // nodes; the second's half frees at 500 s, the first's at 1,000 s. The last job (the
    // first tenant's single accelerator, placed at once elsewhere) arrives at 400 s
    let region = region();
    let tenants: Vec<SimTenant> = ["even-a", "even-b"]
        .iter()
        .map(|name| SimTenant {
            name: (*name).into(),
            city: "macao".into(),
            jurisdiction: Jurisdiction::MO,
            weight: 0.5,
            quota: None,
        })
        .collect();
    let jobs = vec![
        job(0.0, 2, 8, a100(), 1_000.0),
        SimJob {
            tenant: 1,
            ..job(0.0, 2, 8, a100(), 500.0)
        },
        job(1.0, 4, 8, a100(), 100.0),
        SimJob {
            tenant: 1,
            ..job(2.0, 4, 8, a100(), 100.0)
        },
        job(400.0, 1, 1, Acceptance::Any, 100.0),
    ];
    let r = dispatch(&tenants, &jobs);
    check_schedule(&region, &jobs, &r);
    assert!(
        r.schedule[4].unwrap().1 == 400.0,
        "the last job waits for nothing"
    );
    // 2–500 s: both wait holding half each (index 1); 500–1,000 s: both wait, one holding
    // nothing (index 1/2); then one tenant waits alone, which has no index
    let whole = (498.0 * 1.0 + 500.0 * 0.5) / 998.0;
    assert!(
        (r.jain_fairness - whole).abs() < 1e-9,
        "{}",
        r.jain_fairness
    );
    assert!((r.jain_fairness_arriving - 1.0).abs() < 1e-9);
}

#[test]
fn a_job_due_sooner_goes_first_and_one_that_cannot_end_in_time_is_refused() {
    // Macao's four A100 nodes are taken until 1,000 s. Then two of one tenant's 4-node jobs
    // wait for them: the older has no deadline, the later is due at 2,100 s. A third, due at
    // 500 s, could not end in time anywhere even starting on arrival.
    let region = region();
    let tenants = synthetic_tenants(&region);
    let a100 = || Acceptance::Models(vec!["A100".into()]);
    let due = |at: f64, deadline: f64| SimJob {
        deadline_s: Some(deadline),
        ..job(at, 4, 8, a100(), 1000.0)
    };
    let jobs = vec![
        job(0.0, 4, 8, a100(), 1000.0),
        job(10.0, 4, 8, a100(), 1000.0),
        due(20.0, 2100.0),
        due(30.0, 500.0),
    ];
    let config = DispatchConfig::default();
    let dispatcher = simulate(&region, &tenants, &jobs, ReplayPolicy::Baygrid, &config).unwrap();
    check_schedule(&region, &jobs, &dispatcher);
    assert_eq!(dispatcher.rejected, 1);
    assert!(dispatcher.rejections[0].contains(
        "no cluster it may use can end it by its deadline (500 s; started on arrival, the soonest ends at 1030 s)"
    ));
    assert!(dispatcher.schedule[3].is_none());
    // the job due sooner takes the older one's reservation and ends in time
    let (_, start, end) = dispatcher.schedule[2].unwrap();
    assert!((start - 1000.0).abs() < 1e-6 && end <= 2100.0);
    assert!(dispatcher.schedule[1].unwrap().1 >= end - 1e-6);
    assert_eq!(dispatcher.deadlines_missed, 0);
    assert_eq!(dispatcher.reservations_delayed, 0);
    // in arrival order the older job goes first and the deadline is missed
    let fifo = simulate(
        &region,
        &tenants,
        &jobs,
        ReplayPolicy::FifoFirstFit,
        &config,
    )
    .unwrap();
    check_schedule(&region, &jobs, &fifo);
    assert_eq!((fifo.rejected, fifo.deadlines_missed), (1, 1));
    // a deadline before the arrival is refused with the field named
    let mut bad = jobs.clone();
    bad[2].deadline_s = Some(5.0);
    let error = simulate(&region, &tenants, &bad, ReplayPolicy::Baygrid, &config).unwrap_err();
    assert!(error.to_string().contains("deadline_s"), "{error}");
}

#[test]
fn a_trace_may_give_deadlines() {
    let region = region();
    let text = "arrival_s,accelerators,duration_s,tenant,deadline_s\n0,8,60,a,\n5,8,60,a,3600\n";
    let (_, jobs) = parse_trace("t.csv", text, &region).unwrap();
    assert_eq!(jobs[0].deadline_s, None);
    assert_eq!(jobs[1].deadline_s, Some(3600.0));
    let early = "arrival_s,accelerators,duration_s,tenant,deadline_s\n50,8,60,a,40\n";
    assert_eq!(
        parse_trace("t.csv", early, &region)
            .unwrap_err()
            .to_string(),
        "t.csv record 1: `deadline_s`: 40 must be after the arrival 50"
    );
}
