//! FATE's own example data, with FATE's settings, against the AUCs FATE
//! publishes, and federated against centralised training by the same code.

mod common;

use baygrid_fusion::data::Table;
use baygrid_fusion::hetero::{self, HeteroConfig};
use baygrid_fusion::homo::{self, Aggregation, Arch, HomoConfig};
use baygrid_fusion::psi::{align, run_loopback, Reveal};

fn fate_homo_lr() -> HomoConfig {
    HomoConfig::fate_lr()
}

fn fate_hetero_lr() -> HeteroConfig {
    HeteroConfig {
        seed: 7,
        ..HeteroConfig::fate()
    }
}

#[test]
fn homo_lr_on_breast_reproduces_fate() {
    let (g, h) = (
        common::fate("breast_homo_guest.csv"),
        common::fate("breast_homo_host.csv"),
    );
    let dev = homo::device();
    let cfg = fate_homo_lr();
    let report = homo::train(&cfg, &[g.clone(), h.clone()], &dev, |_| {}).unwrap();
    // Two parties: plain FedAvg, and the report says so.
    assert_eq!(report.aggregation, Aggregation::Plain);
    let train = homo::score(cfg.arch, &report.params, &g, &dev).unwrap();
    assert!(
        (train.auc - 0.998095).abs() <= 0.005,
        "guest train AUC {}",
        train.auc
    );
    let test = homo::score(
        cfg.arch,
        &report.params,
        &common::fate("breast_homo_test.csv"),
        &dev,
    )
    .unwrap();
    assert!(test.auc > 0.97, "test AUC {}", test.auc);
}

#[test]
fn hetero_lr_on_breast_reproduces_fate_after_psi() {
    let (g, h) = (
        common::fate("breast_hetero_guest.csv"),
        common::fate("breast_hetero_host.csv"),
    );
    let (go, _) = run_loopback(&g.ids, &h.ids, Reveal::Both, 256).unwrap();
    let ids = go.intersection.unwrap();
    let (g, h) = (
        g.select(&align(&g.ids, &ids)),
        h.select(&align(&h.ids, &ids)),
    );
    let cfg = fate_hetero_lr();
    let report = hetero::train(&cfg, &g, &h, |_| {}).unwrap();
    let s = hetero::score(&report.model, &g, &h).unwrap();
    assert!((s.auc - 0.975186).abs() <= 0.005, "train AUC {}", s.auc);
    // Same numbers as the centralised run of the same optimiser.
    let pooled = g.join_columns(&h).unwrap();
    let w = hetero::train_central(&cfg, &pooled).unwrap();
    let c = hetero::score_central(&w, &pooled).unwrap();
    assert!((s.auc - c.auc).abs() < 1e-4, "{} vs {}", s.auc, c.auc);
    // Central weights: guest columns, host columns, intercept.
    let m = g.width();
    let all: Vec<f64> = report.model.guest[..m]
        .iter()
        .chain(&report.model.host)
        .chain(&report.model.guest[m..])
        .copied()
        .collect();
    for (a, b) in all.iter().zip(&w) {
        assert!((a - b).abs() < 1e-3, "weights {a} vs {b}");
    }
}

#[test]
fn hetero_lr_on_default_credit_matches_central_held_out() {
    let (g, h) = (
        common::fate("default_credit_hetero_guest.csv"),
        common::fate("default_credit_hetero_host.csv"),
    );
    let (g_train, g_test) = g.split(0.8, 11);
    let index = align(&h.ids, &g_train.ids);
    let h_train = h.select(&index);
    let h_test = h.select(&align(&h.ids, &g_test.ids));
    let mut cfg = fate_hetero_lr();
    cfg.iterations = 30;
    let report = hetero::train(&cfg, &g_train, &h_train, |_| {}).unwrap();
    let fed = hetero::score(&report.model, &g_test, &h_test).unwrap();
    let w = hetero::train_central(&cfg, &g_train.join_columns(&h_train).unwrap()).unwrap();
    let central = hetero::score_central(&w, &g_test.join_columns(&h_test).unwrap()).unwrap();
    assert!(
        (fed.auc - central.auc).abs() <= 0.01,
        "{fed:?} vs {central:?}"
    );
    assert!(fed.auc > 0.65, "{fed:?}");
}

#[test]
fn homo_lr_on_default_credit_with_secure_aggregation_matches_central() {
    let parties: Vec<Table> = [
        "default_credit_homo_guest.csv",
        "default_credit_homo_host_1.csv",
        "default_credit_homo_host_2.csv",
    ]
    .iter()
    .map(|f| common::fate(f))
    .collect();
    let dev = homo::device();
    let mut cfg = fate_homo_lr();
    cfg.rounds = 20;
    let fed = homo::train(&cfg, &parties, &dev, |_| {}).unwrap();
    assert_eq!(fed.aggregation, Aggregation::Secure { threshold: 2 });
    let pooled = parties[0]
        .concat(&parties[1])
        .unwrap()
        .concat(&parties[2])
        .unwrap();
    let central = homo::train(&cfg, &[pooled], &dev, |_| {}).unwrap();
    let test = common::fate("default_credit_homo_test.csv");
    let f = homo::score(cfg.arch, &fed.params, &test, &dev).unwrap();
    let c = homo::score(cfg.arch, &central.params, &test, &dev).unwrap();
    assert!((f.auc - c.auc).abs() <= 0.01, "{f:?} vs {c:?}");
    // Full-batch FedAvg with one local step is centralised gradient descent:
    // masked aggregation changes the weights by fixed-point rounding only.
    for (a, b) in fed.params.iter().zip(&central.params) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
}

#[test]
fn homo_mlp_with_dp_reports_epsilon() {
    let parties: Vec<Table> = [
        "default_credit_homo_guest.csv",
        "default_credit_homo_host_1.csv",
        "default_credit_homo_host_2.csv",
    ]
    .iter()
    .map(|f| common::fate(f).sample(0.1, 3))
    .collect();
    let dev = homo::device();
    let cfg = HomoConfig {
        arch: Arch::Mlp { hidden: 8 },
        rounds: 2,
        learning_rate: 0.1,
        decay: 0.0,
        alpha: 0.0,
        dp: Some(baygrid_fusion::dp::DpSgd {
            clip: 1.0,
            noise_multiplier: 1.1,
            batch_size: 80,
            delta: 1e-5,
        }),
        seed: 5,
        ..fate_homo_lr()
    };
    let report = homo::train(&cfg, &parties, &dev, |_| {}).unwrap();
    let (eps, delta) = report.dp.expect("ε reported");
    assert!(eps.is_finite() && eps > 0.0 && delta == 1e-5, "ε {eps}");
    assert_eq!(report.rounds.len(), 2);
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let g = common::fate("breast_hetero_guest.csv");
    let h = common::fate("breast_hetero_host.csv").sample(0.5, 1);
    let err = hetero::train(&fate_hetero_lr(), &g, &h, |_| {}).unwrap_err();
    assert!(err.to_string().contains("aligned"), "{err}");
    let homo_g = common::fate("breast_homo_guest.csv");
    let credit = common::fate("default_credit_homo_guest.csv");
    let err = homo::train(&fate_homo_lr(), &[homo_g, credit], &homo::device(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("columns"), "{err}");
}
