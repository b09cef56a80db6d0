//! Money in integer minor units, one currency per amount, and exact decimal exchange rates.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not an amount: write it as `12.50 CNY` (currency CNY, HKD or MOP)")]
    Malformed(String),
    #[error("unknown currency `{0}`: expected CNY, HKD or MOP")]
    UnknownCurrency(String),
    #[error("`{0}` has more than two decimal places")]
    TooPrecise(String),
    #[error("amount overflows")]
    Overflow,
    #[error("cannot combine {0} with {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("no exchange rate for {0}")]
    NoRate(Currency),
    #[error("`{0}` is not an exchange rate: write a positive decimal such as `0.92`")]
    MalformedRate(String),
}

/// The currencies the exchange settles in. All have two decimal places of minor units
/// (fen, cents, avos).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Currency {
    CNY,
    HKD,
    MOP,
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Currency::CNY => "CNY",
            Currency::HKD => "HKD",
            Currency::MOP => "MOP",
        })
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "CNY" => Ok(Currency::CNY),
            "HKD" => Ok(Currency::HKD),
            "MOP" => Ok(Currency::MOP),
            other => Err(MoneyError::UnknownCurrency(other.to_string())),
        }
    }
}

/// An amount of one currency in minor units. Arithmetic across currencies is an error,
/// never a silent conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub const fn new(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    pub const fn zero(currency: Currency) -> Self {
        Money { minor: 0, currency }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }

    /// This amount times `numerator / denominator`, rounded half away from zero.
    pub fn mul_ratio(self, numerator: i128, denominator: i128) -> Result<Money, MoneyError> {
        // In 64 bits where nothing overflows: 128-bit division is a library call, several
        // times slower, and the dispatcher prices every job on every cluster this way.
        if let (Ok(n), Ok(d)) = (i64::try_from(numerator), i64::try_from(denominator)) {
            if let Some(minor) = self.minor.checked_mul(n).and_then(|v| round_div_64(v, d)) {
                return Ok(Money::new(minor, self.currency));
            }
        }
        let minor = (self.minor as i128)
            .checked_mul(numerator)
            .and_then(|v| round_div(v, denominator))
            .and_then(|v| i64::try_from(v).ok())
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }
}

/// `numerator / denominator` rounded half away from zero, in one integer width; `None`
/// where that width would overflow, or for a zero denominator.
macro_rules! rounded_division {
    ($name:ident, $int:ty) => {
        fn $name(numerator: $int, denominator: $int) -> Option<$int> {
            if denominator == 0 {
                return None;
            }
            let (n, d) = if denominator < 0 {
                (numerator.checked_neg()?, denominator.checked_neg()?)
            } else {
                (numerator, denominator)
            };
            let half = d / 2;
            Some(if n >= 0 {
                n.checked_add(half)? / d
            } else {
                n.checked_sub(half)? / d
            })
        }
    };
}

// 64 bits where nothing overflows (the caller then falls back to 128)
rounded_division!(round_div_64, i64);
rounded_division!(round_div, i128);

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        write!(f, "{sign}{}.{:02} {}", abs / 100, abs % 100, self.currency)
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split_whitespace();
        let (Some(amount), Some(currency), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(MoneyError::Malformed(text.to_string()));
        };
        let currency: Currency = currency.parse()?;
        let minor = parse_decimal(amount, 2).map_err(|e| match e {
            DecimalError::Malformed => MoneyError::Malformed(text.to_string()),
            DecimalError::TooPrecise => MoneyError::TooPrecise(text.to_string()),
            DecimalError::Overflow => MoneyError::Overflow,
        })?;
        Ok(Money::new(minor, currency))
    }
}

enum DecimalError {
    Malformed,
    TooPrecise,
    Overflow,
}

/// Parses a plain decimal (`-12.5`) into an integer scaled by 10^scale.
fn parse_decimal(text: &str, scale: u32) -> Result<i64, DecimalError> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(DecimalError::Malformed);
    }
    if fraction.len() > scale as usize {
        return Err(DecimalError::TooPrecise);
    }
    let mut value: i64 = whole.parse().map_err(|_| DecimalError::Overflow)?;
    value = value
        .checked_mul(10i64.pow(scale))
        .ok_or(DecimalError::Overflow)?;
    if !fraction.is_empty() {
        let padded = format!("{fraction:0<width$}", width = scale as usize);
        let frac: i64 = padded.parse().map_err(|_| DecimalError::Malformed)?;
        value = value.checked_add(frac).ok_or(DecimalError::Overflow)?;
    }
    Ok(if negative { -value } else { value })
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("an amount and its currency, e.g. `12.50 CNY`"))
            .examples([serde_json::json!("22.00 CNY")])
            .into()
    }
}
impl utoipa::ToSchema for Money {}

/// An exact exchange rate: CNY per one unit of a currency, in millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub cny_micros_per_unit: i64,
}

impl FromStr for Rate {
    type Err = MoneyError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match parse_decimal(text.trim(), 6) {
            Ok(micros) if micros > 0 => Ok(Rate {
                cny_micros_per_unit: micros,
            }),
            _ => Err(MoneyError::MalformedRate(text.to_string())),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.cny_micros_per_unit / 1_000_000;
        let frac = self.cny_micros_per_unit % 1_000_000;
        let frac_text = format!("{frac:06}");
        let frac_text = frac_text.trim_end_matches('0');
        if frac_text.is_empty() {
            write!(f, "{whole}")
        } else {
            write!(f, "{whole}.{frac_text}")
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Exchange rates into CNY, the exchange's accounting currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeRates {
    #[serde(flatten)]
    pub to_cny: BTreeMap<Currency, Rate>,
}

impl Default for ExchangeRates {
    fn default() -> Self {
        let mut to_cny = BTreeMap::new();
        to_cny.insert(Currency::HKD, "0.92".parse().expect("literal rate"));
        to_cny.insert(Currency::MOP, "0.89".parse().expect("literal rate"));
        ExchangeRates { to_cny }
    }
}

impl ExchangeRates {
    /// The rate used to convert `currency` into CNY (1 for CNY itself).
    pub fn rate(&self, currency: Currency) -> Result<Rate, MoneyError> {
        if currency == Currency::CNY {
            return Ok(Rate {
                cny_micros_per_unit: 1_000_000,
            });
        }
        self.to_cny
            .get(&currency)
            .copied()
            .ok_or(MoneyError::NoRate(currency))
    }

    /// Converts to CNY at the configured rate, rounding half away from zero to the fen.
    pub fn to_cny(&self, amount: Money) -> Result<Money, MoneyError> {
        let rate = self.rate(amount.currency)?;
        let converted = amount.mul_ratio(rate.cny_micros_per_unit as i128, 1_000_000)?;
        Ok(Money::new(converted.minor, Currency::CNY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        let m: Money = "22.5 CNY".parse().unwrap();
        assert_eq!(m, Money::new(2250, Currency::CNY));
        assert_eq!(m.to_string(), "22.50 CNY");
        assert_eq!(
            "-0.05 HKD".parse::<Money>().unwrap().to_string(),
            "-0.05 HKD"
        );
        assert!(matches!(
            "1.005 CNY".parse::<Money>(),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            "1 USD".parse::<Money>(),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert!(matches!(
            "1".parse::<Money>(),
            Err(MoneyError::Malformed(_))
        ));
        assert!(matches!(
            "x CNY".parse::<Money>(),
            Err(MoneyError::Malformed(_))
        ));
    }

    #[test]
    fn converts_at_exact_rates() {
        let rates = ExchangeRates::default();
        let hkd: Money = "30.00 HKD".parse().unwrap();
        assert_eq!(rates.to_cny(hkd).unwrap().to_string(), "27.60 CNY");
        let mop: Money = "28.00 MOP".parse().unwrap();
        assert_eq!(rates.to_cny(mop).unwrap().to_string(), "24.92 CNY");
        assert_eq!("0.92".parse::<Rate>().unwrap().to_string(), "0.92");
    }

    #[test]
    fn refuses_mixed_currencies() {
        let a = Money::new(1, Currency::CNY);
        let b = Money::new(1, Currency::HKD);
        assert!(a.checked_add(b).is_err());
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(minor in -1_000_000_000i64..1_000_000_000) {
            let m = Money::new(minor, Currency::MOP);
            prop_assert_eq!(m.to_string().parse::<Money>().unwrap(), m);
        }

        /// The 64-bit path gives what 128-bit arithmetic gives, or the same error.
        #[test]
        fn mul_ratio_agrees_with_128_bit_arithmetic(
            minor in prop_oneof![any::<i64>(), -1_000_000_000i64..1_000_000_000],
            numerator in prop_oneof![
                any::<i64>().prop_map(i128::from),
                -10_000_000_000i128..10_000_000_000,
                any::<i128>(),
            ],
            denominator in prop_oneof![
                any::<i64>().prop_map(i128::from),
                -4_000_000i128..4_000_000,
                Just(0i128),
                Just(-1i128),
                any::<i128>(),
            ],
        ) {
            let m = Money::new(minor, Currency::CNY);
            let expected = (minor as i128)
                .checked_mul(numerator)
                .and_then(|p| round_div(p, denominator))
                .and_then(|v| i64::try_from(v).ok());
            match m.mul_ratio(numerator, denominator) {
                Ok(got) => prop_assert_eq!(Some(got.minor), expected),
                Err(_) => prop_assert_eq!(None, expected),
            }
        }
    }
}
