//! Pure handling of change-stream events and driver errors: what each documented event shape
//! means to the engine, and which server errors mean "position lost" or "not a replica set".

use super::convert::{NotARecord, document_to_record, id_to_string};
use crate::record::{ChangeRecord, Op, Origin, Side, now_ms};
use mongodb::bson::{Bson, Document};

/// What one change event asks of the listener.
#[derive(Debug, Clone, PartialEq)]
pub enum EventAction {
    /// Deliver this change to the engine.
    Change(ChangeRecord),
    /// Nothing to deliver (another collection, an event type the bridge does not need); the
    /// reason is for debug logs.
    Ignore(String),
    /// The watched data went away wholesale (drop, rename, dropDatabase, invalidate): the
    /// stream's position is useless and a full sweep must find what changed.
    Gap(String),
}

/// The stage that limits the database-wide stream to the watched collections, keeping the
/// events that remove them wholesale.
pub fn match_stage(collections: &[String]) -> Document {
    mongodb::bson::doc! {
        "$match": { "$or": [
            { "ns.coll": { "$in": collections } },
            { "to.coll": { "$in": collections } },
            { "operationType": { "$in": ["dropDatabase", "invalidate"] } },
        ] }
    }
}

/// When a change happened: `wallTime` (MongoDB 6.0+), else the `clusterTime` seconds, else
/// `now`. It is the deletion time a delete carries to the engine.
pub fn event_time_ms(ev: &Document, now: i64) -> i64 {
    match (ev.get("wallTime"), ev.get("clusterTime")) {
        (Some(Bson::DateTime(d)), _) => d.timestamp_millis(),
        (_, Some(Bson::Timestamp(ts))) => i64::from(ts.time) * 1000,
        _ => now,
    }
}

/// Maps one change event (as MongoDB documents its shapes, read with `fullDocument:
/// updateLookup`) to what the listener does with it.
///
/// An event is only a hint for the engine, which re-reads both sides before deciding; what
/// matters is the id, whether it is a delete, and a delete's time. `updateLookup` returns the
/// document as it is when the event is read (not as of the event), which is what the engine
/// wants; if it has been deleted since, `fullDocument` is null and the later delete event
/// carries the deletion.
pub fn map_event(ev: &Document, side: Side, collections: &[String]) -> EventAction {
    let op = ev.get_str("operationType").unwrap_or("");
    let ns = ev.get_document("ns").ok();
    let coll = ns.and_then(|n| n.get_str("coll").ok()).unwrap_or("");
    let db = ns.and_then(|n| n.get_str("db").ok()).unwrap_or("");
    match op {
        "insert" | "update" | "replace" | "delete" => {}
        "drop" => {
            return EventAction::Gap(format!(
                "collection {db}.{coll} was dropped; its records will be reconciled by a full sweep"
            ));
        }
        "rename" => {
            let to = ev
                .get_document("to")
                .ok()
                .and_then(|t| t.get_str("coll").ok())
                .unwrap_or("?");
            return EventAction::Gap(format!(
                "collection {db}.{coll} was renamed to {to}; watched collections will be reconciled by a full sweep"
            ));
        }
        "dropDatabase" => {
            return EventAction::Gap(format!(
                "database {db} was dropped; its records will be reconciled by a full sweep"
            ));
        }
        "invalidate" => {
            return EventAction::Gap(
                "the change stream was invalidated (the database or a collection was dropped or renamed)"
                    .into(),
            );
        }
        other => return EventAction::Ignore(format!("{other} event")),
    }
    if !collections.iter().any(|c| c == coll) {
        return EventAction::Ignore(format!("{op} in unwatched collection {coll:?}"));
    }
    let Some(raw_id) = ev
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id"))
    else {
        return EventAction::Ignore(format!("{op} event without documentKey._id"));
    };
    let Some(id) = id_to_string(raw_id) else {
        return EventAction::Ignore(format!(
            "{op} of a document whose _id {} is neither an ObjectId nor a string",
            raw_id.clone().into_relaxed_extjson()
        ));
    };
    let at = event_time_ms(ev, now_ms());
    let base = ChangeRecord {
        side,
        collection: coll.to_string(),
        id,
        op: Op::Upsert,
        doc: None,
        updated_at_ms: at,
        // Change events do not say who wrote; the engine's agreed versions recognize echoes.
        origin: Origin::Unknown,
    };
    if op == "delete" {
        return EventAction::Change(ChangeRecord {
            op: Op::Delete,
            ..base
        });
    }
    let record = match ev.get("fullDocument") {
        Some(Bson::Document(full)) => match document_to_record(full) {
            Ok(m) => ChangeRecord {
                doc: Some(m.doc),
                updated_at_ms: m.updated_at_ms.unwrap_or(at),
                ..base
            },
            // Delivered without a document: the engine's read reports it as invalid.
            Err(NotARecord::Invalid(..)) | Err(NotARecord::UnsupportedId(_)) => base,
        },
        // Deleted since the event (updateLookup found nothing): the delete event follows.
        _ => base,
    };
    EventAction::Change(record)
}

/// What a driver error means to the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The resume token can no longer be resumed (the oplog rolled past it).
    HistoryLost,
    /// The server is a standalone `mongod`: change streams need a replica set.
    NotReplicaSet,
    /// Anything else: a connection or server problem, retried with backoff.
    Other,
}

/// Classifies a server error by its code and message.
///
/// Codes: 286 `ChangeStreamHistoryLost`, 280 `ChangeStreamFatalError` (resume token not
/// found), 260 `InvalidResumeToken`; 40573 is "the $changeStream stage is only supported on
/// replica sets".
pub fn classify_error(code: Option<i32>, message: &str) -> ErrorClass {
    let msg = message.to_ascii_lowercase();
    match code {
        Some(286 | 280 | 260) => ErrorClass::HistoryLost,
        Some(40573) => ErrorClass::NotReplicaSet,
        _ if msg.contains("only supported on replica sets") => ErrorClass::NotReplicaSet,
        _ if msg.contains("resume point may no longer be in the oplog")
            || msg.contains("changestreamhistorylost") =>
        {
            ErrorClass::HistoryLost
        }
        _ => ErrorClass::Other,
    }
}

/// The error text for a server that is not a replica set, naming the fix.
pub fn not_replica_set_help(store: &str) -> String {
    format!(
        "MongoDB at {store} is not a replica set, and change streams need one (even a single node): \
         start mongod with `--replSet rs0` and run `rs.initiate()` once in mongosh, \
         or start the repository's docker-compose.yml (`docker compose up`), which does both"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{DateTime, Timestamp, doc, oid::ObjectId};

    fn colls() -> Vec<String> {
        vec!["users".to_string()]
    }

    fn token() -> Document {
        doc! { "_data": "8263F0A1B2000000012B0229296E04" }
    }

    fn change(ev: &Document) -> ChangeRecord {
        match map_event(ev, Side::Local, &colls()) {
            EventAction::Change(r) => r,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    const AT: i64 = 1_795_514_400_123;

    #[test]
    fn insert_becomes_an_upsert_with_the_full_document() {
        let oid = ObjectId::parse_str("65f0a1b2c3d4e5f60718293a").unwrap();
        let ev = doc! {
            "_id": token(),
            "operationType": "insert",
            "clusterTime": Timestamp { time: 1_795_514_400, increment: 1 },
            "wallTime": DateTime::from_millis(AT + 5),
            "fullDocument": { "_id": oid, "name": "Ada", "updatedAt": DateTime::from_millis(AT) },
            "ns": { "db": "app", "coll": "users" },
            "documentKey": { "_id": oid },
        };
        let r = change(&ev);
        assert_eq!(r.op, Op::Upsert);
        assert_eq!(r.id, "65f0a1b2c3d4e5f60718293a");
        assert_eq!(r.collection, "users");
        assert_eq!(r.side, Side::Local);
        assert_eq!(
            r.updated_at_ms, AT,
            "the document's updatedAt is the version time"
        );
        assert_eq!(
            r.doc,
            Some(serde_json::json!({"name": "Ada", "updatedAt": "2026-11-24T10:00:00.123Z"}))
        );
        assert_eq!(r.origin, Origin::Unknown);
    }

    #[test]
    fn update_uses_the_looked_up_document_not_the_delta() {
        let ev = doc! {
            "_id": token(),
            "operationType": "update",
            "clusterTime": Timestamp { time: 1_795_514_400, increment: 2 },
            "wallTime": DateTime::from_millis(AT),
            "ns": { "db": "app", "coll": "users" },
            "documentKey": { "_id": "u1" },
            "updateDescription": {
                "updatedFields": { "email": "ada@example.com" },
                "removedFields": ["phone"],
                "truncatedArrays": [],
            },
            "fullDocument": { "_id": "u1", "name": "Ada", "email": "ada@example.com" },
        };
        let r = change(&ev);
        assert_eq!(r.id, "u1");
        assert_eq!(r.op, Op::Upsert);
        assert_eq!(r.doc.as_ref().unwrap()["email"], "ada@example.com");
        // No updatedAt in the document: the event's wallTime stands in (the engine stamps).
        assert_eq!(r.updated_at_ms, AT);
        assert!(r.doc.as_ref().unwrap().get("updatedAt").is_none());

        // The document was deleted before the lookup: a hint without a document.
        let mut gone = ev.clone();
        gone.insert("fullDocument", Bson::Null);
        let r = change(&gone);
        assert_eq!((r.op, r.doc), (Op::Upsert, None));
    }

    #[test]
    fn replace_is_an_upsert() {
        let ev = doc! {
            "_id": token(),
            "operationType": "replace",
            "clusterTime": Timestamp { time: 1_795_514_400, increment: 3 },
            "ns": { "db": "app", "coll": "users" },
            "documentKey": { "_id": "u2" },
            "fullDocument": { "_id": "u2", "name": "Grace", "updatedAt": "2026-11-24T10:00:00.123Z" },
        };
        let r = change(&ev);
        assert_eq!(
            (r.op, r.id.as_str(), r.updated_at_ms),
            (Op::Upsert, "u2", AT)
        );
    }

    #[test]
    fn delete_carries_only_the_key_and_the_time() {
        let ev = doc! {
            "_id": token(),
            "operationType": "delete",
            "clusterTime": Timestamp { time: 1_795_514_400, increment: 4 },
            "wallTime": DateTime::from_millis(AT),
            "ns": { "db": "app", "coll": "users" },
            "documentKey": { "_id": "u3" },
        };
        let r = change(&ev);
        assert_eq!(
            (r.op, r.id.as_str(), r.updated_at_ms),
            (Op::Delete, "u3", AT)
        );
        assert_eq!(r.doc, None);
        // Before MongoDB 6.0 there is no wallTime: the cluster time's seconds are used.
        let mut old = ev.clone();
        old.remove("wallTime");
        assert_eq!(change(&old).updated_at_ms, 1_795_514_400_000);
    }

    #[test]
    fn whole_collection_events_are_gaps() {
        for (ev, word) in [
            (
                doc! { "_id": token(), "operationType": "drop",
                "clusterTime": Timestamp { time: 1, increment: 1 },
                "ns": { "db": "app", "coll": "users" } },
                "dropped",
            ),
            (
                doc! { "_id": token(), "operationType": "rename",
                "clusterTime": Timestamp { time: 1, increment: 1 },
                "ns": { "db": "app", "coll": "users" },
                "to": { "db": "app", "coll": "people" } },
                "renamed to people",
            ),
            (
                doc! { "_id": token(), "operationType": "dropDatabase",
                "clusterTime": Timestamp { time: 1, increment: 1 },
                "ns": { "db": "app" } },
                "database app",
            ),
            (
                doc! { "_id": token(), "operationType": "invalidate",
                "clusterTime": Timestamp { time: 1, increment: 1 } },
                "invalidated",
            ),
        ] {
            match map_event(&ev, Side::Cloud, &colls()) {
                EventAction::Gap(reason) => assert!(reason.contains(word), "{reason}"),
                other => panic!("{ev}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_collections_and_event_types_are_ignored() {
        let ev = doc! { "_id": token(), "operationType": "insert",
        "ns": { "db": "app", "coll": "orders" },
        "documentKey": { "_id": "o1" }, "fullDocument": { "_id": "o1" } };
        assert!(matches!(
            map_event(&ev, Side::Local, &colls()),
            EventAction::Ignore(_)
        ));
        let ev = doc! { "_id": token(), "operationType": "createIndexes",
        "ns": { "db": "app", "coll": "users" } };
        assert!(matches!(
            map_event(&ev, Side::Local, &colls()),
            EventAction::Ignore(_)
        ));
        let ev = doc! { "_id": token(), "operationType": "insert",
        "ns": { "db": "app", "coll": "users" },
        "documentKey": { "_id": 5 }, "fullDocument": { "_id": 5 } };
        assert!(matches!(
            map_event(&ev, Side::Local, &colls()),
            EventAction::Ignore(_)
        ));
    }

    #[test]
    fn invalid_documents_are_delivered_as_hints() {
        let ev = doc! { "_id": token(), "operationType": "insert",
        "ns": { "db": "app", "coll": "users" },
        "documentKey": { "_id": "bad" },
        "fullDocument": { "_id": "bad", "updatedAt": true } };
        let r = change(&ev);
        assert_eq!((r.id.as_str(), r.doc), ("bad", None));
    }

    #[test]
    fn the_match_stage_keeps_collection_wide_events() {
        let stage = match_stage(&colls());
        let text = format!("{stage}");
        for needle in ["ns.coll", "to.coll", "dropDatabase", "invalidate", "users"] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(
            classify_error(
                Some(286),
                "Error on remote shard :: caused by :: Resume of change stream was not possible, as the resume point may no longer be in the oplog."
            ),
            ErrorClass::HistoryLost
        );
        assert_eq!(
            classify_error(Some(280), "cannot resume stream"),
            ErrorClass::HistoryLost
        );
        assert_eq!(
            classify_error(
                Some(40573),
                "The $changeStream stage is only supported on replica sets"
            ),
            ErrorClass::NotReplicaSet
        );
        assert_eq!(
            classify_error(
                None,
                "The $changeStream stage is only supported on replica sets"
            ),
            ErrorClass::NotReplicaSet
        );
        assert_eq!(
            classify_error(Some(6), "host unreachable"),
            ErrorClass::Other
        );
        assert_eq!(classify_error(None, "connection reset"), ErrorClass::Other);
        let help = not_replica_set_help("mongodb://h/app");
        for needle in [
            "--replSet",
            "rs.initiate()",
            "docker-compose.yml",
            "mongodb://h/app",
        ] {
            assert!(help.contains(needle), "{needle}");
        }
    }
}
