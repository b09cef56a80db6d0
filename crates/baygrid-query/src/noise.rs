//! Calibrated noise and the thresholds it implies.
//!
//! Every released number is a sum whose total change, when one individual is added or
//! removed, is bounded (its L1 sensitivity, from the contribution bounds); Laplace noise of
//! scale sensitivity / ε makes its release ε-differentially private. A group is released
//! only when its noisy count of individuals reaches the threshold: at least the offer's k,
//! and high enough that a group made by one individual alone shows with probability at
//! most δ over all the groups that individual can touch.

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
