use super::*;
use baygrid_core::Catalog;
use proptest::prelude::*;

fn spec(text: &str) -> JobSpec {
    JobSpec::from_yaml(text).unwrap()
}

fn job(accelerators: &str, nodes: u32, extra: &str) -> JobSpec {
    spec(&format!(
        "name: j\nresources:\n  accelerators: {accelerators}\n  nodes: {nodes}\ncommand: 'true'\nestimated_duration: 1h\n{extra}"
    ))
}

fn guangzhou() -> Requester {
    Requester {
        city: "guangzhou".into(),
        jurisdiction: Jurisdiction::CN,
        blocked: vec![],
        inputs_denied: Default::default(),
        inputs: vec![],
        over_quota: Default::default(),
    }
}

fn market() -> Market {
    market_from_catalog(&Catalog::sample())
}

#[test]
fn cheapest_wins_and_costs_are_in_cny() {
    let quote = CheapestFeasible.quote(
        &job("[{H800: 8}, {Ascend910B: 8}, {A100: 8}]", 1, ""),
        &guangzhou(),
        &market(),
        0,
    );
    // The hour is for an A800 (312 TFLOPS): an H800 (990) takes 1,135 s, at 22 CNY an hour
    // the cheapest in total though the dearest per hour but one.
    let chosen = quote.chosen().unwrap();
    assert_eq!(chosen.cluster, "qianhai-h800");
    assert_eq!(chosen.estimated_seconds, Some(1135));
    assert_eq!(chosen.estimated_cost_cny.unwrap().to_string(), "55.49 CNY");
    let shaoguan = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "shaoguan-910b")
        .unwrap();
    // 9 CNY × 8 × 3,510 s (320 TFLOPS)
    assert_eq!(
        shaoguan.estimated_cost_cny.unwrap().to_string(),
        "70.20 CNY"
    );
    let hk = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "cyberport-h800")
        .unwrap();
    // 30 HKD × 0.92 × 8 accelerators × 1,135 s
    assert_eq!(hk.estimated_cost_cny.unwrap().to_string(), "69.61 CNY");
    let macao = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "macao-a100")
        .unwrap();
    assert_eq!(macao.estimated_cost_cny.unwrap().to_string(), "199.36 CNY");
}

fn input_at(site: &str, city: &str, jurisdiction: Jurisdiction, gb: u64) -> InputSite {
    InputSite {
        dataset: format!("data-at-{site}"),
        site: site.into(),
        city: city.into(),
        jurisdiction,
        bytes: gb * 1_000_000_000,
    }
}

fn cost_of<'q>(quote: &'q Quote, cluster: &str) -> &'q Candidate {
    quote
        .candidates
        .iter()
        .find(|c| c.cluster == cluster)
        .unwrap()
}

#[test]
fn staging_inputs_counts_in_the_choice_so_work_goes_to_the_data() {
    let any = job("[{H800: 8}, {Ascend910B: 8}]", 1, "");
    // 20 GB in Hong Kong: across the border to Shenzhen at 1.00 CNY/GB, so the dearer
    // Hong Kong cluster is cheaper in total
    let mut tenant = guangzhou();
    tenant.inputs = vec![input_at("hk-cyberport", "hong-kong", Jurisdiction::HK, 20)];
    let quote = CheapestFeasible.quote(&any, &tenant, &market(), 0);
    let qianhai = cost_of(&quote, "qianhai-h800");
    assert_eq!(qianhai.estimated_cost_cny.unwrap().to_string(), "55.49 CNY");
    assert_eq!(qianhai.transfer_cost_cny.unwrap().to_string(), "20.00 CNY");
    assert_eq!(qianhai.total_cost_cny.unwrap().to_string(), "75.49 CNY");
    let chosen = quote.chosen().unwrap();
    assert_eq!(chosen.cluster, "cyberport-h800");
    assert_eq!(chosen.transfer_cost_cny.unwrap().to_string(), "0.00 CNY");
    assert!(
        chosen
            .reason
            .contains("next qianhai-h800 at 75.49 CNY (compute 55.49 CNY, transfer 20.00 CNY)"),
        "{}",
        chosen.reason
    );
    // 100 GB at Shaoguan, within the mainland at 0.30 CNY/GB: the work goes west to it
    tenant.inputs = vec![input_at("shaoguan", "shaoguan", Jurisdiction::CN, 100)];
    let quote = CheapestFeasible.quote(&any, &tenant, &market(), 0);
    assert_eq!(
        cost_of(&quote, "qianhai-h800")
            .total_cost_cny
            .unwrap()
            .to_string(),
        "85.49 CNY"
    );
    assert_eq!(quote.chosen().unwrap().cluster, "shaoguan-910b");
    // without inputs the cheapest compute wins
    let quote = CheapestFeasible.quote(&any, &guangzhou(), &market(), 0);
    assert_eq!(quote.chosen().unwrap().cluster, "qianhai-h800");
}

#[test]
fn the_green_term_weighs_non_green_power_and_can_turn_the_choice() {
    let any = job("[{H800: 8}, {Ascend910B: 8}]", 1, "");
    let mut region = market();
    region.green_weight = 0.5;
    let quote = CheapestFeasible.quote(&any, &guangzhou(), &region, 0);
    // 55.49 × 0.5 × 70% non-green at Qianhai
    let qianhai = cost_of(&quote, "qianhai-h800");
    assert_eq!(qianhai.green_cost_cny.unwrap().to_string(), "19.42 CNY");
    assert_eq!(quote.chosen().unwrap().cluster, "qianhai-h800");
    // weight 2: Shaoguan's 60% green power outweighs its dearer compute
    region.green_weight = 2.0;
    let quote = CheapestFeasible.quote(&any, &guangzhou(), &region, 0);
    let shaoguan = quote.chosen().unwrap();
    assert_eq!(shaoguan.cluster, "shaoguan-910b");
    assert_eq!(shaoguan.green_cost_cny.unwrap().to_string(), "56.16 CNY");
    assert_eq!(shaoguan.total_cost_cny.unwrap().to_string(), "126.36 CNY");
    assert_eq!(
        cost_of(&quote, "qianhai-h800")
            .total_cost_cny
            .unwrap()
            .to_string(),
        "133.18 CNY"
    );
}

#[test]
fn latency_sensitive_jobs_stay_near_the_tenant() {
    let quote = CheapestFeasible.quote(
        &job("{Ascend910B: 1}", 1, "latency_sensitive: true"),
        &guangzhou(),
        &market(),
        0,
    );
    // shaoguan is 4 ms from guangzhou, so still allowed; from hong-kong it is 8 ms
    assert_eq!(quote.chosen().unwrap().cluster, "shaoguan-910b");
    let hk = Requester {
        city: "hong-kong".into(),
        jurisdiction: Jurisdiction::HK,
        blocked: vec![],
        inputs_denied: Default::default(),
        inputs: vec![],
        over_quota: Default::default(),
    };
    let quote = CheapestFeasible.quote(
        &job("{Ascend910B: 1}", 1, "latency_sensitive: true"),
        &hk,
        &market(),
        0,
    );
    assert_eq!(quote.chosen().unwrap().cluster, "hengqin-910b");
    let shaoguan = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "shaoguan-910b")
        .unwrap();
    assert_eq!(shaoguan.verdict, Verdict::Rejected);
    assert!(shaoguan.reason.contains("8 ms"), "{}", shaoguan.reason);
}

#[test]
fn impossible_jobs_are_never_feasible_with_reasons() {
    let cases = [
        job("{H800: 16}", 1, ""),
        job("{B200: 1}", 1, ""),
        job("{A100: 8}", 5, ""),
        job("{H800: 1}", 1, "max_price_per_hour: '10.00 CNY'"),
        job("{H800: 1}", 1, "allowed_jurisdictions: [INTL]"),
        job("{H800: 1}", 1, "deadline: 1970-01-01T00:10:00Z"),
    ];
    for spec in cases {
        let quote = CheapestFeasible.quote(&spec, &guangzhou(), &market(), 0);
        assert!(!quote.ever_feasible(), "{spec:?}");
        assert!(quote.candidates.iter().all(|c| !c.reason.is_empty()));
        assert!(quote.rejection_summary().contains("qianhai-h800"));
    }
    // a missed deadline says by how much: the run there and when it would end
    let late = job("{H800: 1}", 1, "deadline: 1970-01-01T00:10:00Z");
    let quote = CheapestFeasible.quote(&late, &guangzhou(), &market(), 0);
    let qianhai = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "qianhai-h800")
        .unwrap();
    let runs = qianhai.estimated_seconds.unwrap();
    assert!(
        qianhai.reason.contains("deadline 1970-01-01T00:10:00.000Z")
            && qianhai.reason.contains(&format!(
                "ends at {}",
                baygrid_core::millis_to_rfc3339(runs as i64 * 1000)
            )),
        "{}",
        qianhai.reason
    );
}

#[test]
fn busy_clusters_wait_and_gangs_take_whole_nodes_in_one_cluster() {
    let mut market = market();
    let quote = CheapestFeasible.quote(&job("{A100: 8}", 4, ""), &guangzhou(), &market, 0);
    let alloc = quote.allocation(&job("{A100: 8}", 4, "")).unwrap();
    assert_eq!(alloc.cluster, "macao-a100");
    assert_eq!(alloc.nodes, vec![0, 1, 2, 3]);
    let macao = market
        .clusters
        .iter_mut()
        .find(|c| c.cluster.name == "macao-a100")
        .unwrap();
    macao.take(&alloc);
    let quote = CheapestFeasible.quote(&job("{A100: 1}", 1, ""), &guangzhou(), &market, 0);
    assert!(quote.chosen().is_none());
    assert_eq!(quote.candidates[0].verdict, Verdict::Waits);
    assert!(quote.ever_feasible());
}

#[test]
fn offline_clusters_wait() {
    let mut market = market();
    for c in &mut market.clusters {
        c.online = false;
    }
    let quote = CheapestFeasible.quote(&job("{H800: 1}", 1, ""), &guangzhou(), &market, 0);
    assert!(quote.chosen().is_none());
    assert!(quote.ever_feasible());
}

proptest! {
    /// Placing jobs one after another never over-commits a node.
    #[test]
    fn capacity_is_never_exceeded(sizes in proptest::collection::vec((1u32..=8, 1u32..=6), 1..80)) {
        let mut market = market();
        let original: Vec<(String, u32)> = market.clusters.iter().map(|c| (c.cluster.name.clone(), c.cluster.accelerators_per_node)).collect();
        for (per_node, nodes) in sizes {
            let spec = job(&format!("[{{A100: {per_node}}}, {{H800: {per_node}}}]"), nodes, "");
            let quote = CheapestFeasible.quote(&spec, &guangzhou(), &market, 0);
            if let Some(alloc) = quote.allocation(&spec) {
                prop_assert_eq!(alloc.nodes.len() as u32, nodes);
                let state = market.clusters.iter_mut().find(|c| c.cluster.name == alloc.cluster).unwrap();
                for &n in &alloc.nodes {
                    prop_assert!(state.free[n as usize].accelerators >= per_node);
                }
                state.take(&alloc);
            }
        }
        for (state, (_, per_node)) in market.clusters.iter().zip(original) {
            for node in &state.free {
                prop_assert!(node.accelerators <= per_node);
            }
        }
    }
}

#[test]
fn small_jobs_go_to_the_fullest_node_that_fits_so_whole_nodes_stay_free() {
    let mut market = market();
    let spec = |n| job(&format!("{{A100: {n}}}"), 1, "");
    let place = |market: &mut Market, n: u32| {
        let quote = CheapestFeasible.quote(&spec(n), &guangzhou(), market, 0);
        let alloc = quote.allocation(&spec(n)).unwrap();
        assert_eq!(alloc.cluster, "macao-a100");
        cluster_mut(market, "macao-a100").take(&alloc);
        alloc.nodes
    };
    // node 2 half used: a job of 3 joins it, a job of 4 fills the rest of it
    let macao = cluster_mut(&mut market, "macao-a100");
    let alloc = state_allocation(macao, 2, 4);
    macao.take(&alloc);
    assert_eq!(place(&mut market, 3), vec![2]);
    assert_eq!(place(&mut market, 1), vec![2]);
    // node 2 is full now; an 8 takes a whole node, the lowest free one
    assert_eq!(place(&mut market, 8), vec![0]);
    assert_eq!(place(&mut market, 2), vec![1]);
    assert_eq!(place(&mut market, 6), vec![1]);
}

fn cluster_mut<'a>(market: &'a mut Market, name: &str) -> &'a mut ClusterState {
    market
        .clusters
        .iter_mut()
        .find(|c| c.cluster.name == name)
        .unwrap()
}

fn state_allocation(state: &ClusterState, node: u32, accelerators: u32) -> Allocation {
    Allocation {
        cluster: state.cluster.name.clone(),
        accelerator: Some(state.cluster.accelerator.clone()),
        accelerators_per_node: accelerators,
        cpus_per_node: 1,
        memory_gb_per_node: 1,
        nodes: vec![node],
        price_per_accelerator_hour: state.offer.as_ref().unwrap().price_per_accelerator_hour,
        estimated_seconds: None,
        staging_cny: None,
    }
}

#[test]
fn a_cluster_that_lost_the_job_is_blocked_for_it_and_the_job_goes_elsewhere() {
    let spec = job("{H800: 1}", 1, "");
    let mut requester = guangzhou();
    requester.blocked = vec![BlockedCluster {
        cluster: "qianhai-h800".into(),
        until_ms: 60_000,
        reason: "lease expired: agent at 10.0.0.5 stopped heartbeating".into(),
    }];
    let quote = CheapestFeasible.quote(&spec, &requester, &market(), 0);
    assert_eq!(quote.chosen().unwrap().cluster, "cyberport-h800");
    let qianhai = quote
        .candidates
        .iter()
        .find(|c| c.cluster == "qianhai-h800")
        .unwrap();
    assert_eq!(qianhai.verdict, Verdict::Waits);
    assert!(
        qianhai
            .reason
            .contains("blocked for this job for 60 s more"),
        "{}",
        qianhai.reason
    );
    // the only cluster that could hold it is blocked: the job waits, it is not rejected
    requester.blocked.push(BlockedCluster {
        cluster: "cyberport-h800".into(),
        until_ms: 120_000,
        reason: "lost".into(),
    });
    let quote = CheapestFeasible.quote(&spec, &requester, &market(), 0);
    assert!(quote.chosen().is_none());
    assert!(quote.ever_feasible());
    // after the back-off it may go back
    let quote = CheapestFeasible.quote(&spec, &requester, &market(), 60_000);
    assert_eq!(quote.chosen().unwrap().cluster, "qianhai-h800");
}

#[test]
fn a_busy_cluster_quotes_when_running_work_is_expected_to_end() {
    let mut market = market();
    let macao = cluster_mut(&mut market, "macao-a100");
    // all four nodes full; they free at 50 s, 20 s, 90 s and 70 s
    for (node, end) in [(0, 50_000), (1, 20_000), (2, 90_000), (3, 70_000)] {
        let alloc = state_allocation(macao, node, 8);
        macao.take_until(&alloc, Some(end));
    }
    let quote = CheapestFeasible.quote(&job("{A100: 8}", 1, ""), &guangzhou(), &market, 1_000);
    let line = &quote.candidates[0];
    assert_eq!(line.verdict, Verdict::Waits);
    assert_eq!(line.estimated_start_ms, Some(20_000));
    assert!(
        line.reason.contains("expected to start in 19 s"),
        "{}",
        line.reason
    );
    // a gang of three starts when the third node frees
    let quote = CheapestFeasible.quote(&job("{A100: 8}", 3, ""), &guangzhou(), &market, 1_000);
    assert_eq!(quote.candidates[0].estimated_start_ms, Some(70_000));
    // what fits now starts now
    let quote = CheapestFeasible.quote(&job("{H800: 1}", 1, ""), &guangzhou(), &market, 1_000);
    assert_eq!(quote.chosen().unwrap().estimated_start_ms, Some(1_000));
    // an hour's job due 10 s after an hour from the epoch could make it starting now, but
    // it is expected to start at 20 s: the quote says it would end too late
    let due = |at: &str| job("{A100: 8}", 1, &format!("deadline: {at}"));
    let late = due("1970-01-01T01:00:10Z");
    let quote = CheapestFeasible.quote(&late, &guangzhou(), &market, 1_000);
    let line = &quote.candidates[0];
    assert_eq!(line.verdict, Verdict::Waits);
    assert!(
        line.reason
            .contains("expected to end at 1970-01-01T01:00:20.000Z, after the deadline 1970-01-01T01:00:10.000Z"),
        "{}",
        line.reason
    );
    assert!(quote.misses_deadline(&late));
    // due 30 s later, it is expected to make it
    let fine = due("1970-01-01T01:00:30Z");
    let quote = CheapestFeasible.quote(&fine, &guangzhou(), &market, 1_000);
    assert!(!quote.candidates[0].reason.contains("deadline"));
    assert!(!quote.misses_deadline(&fine));
}

#[test]
fn a_latency_insensitive_job_may_wait_for_a_cheaper_cluster_about_to_free() {
    let mut market = market();
    let qianhai = cluster_mut(&mut market, "qianhai-h800");
    let fill = |qianhai: &mut ClusterState, end| {
        for node in 0..qianhai.cluster.nodes {
            let alloc = state_allocation(qianhai, node, 8);
            qianhai.take_until(&alloc, Some(end));
        }
    };
    fill(qianhai, 100_000);
    let spec = job("[{H800: 8}, {Ascend910B: 8}, {A100: 8}]", 1, "");
    let patience = crate::patience::Patience::default();
    // Qianhai (55.49 CNY) is full until 100 s; Cyberport fits now at 69.61 CNY, 1,135 s,
    // so the job may wait a fifth of that (227 s) from its submission
    let quote = CheapestFeasible.quote(&spec, &guangzhou(), &market, 0);
    assert_eq!(quote.chosen().unwrap().cluster, "cyberport-h800");
    let wait = patience.wait_in(&quote, &spec, 0, |_| false).unwrap();
    assert_eq!(wait.cluster, "qianhai-h800");
    assert_eq!(wait.estimated_start_ms, Some(100_000));
    // not an interactive one, nor one whose deadline waiting would miss (Qianhai would end
    // it at 100 s + 1,135 s)
    let interactive = job(
        "[{H800: 8}, {Ascend910B: 8}, {A100: 8}]",
        1,
        "latency_sensitive: true",
    );
    let quote_near = CheapestFeasible.quote(&interactive, &guangzhou(), &market, 0);
    assert!(patience
        .wait_in(&quote_near, &interactive, 0, |_| false)
        .is_none());
    let due = |at: &str| {
        job(
            "[{H800: 8}, {Ascend910B: 8}, {A100: 8}]",
            1,
            &format!("deadline: {at}"),
        )
    };
    let tight = due("1970-01-01T00:20:00Z");
    assert!(patience.wait_in(&quote, &tight, 0, |_| false).is_none());
    let loose = due("1970-01-01T00:21:00Z");
    assert!(patience.wait_in(&quote, &loose, 0, |_| false).is_some());
    // nor for a cluster another job has reserved
    assert!(patience
        .wait_in(&quote, &spec, 0, |c| c == "qianhai-h800")
        .is_none());
    // submitted 200 s before, it has waited long enough
    assert!(patience
        .wait_in(&quote, &spec, -200_000, |_| false)
        .is_none());
    // full for 300 s: too long to wait
    let mut market = crate::tests::market();
    fill(cluster_mut(&mut market, "qianhai-h800"), 300_000);
    let quote = CheapestFeasible.quote(&spec, &guangzhou(), &market, 0);
    assert!(patience.wait_in(&quote, &spec, 0, |_| false).is_none());
    // nothing to wait for when the cheapest fits now
    let quote = CheapestFeasible.quote(&spec, &guangzhou(), &crate::tests::market(), 0);
    assert!(patience.wait_in(&quote, &spec, 0, |_| false).is_none());
}

#[test]
fn a_job_held_to_sites_goes_nowhere_else_and_says_why() {
    let spec = job(
        "[{H800: 1}, {A800: 1}, {Ascend910B: 1}, {A100: 1}]",
        1,
        "sites: [guangzhou-nansha]",
    );
    let quote = CheapestFeasible.quote(&spec, &guangzhou(), &market(), 0);
    assert_eq!(quote.chosen().unwrap().cluster, "nansha-a800");
    let others: Vec<_> = quote
        .candidates
        .iter()
        .filter(|c| c.cluster != "nansha-a800")
        .collect();
    assert_eq!(others.len(), 5);
    for c in others {
        assert_eq!(c.verdict, Verdict::Rejected, "{c:?}");
        assert_eq!(c.field.as_deref(), Some("sites"));
        assert!(c.reason.contains("guangzhou-nansha"), "{}", c.reason);
    }
    // a site with no cluster for the job: never feasible, the field named
    let nowhere = job("{H800: 1}", 1, "sites: [guangzhou-nansha]");
    let quote = CheapestFeasible.quote(&nowhere, &guangzhou(), &market(), 0);
    assert!(!quote.ever_feasible());
    for bad in ["sites: []", "sites: [Nowhere]", "sites: [macao, macao]"] {
        let text = format!(
            "name: j\nresources:\n  accelerators: {{H800: 1}}\ncommand: 'true'\nestimated_duration: 1h\n{bad}"
        );
        let error = JobSpec::from_yaml(&text).unwrap_err();
        assert!(error.field.starts_with("sites"), "{error}");
    }
}
