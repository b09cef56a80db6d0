//! Domain types shared by every baygrid crate.
//!
//! Nothing here does I/O. Types carry their preconditions: a [`Money`] cannot mix
//! currencies, a [`Jurisdiction`] is an enum, a [`JobSpec`] is validated field by field
//! with errors that name the field.

pub mod auth;
pub mod catalog;
pub mod duration_text;
pub mod ids;
pub mod job;
pub mod money;

pub use auth::{Principal, Role};
pub use catalog::{
    AcceleratorModel, Catalog, CatalogError, Cluster, EngineKind, Jurisdiction, Offer, Party,
    Provider, Site, Tenant,
};
pub use ids::new_id;
pub use job::{
    AcceleratorRequest, Allocation, FusionPart, JobSpec, JobState, Resources, SpecError, MAX_NODES,
};
pub use money::{Currency, ExchangeRates, Money, MoneyError, Rate};

/// Milliseconds since the Unix epoch, UTC. The one representation of an instant that is
/// stored; the API renders it as RFC 3339.
pub type Millis = i64;

/// Renders stored milliseconds as an RFC 3339 UTC instant.
pub fn millis_to_rfc3339(millis: Millis) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A source of "now". The server passes the wall clock; tests pass a pinned one.
pub trait Clock: Send + Sync {
    fn now_millis(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> Millis {
        chrono::Utc::now().timestamp_millis()
    }
}
