//! Horizontal federated training (FedAvg) of logistic regression and a small
//! MLP, in candle. Parties hold the same features on different rows; each
//! round every party trains locally from the global model and the
//! aggregator averages the results weighted by row counts, through secure
//! aggregation when three or more parties take part.

use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Table;
use crate::dp::{Accountant, DpSgd};
use crate::metrics::{evaluate, Scores};
use crate::secagg::{self, Params, SecAggError};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    #[error("{0}")]
    Config(String),
}

/// The model trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Arch {
    Logistic,
    Mlp { hidden: usize },
}

/// How the aggregator combines the parties' models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Plain weighted average: the aggregator sees each party's model.
    Plain,
    /// Secure aggregation: the aggregator sees only masked vectors.
    Secure { threshold: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomoConfig {
    pub arch: Arch,
    /// Aggregation rounds.
    pub rounds: usize,
    /// Local passes over each party's rows per round.
    #[serde(default = "one")]
    pub local_epochs: usize,
    pub learning_rate: f64,
    /// Learning rate at iteration t: lr / sqrt(1 + decay·t) (or lr / (1 +
    /// decay·t) when `decay_sqrt` is false); 0 keeps it constant.
    #[serde(default)]
    pub decay: f64,
    #[serde(default = "yes")]
    pub decay_sqrt: bool,
    /// L2 penalty on weights (not biases).
    #[serde(default)]
    pub alpha: f64,
    /// Mini-batch size; none is the full batch.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Secure-aggregation threshold; none picks a majority. Ignored (and
    /// reported) with fewer than three parties.
    #[serde(default)]
    pub secure_threshold: Option<usize>,
    /// Turn secure aggregation off even with three or more parties.
    #[serde(default)]
    pub plain: bool,
    #[serde(default)]
    pub dp: Option<DpSgd>,
    #[serde(default)]
    pub seed: u64,
}

impl HomoConfig {
    /// FATE's homo LR example settings: L2 (alpha 0.01), SGD at learning rate 0.15 decayed
    /// by 1/sqrt(1 + t), 30 iterations, full batch, zero initial weights.
    pub fn fate_lr() -> Self {
        HomoConfig {
            arch: Arch::Logistic,
            rounds: 30,
            local_epochs: 1,
            learning_rate: 0.15,
            decay: 1.0,
            decay_sqrt: true,
            alpha: 0.01,
            batch_size: None,
            secure_threshold: None,
            plain: false,
            dp: None,
            seed: 0,
        }
    }
}

/// A horizontal task's trainer settings from a map of [`HomoConfig`]'s fields laid
/// over `base` (every field must be given when there is none). For the MLP, `hidden`
/// is its width (16 when absent). An error names the field at fault.
pub fn config_from(
    mlp: bool,
    mut settings: serde_json::Map<String, serde_json::Value>,
    base: Option<&HomoConfig>,
) -> Result<HomoConfig, TrainError> {
    let bad = |field: &str, what: String| TrainError::Config(format!("settings.{field}: {what}"));
    let arch = if mlp {
        let hidden = match settings.remove("hidden") {
            None => 16,
            Some(v) => v
                .as_u64()
                .filter(|h| (1..=4096).contains(h))
                .ok_or_else(|| {
                    bad(
                        "hidden",
                        format!("must be an integer from 1 to 4096, not {v}"),
                    )
                })? as usize,
        };
        Arch::Mlp { hidden }
    } else {
        if settings.contains_key("hidden") {
            return Err(bad("hidden", "only the MLP has a hidden layer".into()));
        }
        Arch::Logistic
    };
    if settings.contains_key("arch") {
        return Err(bad("arch", "is set by the task".into()));
    }
    settings.insert(
        "arch".into(),
        serde_json::to_value(arch).map_err(|e| TrainError::Config(e.to_string()))?,
    );
    let cfg: HomoConfig = crate::settings_over(base, settings).map_err(TrainError::Config)?;
    if cfg.rounds == 0 || cfg.rounds > 10_000 {
        return Err(bad("rounds", "must be from 1 to 10000".into()));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
        return Err(bad("learning_rate", "must be above 0".into()));
    }
    if cfg.batch_size == Some(0) {
        return Err(bad("batch_size", "must be at least 1".into()));
    }
    Ok(cfg)
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// One round's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: usize,
    pub loss: f64,
    pub seconds: f64,
    /// Bytes moved between parties and aggregator this round.
    pub bytes: usize,
    /// Seconds spent in aggregation alone (masking, unmasking or averaging).
    pub aggregation_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HomoReport {
    pub aggregation: Aggregation,
    pub rounds: Vec<RoundStats>,
    pub params: Vec<f32>,
    /// (ε, δ) when DP-SGD ran.
    pub dp: Option<(f64, f64)>,
}

/// Model parameters as candle variables, laid out flat for aggregation.
struct Model {
    arch: Arch,
    vars: Vec<Var>,
}

impl Model {
    fn shapes(arch: Arch, d: usize) -> Vec<Vec<usize>> {
        match arch {
            Arch::Logistic => vec![vec![d, 1], vec![1]],
            Arch::Mlp { hidden } => vec![vec![d, hidden], vec![hidden], vec![hidden, 1], vec![1]],
        }
    }

    fn dim(arch: Arch, d: usize) -> usize {
        Self::shapes(arch, d)
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Zeros for logistic regression (FATE's `zeros`), seeded Xavier-uniform
    /// weights for the MLP.
    fn initial(arch: Arch, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for shape in Self::shapes(arch, d) {
            let n: usize = shape.iter().product();
            if arch == Arch::Logistic || shape.len() == 1 {
                out.extend(std::iter::repeat_n(0.0, n));
            } else {
                let bound = (6.0 / (shape[0] + shape[1]) as f32).sqrt();
                out.extend((0..n).map(|_| rng.gen_range(-bound..bound)));
            }
        }
        out
    }

    fn from_flat(arch: Arch, d: usize, flat: &[f32], device: &Device) -> Result<Self, TrainError> {
        let mut vars = Vec::new();
        let mut at = 0;
        for shape in Self::shapes(arch, d) {
            let n: usize = shape.iter().product();
            let t = Tensor::from_slice(&flat[at..at + n], shape.as_slice(), device)?;
            vars.push(Var::from_tensor(&t)?);
            at += n;
        }
        Ok(Model { arch, vars })
    }

    fn flat(&self) -> Result<Vec<f32>, TrainError> {
        let mut out = Vec::new();
        for v in &self.vars {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let v = &self.vars;
        let z = match self.arch {
            Arch::Logistic => x
                .matmul(v[0].as_tensor())?
                .broadcast_add(v[1].as_tensor())?,
            Arch::Mlp { .. } => {
                let h = x
                    .matmul(v[0].as_tensor())?
                    .broadcast_add(v[1].as_tensor())?
                    .relu()?;
                h.matmul(v[2].as_tensor())?
                    .broadcast_add(v[3].as_tensor())?
            }
        };
        Ok(z.squeeze(D::Minus1)?)
    }

    /// Mean logistic loss plus alpha/2·‖weights‖².
    fn loss(&self, x: &Tensor, y: &Tensor, alpha: f64) -> Result<Tensor, TrainError> {
        let z = self.logits(x)?;
        // softplus(z) − y·z, computed stably.
        let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let mut loss = (softplus - (y * &z)?)?.mean_all()?;
        if alpha > 0.0 {
            for v in self.vars.iter().filter(|v| v.as_tensor().rank() == 2) {
                let sq = v.as_tensor().sqr()?.sum_all()?;
                loss = (loss + (sq * (alpha / 2.0))?)?;
            }
        }
        Ok(loss)
    }

    fn predict(&self, x: &Tensor) -> Result<Vec<f32>, TrainError> {
        Ok(candle_nn::ops::sigmoid(&self.logits(x)?)?.to_vec1::<f32>()?)
    }
}

fn tensors(table: &Table, device: &Device) -> Result<(Tensor, Tensor), TrainError> {
    let labels = table.labels.as_ref().ok_or_else(|| {
        TrainError::Config("a horizontal party's table needs a `y` column".into())
    })?;
    let x = Tensor::from_slice(&table.features, (table.rows(), table.width()), device)?;
    let y = Tensor::from_slice(labels, table.rows(), device)?;
    Ok((x, y))
}

fn learning_rate(cfg: &HomoConfig, t: usize) -> f64 {
    if cfg.decay == 0.0 {
        cfg.learning_rate
    } else if cfg.decay_sqrt {
        cfg.learning_rate / (1.0 + cfg.decay * t as f64).sqrt()
    } else {
        cfg.learning_rate / (1.0 + cfg.decay * t as f64)
    }
}

/// One party's local training from `global`; returns its new parameters
/// and its loss before the update.
fn local_train(
    cfg: &HomoConfig,
    table: &Table,
    global: &[f32],
    round: usize,
    rng: &mut ChaCha8Rng,
    accountant: &mut Accountant,
    device: &Device,
) -> Result<(Vec<f32>, f64), TrainError> {
    let model = Model::from_flat(cfg.arch, table.width(), global, device)?;
    let (x, y) = tensors(table, device)?;
    let first_loss = model.loss(&x, &y, cfg.alpha)?.to_scalar::<f32>()? as f64;
    let n = table.rows();
    let lr = learning_rate(cfg, round);
    for _ in 0..cfg.local_epochs {
        match cfg.dp {
            None => {
                let batch = cfg.batch_size.unwrap_or(n).clamp(1, n.max(1));
                let mut order: Vec<u32> = (0..n as u32).collect();
                if batch < n {
                    use rand::seq::SliceRandom;
                    order.shuffle(rng);
                }
                for chunk in order.chunks(batch) {
                    let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
                    let (xb, yb) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
                    let grads = model.loss(&xb, &yb, cfg.alpha)?.backward()?;
                    for v in &model.vars {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            v.set(&(v.as_tensor() - (g * lr)?)?)?;
                        }
                    }
                }
            }
            Some(dp) => dp_epoch(cfg, &dp, &model, &x, &y, n, lr, rng, accountant, device)?,
        }
    }
    Ok((model.flat()?, first_loss))
}

/// One epoch of DP-SGD: Poisson-sampled batches, each example's gradient
/// clipped to `clip`, Gaussian noise of σ·clip added to the sum.
#[allow(clippy::too_many_arguments)]
fn dp_epoch(
    cfg: &HomoConfig,
    dp: &DpSgd,
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    n: usize,
    lr: f64,
    rng: &mut ChaCha8Rng,
    accountant: &mut Accountant,
    device: &Device,
) -> Result<(), TrainError> {
    let q = (dp.batch_size as f64 / n as f64).min(1.0);
    let steps = (1.0 / q).round().max(1.0) as usize;
    let normal = rand_distr_normal();
    for _ in 0..steps {
        let picked: Vec<u32> = (0..n as u32).filter(|_| rng.gen::<f64>() < q).collect();
        accountant.step(q, dp.noise_multiplier);
        let mut sums: Vec<Tensor> = model
            .vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<_, _>>()?;
        for &i in &picked {
            let idx = Tensor::from_slice(&[i], 1, device)?;
            let (xi, yi) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
            // The data term only; the L2 term is added after noising.
            let grads = model.loss(&xi, &yi, 0.0)?.backward()?;
            let per: Vec<Tensor> = model
                .vars
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .map_or_else(|| v.as_tensor().zeros_like(), Ok)
                })
                .collect::<Result<_, _>>()?;
            let mut norm2 = 0.0f64;
            for g in &per {
                norm2 += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            let scale = (dp.clip / norm2.sqrt().max(1e-12)).min(1.0);
            for (s, g) in sums.iter_mut().zip(&per) {
                *s = (&*s + (g * scale)?)?;
            }
        }
        let expected = (q * n as f64).max(1.0);
        for (v, s) in model.vars.iter().zip(&sums) {
            let count = s.elem_count();
            let noise: Vec<f32> = (0..count)
                .map(|_| (normal(rng) * dp.noise_multiplier * dp.clip) as f32)
                .collect();
            let noise = Tensor::from_slice(&noise, s.shape(), device)?;
            let mut g = ((s + noise)? / expected)?;
            if cfg.alpha > 0.0 && v.as_tensor().rank() == 2 {
                g = (g + (v.as_tensor() * cfg.alpha)?)?;
            }
            v.set(&(v.as_tensor() - (g * lr)?)?)?;
        }
    }
    Ok(())
}

/// A standard normal sampler (Box–Muller), kept local to avoid a
/// distributions dependency.
fn rand_distr_normal() -> impl Fn(&mut ChaCha8Rng) -> f64 {
    |rng: &mut ChaCha8Rng| {
        let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The model's parameter count for `d` features.
pub fn dim(arch: Arch, d: usize) -> usize {
    Model::dim(arch, d)
}

/// The global model every run starts from: zeros for logistic regression,
/// seeded Xavier-uniform weights for the MLP.
pub fn initial_params(arch: Arch, d: usize, seed: u64) -> Vec<f32> {
    Model::initial(arch, d, seed)
}

/// One party of a horizontal run, holding only its own rows: each round it
/// trains from the global model and gives back its update weighted by its
/// share of all rows, ready to be summed (in the clear or through secure
/// aggregation). Party indices run from 1.
pub struct LocalParty {
    cfg: HomoConfig,
    table: Table,
    rng: ChaCha8Rng,
    accountant: Accountant,
    device: Device,
}

impl LocalParty {
    pub fn new(cfg: HomoConfig, table: Table, index: usize, device: Device) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(index as u64));
        LocalParty {
            cfg,
            table,
            rng,
            accountant: Accountant::default(),
            device,
        }
    }

    pub fn rows(&self) -> usize {
        self.table.rows()
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Local training from `global` in round `round` (from 0), with `total`
    /// rows across all parties: the update weighted by this party's share,
    /// and its loss before the update weighted the same way.
    pub fn step(
        &mut self,
        global: &[f32],
        round: usize,
        total: usize,
    ) -> Result<(Vec<f32>, f64), TrainError> {
        if total < self.table.rows() || total == 0 {
            return Err(TrainError::Config(format!(
                "{total} rows in all, fewer than this party's {}",
                self.table.rows()
            )));
        }
        let expected = Model::dim(self.cfg.arch, self.table.width());
        if global.len() != expected {
            return Err(TrainError::Config(format!(
                "a global model of {} parameters for a model of {expected}",
                global.len()
            )));
        }
        let (params, loss) = local_train(
            &self.cfg,
            &self.table,
            global,
            round,
            &mut self.rng,
            &mut self.accountant,
            &self.device,
        )?;
        let weight = self.table.rows() as f32 / total as f32;
        Ok((
            params.iter().map(|p| p * weight).collect(),
            loss * self.table.rows() as f64 / total as f64,
        ))
    }

    /// ε spent so far by DP-SGD at the configured δ (none without DP).
    pub fn epsilon(&self) -> Option<f64> {
        self.cfg.dp.map(|dp| self.accountant.epsilon(dp.delta).0)
    }
}

/// Train across `parties` (each a table with labels and the same columns).
/// One party is the centralised baseline.
pub fn train(
    cfg: &HomoConfig,
    parties: &[Table],
    device: &Device,
    mut progress: impl FnMut(&RoundStats),
) -> Result<HomoReport, TrainError> {
    let first = parties
        .first()
        .ok_or_else(|| TrainError::Config("no parties".into()))?;
    for (i, p) in parties.iter().enumerate() {
        if p.columns != first.columns {
            return Err(TrainError::Config(format!(
                "party {} has columns {:?}, party 1 has {:?}",
                i + 1,
                p.columns,
                first.columns
            )));
        }
        if p.rows() == 0 {
            return Err(TrainError::Config(format!("party {} has no rows", i + 1)));
        }
    }
    if cfg.rounds == 0 {
        return Err(TrainError::Config("rounds: must be at least 1".into()));
    }
    let d = first.width();
    let dim = Model::dim(cfg.arch, d);
    // Secure aggregation's settings, when it runs: checked once, used every round.
    let secure = if parties.len() >= 3 && !cfg.plain {
        let threshold = cfg.secure_threshold.unwrap_or(parties.len() / 2 + 1);
        Some(Params::new(parties.len(), threshold, dim)?)
    } else {
        None
    };
    let aggregation = match secure {
        Some(p) => Aggregation::Secure {
            threshold: p.threshold,
        },
        None => Aggregation::Plain,
    };
    let total: usize = parties.iter().map(Table::rows).sum();
    let mut global = initial_params(cfg.arch, d, cfg.seed);
    let mut locals: Vec<LocalParty> = parties
        .iter()
        .enumerate()
        .map(|(i, table)| LocalParty::new(cfg.clone(), table.clone(), i + 1, device.clone()))
        .collect();
    let mut rounds = Vec::with_capacity(cfg.rounds);
    for round in 0..cfg.rounds {
        let start = Instant::now();
        let mut updates = Vec::with_capacity(parties.len());
        let mut loss = 0.0;
        for local in locals.iter_mut() {
            let (update, l) = local.step(&global, round, total)?;
            loss += l;
            updates.push(update);
        }
        let agg_start = Instant::now();
        let (sum, bytes) = match secure {
            None => {
                let mut sum = vec![0.0f32; dim];
                for u in &updates {
                    for (s, v) in sum.iter_mut().zip(u) {
                        *s += v;
                    }
                }
                (sum, 2 * 4 * dim * parties.len())
            }
            Some(params) => {
                let report = secagg::run_round(params, &updates, &[], &mut rand::rngs::OsRng)?;
                (report.sum, report.bytes)
            }
        };
        let aggregation_seconds = agg_start.elapsed().as_secs_f64();
        global = sum;
        let stats = RoundStats {
            round: round + 1,
            loss,
            seconds: start.elapsed().as_secs_f64(),
            bytes,
            aggregation_seconds,
        };
        progress(&stats);
        rounds.push(stats);
    }
    let dp = cfg.dp.map(|dp| {
        let eps = locals
            .iter()
            .map(|p| p.epsilon().unwrap_or(0.0))
            .fold(0.0, f64::max);
        (eps, dp.delta)
    });
    Ok(HomoReport {
        aggregation,
        rounds,
        params: global,
        dp,
    })
}

/// Probabilities of the trained model on `table`.
pub fn predict(
    arch: Arch,
    params: &[f32],
    table: &Table,
    device: &Device,
) -> Result<Vec<f32>, TrainError> {
    let model = Model::from_flat(arch, table.width(), params, device)?;
    let x = Tensor::from_slice(&table.features, (table.rows(), table.width()), device)?;
    model.predict(&x)
}

/// AUC, KS and accuracy of the trained model on `table`.
pub fn score(
    arch: Arch,
    params: &[f32],
    table: &Table,
    device: &Device,
) -> Result<Scores, TrainError> {
    let labels = table
        .labels
        .as_ref()
        .ok_or_else(|| TrainError::Config("scoring needs a `y` column".into()))?;
    Ok(evaluate(&predict(arch, params, table, device)?, labels))
}

/// The device training runs on: the first CUDA GPU when built with the
/// `cuda` feature and one is present, otherwise the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}
