//! Waiting for a cheaper cluster (东数西算 in time as well as in space).
//!
//! A latency-insensitive job that could start now only on a dear cluster may instead wait a
//! little for a cheaper one that is expected to free up soon. How long is bounded by the
//! job's own size: a share of its estimated run time (by default a fifth: a 10-hour training
//! run may wait two hours, a 5-minute job a minute), capped (six hours), and counted from
//! when it was submitted, so a job never waits longer than that however often it is
//! reconsidered. The saving must be worth it: the cheaper cluster must cost at least
//! `saving` (5%) less.
//!
//! Waiting for the cheaper cluster also keeps the dear one free for the jobs that have no
//! choice (on the sample region, Hong Kong's only cluster is also its dearest, and the jobs
//! that must stay in Hong Kong queue behind a gang that went there only because it was free).

use baygrid_core::{JobSpec, Millis, Money};
use serde::Serialize;

use crate::{Candidate, Quote, Verdict};

/// How long a latency-insensitive job may wait for a cheaper cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Patience {
    /// Share of the job's estimated run time it may wait (0 never waits).
    pub share: f64,
    /// The longest wait, in seconds, whatever the run time.
    pub cap_s: f64,
    /// The least saving, as a share of the cost now, that is worth waiting for.
    pub saving: f64,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            share: 0.2,
            cap_s: 6.0 * 3600.0,
            saving: 0.05,
        }
    }
}

/// A cluster the job could start on later, and at what cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Later {
    /// Expected start, in seconds on the caller's clock.
    pub start_s: f64,
    pub cost: f64,
}

impl Patience {
    /// Checks the settings: the field at fault (`share`, `cap_s` or `saving`) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.share.is_finite() && self.share >= 0.0) {
            return Err(("share", format!("{} must be 0 or more", self.share)));
        }
        if self.cap_s.is_nan() || self.cap_s < 0.0 {
            return Err(("cap_s", format!("{} must be 0 or more", self.cap_s)));
        }
        if !(0.0..1.0).contains(&self.saving) {
            return Err((
                "saving",
                format!("{} must be from 0 up to (not including) 1", self.saving),
            ));
        }
        Ok(())
    }

    /// The latest time a job submitted at `submitted_s` that runs about `runtime_s` may be
    /// kept waiting for a cheaper cluster.
    pub fn until(&self, submitted_s: f64, runtime_s: f64) -> f64 {
        submitted_s + (self.share * runtime_s.max(0.0)).min(self.cap_s)
    }

    /// What a later cluster must cost less than to be worth waiting for, against `now_cost`.
    pub fn worth(&self, now_cost: f64) -> f64 {
        now_cost * (1.0 - self.saving)
    }

    /// Of the clusters it could start on later, the one a latency-insensitive job should wait
    /// for instead of starting now at `now_cost`: the cheapest among those that start by
    /// [`Patience::until`] and save at least `saving`. `None`: start now.
    pub fn wait_for(
        &self,
        submitted_s: f64,
        runtime_s: f64,
        now_cost: f64,
        later: impl IntoIterator<Item = (usize, Later)>,
    ) -> Option<(usize, Later)> {
        let until = self.until(submitted_s, runtime_s);
        let worth = self.worth(now_cost);
        later
            .into_iter()
            .filter(|(_, l)| l.start_s <= until && l.cost < worth)
            .min_by(|a, b| {
                a.1.cost
                    .total_cmp(&b.1.cost)
                    .then(a.1.start_s.total_cmp(&b.1.start_s))
            })
    }
}

fn cny(amount: Option<Money>) -> Option<f64> {
    amount.map(|m| m.minor as f64 / 100.0)
}

impl Patience {
    /// In a quote whose chosen cluster fits now, the busy cluster a latency-insensitive job
    /// submitted at `submitted_ms` should wait for instead, by [`Patience::wait_for`] on the
    /// candidates' total costs and estimated starts (clusters with no estimate are not
    /// waited for, nor one where it would be expected to end after the spec's deadline, nor
    /// one `reserved` for another job). `None`: take the chosen one now.
    pub fn wait_in<'q>(
        &self,
        quote: &'q Quote,
        spec: &JobSpec,
        submitted_ms: Millis,
        reserved: impl Fn(&str) -> bool,
    ) -> Option<&'q Candidate> {
        if spec.latency_sensitive {
            return None;
        }
        let deadline = spec.deadline.map(|d| d.timestamp_millis());
        let chosen = quote.chosen()?;
        let runtime_s = chosen.estimated_seconds? as f64;
        let now_cost = cny(chosen.total_cost_cny)?;
        let later = quote.candidates.iter().enumerate().filter_map(|(i, c)| {
            (c.verdict == Verdict::Waits && !reserved(&c.cluster)).then_some(())?;
            if let Some(deadline) = deadline {
                (c.expected_end_ms()? <= deadline).then_some(())?;
            }
            Some((
                i,
                Later {
                    start_s: c.estimated_start_ms? as f64 / 1000.0,
                    cost: cny(c.total_cost_cny)?,
                },
            ))
        });
        self.wait_for(submitted_ms as f64 / 1000.0, runtime_s, now_cost, later)
            .map(|(i, _)| &quote.candidates[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later(start_s: f64, cost: f64) -> Later {
        Later { start_s, cost }
    }

    /// A tenth of the run time, up to six hours, for at least 5% off.
    fn p() -> Patience {
        Patience {
            share: 0.1,
            cap_s: 6.0 * 3600.0,
            saving: 0.05,
        }
    }

    #[test]
    fn a_long_job_waits_for_a_much_cheaper_cluster_that_frees_soon() {
        let p = p();
        // ten hours may wait one
        let choice = p.wait_for(0.0, 36_000.0, 100.0, [(1, later(3_000.0, 40.0))]);
        assert_eq!(choice.map(|c| c.0), Some(1));
    }

    #[test]
    fn it_does_not_wait_past_its_share_of_run_time_counted_from_submission() {
        let p = p();
        assert_eq!(p.until(1_000.0, 36_000.0), 4_600.0);
        assert!(p
            .wait_for(1_000.0, 36_000.0, 100.0, [(1, later(4_601.0, 40.0))])
            .is_none());
        // a short job hardly waits at all
        assert!(p
            .wait_for(0.0, 300.0, 100.0, [(1, later(31.0, 10.0))])
            .is_none());
        // nor a very long one past the cap
        assert_eq!(p.until(0.0, 1e9), 6.0 * 3600.0);
    }

    #[test]
    fn a_small_saving_is_not_worth_a_wait() {
        let p = p();
        assert!(p
            .wait_for(0.0, 36_000.0, 100.0, [(1, later(10.0, 96.0))])
            .is_none());
        assert!(p
            .wait_for(0.0, 36_000.0, 100.0, [(1, later(10.0, 94.0))])
            .is_some());
    }

    #[test]
    fn of_several_it_waits_for_the_cheapest_in_time() {
        let p = p();
        let choice = p.wait_for(
            0.0,
            36_000.0,
            100.0,
            [
                (1, later(100.0, 80.0)),
                (2, later(9_000.0, 10.0)),
                (3, later(2_000.0, 50.0)),
            ],
        );
        assert_eq!(choice.map(|c| c.0), Some(3));
    }

    #[test]
    fn settings_out_of_range_name_the_field() {
        let bad = Patience {
            saving: 1.0,
            ..Patience::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "saving");
        let bad = Patience {
            share: -1.0,
            ..Patience::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "share");
        assert!(Patience::default().validate().is_ok());
    }
}
