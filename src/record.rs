//! The change record: the one shape every connector emits and consumes.
//!
//! Whatever a store calls a change (a keyspace notification, a trigger row, a change-stream
//! event), its connector turns it into a [`ChangeRecord`] before the engine sees it, and the
//! engine hands [`ChangeRecord`]s back to connectors to apply. The engine therefore never needs
//! to know which store it talks to.
//!
//! A record's [`Version`] is `(updatedAt in ms, hash of the canonical document)`. Comparing
//! versions in that order gives every side the same last-writer-wins winner, whichever change
//! it happens to see first (see `../shared/design-notes.md`).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::fmt;

/// The document field that carries a record's modification time.
pub const UPDATED_AT_FIELD: &str = "updatedAt";

/// Which of the two stores a record belongs to. The bridge always syncs exactly two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The store named `[local]` in the config (the client's own database).
    Local,
    /// The store named `[cloud]` in the config (the shared, central store).
    Cloud,
}

impl Side {
    /// The other store of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Cloud,
            Side::Cloud => Side::Local,
        }
    }

    /// Lower-case name, as used in config, logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Cloud => "cloud",
        }
    }
}

impl std::str::FromStr for Side {
    type Err = String;
    fn from_str(s: &str) -> Result<Side, String> {
        match s {
            "local" => Ok(Side::Local),
            "cloud" => Ok(Side::Cloud),
            other => Err(format!("{other:?} is not a side: use local or cloud")),
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The record exists with the carried document.
    Upsert,
    /// The record is gone; `updated_at_ms` is when it was deleted, as far as anyone knows.
    Delete,
}

/// Who made a change, as far as the store can tell.
///
/// Keyspace notifications and SQLite triggers cannot say who wrote; PostgreSQL triggers can read
/// a session setting the bridge sets on its own transactions. The tag is the bridge's instance id,
/// never just "bridge", so that two bridges sharing one store still see each other's writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "instance")]
pub enum Origin {
    /// The store did not say who wrote.
    #[default]
    Unknown,
    /// Written by the bridge instance with this id.
    Bridge(String),
}

/// One normalized change, as emitted by a listener or handed to a connector to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Which store the change was seen on (or is destined for).
    pub side: Side,
    /// Collection (table, key prefix, MongoDB collection).
    pub collection: String,
    /// Record id within the collection.
    pub id: String,
    /// Upsert or delete.
    pub op: Op,
    /// The whole document for an upsert, with `updatedAt` normalized; `None` for a delete.
    pub doc: Option<Value>,
    /// Modification (or deletion) time in ms since the epoch.
    pub updated_at_ms: i64,
    /// Who wrote it, where the store can tell.
    pub origin: Origin,
}

impl ChangeRecord {
    /// The record's version; deletes hash to a fixed tombstone marker.
    pub fn version(&self) -> Version {
        match &self.doc {
            Some(doc) if self.op == Op::Upsert => Version::of_doc(self.updated_at_ms, doc),
            _ => Version::tombstone(self.updated_at_ms),
        }
    }
}

/// `(updatedAt ms, canonical hash)`, totally ordered: time first, hash breaks ties.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Modification time in ms since the epoch.
    pub updated_at_ms: i64,
    /// Hex SHA-256 (first 16 bytes) of the canonical document, or [`TOMBSTONE_HASH`].
    pub hash: String,
    /// Whether this version is a delete.
    pub deleted: bool,
}

/// The hash a delete carries. All-zero, so at an equal time any live document beats a delete:
/// a tie never throws data away.
pub const TOMBSTONE_HASH: &str = "00000000000000000000000000000000";

impl Version {
    /// The version of a live document.
    pub fn of_doc(updated_at_ms: i64, doc: &Value) -> Version {
        Version {
            updated_at_ms,
            hash: canonical_hash(doc),
            deleted: false,
        }
    }

    /// The version of a delete at `updated_at_ms`.
    pub fn tombstone(updated_at_ms: i64) -> Version {
        Version {
            updated_at_ms,
            hash: TOMBSTONE_HASH.to_string(),
            deleted: true,
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.updated_at_ms
            .cmp(&other.updated_at_ms)
            .then_with(|| self.hash.cmp(&other.hash))
            .then_with(|| self.deleted.cmp(&other.deleted))
    }
}

/// Canonical text of a JSON value: keys sorted (recursively), no whitespace.
///
/// PostgreSQL `jsonb` reorders keys and drops whitespace; hashing this form keeps identical
/// documents identical. The keys are sorted explicitly: `serde_json` is built with
/// `preserve_order` (the `bson` crate that the MongoDB driver uses turns it on), so objects keep
/// insertion order and plain serialization would not be canonical.
pub fn canonical_json(doc: &Value) -> String {
    let mut sorted = doc.clone();
    sorted.sort_all_objects();
    serde_json::to_string(&sorted).expect("a serde_json::Value always serializes")
}

/// Hex of the first 16 bytes of SHA-256 over [`canonical_json`].
pub fn canonical_hash(doc: &Value) -> String {
    let digest = Sha256::digest(canonical_json(doc).as_bytes());
    hex::encode(&digest[..16])
}

/// Formats ms since the epoch as RFC 3339 UTC with milliseconds: `2026-11-24T10:00:00.123Z`.
pub fn format_ts(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a timestamp as written by people and databases: RFC 3339 (any fraction, any offset),
/// or `YYYY-MM-DD HH:MM:SS[.fff]` taken as UTC (SQLite's `datetime()`/`CURRENT_TIMESTAMP`).
pub fn parse_ts(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return Some(dt.timestamp_millis());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, fmt) {
            return Some(naive.and_utc().timestamp_millis());
        }
    }
    None
}

/// Current wall-clock time in ms since the epoch.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Reads `updatedAt` from a document: an RFC 3339 string, or a number of ms since the epoch.
pub fn doc_updated_at(doc: &Value) -> Option<i64> {
    match doc.get(UPDATED_AT_FIELD)? {
        Value::String(s) => parse_ts(s),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Returns `doc` with `updatedAt` set to the normalized form of `ms`, so that the same record
/// hashes the same on every store whatever precision or format its writer used.
pub fn with_updated_at(mut doc: Value, ms: i64) -> Value {
    if let Value::Object(map) = &mut doc {
        map.insert(UPDATED_AT_FIELD.to_string(), Value::String(format_ts(ms)));
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_hash_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b":1, "a": {"y":2,"x":[1,2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":[1,2],"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
        assert_ne!(canonical_hash(&a), canonical_hash(&json!({"b": 2})));
    }

    #[test]
    fn versions_order_by_time_then_hash() {
        let early = Version::of_doc(1, &json!({"a": 1}));
        let late = Version::of_doc(2, &json!({"a": 0}));
        assert!(late > early);
        let x = Version::of_doc(5, &json!({"a": 1}));
        let y = Version::of_doc(5, &json!({"a": 2}));
        assert_ne!(x.cmp(&y), Ordering::Equal);
        assert_eq!(x.cmp(&y), y.cmp(&x).reverse());
        // A delete at the same instant as a live document loses the tie.
        assert!(Version::tombstone(5) < x);
    }

    #[test]
    fn timestamps_parse_and_format() {
        assert_eq!(
            parse_ts("2026-11-24T10:00:00.123Z"),
            Some(1_795_514_400_123)
        );
        assert_eq!(
            parse_ts("2026-11-24T11:00:00.123+01:00"),
            Some(1_795_514_400_123)
        );
        assert_eq!(parse_ts("2026-11-24 10:00:00.123"), Some(1_795_514_400_123));
        assert_eq!(parse_ts("yesterday"), None);
        assert_eq!(format_ts(1_795_514_400_123), "2026-11-24T10:00:00.123Z");
    }

    #[test]
    fn updated_at_is_normalized_into_the_document() {
        let doc = json!({"name": "Ada", "updatedAt": "2026-11-24T10:00:00Z"});
        let ms = doc_updated_at(&doc).unwrap();
        let norm = with_updated_at(doc, ms);
        assert_eq!(norm["updatedAt"], "2026-11-24T10:00:00.000Z");
        assert_eq!(doc_updated_at(&json!({"updatedAt": 17})), Some(17));
        assert_eq!(doc_updated_at(&json!({"name": "x"})), None);
    }
}
