//! Entries: one canonical encoding for every decision the exchange writes to the log.
//!
//! An entry is a JSON object with exactly the keys `index`, `at`, `kind`, `actor` and
//! `payload`, serialized with keys in lexicographic order at every depth, no insignificant
//! white space, and UTF-8. The leaf hash is SHA-256(0x00 ‖ those bytes).

use serde::{Deserialize, Serialize};

/// One decision in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: u64,
    /// Milliseconds since the Unix epoch, UTC.
    pub at: i64,
    /// What was decided: `job.transition`, `job.placement`, `lease.grant`, …
    pub kind: String,
    /// Who decided: `scheduler`, `tenant:NAME`, `agent:CLUSTER`, …
    pub actor: String,
    pub payload: serde_json::Value,
}

impl Entry {
    /// The canonical bytes: keys sorted at every depth, compact. The keys are sorted here,
    /// not left to `serde_json`'s map, whose order depends on a cargo feature that any crate
    /// in a build may turn on.
    pub fn canonical(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("entries serialize");
        let mut out = Vec::with_capacity(256);
        write_canonical(&value, &mut out);
        out
    }

    pub fn leaf_hash(&self) -> crate::Hash {
        crate::leaf_hash(&self.canonical())
    }
}

/// Writes `value` with object keys in byte order at every depth and no white space.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("strings serialize");
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalars serialize"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_sorts_keys_at_every_depth() {
        let entry = Entry {
            index: 3,
            at: 1_700_000_000_000,
            kind: "job.transition".into(),
            actor: "scheduler".into(),
            payload: serde_json::json!({"to": "placed", "from": "queued", "job": {"z": 1, "a": 2}}),
        };
        let text = String::from_utf8(entry.canonical()).unwrap();
        assert_eq!(
            text,
            r#"{"actor":"scheduler","at":1700000000000,"index":3,"kind":"job.transition","payload":{"from":"queued","job":{"a":2,"z":1},"to":"placed"}}"#
        );
        let back: Entry = serde_json::from_slice(text.as_bytes()).unwrap();
        assert_eq!(back.canonical(), entry.canonical());
    }
}
