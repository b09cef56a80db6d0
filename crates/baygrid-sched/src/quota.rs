//! Quotas (Kueue-style): a tenant may be given a nominal number of accelerators of each
//! model. Without borrowing it never holds more than that. With borrowing, every tenant
//! with a quota is in one cohort, and a tenant may use the cohort's unused quota: the
//! cohort together never holds more than its quotas' sum. Tenants without a quota are not
//! limited. Borrowed capacity comes back as the borrowers' jobs end.

use std::collections::BTreeMap;

use baygrid_core::JobSpec;

use crate::fairshare::Usage;

/// Nominal quotas by tenant, then by accelerator model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    pub nominal: BTreeMap<String, BTreeMap<String, u64>>,
    pub borrowing: bool,
}

/// Why a tenant may not take a model's accelerators for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaBlock {
    /// Not now: it would take the tenant (or, borrowing, its cohort) past its quota; it
    /// may later, as running work ends.
    NotNow(String),
    /// Never: the job alone is larger than the most the tenant could ever hold.
    Never(String),
}

impl Quotas {
    /// A tenant's nominal quota of a model (0 for a model it does not list); `None` for a
    /// tenant without quotas.
    pub fn own(&self, tenant: &str, model: &str) -> Option<u64> {
        self.nominal
            .get(tenant)
            .map(|q| q.get(model).copied().unwrap_or(0))
    }

    /// The cohort's quota of a model: every tenant's nominal quota summed.
    pub fn cohort(&self, model: &str) -> u64 {
        self.nominal
            .values()
            .map(|q| q.get(model).copied().unwrap_or(0))
            .sum()
    }

    /// What the cohort's tenants hold of a model.
    pub fn cohort_used(&self, usage: &Usage, model: &str) -> u64 {
        self.nominal.keys().map(|t| usage.held(t, model)).sum()
    }

    /// Whether a tenant holds more of a model than its own quota (it borrows).
    pub fn borrows(&self, usage: &Usage, tenant: &str, model: &str) -> bool {
        self.own(tenant, model)
            .is_some_and(|own| usage.held(tenant, model) > own)
    }

    /// For each model the job accepts, why the tenant may not take it now or ever, given
    /// what every tenant holds (`usage`); models it may take are absent.
    pub fn blocks(
        &self,
        usage: &Usage,
        tenant: &str,
        spec: &JobSpec,
    ) -> BTreeMap<String, QuotaBlock> {
        let mut out = BTreeMap::new();
        if !self.nominal.contains_key(tenant) {
            return out;
        }
        for (model, per_node) in &spec.resources.accelerators.alternatives {
            let asked = u64::from(*per_node) * u64::from(spec.resources.nodes);
            let own = self.own(tenant, model).unwrap_or(0);
            let cohort = self.cohort(model);
            let ceiling = if self.borrowing { cohort } else { own };
            if asked > ceiling {
                let whose = if self.borrowing {
                    format!("{tenant}'s cohort's quota of {cohort}")
                } else {
                    format!("{tenant}'s quota of {own}")
                };
                out.insert(
                    model.clone(),
                    QuotaBlock::Never(format!("quota: {asked} × {model} exceed {whose} {model}")),
                );
                continue;
            }
            let block = if self.borrowing {
                let used = self.cohort_used(usage, model);
                (used + asked > cohort).then(|| {
                    format!(
                        "quota: the cohort holds {used} of its {cohort} × {model}; {asked} more would pass it (own quota {own}, holding {})",
                        usage.held(tenant, model)
                    )
                })
            } else {
                let held = usage.held(tenant, model);
                (held + asked > own).then(|| {
                    format!("quota: {tenant} holds {held} of its {own} × {model}; {asked} more would pass it")
                })
            };
            if let Some(reason) = block {
                out.insert(model.clone(), QuotaBlock::NotNow(reason));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(accelerators: &str, nodes: u32) -> JobSpec {
        JobSpec::from_yaml(&format!(
            "name: j\nresources:\n  accelerators: {accelerators}\n  nodes: {nodes}\ncommand: 'true'\nestimated_duration: 1h\n"
        ))
        .unwrap()
    }

    fn quotas(borrowing: bool) -> Quotas {
        let q = |h800: u64| BTreeMap::from([("H800".to_string(), h800)]);
        Quotas {
            nominal: BTreeMap::from([("a".to_string(), q(16)), ("b".to_string(), q(8))]),
            borrowing,
        }
    }

    fn usage(a: u64, b: u64) -> Usage {
        let mut usage = Usage::new(BTreeMap::from([("H800".to_string(), 64)]));
        usage.add("a", "H800", a);
        usage.add("b", "H800", b);
        usage
    }

    #[test]
    fn without_borrowing_a_tenant_stays_within_its_own_quota() {
        let q = quotas(false);
        let eight = job("{H800: 8}", 1);
        assert!(q.blocks(&usage(8, 0), "a", &eight).is_empty());
        let blocked = q.blocks(&usage(16, 0), "a", &eight);
        assert!(
            matches!(&blocked["H800"], QuotaBlock::NotNow(r) if r.contains("a holds 16 of its 16")),
            "{blocked:?}"
        );
        // b's idle quota is not a's to use
        assert!(!q.blocks(&usage(9, 0), "a", &eight).is_empty());
        // larger than the quota itself: never
        let gang = job("{H800: 8}", 3);
        assert!(matches!(
            &q.blocks(&usage(0, 0), "a", &gang)["H800"],
            QuotaBlock::Never(r) if r.contains("exceed a's quota of 16")
        ));
        // a model outside the quota is one the tenant may not use; one with alternatives
        // is blocked only on the models it is over
        let either = job("[{H800: 8}, {A800: 8}]", 1);
        let blocked = q.blocks(&usage(16, 0), "a", &either);
        assert!(matches!(&blocked["A800"], QuotaBlock::Never(_)));
        assert!(matches!(&blocked["H800"], QuotaBlock::NotNow(_)));
        // tenants without a quota are not limited
        assert!(q.blocks(&usage(0, 0), "c", &gang).is_empty());
    }

    #[test]
    fn borrowing_uses_the_cohorts_idle_quota_and_never_more() {
        let q = quotas(true);
        let eight = job("{H800: 8}", 1);
        // a holds its 16 and borrows b's idle 8
        assert!(q.blocks(&usage(16, 0), "a", &eight).is_empty());
        // the cohort's 24 are all held: even b, within its own quota, waits for the
        // borrower's work to end
        assert!(matches!(
            &q.blocks(&usage(24, 0), "b", &eight)["H800"],
            QuotaBlock::NotNow(r) if r.contains("the cohort holds 24 of its 24")
        ));
        // a job as large as the cohort's quota may run; a larger one never
        assert!(q.blocks(&usage(0, 0), "b", &job("{H800: 8}", 3)).is_empty());
        assert!(matches!(
            &q.blocks(&usage(0, 0), "b", &job("{H800: 8}", 4))["H800"],
            QuotaBlock::Never(_)
        ));
    }
}
