//! The cost model: what running a job on a cluster costs, in CNY.
//!
//! One model for the server's placer ([`crate::CheapestFeasible`], and so every quote), the
//! server's holds and metering (compute for the time a job ran), and the replay's
//! dispatcher and baselines: the run time on the cluster's accelerator model,
//! compute at the cluster's price, staging the inputs at the region's transfer price for
//! the tier between where they are and the cluster, and the green term. Amounts are
//! [`Money`] in fen, rounded half away from zero at each step; the replay sums them as
//! floating CNY only when it totals a run.

use baygrid_core::catalog::{TransferPrices, TransferTier};
use baygrid_core::{AcceleratorModel, Money, MoneyError};

/// A duration estimated for the reference model, on `model`: × the reference's BF16 TFLOPS
/// ÷ the model's, rounded up, in the unit it was given in (the server counts seconds, the
/// replay milliseconds); unscaled when either is unknown. Never below 1.
pub fn scale_by_tflops(
    reference: u64,
    reference_tflops: Option<u32>,
    model: Option<&AcceleratorModel>,
) -> u64 {
    match (reference_tflops, model) {
        (Some(r), Some(m)) if m.bf16_tflops > 0 => {
            (reference * u64::from(r)).div_ceil(u64::from(m.bf16_tflops))
        }
        _ => reference,
    }
    .max(1)
}

/// `accelerators` held for `millis` at `price_cny` per accelerator-hour.
pub fn compute(price_cny: Money, accelerators: u64, millis: u64) -> Result<Money, MoneyError> {
    price_cny.mul_ratio(i128::from(accelerators) * i128::from(millis), 3_600_000)
}

/// Moving `bytes` from one place to another at the region's prices (`prices` in CNY): the
/// tier's price per GB (10⁹ bytes); nothing within a city.
pub fn transfer(
    bytes: u64,
    tier: TransferTier,
    prices: &TransferPrices,
) -> Result<Money, MoneyError> {
    match prices.per_gb(tier) {
        Some(price) => price.mul_ratio(i128::from(bytes), 1_000_000_000),
        None => Ok(Money::zero(prices.within_jurisdiction.currency)),
    }
}

/// The green term on `compute` at a site with `green_share_pct` of green power: `weight` ×
/// the non-green share × compute (weight to four decimals). It steers the choice and is
/// never billed.
pub fn green(compute: Money, weight: f64, green_share_pct: u8) -> Result<Money, MoneyError> {
    let weight_per_10k = (weight * 10_000.0).round() as i128;
    let brown_pct = 100 - i128::from(green_share_pct.min(100));
    compute.mul_ratio(weight_per_10k * brown_pct, 1_000_000)
}

/// One run's cost on one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunCost {
    pub compute: Money,
    pub transfer: Money,
    pub green: Money,
}

impl RunCost {
    /// `accelerators` for `millis` at `price_cny`, `transfer` to stage the inputs, the green
    /// term by `green_weight` at a site with `green_share_pct` of green power.
    pub fn new(
        price_cny: Money,
        accelerators: u64,
        millis: u64,
        transfer: Money,
        green_weight: f64,
        green_share_pct: u8,
    ) -> Result<RunCost, MoneyError> {
        let compute = compute(price_cny, accelerators, millis)?;
        Ok(RunCost {
            compute,
            transfer,
            green: green(compute, green_weight, green_share_pct)?,
        })
    }

    /// What the choice minimises: compute + transfer + green.
    pub fn total(&self) -> Result<Money, MoneyError> {
        self.compute
            .checked_add(self.transfer)?
            .checked_add(self.green)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baygrid_core::Currency;

    fn cny(fen: i64) -> Money {
        Money::new(fen, Currency::CNY)
    }

    #[test]
    fn a_faster_card_runs_shorter_rounded_up_in_the_unit_given() {
        let h800 = AcceleratorModel {
            model: "H800".into(),
            vendor: "NVIDIA".into(),
            bf16_tflops: 989,
            memory_gb: 80,
        };
        // 1 hour on an A800 (312 TFLOPS): 1,135.7 s on an H800, rounded up
        assert_eq!(scale_by_tflops(3_600, Some(312), Some(&h800)), 1_136);
        assert_eq!(
            scale_by_tflops(3_600_000, Some(312), Some(&h800)),
            1_135_693
        );
        assert_eq!(scale_by_tflops(3_600, None, Some(&h800)), 3_600);
        assert_eq!(scale_by_tflops(0, Some(312), Some(&h800)), 1);
    }

    #[test]
    fn compute_transfer_and_green_in_fen() {
        // 8 accelerators for 90 minutes at 16 CNY an hour: 192 CNY
        let run = RunCost::new(cny(1_600), 8, 5_400_000, cny(0), 0.05, 30).unwrap();
        assert_eq!(run.compute, cny(19_200));
        // 0.05 × 70% non-green × 192 CNY = 6.72 CNY
        assert_eq!(run.green, cny(672));
        assert_eq!(run.total().unwrap(), cny(19_872));
        let prices = TransferPrices {
            within_jurisdiction: cny(5),
            across_border: cny(20),
        };
        // 1.5 GB across a border at 0.20 CNY/GB: 0.30 CNY; within a city free
        assert_eq!(
            transfer(1_500_000_000, TransferTier::AcrossBorder, &prices).unwrap(),
            cny(30)
        );
        assert_eq!(
            transfer(1_500_000_000, TransferTier::SameCity, &prices).unwrap(),
            cny(0)
        );
        // a green weight of 0 adds nothing
        assert_eq!(green(cny(19_200), 0.0, 0).unwrap(), cny(0));
    }
}
