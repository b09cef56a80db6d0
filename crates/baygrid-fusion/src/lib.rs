//! Sample-data fusion training (样本数据融合训练): the parties' raw rows stay
//! with them; only blinded ids, masked updates and secret shares move.
//!
//! - [`psi`]: ECDH private set intersection over ristretto255.
//! - [`data`]: party tables read from CSV.

pub mod data;
pub mod dp;
pub mod fed;
pub mod hetero;
pub mod homo;
pub mod metrics;
pub mod psi;
pub mod secagg;

/// A trainer's settings: the fields given laid over `base` (every required field must be
/// given when there is none). An error names the field: `settings.<path>: <problem>`.
pub fn settings_over<T: serde::Serialize + serde::de::DeserializeOwned>(
    base: Option<&T>,
    settings: serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    let mut map = match base.map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Object(m))) => m,
        _ => serde_json::Map::new(),
    };
    map.extend(settings);
    serde_path_to_error::deserialize(serde_json::Value::Object(map))
        .map_err(|e| format!("settings.{}: {}", e.path(), e.inner()))
}
