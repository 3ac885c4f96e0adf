//! Pure conversions between MongoDB documents and the engine's JSON records: BSON ↔ JSON,
//! `_id` ↔ record id, `updatedAt` ↔ version time, etags, the conditional-write filter and the
//! scan filters. Nothing here talks to a server, so every rule is unit-tested.
//!
//! # JSON form: relaxed Extended JSON, with `Int64` made exact
//! Documents travel through the engine (and land in the other store, e.g. Redis) as JSON. We
//! use MongoDB **relaxed Extended JSON v2**, because its plain values are what an application
//! on the other side expects: a string is a string, an `Int32` is a JSON integer, a `Double` is
//! a JSON number with a fraction (`5.0`), a boolean is a boolean. Types JSON lacks are
//! wrapped: `{"$oid": …}`, `{"$date": "2026-11-24T10:00:00.123Z"}`, `{"$numberDecimal": "1.10"}`,
//! `{"$binary": {"base64": …, "subType": "00"}}`, `{"$timestamp": {"t": …, "i": …}}`.
//!
//! Relaxed EJSON writes an `Int64` as a plain integer, which would come back as an `Int32`
//! when it fits one. We close that one gap: an `Int64` whose value fits in 32 bits is written
//! `{"$numberLong": "5"}` (the canonical form); a larger one stays a plain integer, because a
//! plain integer outside the 32-bit range can only be read back as an `Int64`. Doubles stay
//! doubles because `serde_json` keeps the float/integer distinction (`5.0` is not `5`). So
//! every type survives MongoDB → JSON → MongoDB unchanged (the tests check each one). Plain
//! JSON coming from the other store maps the natural way: integer → `Int32` (or `Int64` when
//! large), fraction → `Double`. An integer beyond the `Int64` range is refused, not rounded.
//!
//! # `_id` and the record id
//! An `ObjectId` `_id` becomes its 24-character lowercase hex string; a string `_id` stays
//! that string. Going back, a record id of 24 lowercase hex characters is an `ObjectId` when
//! the bridge creates the document, and reads look for both forms. When the bridge updates or
//! deletes a document it uses the `_id` it read (from the etag), so an existing string `_id`
//! that happens to look like hex keeps its type. Other `_id` types (numbers, embedded
//! documents, UUIDs) cannot be told apart from strings in a record id; such documents are
//! reported as invalid and left alone. `_id` is not part of the record's JSON document.
//!
//! # `updatedAt`
//! The engine's documents carry `updatedAt` as an RFC 3339 string with milliseconds. In
//! MongoDB the bridge stores it as a BSON `Date` (milliseconds, like the version), which is
//! what applications and indexes expect. Reading, a `Date`, an RFC 3339 string or an integer of
//! ms since the epoch are all accepted and normalized to the engine's string; a missing or
//! `null` `updatedAt` lets the engine stamp the record; any other value makes the document
//! invalid (the bridge will not overwrite a field it does not understand).

use crate::record::{UPDATED_AT_FIELD, format_ts, parse_ts, with_updated_at};
use mongodb::bson::{self, Bson, DateTime, Document, doc, oid::ObjectId};
use serde_json::{Map, Value};

/// The record's JSON document for a MongoDB document, with its id and version time.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedDoc {
    /// The record id (ObjectId hex or the string `_id`).
    pub id: String,
    /// The document without `_id`, `updatedAt` normalized when present.
    pub doc: Value,
    /// The version time, when the document has a usable `updatedAt`.
    pub updated_at_ms: Option<i64>,
}

/// Why a MongoDB document cannot be a record.
#[derive(Debug, Clone, PartialEq)]
pub enum NotARecord {
    /// The `_id` is neither an ObjectId nor a string; carries its Extended JSON, as a name for
    /// reports.
    UnsupportedId(String),
    /// The document is there but unusable; carries its record id and the reason.
    Invalid(String, String),
}

/// Converts one BSON value to JSON: relaxed Extended JSON, with small `Int64`s in canonical
/// form so they do not come back as `Int32` (see the module docs).
pub fn bson_to_json(value: &Bson) -> Value {
    match value {
        Bson::Document(d) => Value::Object(
            d.iter()
                .map(|(k, v)| (k.clone(), bson_to_json(v)))
                .collect::<Map<String, Value>>(),
        ),
        Bson::Array(a) => Value::Array(a.iter().map(bson_to_json).collect()),
        Bson::Int64(n) if i32::try_from(*n).is_ok() => {
            serde_json::json!({ "$numberLong": n.to_string() })
        }
        other => other.clone().into_relaxed_extjson(),
    }
}

/// Converts JSON (Extended JSON, relaxed or canonical, or plain JSON) to a BSON value.
/// Integers beyond the `Int64` range are refused rather than rounded to a `Double`.
pub fn json_to_bson(value: &Value) -> Result<Bson, String> {
    check_integers(value)?;
    Bson::try_from(value.clone()).map_err(|e| format!("not valid Extended JSON: {e}"))
}

fn check_integers(value: &Value) -> Result<(), String> {
    match value {
        Value::Number(n) if n.is_u64() && !n.is_i64() => Err(format!(
            "the integer {n} does not fit MongoDB's 64-bit integers"
        )),
        Value::Array(a) => a.iter().try_for_each(check_integers),
        Value::Object(o) => o.values().try_for_each(check_integers),
        _ => Ok(()),
    }
}

/// The record id for an `_id`, if the `_id` is of a supported type.
pub fn id_to_string(id: &Bson) -> Option<String> {
    match id {
        Bson::ObjectId(oid) => Some(oid.to_hex()),
        Bson::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether a record id has the shape of an ObjectId (24 lowercase hex characters).
fn looks_like_object_id(id: &str) -> bool {
    id.len() == 24
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The `_id` values a record id may stand for: an ObjectId and/or the string itself.
pub fn id_candidates(id: &str) -> Vec<Bson> {
    let mut out = Vec::with_capacity(2);
    if looks_like_object_id(id)
        && let Ok(oid) = ObjectId::parse_str(id)
    {
        out.push(Bson::ObjectId(oid));
    }
    out.push(Bson::String(id.to_string()));
    out
}

/// The `_id` for a document the bridge creates: an ObjectId for ObjectId-shaped ids.
pub fn id_for_insert(id: &str) -> Bson {
    id_candidates(id)
        .into_iter()
        .next()
        .expect("there is always a candidate")
}

/// The version time an `updatedAt` value stands for: `Ok(None)` when missing or null, an error
/// when present but unusable.
fn updated_at_of(value: Option<&Bson>) -> Result<Option<i64>, String> {
    match value {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::DateTime(d)) => Ok(Some(d.timestamp_millis())),
        Some(Bson::String(s)) => parse_ts(s)
            .map(Some)
            .ok_or_else(|| format!("updatedAt {s:?} is not a timestamp")),
        Some(Bson::Int64(n)) => Ok(Some(*n)),
        Some(Bson::Int32(n)) => Ok(Some(i64::from(*n))),
        Some(other) => Err(format!(
            "updatedAt is a {:?}, not a date, a timestamp string or ms since the epoch",
            other.element_type()
        )),
    }
}

/// Maps a stored document to its record: id, JSON document (no `_id`, `updatedAt`
/// normalized to the engine's RFC 3339 string) and version time.
pub fn document_to_record(doc: &Document) -> Result<MappedDoc, NotARecord> {
    let raw_id = doc.get("_id").cloned().unwrap_or(Bson::Null);
    let Some(id) = id_to_string(&raw_id) else {
        return Err(NotARecord::UnsupportedId(
            raw_id.into_canonical_extjson().to_string(),
        ));
    };
    let updated_at_ms = updated_at_of(doc.get(UPDATED_AT_FIELD))
        .map_err(|reason| NotARecord::Invalid(id.clone(), reason))?;
    let mut map = Map::new();
    for (k, v) in doc {
        if k != "_id" {
            map.insert(k.clone(), bson_to_json(v));
        }
    }
    let mut json = Value::Object(map);
    if let Some(ms) = updated_at_ms {
        json = with_updated_at(json, ms);
    } else {
        // A null updatedAt is as good as none: the engine stamps one.
        if let Value::Object(m) = &mut json {
            m.shift_remove(UPDATED_AT_FIELD);
        }
    }
    Ok(MappedDoc {
        id,
        doc: json,
        updated_at_ms,
    })
}

/// Builds the document to store for a record: `_id` first, the JSON fields converted from
/// Extended JSON, `updatedAt` as a BSON `Date` of `updated_at_ms`. A JSON `_id` is refused: the
/// `_id` comes from the record id, and silently dropping one would make the record differ
/// from its source forever.
pub fn record_to_document(id: Bson, doc: &Value, updated_at_ms: i64) -> Result<Document, String> {
    let Value::Object(fields) = doc else {
        return Err("the document is not a JSON object".into());
    };
    let mut out = Document::new();
    out.insert("_id", id);
    for (k, v) in fields {
        if k == "_id" {
            return Err(
                "the document has an `_id` field; in MongoDB `_id` is the record id".into(),
            );
        }
        if k == UPDATED_AT_FIELD {
            continue;
        }
        out.insert(k.clone(), json_to_bson(v).map_err(|e| format!("{k}: {e}"))?);
    }
    out.insert(
        UPDATED_AT_FIELD,
        Bson::DateTime(DateTime::from_millis(updated_at_ms)),
    );
    Ok(out)
}

/// The etag of a stored document: its canonical Extended JSON, `_id` included, fields in
/// stored order. Canonical because it must name the exact stored state (types included).
pub fn etag_of(doc: &Document) -> String {
    Bson::Document(doc.clone())
        .into_canonical_extjson()
        .to_string()
}

/// Parses an etag back into the stored document it names.
pub fn parse_etag(etag: &str) -> Result<Document, String> {
    let json: Value =
        serde_json::from_str(etag).map_err(|e| format!("malformed MongoDB etag: {e}"))?;
    match Bson::try_from(json) {
        Ok(Bson::Document(d)) if d.contains_key("_id") => Ok(d),
        Ok(_) => Err("malformed MongoDB etag: not a stored document".into()),
        Err(e) => Err(format!("malformed MongoDB etag: {e}")),
    }
}

/// The filter of a conditional replace or delete: the document with this `_id` **and exactly
/// the content the engine read**.
///
/// Why the whole document and not `updatedAt`: a client may change a document without
/// touching `updatedAt` (MongoDB has no trigger to stamp it), and a filter on `updatedAt`
/// alone would let the bridge overwrite that edit. Matching `$$ROOT` against the stored
/// document (`$literal`, so field names starting with `$` are not read as expressions) refuses
/// the write after any change to any field, added and removed fields included. The `_id`
/// equality keeps it an indexed point lookup. One limit: aggregation equality compares numbers
/// by value, so a change of numeric type alone (`Int32` 1 → `Double` 1.0) is not seen.
pub fn guard_filter(stored: &Document) -> Document {
    doc! {
        "_id": stored.get("_id").cloned().unwrap_or(Bson::Null),
        "$expr": { "$eq": ["$$ROOT", { "$literal": stored.clone() }] },
    }
}

/// MongoDB's comparison order of BSON types, as `$type` aliases per rank: sorting by `_id`
/// goes through the ranks in this order.
const TYPE_RANKS: &[&[&str]] = &[
    &["minKey"],
    &["null", "undefined"],
    &["double", "int", "long", "decimal"],
    &["string", "symbol"],
    &["object"],
    &["array"],
    &["binData"],
    &["objectId"],
    &["bool"],
    &["date"],
    &["timestamp"],
    &["regex"],
    &["dbPointer", "javascript", "javascriptWithScope"],
    &["maxKey"],
];

fn type_rank(v: &Bson) -> usize {
    let alias = match v {
        Bson::MinKey => "minKey",
        Bson::Null | Bson::Undefined => "null",
        Bson::Double(_) | Bson::Int32(_) | Bson::Int64(_) | Bson::Decimal128(_) => "double",
        Bson::String(_) | Bson::Symbol(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Timestamp(_) => "timestamp",
        Bson::RegularExpression(_) => "regex",
        Bson::MaxKey => "maxKey",
        _ => "javascript",
    };
    TYPE_RANKS
        .iter()
        .position(|r| r.contains(&alias))
        .unwrap_or(TYPE_RANKS.len() - 1)
}

/// Matches every `_id` that sorts after `last`. A plain `{$gt: last}` only matches values of
/// the same type family (MongoDB's type bracketing), so ids of the types sorting later are
/// added with `$type`. Both branches use the `_id` index.
pub fn after_id(last: &Bson) -> Document {
    let later: Vec<&str> = TYPE_RANKS[type_rank(last) + 1..]
        .iter()
        .flat_map(|r| r.iter().copied())
        .collect();
    doc! { "$or": [ { "_id": { "$gt": last.clone() } }, { "_id": { "$type": later } } ] }
}

/// A scan position: where the previous page ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ScanCursor {
    /// A full scan, in `_id` order, after this `_id`.
    ById(Bson),
    /// A scan by time, in (`updatedAt`, `_id`) order, after this pair.
    ByTime(i64, Bson),
}

impl ScanCursor {
    /// The cursor as the opaque text the engine carries between pages.
    pub fn encode(&self) -> String {
        let ejson = |b: &Bson| Bson::Document(doc! { "v": b.clone() }).into_canonical_extjson();
        match self {
            ScanCursor::ById(id) => format!("i\n{}", ejson(id)),
            ScanCursor::ByTime(t, id) => format!("t\n{t}\n{}", ejson(id)),
        }
    }

    /// Parses a cursor made by [`ScanCursor::encode`].
    pub fn decode(text: &str) -> Result<ScanCursor, String> {
        let bad = || format!("malformed MongoDB scan cursor {text:?}");
        let value = |json: &str| -> Result<Bson, String> {
            let v: Value = serde_json::from_str(json).map_err(|_| bad())?;
            match Bson::try_from(v) {
                Ok(Bson::Document(mut d)) => d.remove("v").ok_or_else(bad),
                _ => Err(bad()),
            }
        };
        match text.split_once('\n') {
            Some(("i", rest)) => Ok(ScanCursor::ById(value(rest)?)),
            Some(("t", rest)) => {
                let (t, id) = rest.split_once('\n').ok_or_else(bad)?;
                Ok(ScanCursor::ByTime(
                    t.parse().map_err(|_| bad())?,
                    value(id)?,
                ))
            }
            _ => Err(bad()),
        }
    }
}

/// The filter and sort of one scan page. With `since`, the `updatedAt` index is used (only
/// `Date` values are in that range: documents with a string or missing `updatedAt` are found
/// by the listener and by full scans); without, every document is walked in `_id` order.
pub fn scan_query(
    since_ms: Option<i64>,
    cursor: Option<&ScanCursor>,
) -> Result<(Document, Document), String> {
    let date = |ms: i64| Bson::DateTime(DateTime::from_millis(ms));
    match since_ms {
        None => {
            let filter = match cursor {
                None => Document::new(),
                Some(ScanCursor::ById(last)) => after_id(last),
                Some(other) => return Err(format!("a full scan cannot resume from {other:?}")),
            };
            Ok((filter, doc! { "_id": 1 }))
        }
        Some(since) => {
            let mut filter = doc! { UPDATED_AT_FIELD: { "$gte": date(since) } };
            match cursor {
                None => {}
                Some(ScanCursor::ByTime(t, last)) => {
                    let mut same_time = after_id(last);
                    same_time.insert(UPDATED_AT_FIELD, date(*t));
                    filter = doc! { "$and": [
                        filter,
                        { "$or": [ { UPDATED_AT_FIELD: { "$gt": date(*t) } }, same_time ] },
                    ] };
                }
                Some(other) => return Err(format!("a scan by time cannot resume from {other:?}")),
            }
            Ok((filter, doc! { UPDATED_AT_FIELD: 1, "_id": 1 }))
        }
    }
}

/// The cursor that resumes after `doc` in a scan of the given kind.
pub fn cursor_after(since_ms: Option<i64>, doc: &Document) -> ScanCursor {
    let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
    match (since_ms, doc.get(UPDATED_AT_FIELD)) {
        (Some(_), Some(Bson::DateTime(d))) => ScanCursor::ByTime(d.timestamp_millis(), id),
        (Some(s), _) => ScanCursor::ByTime(s, id),
        (None, _) => ScanCursor::ById(id),
    }
}

/// The RFC 3339 text of a BSON date, as the engine writes `updatedAt`.
pub fn date_text(d: &DateTime) -> String {
    format_ts(d.timestamp_millis())
}

/// Serializes a driver value (a resume token) to canonical Extended JSON text.
pub fn to_ejson_text<T: serde::Serialize>(value: &T) -> Result<String, String> {
    bson::to_bson(value)
        .map(|b| b.into_canonical_extjson().to_string())
        .map_err(|e| e.to_string())
}

/// Parses a driver value (a resume token) from Extended JSON text.
pub fn from_ejson_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let json: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let b = Bson::try_from(json).map_err(|e| e.to_string())?;
    bson::from_bson(b).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{Binary, Decimal128, Timestamp, spec::BinarySubtype};
    use serde_json::json;
    use std::str::FromStr;

    fn every_type() -> Document {
        doc! {
            "_id": ObjectId::parse_str("65f0a1b2c3d4e5f60718293a").unwrap(),
            "oid": ObjectId::parse_str("507f1f77bcf86cd799439011").unwrap(),
            "date": DateTime::from_millis(1_795_514_400_123),
            "old_date": DateTime::from_millis(-86_400_000),
            "dec": Decimal128::from_str("1234.5670").unwrap(),
            "i32": 7_i32,
            "i64_small": 7_i64,
            "i64_big": 9_007_199_254_740_993_i64,
            "dbl": 7.0_f64,
            "dbl_frac": 0.1_f64,
            "dbl_nan": f64::NAN,
            "dbl_inf": f64::NEG_INFINITY,
            "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
            "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![7; 16] },
            "ts": Timestamp { time: 1_700_000_000, increment: 3 },
            "nested": { "list": [1_i32, 2_i64, "three", { "deep": 4.5_f64 }], "null": Bson::Null },
            "bool": true,
            "text": "héllo",
            "updatedAt": DateTime::from_millis(1_795_514_400_123),
        }
    }

    /// Compares two documents type by type (NaN equals NaN here).
    fn same_bson(a: &Bson, b: &Bson) -> bool {
        match (a, b) {
            (Bson::Double(x), Bson::Double(y)) => {
                (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
            }
            (Bson::Document(x), Bson::Document(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y.iter())
                        .all(|((ka, va), (kb, vb))| ka == kb && same_bson(va, vb))
            }
            (Bson::Array(x), Bson::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_bson(p, q))
            }
            _ => a == b,
        }
    }

    #[test]
    fn every_type_survives_mongo_to_json_text_and_back() {
        let original = every_type();
        let mapped = document_to_record(&original).unwrap();
        assert_eq!(mapped.id, "65f0a1b2c3d4e5f60718293a");
        assert_eq!(mapped.updated_at_ms, Some(1_795_514_400_123));
        // Through text, as it would sit in Redis.
        let text = crate::record::canonical_json(&mapped.doc);
        let back_json: Value = serde_json::from_str(&text).unwrap();
        let back = record_to_document(
            id_for_insert(&mapped.id),
            &back_json,
            mapped.updated_at_ms.unwrap(),
        )
        .unwrap();
        for (k, v) in &original {
            let got = back.get(k).unwrap_or_else(|| panic!("{k} lost"));
            assert!(same_bson(v, got), "{k}: {v:?} came back as {got:?}");
        }
        assert_eq!(back.len(), original.len());
        // And the round trip is stable: mapping again gives the same JSON (same hash).
        assert_eq!(document_to_record(&back).unwrap().doc, mapped.doc);
    }

    #[test]
    fn json_form_is_relaxed_with_exact_int64() {
        let j = document_to_record(&every_type()).unwrap().doc;
        assert_eq!(j["i32"], json!(7));
        assert_eq!(j["i64_small"], json!({"$numberLong": "7"}));
        assert_eq!(j["i64_big"], json!(9_007_199_254_740_993_i64));
        assert_eq!(serde_json::to_string(&j["dbl"]).unwrap(), "7.0");
        assert_eq!(j["oid"], json!({"$oid": "507f1f77bcf86cd799439011"}));
        assert_eq!(j["date"], json!({"$date": "2026-11-24T10:00:00.123Z"}));
        assert_eq!(
            j["old_date"],
            json!({"$date": {"$numberLong": "-86400000"}})
        );
        assert_eq!(j["dec"], json!({"$numberDecimal": "1234.5670"}));
        assert_eq!(
            j["bin"],
            json!({"$binary": {"base64": "AAEC/w==", "subType": "00"}})
        );
        assert_eq!(
            j["ts"],
            json!({"$timestamp": {"t": 1_700_000_000u32, "i": 3}})
        );
        assert_eq!(j["dbl_nan"], json!({"$numberDouble": "NaN"}));
        assert_eq!(j["updatedAt"], json!("2026-11-24T10:00:00.123Z"));
        assert!(j.get("_id").is_none(), "_id is the record id, not a field");
    }

    #[test]
    fn plain_json_from_another_store_maps_naturally() {
        let doc = json!({"n": 5, "big": 5_000_000_000_i64, "f": 2.5, "whole": 3.0, "s": "x",
                          "updatedAt": "2026-11-24T10:00:00.123Z"});
        let d = record_to_document(Bson::String("k".into()), &doc, 1_795_514_400_123).unwrap();
        assert_eq!(d.get("_id"), Some(&Bson::String("k".into())));
        assert_eq!(d.keys().next().map(String::as_str), Some("_id"));
        assert_eq!(d.get("n"), Some(&Bson::Int32(5)));
        assert_eq!(d.get("big"), Some(&Bson::Int64(5_000_000_000)));
        assert_eq!(d.get("f"), Some(&Bson::Double(2.5)));
        assert_eq!(d.get("whole"), Some(&Bson::Double(3.0)));
        assert_eq!(
            d.get("updatedAt"),
            Some(&Bson::DateTime(DateTime::from_millis(1_795_514_400_123)))
        );
        // And back to the very same JSON: no second write, no echo loop.
        let back = document_to_record(&d).unwrap();
        assert_eq!(
            crate::record::canonical_hash(&back.doc),
            crate::record::canonical_hash(&doc)
        );
    }

    #[test]
    fn unusable_json_is_refused_with_a_reason() {
        let id = || Bson::String("k".into());
        assert!(record_to_document(id(), &json!([1]), 0).is_err());
        let e = record_to_document(id(), &json!({"_id": "k"}), 0).unwrap_err();
        assert!(e.contains("_id"), "{e}");
        let e = record_to_document(id(), &json!({"n": u64::MAX}), 0).unwrap_err();
        assert!(e.contains("64-bit"), "{e}");
        let e = record_to_document(id(), &json!({"d": {"$date": "yesterday"}}), 0).unwrap_err();
        assert!(e.starts_with("d:"), "{e}");
    }

    #[test]
    fn ids_map_both_ways() {
        let oid = ObjectId::parse_str("65f0a1b2c3d4e5f60718293a").unwrap();
        assert_eq!(
            id_to_string(&Bson::ObjectId(oid)).as_deref(),
            Some("65f0a1b2c3d4e5f60718293a")
        );
        assert_eq!(
            id_to_string(&Bson::String("42".into())).as_deref(),
            Some("42")
        );
        assert_eq!(id_to_string(&Bson::Int32(42)), None);
        assert_eq!(
            id_candidates("65f0a1b2c3d4e5f60718293a"),
            vec![
                Bson::ObjectId(oid),
                Bson::String("65f0a1b2c3d4e5f60718293a".into())
            ]
        );
        assert_eq!(
            id_for_insert("65f0a1b2c3d4e5f60718293a"),
            Bson::ObjectId(oid)
        );
        // Upper-case hex is not what an ObjectId prints: it stays a string.
        assert_eq!(
            id_for_insert("65F0A1B2C3D4E5F60718293A"),
            Bson::String("65F0A1B2C3D4E5F60718293A".into())
        );
        assert_eq!(id_for_insert("user-1"), Bson::String("user-1".into()));
        match document_to_record(&doc! {"_id": 5, "a": 1}) {
            Err(NotARecord::UnsupportedId(name)) => assert_eq!(name, r#"{"$numberInt":"5"}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn updated_at_forms() {
        let rec = |v: Bson| document_to_record(&doc! {"_id": "a", "updatedAt": v});
        let want = Some(1_795_514_400_123);
        assert_eq!(
            rec(Bson::DateTime(DateTime::from_millis(1_795_514_400_123)))
                .unwrap()
                .updated_at_ms,
            want
        );
        let from_text = rec(Bson::String("2026-11-24T11:00:00.123+01:00".into())).unwrap();
        assert_eq!(from_text.updated_at_ms, want);
        assert_eq!(from_text.doc["updatedAt"], "2026-11-24T10:00:00.123Z");
        assert_eq!(
            rec(Bson::Int64(1_795_514_400_123)).unwrap().updated_at_ms,
            want
        );
        let none = rec(Bson::Null).unwrap();
        assert_eq!(none.updated_at_ms, None);
        assert!(none.doc.get("updatedAt").is_none());
        assert!(matches!(
            rec(Bson::Boolean(true)),
            Err(NotARecord::Invalid(id, _)) if id == "a"
        ));
        assert!(matches!(
            rec(Bson::String("soon".into())),
            Err(NotARecord::Invalid(_, _))
        ));
    }

    #[test]
    fn etags_name_the_exact_stored_document() {
        let d = every_type();
        let etag = etag_of(&d);
        let back = parse_etag(&etag).unwrap();
        assert!(same_bson(
            &Bson::Document(d.clone()),
            &Bson::Document(back.clone())
        ));
        // Types are in the etag: Int32 7 and Double 7.0 are different states.
        assert_ne!(
            etag_of(&doc! {"_id": "a", "n": 7_i32}),
            etag_of(&doc! {"_id": "a", "n": 7.0_f64})
        );
        let filter = guard_filter(&back);
        assert_eq!(filter.get("_id"), d.get("_id"));
        let expr = filter.get_document("$expr").unwrap();
        let eq = expr.get_array("$eq").unwrap();
        assert_eq!(eq[0], Bson::String("$$ROOT".into()));
        assert!(same_bson(&eq[1], &Bson::Document(doc! {"$literal": back})));
        assert!(parse_etag("not json").is_err());
        assert!(
            parse_etag(r#"{"a":1}"#).is_err(),
            "an etag names a stored document"
        );
    }

    #[test]
    fn scan_cursors_round_trip_and_page_past_type_brackets() {
        let oid = ObjectId::parse_str("65f0a1b2c3d4e5f60718293a").unwrap();
        for c in [
            ScanCursor::ById(Bson::String("k\nwith newline".into())),
            ScanCursor::ById(Bson::ObjectId(oid)),
            ScanCursor::ByTime(1_795_514_400_123, Bson::Int64(9)),
        ] {
            assert_eq!(ScanCursor::decode(&c.encode()).unwrap(), c);
        }
        assert!(ScanCursor::decode("x\n1").is_err());
        // After a string id: larger strings, or any id of a type sorting after strings.
        let f = after_id(&Bson::String("m".into()));
        let or = f.get_array("$or").unwrap();
        assert_eq!(or[0], Bson::Document(doc! {"_id": {"$gt": "m"}}));
        let later = or[1].as_document().unwrap().get_document("_id").unwrap();
        let later: Vec<&str> = later
            .get_array("$type")
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap())
            .collect();
        assert!(later.contains(&"objectId"));
        assert!(!later.contains(&"string") && !later.contains(&"int"));
        // After an ObjectId, strings are done.
        let f = after_id(&Bson::ObjectId(oid));
        let types = f.get_array("$or").unwrap()[1]
            .as_document()
            .unwrap()
            .clone();
        assert!(!format!("{types}").contains("\"string\""));
    }

    #[test]
    fn scan_queries() {
        let (f, s) = scan_query(None, None).unwrap();
        assert!(f.is_empty());
        assert_eq!(s, doc! {"_id": 1});
        let (f, s) = scan_query(Some(1000), None).unwrap();
        assert_eq!(f, doc! {"updatedAt": {"$gte": DateTime::from_millis(1000)}});
        assert_eq!(s, doc! {"updatedAt": 1, "_id": 1});
        let c = ScanCursor::ByTime(2000, Bson::String("b".into()));
        let (f, _) = scan_query(Some(1000), Some(&c)).unwrap();
        let and = f.get_array("$and").unwrap();
        assert_eq!(
            and[0],
            Bson::Document(doc! {"updatedAt": {"$gte": DateTime::from_millis(1000)}})
        );
        let text = format!("{f}");
        assert!(text.contains("$gt") && text.contains("\"b\""), "{text}");
        assert!(scan_query(None, Some(&c)).is_err());
        assert!(scan_query(Some(1), Some(&ScanCursor::ById(Bson::Null))).is_err());
        let d = doc! {"_id": "z", "updatedAt": DateTime::from_millis(5)};
        assert_eq!(
            cursor_after(Some(1), &d),
            ScanCursor::ByTime(5, Bson::String("z".into()))
        );
        assert_eq!(
            cursor_after(None, &d),
            ScanCursor::ById(Bson::String("z".into()))
        );
    }

    #[test]
    fn resume_tokens_survive_text() {
        let token: mongodb::change_stream::event::ResumeToken =
            bson::from_document(doc! {"_data": "8263F0A1B2000000012B0229296E04"}).unwrap();
        let text = to_ejson_text(&token).unwrap();
        assert_eq!(text, r#"{"_data":"8263F0A1B2000000012B0229296E04"}"#);
        let back: mongodb::change_stream::event::ResumeToken = from_ejson_text(&text).unwrap();
        assert_eq!(back, token);
        assert!(from_ejson_text::<mongodb::change_stream::event::ResumeToken>("nope").is_err());
    }
}
