//! Dominant-resource fair share: the order in which a scheduling cycle considers queued
//! jobs. Within a priority class, the tenant holding the smallest dominant share (the largest
//! share, over accelerator models, of a model's capacity that it holds now) goes first, then
//! the oldest job. The replay's dispatcher orders the same way, with tenant weights.

use std::collections::BTreeMap;

/// What each tenant holds now, per accelerator model, against the region's capacity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    held: BTreeMap<String, BTreeMap<String, u64>>,
    capacity: BTreeMap<String, u64>,
    /// Tenants' weights (1 when absent): a tenant of weight 2 is entitled to twice the share.
    weights: BTreeMap<String, f64>,
}

impl Usage {
    /// Usage against `capacity` (accelerators per model).
    pub fn new(capacity: BTreeMap<String, u64>) -> Self {
        Usage {
            held: BTreeMap::new(),
            capacity,
            weights: BTreeMap::new(),
        }
    }

    /// The same usage with tenants' weights; weights that are not positive and finite are
    /// ignored (the server's config refuses them).
    pub fn with_weights(mut self, weights: BTreeMap<String, f64>) -> Self {
        self.weights = weights
            .into_iter()
            .filter(|(_, w)| w.is_finite() && *w > 0.0)
            .collect();
        self
    }

    /// The tenant's dominant share divided by its weight: what the order compares.
    pub fn weighted_share(&self, tenant: &str) -> f64 {
        self.share(tenant) / self.weights.get(tenant).copied().unwrap_or(1.0)
    }

    /// Records `accelerators` of `model` held by `tenant`.
    pub fn add(&mut self, tenant: &str, model: &str, accelerators: u64) {
        *self
            .held
            .entry(tenant.to_string())
            .or_default()
            .entry(model.to_string())
            .or_default() += accelerators;
    }

    /// Takes `accelerators` of `model` off what the tenant holds (a job stopped).
    pub fn remove(&mut self, tenant: &str, model: &str, accelerators: u64) {
        if let Some(held) = self
            .held
            .get_mut(tenant)
            .and_then(|models| models.get_mut(model))
        {
            *held = held.saturating_sub(accelerators);
        }
    }

    /// Accelerators of `model` the tenant holds.
    pub fn held(&self, tenant: &str, model: &str) -> u64 {
        self.held
            .get(tenant)
            .and_then(|m| m.get(model))
            .copied()
            .unwrap_or(0)
    }

    /// The tenant's dominant share, 0 to 1 (models without capacity count as full).
    pub fn share(&self, tenant: &str) -> f64 {
        self.held.get(tenant).map_or(0.0, |models| {
            models
                .iter()
                .map(|(model, held)| match self.capacity.get(model) {
                    Some(&capacity) if capacity > 0 => *held as f64 / capacity as f64,
                    _ => 1.0,
                })
                .fold(0.0, f64::max)
        })
    }
}

/// One queued job as the order sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued<'a> {
    pub priority: i64,
    pub tenant: &'a str,
    pub submitted_ms: i64,
    /// When the job must have ended, if it must.
    pub deadline_ms: Option<i64>,
}

/// The indices of `jobs` in the order to consider them: higher priority first; then the
/// tenant with the smaller dominant share over its weight; then the earlier deadline (a job
/// with none after every job with one); then the older job; then the original order.
pub fn order(jobs: &[Queued<'_>], usage: &Usage) -> Vec<usize> {
    let shares: Vec<f64> = jobs
        .iter()
        .map(|j| usage.weighted_share(j.tenant))
        .collect();
    let mut indices: Vec<usize> = (0..jobs.len()).collect();
    indices.sort_by(|&a, &b| {
        jobs[b]
            .priority
            .cmp(&jobs[a].priority)
            .then(shares[a].total_cmp(&shares[b]))
            .then(
                jobs[a]
                    .deadline_ms
                    .unwrap_or(i64::MAX)
                    .cmp(&jobs[b].deadline_ms.unwrap_or(i64::MAX)),
            )
            .then(jobs[a].submitted_ms.cmp(&jobs[b].submitted_ms))
            .then(a.cmp(&b))
    });
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_scale_the_share_a_tenant_is_entitled_to() {
        let capacity = BTreeMap::from([("H800".to_string(), 100)]);
        let mut usage = Usage::new(capacity);
        usage.add("heavy", "H800", 40); // 0.4, weight 4 → 0.1
        usage.add("light", "H800", 20); // 0.2, weight 1 → 0.2
        let usage = usage.with_weights(BTreeMap::from([
            ("heavy".to_string(), 4.0),
            ("bad".to_string(), -1.0),
        ]));
        assert!((usage.weighted_share("heavy") - 0.1).abs() < 1e-12);
        assert!((usage.weighted_share("light") - 0.2).abs() < 1e-12);
        assert_eq!(usage.weighted_share("bad"), 0.0);
        let jobs = [
            Queued {
                priority: 0,
                tenant: "light",
                submitted_ms: 1,
                deadline_ms: None,
            },
            Queued {
                priority: 0,
                tenant: "heavy",
                submitted_ms: 2,
                deadline_ms: None,
            },
        ];
        // the heavier-weighted tenant is further below its entitlement: it goes first
        assert_eq!(order(&jobs, &usage), vec![1, 0]);
        // without weights, the one holding less goes first
        let mut plain = Usage::new(BTreeMap::from([("H800".to_string(), 100)]));
        plain.add("heavy", "H800", 40);
        plain.add("light", "H800", 20);
        assert_eq!(order(&jobs, &plain), vec![0, 1]);
    }

    #[test]
    fn the_least_served_tenant_goes_first_within_a_priority() {
        let capacity = BTreeMap::from([("H800".to_string(), 100), ("A800".to_string(), 50)]);
        let mut usage = Usage::new(capacity);
        usage.add("big", "H800", 40); // 0.4
        usage.add("small", "A800", 10); // 0.2
        usage.add("small", "H800", 5);
        assert!((usage.share("big") - 0.4).abs() < 1e-12);
        assert!((usage.share("small") - 0.2).abs() < 1e-12);
        assert_eq!(usage.share("new"), 0.0);
        let q = |priority, tenant, submitted_ms| Queued {
            priority,
            tenant,
            submitted_ms,
            deadline_ms: None,
        };
        let jobs = [
            q(0, "big", 1),
            q(0, "small", 5),
            q(0, "new", 9),
            q(10, "big", 7),
            q(0, "small", 2),
        ];
        // priority 10 first; then new (0), small (0.2) oldest first, big (0.4)
        assert_eq!(order(&jobs, &usage), vec![3, 2, 4, 1, 0]);
    }

    #[test]
    fn within_a_tenant_the_earliest_deadline_goes_first_then_the_oldest() {
        let usage = Usage::new(BTreeMap::from([("H800".to_string(), 100)]));
        let q = |tenant, submitted_ms, deadline_ms| Queued {
            priority: 0,
            tenant,
            submitted_ms,
            deadline_ms,
        };
        let jobs = [
            q("a", 1, None),
            q("a", 2, Some(9_000)),
            q("a", 3, Some(5_000)),
            q("a", 4, None),
            q("a", 5, Some(5_000)),
        ];
        // deadlines 5,000 (oldest first), then 9,000, then the jobs with none by age
        assert_eq!(order(&jobs, &usage), vec![2, 4, 1, 0, 3]);
        // a deadline does not jump a less-served tenant, nor a higher priority
        let mut usage = usage;
        usage.add("a", "H800", 10);
        let mut urgent = q("a", 1, Some(1));
        let calm = q("b", 2, None);
        assert_eq!(order(&[urgent, calm], &usage), vec![1, 0]);
        urgent.priority = 1;
        assert_eq!(order(&[urgent, calm], &usage), vec![0, 1]);
    }
}
