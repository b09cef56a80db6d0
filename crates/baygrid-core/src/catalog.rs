//! The published compute: accelerator models, parties, providers, sites, clusters and offers,
//! plus the facts placement needs about the region (round trips, transfer prices, rates).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::is_valid_name;
use crate::money::{Currency, ExchangeRates, Money};

/// A legal area.
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
pub enum Jurisdiction {
    /// Mainland China (Guangdong's nine GBA cities are here).
    CN,
    HK,
    MO,
    INTL,
}

impl Jurisdiction {
    /// The currency a party in this jurisdiction is billed in by default.
    pub fn home_currency(self) -> Currency {
        match self {
            Jurisdiction::HK => Currency::HKD,
            Jurisdiction::MO => Currency::MOP,
            Jurisdiction::CN | Jurisdiction::INTL => Currency::CNY,
        }
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Jurisdiction::CN => "CN",
            Jurisdiction::HK => "HK",
            Jurisdiction::MO => "MO",
            Jurisdiction::INTL => "INTL",
        })
    }
}

impl FromStr for Jurisdiction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "CN" => Ok(Jurisdiction::CN),
            "HK" => Ok(Jurisdiction::HK),
            "MO" => Ok(Jurisdiction::MO),
            "INTL" => Ok(Jurisdiction::INTL),
            other => Err(format!(
                "unknown jurisdiction `{other}`: expected CN, HK, MO or INTL"
            )),
        }
    }
}

/// A device model and the figures placement uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceleratorModel {
    pub model: String,
    pub vendor: String,
    pub memory_gb: u32,
    /// Dense BF16 TFLOPS.
    pub bf16_tflops: u32,
}

/// A legal entity. Every tenant, provider and data holder belongs to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Party {
    pub name: String,
    /// Where the party is registered.
    pub jurisdiction: Jurisdiction,
    pub city: String,
    /// Operator of critical information infrastructure.
    #[serde(default)]
    pub ciio: bool,
}

/// A compute provider (算力提供方).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub party: String,
}

/// A data-centre location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub jurisdiction: Jurisdiction,
    pub city: String,
    /// Share of the site's power from green sources, in percent.
    pub green_share_pct: u8,
    pub power_price_per_kwh: Money,
}

/// The engine a cluster runs its work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Local,
    Slurm,
    Kubernetes,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Local => "local",
            EngineKind::Slurm => "slurm",
            EngineKind::Kubernetes => "kubernetes",
        })
    }
}

/// A pool of identical nodes at one site, run by one engine, owned by one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub site: String,
    pub provider: String,
    pub engine: EngineKind,
    pub nodes: u32,
    pub accelerator: String,
    pub accelerators_per_node: u32,
    pub cpus_per_node: u32,
    pub memory_gb_per_node: u32,
    /// Default container image for engines that need one (Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image: Option<String>,
    /// Whether the engine can run a job's `image` (a container runtime is configured).
    #[serde(default)]
    pub container_runtime: bool,
}

/// A provider's price for a cluster's capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub cluster: String,
    pub price_per_accelerator_hour: Money,
}

/// A consumer of compute, with a budget in CNY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    pub party: String,
    pub budget: Money,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransferPrices {
    pub within_jurisdiction: Money,
    pub across_border: Money,
}

/// Which of the region's transfer prices moving data from one place to another pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferTier {
    /// Within a city: free.
    SameCity,
    WithinJurisdiction,
    AcrossBorder,
}

impl TransferTier {
    /// The tier between two places, each a city and its jurisdiction.
    pub fn between(from: (&str, Jurisdiction), to: (&str, Jurisdiction)) -> Self {
        if from.0 == to.0 {
            TransferTier::SameCity
        } else if from.1 == to.1 {
            TransferTier::WithinJurisdiction
        } else {
            TransferTier::AcrossBorder
        }
    }
}

impl TransferPrices {
    /// The price per GB of a tier; none within a city.
    pub fn per_gb(&self, tier: TransferTier) -> Option<Money> {
        match tier {
            TransferTier::SameCity => None,
            TransferTier::WithinJurisdiction => Some(self.within_jurisdiction),
            TransferTier::AcrossBorder => Some(self.across_border),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("sites file: {field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> CatalogError {
    CatalogError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A whole published region: what `baygrid up` loads from a sites file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: u32,
    #[serde(default)]
    pub exchange_rates: ExchangeRates,
    pub transfer_price_per_gb: TransferPrices,
    pub accelerators: Vec<AcceleratorModel>,
    pub parties: Vec<Party>,
    pub providers: Vec<Provider>,
    pub sites: Vec<Site>,
    pub clusters: Vec<Cluster>,
    pub offers: Vec<Offer>,
    /// `[city, city, ms]`, symmetric.
    pub round_trip_ms: Vec<(String, String, u32)>,
}

/// The sample GBA region shipped with baygrid.
pub const SAMPLE_SITES_YAML: &str = include_str!("../../../config/sites.yaml");

impl Catalog {
    pub fn sample() -> Catalog {
        Catalog::from_yaml(SAMPLE_SITES_YAML).expect("the shipped sites file is valid")
    }

    pub fn from_yaml(text: &str) -> Result<Catalog, CatalogError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let catalog: Catalog = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let e = crate::SpecError::at(e.path(), &e.inner().to_string(), "file");
            invalid(e.field, e.problem)
        })?;
        catalog.validate()?;
        Ok(catalog)
    }

    /// Checks names, references and figures.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let accelerators: BTreeSet<&str> =
            self.accelerators.iter().map(|a| a.model.as_str()).collect();
        let parties: BTreeSet<&str> = self.parties.iter().map(|p| p.name.as_str()).collect();
        let providers: BTreeSet<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
        let sites: BTreeSet<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
        let clusters: BTreeSet<&str> = self.clusters.iter().map(|c| c.name.as_str()).collect();
        for (i, p) in self.parties.iter().enumerate() {
            check_name(&format!("parties[{i}].name"), &p.name)?;
        }
        for (i, p) in self.providers.iter().enumerate() {
            check_name(&format!("providers[{i}].name"), &p.name)?;
            if !parties.contains(p.party.as_str()) {
                return Err(invalid(
                    format!("providers[{i}].party"),
                    format!("unknown party `{}`", p.party),
                ));
            }
        }
        for (i, s) in self.sites.iter().enumerate() {
            check_name(&format!("sites[{i}].name"), &s.name)?;
            if s.green_share_pct > 100 {
                return Err(invalid(
                    format!("sites[{i}].green_share_pct"),
                    "must be between 0 and 100",
                ));
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            check_cluster(c, &format!("clusters[{i}]"))?;
            if !sites.contains(c.site.as_str()) {
                return Err(invalid(
                    format!("clusters[{i}].site"),
                    format!("unknown site `{}`", c.site),
                ));
            }
            if !providers.contains(c.provider.as_str()) {
                return Err(invalid(
                    format!("clusters[{i}].provider"),
                    format!("unknown provider `{}`", c.provider),
                ));
            }
            if !accelerators.contains(c.accelerator.as_str()) {
                return Err(invalid(
                    format!("clusters[{i}].accelerator"),
                    format!("unknown accelerator model `{}`", c.accelerator),
                ));
            }
        }
        for (i, o) in self.offers.iter().enumerate() {
            if !clusters.contains(o.cluster.as_str()) {
                return Err(invalid(
                    format!("offers[{i}].cluster"),
                    format!("unknown cluster `{}`", o.cluster),
                ));
            }
            if o.price_per_accelerator_hour.minor <= 0 {
                return Err(invalid(
                    format!("offers[{i}].price_per_accelerator_hour"),
                    "must be positive",
                ));
            }
            self.exchange_rates
                .rate(o.price_per_accelerator_hour.currency)
                .map_err(|e| {
                    invalid(
                        format!("offers[{i}].price_per_accelerator_hour"),
                        e.to_string(),
                    )
                })?;
        }
        Ok(())
    }

    /// Round trips between cities as a lookup table.
    pub fn round_trips(&self) -> RoundTrips {
        let mut table = BTreeMap::new();
        for (a, b, ms) in &self.round_trip_ms {
            table.insert((a.clone(), b.clone()), *ms);
            table.insert((b.clone(), a.clone()), *ms);
        }
        RoundTrips { table }
    }
}

/// Checks a cluster's own fields (names and figures), reporting the first bad one.
pub fn check_cluster(c: &Cluster, prefix: &str) -> Result<(), CatalogError> {
    check_name(&format!("{prefix}.name"), &c.name)?;
    if c.nodes == 0 {
        return Err(invalid(format!("{prefix}.nodes"), "must be at least 1"));
    }
    if c.cpus_per_node == 0 {
        return Err(invalid(
            format!("{prefix}.cpus_per_node"),
            "must be at least 1",
        ));
    }
    if c.memory_gb_per_node == 0 {
        return Err(invalid(
            format!("{prefix}.memory_gb_per_node"),
            "must be at least 1",
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str) -> Result<(), CatalogError> {
    if is_valid_name(value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{value}` is not a name: use 1-63 lowercase letters, digits and `-`"),
        ))
    }
}

/// Round-trip times between cities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundTrips {
    table: BTreeMap<(String, String), u32>,
}

impl RoundTrips {
    /// Milliseconds between two cities; 1 within a city; `None` when unknown.
    pub fn between(&self, a: &str, b: &str) -> Option<u32> {
        if a == b {
            return Some(1);
        }
        self.table.get(&(a.to_string(), b.to_string())).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_catalog_loads_and_is_consistent() {
        let catalog = Catalog::sample();
        assert_eq!(catalog.sites.len(), 6);
        assert_eq!(catalog.clusters.len(), 6);
        let rt = catalog.round_trips();
        assert_eq!(rt.between("shenzhen", "hong-kong"), Some(2));
        assert_eq!(rt.between("hong-kong", "shenzhen"), Some(2));
        assert_eq!(rt.between("macao", "macao"), Some(1));
        assert_eq!(rt.between("macao", "nowhere"), None);
    }

    #[test]
    fn bad_references_name_the_field() {
        let text = SAMPLE_SITES_YAML.replace("site: macao,", "site: atlantis,");
        let err = Catalog::from_yaml(&text).unwrap_err();
        assert!(err.to_string().contains("clusters[5].site"), "{err}");
        let text = SAMPLE_SITES_YAML.replace("nodes: 4,", "nodez: 4,");
        let err = Catalog::from_yaml(&text).unwrap_err();
        assert!(err.to_string().contains("clusters[5]"), "{err}");
    }
}
