use super::*;
use proptest::prelude::*;

const NODES_HEADER: &str = "sn,cpu_milli,memory_mib,gpu,model\n";
const TASKS_HEADER: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\n";

fn shared_trace(file: &str) -> Option<String> {
    let path = format!(
        "{}/../../../shared/data/traces/alibaba-gpu-2023/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).ok()
}

fn node(name: &str, cpu: u32, memory: u64, gpus: u32, model: &str) -> GpuNode {
    GpuNode {
        name: name.into(),
        cpu_milli: cpu,
        memory_mib: memory,
        gpus,
        model: model.into(),
    }
}

fn task(cpu: u32, num_gpu: u32, gpu_milli: u32, spec: &[&str]) -> GpuTask {
    GpuTask {
        name: "t".into(),
        cpu_milli: cpu,
        memory_mib: 1024,
        num_gpu,
        gpu_milli,
        gpu_spec: spec.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn node_and_task_files_parse_and_bad_fields_are_named() {
    let nodes = parse_nodes("n.csv", &format!("{NODES_HEADER}a,64000,262144,2,P100\n")).unwrap();
    assert_eq!(nodes, vec![node("a", 64000, 262_144, 2, "P100")]);
    let tasks = parse_tasks(
        "t.csv",
        &format!("{TASKS_HEADER}p,6000,12288,1,460,,LS\nq,1000,1,2,1000,T4|P100,BE\n"),
    )
    .unwrap();
    assert_eq!(tasks[0].gpu_request_milli(), 460);
    assert_eq!(
        tasks[1].gpu_spec,
        vec!["T4".to_string(), "P100".to_string()]
    );

    let cases = [
        (
            "x,64000,1,9,P100",
            "n.csv line 2: column `gpu`: 9 GPUs; a node has at most 8",
        ),
        (
            "x,lots,1,2,P100",
            "n.csv line 2: column `cpu_milli`: `lots` is not a non-negative integer",
        ),
        ("x,64000,1,2", "n.csv: line 2: 4 fields, the header has 5"),
    ];
    for (row, message) in cases {
        let error = parse_nodes("n.csv", &format!("{NODES_HEADER}{row}\n")).unwrap_err();
        assert_eq!(error.to_string(), message, "{row}");
    }
    let cases = [
        (
            "p,1,1,2,500,,LS",
            "t.csv line 2: column `gpu_milli`: a task of 2 GPUs takes whole GPUs (1000), not 500",
        ),
        (
            "p,1,1,1,1500,,LS",
            "t.csv line 2: column `gpu_milli`: 1500 is above 1000 per GPU",
        ),
        (
            "p,1,1,0,300,,LS",
            "t.csv line 2: column `gpu_milli`: a task with no GPU asks 0 gpu_milli",
        ),
    ];
    for (row, message) in cases {
        let error = parse_tasks("t.csv", &format!("{TASKS_HEADER}{row}\n")).unwrap_err();
        assert_eq!(error.to_string(), message, "{row}");
    }
    let error = parse_tasks("t.csv", "name,cpu_milli\np,1\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "t.csv: the header lacks column `memory_mib`"
    );
    assert!("worstfit".parse::<PackPolicy>().is_err());
}

#[test]
fn a_shared_task_goes_to_the_fullest_gpu_under_bestfit_and_whole_gpus_stay_whole() {
    // One node, two GPUs: a 600-milli task, then a 300 must join it, then a whole GPU fits.
    let nodes = vec![node("a", 64_000, 1 << 20, 2, "T4")];
    let trace = vec![
        task(1000, 1, 600, &[]),
        task(1000, 1, 300, &[]),
        task(1000, 1, 1000, &[]),
    ];
    let harness = PackHarness::new(&nodes, &trace).unwrap();
    for policy in PackPolicy::ALL {
        let mut packer = Packer::new(harness.nodes.clone(), &harness.typical, policy);
        let mut rng = StdRng::seed_from_u64(1);
        for request in &harness.requests {
            assert_eq!(packer.place(request, &mut rng), Some(0), "{policy}");
        }
        let left = &packer.nodes[0].left[..2];
        assert_eq!(
            left.iter().map(|&l| u32::from(l)).sum::<u32>(),
            100,
            "{policy}"
        );
        assert!(
            left.contains(&0),
            "{policy}: one GPU is given whole: {left:?}"
        );
        assert_eq!(packer.allocated_percent(2000.0), 95.0);
        // Nothing more fits.
        assert_eq!(packer.place(&harness.requests[0], &mut rng), None);
    }
}

#[test]
fn model_restrictions_cpu_and_memory_bind() {
    let nodes = vec![
        node("p100", 8_000, 4096, 2, "P100"),
        node("t4", 64_000, 1 << 20, 2, "T4"),
    ];
    let trace = vec![
        task(1000, 1, 1000, &["P100"]),
        task(16_000, 1, 1000, &[]),
        GpuTask {
            memory_mib: 8192,
            ..task(1000, 0, 0, &[])
        },
    ];
    let harness = PackHarness::new(&nodes, &trace).unwrap();
    for policy in PackPolicy::ALL {
        let mut packer = Packer::new(harness.nodes.clone(), &harness.typical, policy);
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(
            packer.place(&harness.requests[0], &mut rng),
            Some(0),
            "{policy}: model"
        );
        assert_eq!(
            packer.place(&harness.requests[1], &mut rng),
            Some(1),
            "{policy}: cpu"
        );
        assert_eq!(
            packer.place(&harness.requests[2], &mut rng),
            Some(1),
            "{policy}: memory"
        );
    }
}

#[test]
fn fragmentation_counts_what_typical_tasks_cannot_use() {
    let half = Typical {
        request: Request {
            cpu: 1000,
            memory: 0,
            gpus: 1,
            milli: 500,
            models: u64::MAX,
        },
        share: 0.5,
    };
    let whole = Typical {
        request: Request {
            milli: 1000,
            ..half.request
        },
        share: 0.5,
    };
    let mut n = Node {
        cpu: 8000,
        memory: 1,
        model: 0,
        gpus: 2,
        left: [1000, 300, 0, 0, 0, 0, 0, 0],
        frag: 0.0,
    };
    // The half task cannot use the 300 left; the whole task cannot use it either.
    assert!((fragmentation(&n, &[half, whole]) - 300.0).abs() < 1e-9);
    // Without CPU, nothing on the node is usable.
    n.cpu = 500;
    assert!((fragmentation(&n, &[half, whole]) - 1300.0).abs() < 1e-9);
    // A model the tasks do not accept: all of it.
    n.cpu = 8000;
    let only_other = Typical {
        request: Request {
            models: 0b10,
            ..half.request
        },
        share: 1.0,
    };
    assert!((fragmentation(&n, &[only_other]) - 1300.0).abs() < 1e-9);
}

#[test]
fn typical_tasks_cover_the_share_and_sum_to_one() {
    let r = |cpu| Request {
        cpu,
        memory: 0,
        gpus: 1,
        milli: 1000,
        models: u64::MAX,
    };
    let requests: Vec<Request> = std::iter::repeat_n(r(1), 6)
        .chain(std::iter::repeat_n(r(2), 3))
        .chain([r(3)])
        .collect();
    let typical = typical_tasks(&requests, 0.85);
    assert_eq!(typical.len(), 2);
    assert!((typical[0].share - 6.0 / 9.0).abs() < 1e-12);
    assert!((typical.iter().map(|t| t.share).sum::<f64>() - 1.0).abs() < 1e-12);
    assert_eq!(typical_tasks(&requests, 1.0).len(), 3);
}

fn arbitrary_nodes() -> impl Strategy<Value = Vec<GpuNode>> {
    prop::collection::vec(
        (1u32..=8, 0usize..3, 1u32..=96).prop_map(|(gpus, model, cores)| {
            node(
                "n",
                cores * 1000,
                1 << 18,
                gpus,
                ["A10", "T4", "V100M32"][model],
            )
        }),
        1..12,
    )
}

fn arbitrary_tasks() -> impl Strategy<Value = Vec<GpuTask>> {
    prop::collection::vec(
        (0u32..=8, 1u32..=1000, 0u32..=32, 0usize..4).prop_map(|(gpus, milli, cores, spec)| {
            let (num_gpu, gpu_milli) = match gpus {
                0 => (0, 0),
                1 => (1, milli),
                n => (n, 1000),
            };
            let spec: &[&str] = [&[][..], &["T4"], &["A10", "V100M32"], &["G9"]][spec];
            task(cores * 1000, num_gpu, gpu_milli, spec)
        }),
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the policy: no GPU, CPU or memory is over-committed, a shared GPU never
    /// holds more than 1000 milli, every placement respects the model restriction, and the
    /// allocated total is what the tasks placed asked for.
    #[test]
    fn capacity_is_never_exceeded(nodes in arbitrary_nodes(), trace in arbitrary_tasks(), seed in 0u64..1000) {
        let harness = PackHarness::new(&nodes, &trace).unwrap();
        for policy in PackPolicy::ALL {
            let mut packer = Packer::new(harness.nodes.clone(), &harness.typical, policy);
            let mut rng = StdRng::seed_from_u64(seed);
            let mut asked = 0u64;
            let mut cpu_taken = vec![0u64; nodes.len()];
            for request in &harness.requests {
                if let Some(index) = packer.place(request, &mut rng) {
                    asked += u64::from(request.total_milli());
                    cpu_taken[index] += u64::from(request.cpu);
                    prop_assert!(request.gpus == 0 || request.models & (1 << packer.nodes[index].model) != 0);
                }
            }
            prop_assert_eq!(packer.allocated_milli, asked);
            for (index, (state, original)) in packer.nodes.iter().zip(&nodes).enumerate() {
                prop_assert_eq!(u64::from(state.cpu) + cpu_taken[index], u64::from(original.cpu_milli));
                prop_assert!(state.left[..state.gpus as usize].iter().all(|&l| u32::from(l) <= MILLI));
                prop_assert!(state.left[state.gpus as usize..].iter().all(|&l| l == 0));
            }
        }
    }
}

#[test]
fn a_run_is_deterministic_for_its_seed() {
    let nodes = vec![
        node("a", 96_000, 1 << 20, 8, "G2"),
        node("b", 64_000, 1 << 20, 2, "T4"),
        node("c", 64_000, 1 << 20, 2, "T4"),
    ];
    let trace = vec![
        task(4000, 1, 500, &[]),
        task(8000, 1, 1000, &[]),
        task(12_000, 4, 1000, &[]),
        task(2000, 0, 0, &[]),
        task(6000, 1, 250, &["T4"]),
    ];
    let harness = PackHarness::new(&nodes, &trace).unwrap();
    for policy in PackPolicy::ALL {
        let first = harness.run(policy, 1.3, 42).unwrap();
        assert_eq!(first, harness.run(policy, 1.3, 42).unwrap(), "{policy}");
        assert!(first.tasks >= trace.len());
        assert!(first.alloc_at_100 <= first.alloc_at_130 + 1e-9);
    }
    assert!(harness.run(PackPolicy::Fgd, 0.5, 1).is_err());
}

/// The openb traces themselves, one seed each: the harness reads them, keeps the trace's
/// tasks, inflates to 1.3 × the cluster, and lands where the published method does (the
/// ten-seed means against the published figures are a benchmark, docs/BENCHMARKS.md).
#[test]
fn openb_traces_pack_as_published() {
    let (Some(nodes), Some(default)) = (
        shared_trace("openb_node_list_gpu_node.csv"),
        shared_trace("openb_pod_list_default.csv"),
    ) else {
        panic!("the shared openb traces are missing: ../shared/data/traces/alibaba-gpu-2023");
    };
    let nodes = parse_nodes("nodes", &nodes).unwrap();
    let trace = parse_tasks("default", &default).unwrap();
    assert_eq!(nodes.len(), 1213);
    assert_eq!(trace.len(), 8152);
    let harness = PackHarness::new(&nodes, &trace).unwrap();
    assert_eq!(harness.capacity_milli(), 6_212_000);
    let bestfit = harness.run(PackPolicy::BestFit, 1.3, 42).unwrap();
    let fgd = harness.run(PackPolicy::Fgd, 1.3, 42).unwrap();
    // The published means are 92.86 (BestFit) and 95.23 (FGD) at 100%; one seed strays
    // a little from the mean.
    assert!((bestfit.alloc_at_100 - 92.86).abs() < 1.0, "{bestfit:?}");
    assert!((fgd.alloc_at_100 - 95.23).abs() < 1.0, "{fgd:?}");
    assert!(fgd.alloc_at_100 > bestfit.alloc_at_100);
}
