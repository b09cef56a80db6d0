//! A cost lower bound for a replay: a min-cost flow over time slots.
//!
//! Formulation (docs/SCHEDULER.md): the horizon (the dispatcher's own makespan) is cut into
//! `T` slots. Work is measured in reference-accelerator seconds (A800-seconds). Pool `p`
//! offers `C_p × slot × speed_p` of them in each slot, at `price_p ÷ 3600 ÷ speed_p` CNY
//! each. Jobs are aggregated into classes by the set of pools they may run on and by
//! arrival slot; class `k` arriving in slot `a` brings `D_{k,a}` = Σ accelerators × reference
//! duration. Demand may wait (an edge from each class-slot to the next, free) and may be
//! served in any slot at or after its arrival, on any pool of its set. Packing, gang shape,
//! job order and the granularity of a job are ignored, and a job may use its whole arrival
//! slot, so every schedule the simulator can produce is a feasible flow: the minimum cost
//! of the flow is a lower bound on the cost of any schedule that ends within the horizon.
//!
//! Solved exactly by successive shortest paths (Dijkstra with potentials; every cost is
//! non-negative) on integer units: A800-seconds and micro-CNY.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// Demand of one class (a set of pools, as a bit mask) arriving in one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub pools: u64,
    pub slot: usize,
    /// Reference-accelerator seconds.
    pub work: u64,
}

/// One pool as the bound sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Supply {
    /// Reference-accelerator seconds per slot.
    pub per_slot: u64,
    /// Micro-CNY per reference-accelerator second.
    pub cost: i64,
}

/// The bound: its cost, and any demand the horizon could not hold (zero when the horizon
/// is the dispatcher's own makespan).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    pub cost_cny: f64,
    pub unserved_work: u64,
}

struct Edge {
    to: usize,
    cap: u64,
    cost: i64,
}

struct Graph {
    edges: Vec<Edge>,
    adjacency: Vec<Vec<usize>>,
}

impl Graph {
    fn new(nodes: usize) -> Self {
        Graph {
            edges: Vec::new(),
            adjacency: vec![Vec::new(); nodes],
        }
    }

    fn add(&mut self, from: usize, to: usize, cap: u64, cost: i64) {
        self.adjacency[from].push(self.edges.len());
        self.edges.push(Edge { to, cap, cost });
        self.adjacency[to].push(self.edges.len());
        self.edges.push(Edge {
            to: from,
            cap: 0,
            cost: -cost,
        });
    }

    /// Sends as much as possible from `source` to `sink` at least cost. Returns (flow, cost).
    fn min_cost_flow(&mut self, source: usize, sink: usize) -> (u64, i128) {
        let n = self.adjacency.len();
        let mut potential = vec![0i64; n];
        let mut flow = 0u64;
        let mut cost = 0i128;
        loop {
            let mut distance = vec![i64::MAX; n];
            let mut via = vec![usize::MAX; n];
            distance[source] = 0;
            let mut heap = BinaryHeap::new();
            heap.push(Reverse((0i64, source)));
            while let Some(Reverse((d, node))) = heap.pop() {
                if d > distance[node] {
                    continue;
                }
                for &e in &self.adjacency[node] {
                    let edge = &self.edges[e];
                    if edge.cap == 0 {
                        continue;
                    }
                    let reduced = edge.cost + potential[node] - potential[edge.to];
                    let next = d + reduced;
                    if next < distance[edge.to] {
                        distance[edge.to] = next;
                        via[edge.to] = e;
                        heap.push(Reverse((next, edge.to)));
                    }
                }
            }
            if distance[sink] == i64::MAX {
                return (flow, cost);
            }
            for (p, d) in potential.iter_mut().zip(&distance) {
                if *d != i64::MAX {
                    *p += d;
                }
            }
            let mut push = u64::MAX;
            let mut node = sink;
            while node != source {
                let e = via[node];
                push = push.min(self.edges[e].cap);
                node = self.edges[e ^ 1].to;
            }
            let mut node = sink;
            while node != source {
                let e = via[node];
                self.edges[e].cap -= push;
                self.edges[e ^ 1].cap += push;
                cost += i128::from(self.edges[e].cost) * i128::from(push);
                node = self.edges[e ^ 1].to;
            }
            flow += push;
        }
    }
}

/// The least cost of serving `demands` from `supplies` over `slots` slots.
pub fn lower_bound(demands: &[Demand], supplies: &[Supply], slots: usize) -> Bound {
    // aggregate by class
    let mut classes: BTreeMap<u64, BTreeMap<usize, u64>> = BTreeMap::new();
    for d in demands {
        if d.work == 0 {
            continue;
        }
        *classes
            .entry(d.pools)
            .or_default()
            .entry(d.slot.min(slots - 1))
            .or_default() += d.work;
    }
    let pools = supplies.len();
    // node numbering: source, sink, pool-slots, then class-slots
    let source = 0;
    let sink = 1;
    let pool_node = |p: usize, t: usize| 2 + p * slots + t;
    let mut next = 2 + pools * slots;
    let mut class_first = Vec::new();
    for arrivals in classes.values() {
        let first = *arrivals.keys().next().expect("a class has demand");
        class_first.push((next, first));
        next += slots - first;
    }
    let mut graph = Graph::new(next);
    for (p, supply) in supplies.iter().enumerate() {
        for t in 0..slots {
            graph.add(pool_node(p, t), sink, supply.per_slot, 0);
        }
    }
    let mut total_work = 0u64;
    for ((mask, arrivals), &(base, first)) in classes.iter().zip(&class_first) {
        let class_node = |t: usize| base + (t - first);
        for (&slot, &work) in arrivals {
            graph.add(source, class_node(slot), work, 0);
            total_work += work;
        }
        for t in first..slots {
            if t + 1 < slots {
                graph.add(class_node(t), class_node(t + 1), u64::MAX / 4, 0);
            }
            for (p, supply) in supplies.iter().enumerate() {
                if mask & (1u64 << p) != 0 {
                    graph.add(class_node(t), pool_node(p, t), u64::MAX / 4, supply.cost);
                }
            }
        }
    }
    let (flow, cost) = graph.min_cost_flow(source, sink);
    Bound {
        cost_cny: cost as f64 / 1e6,
        unserved_work: total_work - flow,
    }
}
