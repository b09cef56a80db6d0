//! Differential privacy for training: per-example clipping with Gaussian
//! noise (DP-SGD), and a Rényi-DP accountant for the sampled Gaussian
//! mechanism (Mironov, Talwar and Zhang 2019, integer orders).

/// Rényi orders the accountant searches by default.
pub fn default_orders() -> Vec<u32> {
    (2..=64).chain([80, 96, 128, 256]).collect()
}

/// RDP of one step of the sampled Gaussian mechanism with sampling rate
/// `q` and noise multiplier `sigma`, at integer order `alpha` ≥ 2.
pub fn rdp_step(q: f64, sigma: f64, alpha: u32) -> f64 {
    assert!(alpha >= 2, "integer orders start at 2");
    if q == 0.0 {
        return 0.0;
    }
    let a = alpha as f64;
    if q >= 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    // log A_α = log Σ_k C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)), in log space.
    let mut terms = Vec::with_capacity(alpha as usize + 1);
    let mut log_binom = 0.0f64; // log C(α, 0)
    for k in 0..=alpha {
        if k > 0 {
            log_binom += ((alpha - k + 1) as f64).ln() - (k as f64).ln();
        }
        let kf = k as f64;
        terms.push(
            log_binom
                + (a - kf) * (1.0 - q).ln()
                + kf * q.ln()
                + (kf * kf - kf) / (2.0 * sigma * sigma),
        );
    }
    let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_a = max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    log_a / (a - 1.0)
}

/// How RDP is turned into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// ε = RDP(α) + log(1/δ)/(α−1) (Mironov 2017, Prop. 3).
    Classic,
    /// ε = RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1) (Balle et al. 2020).
    Improved,
}

/// ε after `steps` steps at (`q`, `sigma`) for `delta`, and the order that
/// gave it.
pub fn epsilon(
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    orders: &[u32],
    conversion: Conversion,
) -> (f64, u32) {
    let mut best = (f64::INFINITY, 0);
    for &alpha in orders {
        let a = alpha as f64;
        let rdp = steps as f64 * rdp_step(q, sigma, alpha);
        let eps = match conversion {
            Conversion::Classic => rdp + (1.0 / delta).ln() / (a - 1.0),
            Conversion::Improved => rdp + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0),
        };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    best
}

/// A running accountant: one entry per (q, σ) with its step count.
#[derive(Debug, Clone, Default)]
pub struct Accountant {
    steps: Vec<(f64, f64, u64)>,
}

impl Accountant {
    pub fn step(&mut self, q: f64, sigma: f64) {
        match self
            .steps
            .iter_mut()
            .find(|(sq, ss, _)| *sq == q && *ss == sigma)
        {
            Some(entry) => entry.2 += 1,
            None => self.steps.push((q, sigma, 1)),
        }
    }

    /// (ε, order) for `delta` over all steps so far.
    pub fn epsilon(&self, delta: f64) -> (f64, u32) {
        let mut best = (f64::INFINITY, 0);
        for alpha in default_orders() {
            let a = alpha as f64;
            let rdp: f64 = self
                .steps
                .iter()
                .map(|&(q, s, n)| n as f64 * rdp_step(q, s, alpha))
                .sum();
            let eps = rdp + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0);
            if eps < best.0 {
                best = (eps, alpha);
            }
        }
        best
    }
}

/// DP-SGD settings for one party.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSgd {
    /// Per-example L2 clipping norm.
    pub clip: f64,
    /// Noise standard deviation as a multiple of `clip`.
    pub noise_multiplier: f64,
    /// Expected batch size of Poisson sampling.
    pub batch_size: usize,
    /// δ to report ε at.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsampled_gaussian_is_alpha_over_two_sigma_squared() {
        for alpha in [2, 5, 32] {
            assert!((rdp_step(1.0, 2.0, alpha) - alpha as f64 / 8.0).abs() < 1e-12);
        }
        // The sampled formula at q → 1 agrees with the closed form.
        assert!((rdp_step(1.0 - 1e-12, 2.0, 7) - 7.0 / 8.0).abs() < 1e-6);
    }

    /// Opacus documents: 60,000 examples, batch 256, σ = 1.12, 60 epochs,
    /// δ = 1e-5, orders 10, 20, 100 → ε = 2.95.
    #[test]
    fn matches_the_opacus_reference_value() {
        let q = 256.0 / 60000.0;
        let steps = (60.0 / q) as u64;
        let (eps, order) = epsilon(q, 1.12, steps, 1e-5, &[10, 20, 100], Conversion::Classic);
        assert!((eps - 2.95).abs() < 0.01, "ε = {eps} at order {order}");
        assert_eq!(order, 10);
    }

    /// Abadi et al. (2016): q = 0.01, σ = 4, δ = 1e-5, 10,000 steps gives
    /// ε ≈ 1.26 with their moments accountant; the exact RDP bound is tighter.
    #[test]
    fn is_at_most_the_moments_accountant_bound() {
        let (eps, _) = epsilon(
            0.01,
            4.0,
            10_000,
            1e-5,
            &default_orders(),
            Conversion::Classic,
        );
        assert!(eps <= 1.26 && eps > 1.0, "ε = {eps}");
        let (improved, _) = epsilon(
            0.01,
            4.0,
            10_000,
            1e-5,
            &default_orders(),
            Conversion::Improved,
        );
        assert!(improved < eps);
    }

    #[test]
    fn accountant_composes_steps() {
        let mut acc = Accountant::default();
        for _ in 0..100 {
            acc.step(0.05, 1.0);
        }
        let (eps, _) = acc.epsilon(1e-5);
        let (direct, _) = epsilon(
            0.05,
            1.0,
            100,
            1e-5,
            &default_orders(),
            Conversion::Improved,
        );
        assert!((eps - direct).abs() < 1e-12);
    }
}
