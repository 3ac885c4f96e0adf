//! MongoDB-only integration tests, against the replica set `MONGODB_URI` names: every BSON type
//! survives MongoDB → Redis → MongoDB through a running bridge, and `_id` keeps its type.
//! Without `MONGODB_URI` each test prints the one SKIPPED line and returns: it tests nothing.

mod common;

use common::{
    Kind, TestBridge, TestStore, available, collection, config, data_dir, eventually, path,
};
use mongodb::bson::{
    Binary, Bson, DateTime, Decimal128, Document, Timestamp, doc, oid::ObjectId,
    spec::BinarySubtype,
};
use std::str::FromStr;
use syncbridge::engine::policy::Mode;
use syncbridge::record::{Op, Origin, Side, now_ms};
use syncbridge::stores::{self, ApplyOutcome, Slot, Write};

fn every_type(at_ms: i64) -> Document {
    doc! {
        "oid": ObjectId::parse_str("507f1f77bcf86cd799439011").unwrap(),
        "date": DateTime::from_millis(1_795_514_400_123),
        "dec": Decimal128::from_str("1234.5670").unwrap(),
        "i32": 7_i32,
        "i64_small": 7_i64,
        "i64_big": 9_007_199_254_740_993_i64,
        "dbl": 7.0_f64,
        "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
        "ts": Timestamp { time: 1_700_000_000, increment: 3 },
        "nested": { "list": [1_i32, 2_i64, "three", { "deep": 4.5_f64 }] },
        "updatedAt": DateTime::from_millis(at_ms),
    }
}

/// A document from MongoDB reaches Redis as Extended JSON; that very JSON, written back to
/// Redis under another key, reaches MongoDB as the same BSON, type for type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mongodb_tests),
    ignore = "needs MONGODB_URI naming a MongoDB replica set"
)]
async fn every_type_survives_mongo_to_redis_and_back() {
    if !available(Kind::Mongo) {
        return;
    }
    let (mongo, redis, c, dir) = (
        TestStore::new(Kind::Mongo),
        TestStore::new(Kind::Redis),
        collection("types"),
        data_dir(),
    );
    let bridge = TestBridge::start(config(&mongo, &redis, &[&c], Mode::Both, &path(&dir))).await;
    let t = now_ms();
    let oid = ObjectId::new();
    let mut original = doc! { "_id": oid };
    original.extend(every_type(t));
    let inserted = original.clone();
    let coll = c.clone();
    common::mongo(&mongo.uri, move |db| async move {
        db.collection::<Document>(&coll)
            .insert_one(inserted)
            .await
            .unwrap();
    });
    let id = oid.to_hex();
    eventually("the document to reach Redis", || {
        redis.get(&c, &id).is_some()
    })
    .await;
    let in_redis = redis.get(&c, &id).unwrap();
    assert_eq!(
        in_redis["i64_small"],
        serde_json::json!({"$numberLong": "7"})
    );
    assert!(in_redis.get("_id").is_none(), "_id is the key, not a field");

    // Written back through Redis as a new record.
    redis.put(&c, "copy", &in_redis);
    eventually("the copy to reach MongoDB", || {
        mongo.mongo_doc(&c, "copy").is_some()
    })
    .await;
    let copy = mongo.mongo_doc(&c, "copy").unwrap();
    assert_eq!(copy.get("_id"), Some(&Bson::String("copy".into())));
    for (k, v) in &original {
        if k != "_id" {
            assert_eq!(copy.get(k), Some(v), "{k} changed type or value");
        }
    }
    // And the original came back as an ObjectId-keyed document, unchanged by the trip.
    assert_eq!(mongo.mongo_doc(&c, &id).unwrap(), original);
    bridge.stop().await;
}

/// A string `_id` stays a string, even one shaped like an ObjectId, when the bridge updates it;
/// reads find both kinds; a stale etag is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mongodb_tests),
    ignore = "needs MONGODB_URI naming a MongoDB replica set"
)]
async fn ids_keep_their_type_and_stale_writes_are_refused() {
    if !available(Kind::Mongo) {
        return;
    }
    let ts = TestStore::new(Kind::Mongo);
    let store = stores::open(&ts.uri, "mongo-test").await.unwrap();
    let c = collection("ids");
    store.prepare(std::slice::from_ref(&c)).await.unwrap();
    let hex = "65f0a1b2c3d4e5f60718293a";
    ts.raw(&[
        &c,
        &format!(r#"{{"_id": "{hex}", "name": "string id", "updatedAt": {{"$date": "2026-01-01T00:00:00Z"}}}}"#),
    ]);
    let slot = store
        .read(&c, &[hex.to_string()])
        .await
        .unwrap()
        .pop()
        .unwrap();
    let Slot::Present(rec) = slot else {
        panic!("{slot:?}")
    };
    let at = now_ms();
    let write = |name: &str, expected: Option<String>| Write {
        record: syncbridge::record::ChangeRecord {
            side: Side::Local,
            collection: c.clone(),
            id: hex.to_string(),
            op: Op::Upsert,
            doc: Some(syncbridge::record::with_updated_at(
                serde_json::json!({ "name": name }),
                at,
            )),
            updated_at_ms: at,
            origin: Origin::Bridge("mongo-test".into()),
        },
        expected,
    };
    let out = store
        .apply(&c, &[write("updated", Some(rec.etag.clone()))])
        .await
        .unwrap();
    assert_eq!(out, vec![ApplyOutcome::Applied]);
    let raw = ts.mongo_doc(&c, hex).unwrap();
    assert_eq!(raw.get("_id"), Some(&Bson::String(hex.into())));
    assert_eq!(raw.get_str("name"), Ok("updated"));
    assert_eq!(
        raw.get("updatedAt"),
        Some(&Bson::DateTime(DateTime::from_millis(at)))
    );
    // The old etag no longer matches anything: refused, nothing written.
    let out = store
        .apply(&c, &[write("stale", Some(rec.etag))])
        .await
        .unwrap();
    assert_eq!(out, vec![ApplyOutcome::Conflict]);
    assert_eq!(
        ts.mongo_doc(&c, hex).unwrap().get_str("name"),
        Ok("updated")
    );
}
