//! Vertical (hetero) logistic regression between a guest, which holds the
//! labels and some features, and a host, which holds other features of the
//! same rows (aligned by PSI), with a dealer that hands out correlated
//! randomness and never sees data.
//!
//! The gradient is FATE's: the logistic loss's Taylor expansion at zero,
//! so the residual is d = z/4 − y/2 (y in {−1, 1}) and the gradient is
//! Xᵀd / n. Each party keeps its own weights. Per iteration:
//!
//! 1. Each computes its partial score z_g = X_g w_g (the guest's X has the
//!    intercept column), z_h = X_h w_h. The host splits z_h into two
//!    additive shares mod 2^64 and sends one, uniformly random, to the
//!    guest. Both now hold additive shares of 4d = z − 2y without either
//!    seeing the other's score or the guest's labels leaving it.
//! 2. For each party's gradient Xᵀ(4d) the owner of X multiplies its own
//!    share locally; the product of its X with the *other* party's share
//!    uses one dealer-made correlation (R, s, c_A, c_B with c_A + c_B =
//!    Rᵀs): the owner sends E = X − R, the other sends f = u − s, and
//!    Rᵀf + c_A and Eᵀu + c_B are shares of Xᵀu. Both E and f are masked
//!    by fresh uniform values.
//! 3. The other party sends its share of the product to the owner, who
//!    alone learns its gradient and updates its weights.
//!
//! Values are fixed-point with 16 fractional bits; products carry 32.
//! Threat model: semi-honest parties and a dealer that colludes with
//! neither. Each party learns its own gradient per iteration, as in FATE.
//! For scoring, the host releases its partial scores to the guest.

use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::data::Table;
use crate::metrics::{evaluate, Scores};

const FRAC: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum HeteroError {
    #[error("{0}")]
    Config(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Sgd,
    Rmsprop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeteroConfig {
    pub iterations: usize,
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    /// L2 penalty on weights (not the intercept).
    #[serde(default)]
    pub alpha: f64,
    #[serde(default)]
    pub decay: f64,
    #[serde(default = "yes")]
    pub decay_sqrt: bool,
    #[serde(default)]
    pub seed: u64,
}

fn yes() -> bool {
    true
}

impl HeteroConfig {
    /// FATE's hetero LR example settings: L2 (alpha 0.01), RMSprop at learning rate 0.15
    /// decayed by 1/sqrt(1 + t), 5 iterations, full batch.
    pub fn fate() -> Self {
        HeteroConfig {
            iterations: 5,
            learning_rate: 0.15,
            optimizer: Optimizer::Rmsprop,
            alpha: 0.01,
            decay: 1.0,
            decay_sqrt: true,
            seed: 0,
        }
    }

    /// The settings given laid over `base`; an error names the field at fault.
    pub fn from_settings(
        settings: serde_json::Map<String, serde_json::Value>,
        base: Option<&HeteroConfig>,
    ) -> Result<HeteroConfig, HeteroError> {
        let cfg: HeteroConfig =
            crate::settings_over(base, settings).map_err(HeteroError::Config)?;
        if cfg.iterations == 0 || cfg.iterations > 10_000 {
            return Err(HeteroError::Config(
                "settings.iterations: must be from 1 to 10000".into(),
            ));
        }
        if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
            return Err(HeteroError::Config(
                "settings.learning_rate: must be above 0".into(),
            ));
        }
        Ok(cfg)
    }
}

/// FATE's optimizers: SGD and RMSprop (ρ = 0.99, ε = 1e-6) with the
/// learning rate decayed per iteration.
#[derive(Debug, Clone)]
struct Step {
    cfg: HeteroConfig,
    square: Vec<f64>,
    t: usize,
}

impl Step {
    fn new(cfg: &HeteroConfig, dim: usize) -> Self {
        Step {
            cfg: cfg.clone(),
            square: vec![0.0; dim],
            t: 0,
        }
    }

    /// Apply `grad` (data term) to `w`; `intercept` marks an unpenalised
    /// last weight.
    fn apply(&mut self, w: &mut [f64], grad: &[f64], intercept: bool) {
        let cfg = &self.cfg;
        let lr = if cfg.decay == 0.0 {
            cfg.learning_rate
        } else if cfg.decay_sqrt {
            cfg.learning_rate / (1.0 + cfg.decay * self.t as f64).sqrt()
        } else {
            cfg.learning_rate / (1.0 + cfg.decay * self.t as f64)
        };
        let penalised = if intercept { w.len() - 1 } else { w.len() };
        for i in 0..w.len() {
            let mut g = grad[i];
            if i < penalised {
                g += cfg.alpha * w[i];
            }
            let delta = match cfg.optimizer {
                Optimizer::Sgd => lr * g,
                Optimizer::Rmsprop => {
                    self.square[i] = 0.99 * self.square[i] + 0.01 * g * g;
                    lr * g / (self.square[i] + 1e-6).sqrt()
                }
            };
            w[i] -= delta;
        }
        self.t += 1;
    }
}

fn enc(v: f64) -> u64 {
    ((v * (1u64 << FRAC) as f64).round() as i64) as u64
}

fn dec_product(v: u64) -> f64 {
    (v as i64) as f64 / (1u64 << (2 * FRAC)) as f64
}

/// Xᵀu in the ring, X row-major n×m.
fn xt_u(x: &[u64], m: usize, u: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; m];
    for (row, &ui) in x.chunks_exact(m).zip(u) {
        for (o, &xij) in out.iter_mut().zip(row) {
            *o = o.wrapping_add(xij.wrapping_mul(ui));
        }
    }
    out
}

fn random_ring(rng: &mut ChaCha20Rng, n: usize) -> Vec<u64> {
    (0..n).map(|_| rng.next_u64()).collect()
}

/// The dealer: makes one correlation for a product Xᵀu with X (n×m) held
/// by the owner and u by the other party. The owner's part (R, c_A) comes
/// from a 32-byte seed; the other gets s from a seed and c_B explicitly.
struct Dealer {
    rng: ChaCha20Rng,
}

struct OwnerPart {
    r: Vec<u64>,
    c: Vec<u64>,
}

struct OtherPart {
    s: Vec<u64>,
    c: Vec<u64>,
}

impl Dealer {
    fn correlation(&mut self, n: usize, m: usize) -> (OwnerPart, OtherPart, usize) {
        let mut owner_seed = [0u8; 32];
        let mut other_seed = [0u8; 32];
        self.rng.fill_bytes(&mut owner_seed);
        self.rng.fill_bytes(&mut other_seed);
        let mut owner_rng = ChaCha20Rng::from_seed(owner_seed);
        let r = random_ring(&mut owner_rng, n * m);
        let c_a = random_ring(&mut owner_rng, m);
        let s = random_ring(&mut ChaCha20Rng::from_seed(other_seed), n);
        let rts = xt_u(&r, m, &s);
        let c_b: Vec<u64> = rts
            .iter()
            .zip(&c_a)
            .map(|(p, a)| p.wrapping_sub(*a))
            .collect();
        let bytes = 32 + 32 + 8 * m;
        (OwnerPart { r, c: c_a }, OtherPart { s, c: c_b }, bytes)
    }
}

/// Shares of Xᵀu: (owner's share, other's share, bytes exchanged).
fn secure_product(
    x: &[u64],
    m: usize,
    u: &[u64],
    owner: &OwnerPart,
    other: &OtherPart,
) -> (Vec<u64>, Vec<u64>, usize) {
    // Owner → other: E = X − R.
    let e: Vec<u64> = x
        .iter()
        .zip(&owner.r)
        .map(|(a, b)| a.wrapping_sub(*b))
        .collect();
    // Other → owner: f = u − s.
    let f: Vec<u64> = u
        .iter()
        .zip(&other.s)
        .map(|(a, b)| a.wrapping_sub(*b))
        .collect();
    let owner_share: Vec<u64> = xt_u(&owner.r, m, &f)
        .iter()
        .zip(&owner.c)
        .map(|(a, b)| a.wrapping_add(*b))
        .collect();
    let other_share: Vec<u64> = xt_u(&e, m, u)
        .iter()
        .zip(&other.c)
        .map(|(a, b)| a.wrapping_add(*b))
        .collect();
    (owner_share, other_share, 8 * (e.len() + f.len()))
}

/// The owner's gradient Xᵀ(4d)/(4n) from its own share of 4d (multiplied locally) and the
/// other party's (through one dealer correlation; the other's product share goes to the
/// owner). Returns the gradient and the bytes moved.
fn gradient(
    owner: &Party,
    own: &[u64],
    other: &[u64],
    dealer: &mut Dealer,
    n: usize,
) -> (Vec<f64>, usize) {
    let (owner_part, other_part, dealt) = dealer.correlation(n, owner.m);
    let (owner_share, other_share, moved) =
        secure_product(&owner.x, owner.m, other, &owner_part, &other_part);
    let local = xt_u(&owner.x, owner.m, own);
    let grad = (0..owner.m)
        .map(|j| {
            let total = local[j]
                .wrapping_add(owner_share[j])
                .wrapping_add(other_share[j]);
            dec_product(total) / (4.0 * n as f64)
        })
        .collect();
    // the other party's product share travels to the owner
    (grad, dealt + moved + 8 * owner.m)
}

/// One party's features, fixed-point encoded, with its weights.
struct Party {
    x_real: Vec<f64>,
    x: Vec<u64>,
    m: usize,
    w: Vec<f64>,
    step: Step,
    intercept: bool,
}

impl Party {
    fn new(table: &Table, intercept: bool, cfg: &HeteroConfig) -> Self {
        let m = table.width() + usize::from(intercept);
        let mut x_real = Vec::with_capacity(table.rows() * m);
        for i in 0..table.rows() {
            x_real.extend(table.row(i).iter().map(|&v| v as f64));
            if intercept {
                x_real.push(1.0);
            }
        }
        Party {
            x: x_real.iter().map(|&v| enc(v)).collect(),
            x_real,
            m,
            w: vec![0.0; m],
            step: Step::new(cfg, m),
            intercept,
        }
    }

    fn scores(&self) -> Vec<f64> {
        self.x_real
            .chunks_exact(self.m)
            .map(|row| row.iter().zip(&self.w).map(|(a, b)| a * b).sum())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IterationStats {
    pub iteration: usize,
    pub seconds: f64,
    /// Bytes between guest, host and dealer this iteration.
    pub bytes: usize,
    pub guest_gradient_norm: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeteroModel {
    /// Guest weights, intercept last.
    pub guest: Vec<f64>,
    pub host: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeteroReport {
    pub model: HeteroModel,
    pub iterations: Vec<IterationStats>,
}

/// The guest's labels as ±1.
fn check_labels(guest: &Table) -> Result<Vec<f64>, HeteroError> {
    let labels = guest
        .labels
        .as_ref()
        .ok_or_else(|| HeteroError::Config("the guest's table needs a `y` column".into()))?;
    if guest.rows() == 0 {
        return Err(HeteroError::Config("no rows in common".into()));
    }
    Ok(labels
        .iter()
        .map(|&y| if y > 0.5 { 1.0 } else { -1.0 })
        .collect())
}

fn check(guest: &Table, host: &Table) -> Result<Vec<f64>, HeteroError> {
    if host.labels.is_some() {
        return Err(HeteroError::Config(
            "the host's table must not hold labels".into(),
        ));
    }
    if guest.ids != host.ids {
        return Err(HeteroError::Config(
            "guest and host rows are not aligned by id; run PSI and align first".into(),
        ));
    }
    check_labels(guest)
}

/// Train over aligned tables through the protocol above.
pub fn train(
    cfg: &HeteroConfig,
    guest: &Table,
    host: &Table,
    mut progress: impl FnMut(&IterationStats),
) -> Result<HeteroReport, HeteroError> {
    let y = check(guest, host)?;
    let n = guest.rows();
    let mut g = Party::new(guest, true, cfg);
    let mut h = Party::new(host, false, cfg);
    let mut dealer = Dealer {
        rng: ChaCha20Rng::seed_from_u64(cfg.seed ^ 0x6465_616c_6572),
    };
    let mut host_rng = ChaCha20Rng::from_entropy();
    let two_y: Vec<u64> = y.iter().map(|&v| enc(2.0 * v)).collect();
    let mut iterations = Vec::with_capacity(cfg.iterations);
    for it in 0..cfg.iterations {
        let start = Instant::now();
        let mut bytes = 0;
        // 1. Shares of 4d = z_g + z_h − 2y.
        let z_g: Vec<u64> = g.scores().into_iter().map(enc).collect();
        let z_h: Vec<u64> = h.scores().into_iter().map(enc).collect();
        let r = random_ring(&mut host_rng, n);
        bytes += 8 * n; // r, host → guest
        let d_host: Vec<u64> = z_h
            .iter()
            .zip(&r)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        let d_guest: Vec<u64> = z_g
            .iter()
            .zip(&r)
            .zip(&two_y)
            .map(|((a, b), c)| a.wrapping_add(*b).wrapping_sub(*c))
            .collect();

        // 2–3. Each party's gradient: its own share locally, the other's securely.
        let (grad_h, moved_h) = gradient(&h, &d_host, &d_guest, &mut dealer, n);
        let (grad_g, moved_g) = gradient(&g, &d_guest, &d_host, &mut dealer, n);
        bytes += moved_h + moved_g;

        let intercept = g.intercept;
        g.step.apply(&mut g.w, &grad_g, intercept);
        h.step.apply(&mut h.w, &grad_h, false);
        let stats = IterationStats {
            iteration: it + 1,
            seconds: start.elapsed().as_secs_f64(),
            bytes,
            guest_gradient_norm: grad_g.iter().map(|v| v * v).sum::<f64>().sqrt(),
        };
        progress(&stats);
        iterations.push(stats);
    }
    Ok(HeteroReport {
        model: HeteroModel {
            guest: g.w,
            host: h.w,
        },
        iterations,
    })
}

/// The same optimisation on the pooled table, in the clear: the
/// centralised baseline. `table` holds the guest's columns then the
/// host's; the intercept is added.
pub fn train_central(cfg: &HeteroConfig, table: &Table) -> Result<Vec<f64>, HeteroError> {
    let labels = table
        .labels
        .as_ref()
        .ok_or_else(|| HeteroError::Config("the pooled table needs a `y` column".into()))?;
    let p = Party::new(table, true, cfg);
    let mut w = vec![0.0; p.m];
    let mut step = Step::new(cfg, p.m);
    let n = table.rows() as f64;
    for _ in 0..cfg.iterations {
        let mut grad = vec![0.0; p.m];
        for (row, &y) in p.x_real.chunks_exact(p.m).zip(labels) {
            let z: f64 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
            let y = if y > 0.5 { 1.0 } else { -1.0 };
            let d = 0.25 * z - 0.5 * y;
            for (g, x) in grad.iter_mut().zip(row) {
                *g += d * x / n;
            }
        }
        step.apply(&mut w, &grad, true);
    }
    Ok(w)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Scores on aligned guest and host rows: the host releases its partial
/// scores to the guest, which adds its own.
pub fn score(model: &HeteroModel, guest: &Table, host: &Table) -> Result<Scores, HeteroError> {
    let labels = guest
        .labels
        .as_ref()
        .ok_or_else(|| HeteroError::Config("scoring needs the guest's `y` column".into()))?;
    if guest.ids != host.ids {
        return Err(HeteroError::Config("rows are not aligned by id".into()));
    }
    let probs: Vec<f32> = (0..guest.rows())
        .map(|i| {
            let zg: f64 = guest
                .row(i)
                .iter()
                .zip(&model.guest)
                .map(|(&a, b)| a as f64 * b)
                .sum::<f64>()
                + model.guest[guest.width()];
            let zh: f64 = host
                .row(i)
                .iter()
                .zip(&model.host)
                .map(|(&a, b)| a as f64 * b)
                .sum();
            sigmoid(zg + zh) as f32
        })
        .collect();
    Ok(evaluate(&probs, labels))
}

/// Scores of a centralised model on a pooled table.
pub fn score_central(w: &[f64], table: &Table) -> Result<Scores, HeteroError> {
    let labels = table
        .labels
        .as_ref()
        .ok_or_else(|| HeteroError::Config("scoring needs a `y` column".into()))?;
    let probs: Vec<f32> = (0..table.rows())
        .map(|i| {
            let z: f64 = table
                .row(i)
                .iter()
                .zip(w)
                .map(|(&a, b)| a as f64 * b)
                .sum::<f64>()
                + w[table.width()];
            sigmoid(z) as f32
        })
        .collect();
    Ok(evaluate(&probs, labels))
}

/// The workers of a vertical run apart: the dealer (0), the guest (1), the host (2).
pub mod apart {
    use std::time::{Duration, Instant};

    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use super::{
        check_labels, dec_product, enc, random_ring, xt_u, HeteroConfig, IterationStats, Party,
    };
    use crate::data::Table;
    use crate::fed::{FedError, Link, Msg, Transport};
    use crate::metrics::{evaluate, Scores};
    use crate::psi;

    pub const DEALER: usize = 0;
    pub const GUEST: usize = 1;
    pub const HOST: usize = 2;

    /// What a party of a vertical run ends with.
    #[derive(Debug, Clone)]
    pub struct PartyOutcome {
        /// Its own weights (the guest's intercept last).
        pub weights: Vec<f64>,
        /// The rows both hold, after PSI.
        pub aligned: usize,
        pub iterations: Vec<IterationStats>,
        /// The guest's scores on the aligned rows (the host releases its partial scores
        /// to the guest at the end); none at the host.
        pub scores: Option<Scores>,
    }

    fn ring(
        link: &mut Link<'_, impl Transport>,
        from: usize,
        wait: Duration,
    ) -> Result<Vec<u64>, FedError> {
        match link.from(from, wait)? {
            Msg::Ring(v) => Ok(v),
            other => Err(FedError::Protocol(format!(
                "expected ring elements, got {}",
                other.kind()
            ))),
        }
    }

    fn sized(v: Vec<u64>, len: usize, what: &str) -> Result<Vec<u64>, FedError> {
        if v.len() != len {
            return Err(FedError::Protocol(format!(
                "{what}: {} elements, expected {len}",
                v.len()
            )));
        }
        Ok(v)
    }

    fn owner_part(seed: [u8; 32], n: usize, m: usize) -> (Vec<u64>, Vec<u64>) {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let r = random_ring(&mut rng, n * m);
        let c = random_ring(&mut rng, m);
        (r, c)
    }

    fn seed_from(
        link: &mut Link<'_, impl Transport>,
        wait: Duration,
    ) -> Result<[u8; 32], FedError> {
        match link.from(DEALER, wait)? {
            Msg::Seed(s) => Ok(s),
            other => Err(FedError::Protocol(format!(
                "expected a seed, got {}",
                other.kind()
            ))),
        }
    }

    fn correlation_from(
        link: &mut Link<'_, impl Transport>,
        n: usize,
        m: usize,
        wait: Duration,
    ) -> Result<(Vec<u64>, Vec<u64>), FedError> {
        match link.from(DEALER, wait)? {
            Msg::Correlation { seed, c } => {
                let s = random_ring(&mut ChaCha20Rng::from_seed(seed), n);
                Ok((s, sized(c, m, "c_B")?))
            }
            other => Err(FedError::Protocol(format!(
                "expected a correlation, got {}",
                other.kind()
            ))),
        }
    }

    /// The owner's half of a secure product Xᵀu (u the other party's share): sends E,
    /// takes f and the other's product share; returns Xᵀ(own + other's share) decoded / 4n.
    fn own_gradient(
        link: &mut Link<'_, impl Transport>,
        me: &Party,
        own: &[u64],
        peer: usize,
        n: usize,
        wait: Duration,
    ) -> Result<Vec<f64>, FedError> {
        let (r, c_a) = owner_part(seed_from(link, wait)?, n, me.m);
        let e: Vec<u64> =
            me.x.iter()
                .zip(&r)
                .map(|(a, b)| a.wrapping_sub(*b))
                .collect();
        link.send(peer, &Msg::Ring(e))?;
        let f = sized(ring(link, peer, wait)?, n, "f")?;
        let other_share = sized(ring(link, peer, wait)?, me.m, "a product share")?;
        let owner_share = xt_u(&r, me.m, &f);
        let local = xt_u(&me.x, me.m, own);
        Ok((0..me.m)
            .map(|j| {
                let total = local[j]
                    .wrapping_add(owner_share[j])
                    .wrapping_add(c_a[j])
                    .wrapping_add(other_share[j]);
                dec_product(total) / (4.0 * n as f64)
            })
            .collect())
    }

    /// The other half of the owner's product: its share u goes in masked as f, and its
    /// product share Eᵀu + c_B goes to the owner.
    fn help_gradient(
        link: &mut Link<'_, impl Transport>,
        mine: &[u64],
        peer: usize,
        peer_width: usize,
        n: usize,
        wait: Duration,
    ) -> Result<(), FedError> {
        let (s, c_b) = correlation_from(link, n, peer_width, wait)?;
        let e = sized(ring(link, peer, wait)?, n * peer_width, "E")?;
        let f: Vec<u64> = mine
            .iter()
            .zip(&s)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        link.send(peer, &Msg::Ring(f))?;
        let share: Vec<u64> = xt_u(&e, peer_width, mine)
            .iter()
            .zip(&c_b)
            .map(|(a, b)| a.wrapping_add(*b))
            .collect();
        link.send(peer, &Msg::Ring(share))
    }

    /// PSI with the other party, then this party's rows in the intersection's sorted order
    /// (both sort it, so rows line up without either sending an order).
    fn aligned(
        link: &mut Link<'_, impl Transport>,
        table: &Table,
        peer: usize,
        role: psi::Role,
        wait: Duration,
    ) -> Result<Table, FedError> {
        let outcome = link.psi(peer, role, &table.ids, psi::Reveal::Both, wait)?;
        let mut ids = outcome.intersection.ok_or_else(|| {
            FedError::Protocol("PSI did not tell this party the intersection".into())
        })?;
        ids.sort_unstable();
        if ids.is_empty() {
            return Err(FedError::Protocol(
                "the parties hold no id in common".into(),
            ));
        }
        Ok(table.select(&psi::align(&table.ids, &ids)))
    }

    fn shape(
        link: &mut Link<'_, impl Transport>,
        table: &Table,
        me: &Party,
    ) -> Result<(), FedError> {
        link.send(
            DEALER,
            &Msg::Shape {
                rows: table.rows(),
                width: me.m,
            },
        )
    }

    /// The guest: labels and its features; learns its own weights and, at the end, the
    /// model's scores on the aligned rows.
    pub fn run_guest<T: Transport>(
        cfg: &HeteroConfig,
        table: &Table,
        transport: &mut T,
        wait: Duration,
        mut progress: impl FnMut(&IterationStats),
    ) -> Result<PartyOutcome, FedError> {
        let link = &mut Link::new(transport);
        let t = aligned(link, table, HOST, psi::Role::Guest, wait)?;
        let y = check_labels(&t).map_err(|e| FedError::Protocol(e.to_string()))?;
        let n = t.rows();
        let mut me = Party::new(&t, true, cfg);
        shape(link, &t, &me)?;
        let host_width = match link.from(HOST, wait)? {
            Msg::Shape { rows, width } if rows == n => width,
            other => {
                return Err(FedError::Protocol(format!(
                    "expected the host's shape, got {}",
                    other.kind()
                )))
            }
        };
        let two_y: Vec<u64> = y.iter().map(|&v| enc(2.0 * v)).collect();
        let mut iterations = Vec::new();
        for it in 0..cfg.iterations {
            let start = Instant::now();
            let before = link.bytes();
            let r = sized(ring(link, HOST, wait)?, n, "the host's share")?;
            let d: Vec<u64> = me
                .scores()
                .into_iter()
                .map(enc)
                .zip(&r)
                .zip(&two_y)
                .map(|((a, b), c)| a.wrapping_add(*b).wrapping_sub(*c))
                .collect();
            help_gradient(link, &d, HOST, host_width, n, wait)?;
            let grad = own_gradient(link, &me, &d, HOST, n, wait)?;
            let intercept = me.intercept;
            me.step.apply(&mut me.w, &grad, intercept);
            let stats = IterationStats {
                iteration: it + 1,
                seconds: start.elapsed().as_secs_f64(),
                bytes: link.bytes() - before,
                guest_gradient_norm: grad.iter().map(|v| v * v).sum::<f64>().sqrt(),
            };
            progress(&stats);
            iterations.push(stats);
        }
        let z_h = match link.from(HOST, wait)? {
            Msg::Partial(z) if z.len() == n => z,
            other => {
                return Err(FedError::Protocol(format!(
                    "expected partial scores, got {}",
                    other.kind()
                )))
            }
        };
        let probs: Vec<f32> = me
            .scores()
            .iter()
            .zip(&z_h)
            .map(|(g, h)| (1.0 / (1.0 + (-(g + h)).exp())) as f32)
            .collect();
        let labels = t.labels.as_ref().expect("checked");
        Ok(PartyOutcome {
            weights: me.w,
            aligned: n,
            iterations,
            scores: Some(evaluate(&probs, labels)),
        })
    }

    /// The host: only features, never a label; learns its own weights.
    pub fn run_host<T: Transport>(
        cfg: &HeteroConfig,
        table: &Table,
        transport: &mut T,
        wait: Duration,
    ) -> Result<PartyOutcome, FedError> {
        if table.labels.is_some() {
            return Err(FedError::Protocol(
                "the host's table must not hold labels".into(),
            ));
        }
        let link = &mut Link::new(transport);
        let t = aligned(link, table, GUEST, psi::Role::Host, wait)?;
        let n = t.rows();
        let mut me = Party::new(&t, false, cfg);
        shape(link, &t, &me)?;
        link.send(
            GUEST,
            &Msg::Shape {
                rows: n,
                width: me.m,
            },
        )?;
        let guest_width = match link.from(DEALER, wait)? {
            Msg::Shape { width, .. } => width,
            other => {
                return Err(FedError::Protocol(format!(
                    "expected the guest's width, got {}",
                    other.kind()
                )))
            }
        };
        let mut rng = ChaCha20Rng::from_entropy();
        let mut iterations = Vec::new();
        for it in 0..cfg.iterations {
            let start = Instant::now();
            let before = link.bytes();
            let r = random_ring(&mut rng, n);
            link.send(GUEST, &Msg::Ring(r.clone()))?;
            let d: Vec<u64> = me
                .scores()
                .into_iter()
                .map(enc)
                .zip(&r)
                .map(|(a, b)| a.wrapping_sub(*b))
                .collect();
            let grad = own_gradient(link, &me, &d, GUEST, n, wait)?;
            help_gradient(link, &d, GUEST, guest_width, n, wait)?;
            me.step.apply(&mut me.w, &grad, false);
            iterations.push(IterationStats {
                iteration: it + 1,
                seconds: start.elapsed().as_secs_f64(),
                bytes: link.bytes() - before,
                guest_gradient_norm: 0.0,
            });
        }
        link.send(GUEST, &Msg::Partial(me.scores()))?;
        Ok(PartyOutcome {
            weights: me.w,
            aligned: n,
            iterations,
            scores: None,
        })
    }

    /// The dealer: sees only the two shapes; deals every iteration's correlations and is
    /// done. It never sees a row, a share or a weight.
    pub fn run_dealer<T: Transport>(
        cfg: &HeteroConfig,
        transport: &mut T,
        wait: Duration,
    ) -> Result<(), FedError> {
        let link = &mut Link::new(transport);
        let mut shapes = [(0, 0); 2];
        for (i, party) in [GUEST, HOST].into_iter().enumerate() {
            match link.from(party, wait)? {
                Msg::Shape { rows, width } => shapes[i] = (rows, width),
                other => {
                    return Err(FedError::Protocol(format!(
                        "expected a shape, got {}",
                        other.kind()
                    )))
                }
            }
        }
        let ((n, m_g), (n_h, m_h)) = (shapes[0], shapes[1]);
        if n != n_h {
            return Err(FedError::Protocol(format!(
                "the guest aligned {n} rows, the host {n_h}"
            )));
        }
        // the host learns the guest's width, to size the products it helps with
        link.send(
            HOST,
            &Msg::Shape {
                rows: n,
                width: m_g,
            },
        )?;
        let mut rng = ChaCha20Rng::from_entropy();
        for _ in 0..cfg.iterations {
            // the host's gradient first, then the guest's, as the parties take them
            for (owner, other, m) in [(HOST, GUEST, m_h), (GUEST, HOST, m_g)] {
                let mut owner_seed = [0u8; 32];
                let mut other_seed = [0u8; 32];
                rng.fill_bytes(&mut owner_seed);
                rng.fill_bytes(&mut other_seed);
                let (r, c_a) = owner_part(owner_seed, n, m);
                let s = random_ring(&mut ChaCha20Rng::from_seed(other_seed), n);
                let c_b: Vec<u64> = xt_u(&r, m, &s)
                    .iter()
                    .zip(&c_a)
                    .map(|(p, a)| p.wrapping_sub(*a))
                    .collect();
                link.send(owner, &Msg::Seed(owner_seed))?;
                link.send(
                    other,
                    &Msg::Correlation {
                        seed: other_seed,
                        c: c_b,
                    },
                )?;
            }
        }
        Ok(())
    }
}
