//! Durations in config files as people write them (`15s`, `30days`), for
//! `#[serde(with = "baygrid_core::duration_text")]`; `optional` for one that may be left out
//! (with `default` and `skip_serializing_if = "Option::is_none"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*value))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration: {e}")))
}

/// The same, for a duration that may be left out.
pub mod optional {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::deserialize(deserializer).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Config {
        #[serde(with = "super")]
        every: Duration,
        #[serde(
            default,
            with = "super::optional",
            skip_serializing_if = "Option::is_none"
        )]
        keep: Option<Duration>,
    }

    #[test]
    fn durations_read_as_written_and_round_trip() {
        let config: Config = serde_json::from_str(r#"{"every": "15s", "keep": "30days"}"#).unwrap();
        assert_eq!(config.every, Duration::from_secs(15));
        assert_eq!(config.keep, Some(Duration::from_secs(30 * 86_400)));
        let back: Config = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);
        let left_out: Config = serde_json::from_str(r#"{"every": "1m"}"#).unwrap();
        assert_eq!(left_out.keep, None);
        let err = serde_json::from_str::<Config>(r#"{"every": "soon"}"#).unwrap_err();
        assert!(
            err.to_string().contains("`soon` is not a duration"),
            "{err}"
        );
    }
}
