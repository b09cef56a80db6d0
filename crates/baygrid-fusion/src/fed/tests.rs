use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::*;

/// Roles wired by channels; every message goes through its JSON encoding, as on the relay.
struct Wire {
    me: usize,
    inbox: Receiver<(usize, Vec<u8>)>,
    peers: Vec<Sender<(usize, Vec<u8>)>>,
    bytes: usize,
    /// What this role received, decoded, in order.
    seen: Seen,
    /// Stop sending after this many messages (a party that drops).
    sends_left: Option<usize>,
}

impl Transport for Wire {
    fn send(&mut self, to: usize, msg: &Msg) -> Result<(), FedError> {
        if let Some(left) = &mut self.sends_left {
            if *left == 0 {
                return Err(FedError::Transport("dropped".into()));
            }
            *left -= 1;
        }
        let bytes = serde_json::to_vec(msg).unwrap();
        self.bytes += bytes.len();
        self.peers[to]
            .send((self.me, bytes))
            .map_err(|e| FedError::Transport(e.to_string()))
    }

    fn recv(&mut self, wait: Duration) -> Result<Option<(usize, Msg)>, FedError> {
        match self.inbox.recv_timeout(wait) {
            Ok((from, bytes)) => {
                self.bytes += bytes.len();
                let msg: Msg = serde_json::from_slice(&bytes).unwrap();
                self.seen.lock().unwrap().push((from, msg.clone()));
                Ok(Some((from, msg)))
            }
            Err(_) => Ok(None),
        }
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

fn wires(n: usize) -> Vec<Wire> {
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..=n).map(|_| channel()).unzip();
    inboxes
        .into_iter()
        .enumerate()
        .map(|(me, inbox)| Wire {
            me,
            inbox,
            peers: senders.clone(),
            bytes: 0,
            seen: Arc::default(),
            sends_left: None,
        })
        .collect()
}

fn fate(file: &str) -> Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fate")
        .join(file);
    Table::read_csv(&path).unwrap()
}

type Seen = Arc<Mutex<Vec<(usize, Msg)>>>;

/// Runs the aggregator here and each party on its own thread; what the aggregator saw.
fn run(
    cfg: &HomoConfig,
    tables: Vec<Table>,
    mut wires: Vec<Wire>,
) -> (
    Result<AggregatorOutcome, FedError>,
    Vec<Result<PartyOutcome, FedError>>,
    Seen,
) {
    let wait = Duration::from_secs(5);
    let mut aggregator = wires.remove(0);
    let seen = aggregator.seen.clone();
    let threads: Vec<_> = tables
        .into_iter()
        .zip(wires)
        .enumerate()
        .map(|(i, (table, mut wire))| {
            let cfg = cfg.clone();
            std::thread::spawn(move || run_party(&cfg, table, i + 1, Device::Cpu, &mut wire, wait))
        })
        .collect();
    let outcome = run_aggregator(cfg, threads.len(), &mut aggregator, wait, |_| {});
    let parties = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (outcome, parties, seen)
}

#[test]
fn two_parties_apart_train_the_same_model_as_in_one_process() {
    let tables = vec![fate("breast_homo_guest.csv"), fate("breast_homo_host.csv")];
    let cfg = HomoConfig::fate_lr();
    let together = homo::train(&cfg, &tables, &Device::Cpu, |_| {}).unwrap();
    let (outcome, parties, _) = run(&cfg, tables, wires(2));
    let outcome = outcome.unwrap();
    assert_eq!(outcome.aggregation, Aggregation::Plain);
    assert_eq!(outcome.rounds.len(), 30);
    assert_eq!(outcome.params, together.params);
    for (r, t) in outcome.rounds.iter().zip(&together.rounds) {
        assert!((r.loss - t.loss).abs() < 1e-9, "round {}", r.round);
        assert!(r.bytes > 0);
    }
    for party in parties {
        assert_eq!(party.unwrap().params, together.params);
    }
}

fn default_credit() -> Vec<Table> {
    ["guest", "host_1", "host_2"]
        .iter()
        .map(|p| fate(&format!("default_credit_homo_{p}.csv")))
        .collect()
}

fn short(rounds: usize) -> HomoConfig {
    HomoConfig {
        rounds,
        ..HomoConfig::fate_lr()
    }
}

#[test]
fn three_parties_aggregate_securely_and_the_aggregator_sees_only_masked_vectors() {
    let tables = default_credit();
    let cfg = short(3);
    let together = homo::train(&cfg, &tables, &Device::Cpu, |_| {}).unwrap();
    let (outcome, _, seen) = run(&cfg, tables, wires(3));
    let outcome = outcome.unwrap();
    assert_eq!(outcome.aggregation, Aggregation::Secure { threshold: 2 });
    assert!(outcome.dropped.is_empty());
    // fixed-point encoding rounds each update the same way in both runs
    for (a, b) in outcome.params.iter().zip(&together.params) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    for (r, t) in outcome.rounds.iter().zip(&together.rounds) {
        assert!((r.loss - t.loss).abs() < 1e-3, "round {}", r.round);
    }
    let seen = seen.lock().unwrap();
    assert!(
        !seen.iter().any(|(_, m)| matches!(m, Msg::Update { .. })),
        "no plain update reaches the aggregator"
    );
    // each masked vector is far from the party's update in the ring: the masks are
    // uniform, so its decoding is noise, not a model
    let masked: Vec<&Vec<u32>> = seen
        .iter()
        .filter_map(|(_, m)| match m {
            Msg::Masked(y) => Some(y),
            _ => None,
        })
        .collect();
    assert_eq!(masked.len(), 3 * 3);
    let params = Params::new(3, 2, outcome.params.len() + 1).unwrap();
    for y in masked {
        let decoded = params.decode(y);
        let big = decoded.iter().filter(|v| v.abs() > 1.0).count();
        assert!(
            big > decoded.len() / 2,
            "a masked vector decodes to {decoded:?}"
        );
    }
}

#[test]
fn a_party_that_drops_mid_round_is_left_out_and_the_run_goes_on() {
    let tables = default_credit();
    let cfg = short(2);
    let mut w = wires(3);
    // party 3 sends its hello, its advert and its shares, then goes silent
    w[3].sends_left = Some(3);
    let (outcome, parties, _) = run(&cfg, tables.clone(), w);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.dropped, vec![3]);
    assert!(parties[2].is_err());
    assert_eq!(outcome.rounds.len(), 2);
    assert_eq!(parties[0].as_ref().unwrap().params, outcome.params);
    // the survivors' sum is reweighted over their own rows, so the model is not shrunk
    let scores = homo::score(
        cfg.arch,
        &outcome.params,
        &fate("default_credit_homo_test.csv"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(scores.auc > 0.65, "{scores:?}");
}

#[test]
fn below_the_threshold_the_round_is_refused() {
    let tables = default_credit();
    let cfg = HomoConfig {
        secure_threshold: Some(3),
        ..short(1)
    };
    let mut w = wires(3);
    w[2].sends_left = Some(3);
    let (outcome, _, _) = run(&cfg, tables, w);
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("threshold") || err.contains("below"), "{err}");
}

#[test]
fn parties_with_different_columns_are_refused_by_name() {
    let tables = vec![
        fate("breast_homo_guest.csv"),
        fate("default_credit_homo_guest.csv"),
    ];
    let (outcome, _, _) = run(&short(1), tables, wires(2));
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("party 2 has columns"), "{err}");
}

fn fate_hetero_lr() -> crate::hetero::HeteroConfig {
    crate::hetero::HeteroConfig {
        seed: 7,
        ..crate::hetero::HeteroConfig::fate()
    }
}

#[test]
fn a_vertical_run_apart_aligns_by_psi_and_learns_the_same_weights_as_in_one_process() {
    use crate::hetero::{self, apart};
    // a seeded quarter of each side's rows dropped, so that PSI has work to do
    let guest = fate("breast_hetero_guest.csv").sample(0.75, 1);
    let host = fate("breast_hetero_host.csv").sample(0.75, 2);
    let cfg = fate_hetero_lr();
    let mut w = wires(2);
    let mut host_wire = w.pop().unwrap();
    let mut guest_wire = w.pop().unwrap();
    let mut dealer_wire = w.pop().unwrap();
    let dealer_seen = dealer_wire.seen.clone();
    let wait = Duration::from_secs(10);
    let (g, h, d) = std::thread::scope(|scope| {
        let (gc, hc, dc) = (cfg.clone(), cfg.clone(), cfg.clone());
        let (gt, ht) = (&guest, &host);
        let g = scope.spawn(move || apart::run_guest(&gc, gt, &mut guest_wire, wait, |_| {}));
        let h = scope.spawn(move || apart::run_host(&hc, ht, &mut host_wire, wait));
        let d = scope.spawn(move || apart::run_dealer(&dc, &mut dealer_wire, wait));
        (g.join().unwrap(), h.join().unwrap(), d.join().unwrap())
    });
    let (g, h) = (g.unwrap(), h.unwrap());
    d.unwrap();
    // the rows both hold, aligned in one process, trained by the in-process protocol
    let host_ids: std::collections::HashSet<&String> = host.ids.iter().collect();
    let common: Vec<String> = guest
        .ids
        .iter()
        .filter(|i| host_ids.contains(i))
        .cloned()
        .collect();
    assert_eq!(g.aligned, common.len());
    assert_eq!(h.aligned, common.len());
    let together = hetero::train(
        &cfg,
        &guest.select(&crate::psi::align(&guest.ids, &common)),
        &host.select(&crate::psi::align(&host.ids, &common)),
        |_| {},
    )
    .unwrap();
    // ring arithmetic is exact, so the order of the rows changes nothing
    assert_eq!(g.weights, together.model.guest);
    assert_eq!(h.weights, together.model.host);
    assert_eq!(g.iterations.len(), 5);
    let auc = g.scores.unwrap().auc;
    assert!(auc > 0.95, "{auc}");
    assert!(
        h.scores.is_none(),
        "the host never scores: it has no labels"
    );
    // the dealer saw two shapes and nothing else
    let seen = dealer_seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, m)| matches!(m, Msg::Shape { .. })));
}
