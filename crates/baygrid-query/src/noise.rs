//! Calibrated noise and the thresholds it implies.
//!
//! Every released number is a sum whose total change, when one individual is added or
//! removed, is bounded (its L1 sensitivity, from the contribution bounds); Laplace noise of
//! scale sensitivity / ε makes its release ε-differentially private. A group is released
//! only when its noisy count of individuals reaches the threshold: at least the offer's k,
//! and high enough that a group made by one individual alone shows with probability at
//! most δ over all the groups that individual can touch.
//!
//! With the Gaussian mechanism the released numbers get Gaussian noise instead, with the
//! smallest σ the analytic Gaussian mechanism (Balle and Wang, ICML 2018, Theorem 8)
//! allows for the aggregate's (ε, δ): σ such that
//! Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) ≤ δ, with Δ the sensitivity. It holds for every
//! ε > 0, unlike the classic σ = Δ√(2 ln(1.25/δ))/ε, which needs ε < 1 and is larger.

use rand::Rng;

/// A draw from Laplace(0, scale), by inverting the CDF on a uniform in (-1/2, 1/2).
pub fn laplace<R: Rng + ?Sized>(rng: &mut R, scale: f64) -> f64 {
    // open interval: u = -1/2 would give ln(0)
    let mut u: f64 = rng.gen::<f64>() - 0.5;
    while u == -0.5 {
        u = rng.gen::<f64>() - 0.5;
    }
    -scale * u.signum() * (1.0 - 2.0 * u.abs()).ln()
}

/// The noisy count a group's individuals must reach to be released: at least `k`, and
/// with `max_groups` groups per individual and Laplace scale `scale` on that count, a
/// group of one individual passes with probability at most δ / max_groups each.
/// Ungrouped queries (one group that always exists) need only `k`.
pub fn threshold(k: u32, grouped: bool, max_groups: u32, scale: f64, delta: f64) -> f64 {
    let k = k as f64;
    if !grouped {
        return k;
    }
    let tail = 1.0 + scale * (max_groups as f64 / (2.0 * delta)).ln();
    k.max(tail)
}

/// The probability that a group of exactly `count` individuals is released at `threshold`
/// under Laplace noise of `scale`.
pub fn release_probability(count: f64, threshold: f64, scale: f64) -> f64 {
    let gap = threshold - count;
    if gap >= 0.0 {
        0.5 * (-gap / scale).exp()
    } else {
        1.0 - 0.5 * (gap / scale).exp()
    }
}

/// A draw from N(0, σ²) (Box–Muller).
pub fn gaussian<R: Rng + ?Sized>(rng: &mut R, sigma: f64) -> f64 {
    let mut u1: f64 = rng.gen();
    while u1 == 0.0 {
        u1 = rng.gen();
    }
    let u2: f64 = rng.gen();
    sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The complementary error function, to a fractional error below 1.2e-7 everywhere
/// (a Chebyshev fit of erfc's asymptote, Press et al., Numerical Recipes §6.2).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The standard normal CDF.
pub fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The δ the Gaussian mechanism with σ achieves at ε for sensitivity Δ (Balle and Wang's
/// exact privacy profile).
pub fn gaussian_delta(sigma: f64, epsilon: f64, sensitivity: f64) -> f64 {
    let a = sensitivity / (2.0 * sigma);
    let b = epsilon * sigma / sensitivity;
    (phi(a - b) - epsilon.exp() * phi(-a - b)).max(0.0)
}

/// The smallest σ (to 1 part in 10⁹) for which Gaussian noise on a number of the given
/// sensitivity is (ε, δ)-differentially private.
pub fn gaussian_sigma(epsilon: f64, delta: f64, sensitivity: f64) -> f64 {
    if sensitivity <= 0.0 {
        return 0.0;
    }
    // δ falls as σ grows; bracket, then bisect
    let (mut low, mut high) = (sensitivity * 1e-3, sensitivity);
    while gaussian_delta(high, epsilon, sensitivity) > delta {
        low = high;
        high *= 2.0;
    }
    while (high - low) > high * 1e-9 {
        let mid = 0.5 * (low + high);
        if gaussian_delta(mid, epsilon, sensitivity) > delta {
            low = mid;
        } else {
            high = mid;
        }
    }
    high
}
