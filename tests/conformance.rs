//! The connector conformance suite: every store passes the same checks of the `Store` trait
//! contract (conditional, idempotent applies; reads; scans since a time; listening to direct
//! writes; resuming from the checkpoint). A new connector adds one line at the bottom.
//! A store that cannot run on every machine (MongoDB) is gated by `common::available`.

mod common;

use common::{Kind, TestStore, collection};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use syncbridge::record::{
    ChangeRecord, Op, Origin, Side, canonical_hash, format_ts, now_ms, with_updated_at,
};
use syncbridge::stores::{
    self, Ack, ApplyOutcome, ChangeBatch, ListenContext, Slot, Store, StoredRecord, Write,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The layouts a store keeps collections in: the bridge's own tables and keys, or (SQL
/// stores) an application's typed table mapped column by column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Own,
    Typed,
}

async fn open(kind: Kind, layout: Layout) -> (TestStore, Arc<dyn Store>, String) {
    let ts = match layout {
        Layout::Own => TestStore::new(kind),
        Layout::Typed => TestStore::typed(kind),
    };
    let store = stores::open(&ts.uri, "conformance-instance")
        .await
        .expect("store opens");
    let c = collection("conf");
    if layout == Layout::Typed {
        ts.create_typed_table(&c);
    }
    prepare(&store, &c, layout).await;
    (ts, store, c)
}

/// Prepares `store` for collection `c` in `layout` (the typed table must exist).
async fn prepare(store: &Arc<dyn Store>, c: &str, layout: Layout) {
    match layout {
        Layout::Own => store.prepare(&[c.to_string()]).await.expect("prepare"),
        Layout::Typed => {
            store.prepare(&[]).await.expect("prepare");
            store
                .prepare_tables(&[stores::TableSpec {
                    collection: c.to_string(),
                    table: c.to_string(),
                    key: vec!["id".into()],
                    updated_at: "updated_at".into(),
                    columns: None,
                    add_updated_at: false,
                }])
                .await
                .expect("typed table maps");
        }
    }
}

fn upsert(c: &str, id: &str, name: &str, at: i64) -> ChangeRecord {
    ChangeRecord {
        side: Side::Cloud,
        collection: c.into(),
        id: id.into(),
        op: Op::Upsert,
        // The id is in the document too, as in a typed row (its key column).
        doc: Some(with_updated_at(
            json!({ "id": id, "name": name, "n": 1 }),
            at,
        )),
        updated_at_ms: at,
        origin: Origin::Bridge("conformance-instance".into()),
    }
}

fn delete(c: &str, id: &str, at: i64) -> ChangeRecord {
    ChangeRecord {
        op: Op::Delete,
        doc: None,
        updated_at_ms: at,
        ..upsert(c, id, "", at)
    }
}

async fn read_one(store: &Arc<dyn Store>, c: &str, id: &str) -> Slot {
    store
        .read(c, &[id.to_string()])
        .await
        .unwrap()
        .pop()
        .unwrap()
}

fn present(slot: Slot) -> StoredRecord {
    match slot {
        Slot::Present(r) => r,
        other => panic!("expected a record, found {other:?}"),
    }
}

/// Every page of a scan: the records and the invalid ids.
async fn scan_all(
    store: &Arc<dyn Store>,
    c: &str,
    since: Option<i64>,
) -> (Vec<StoredRecord>, Vec<(String, String)>) {
    let (mut records, mut invalid, mut cursor) = (Vec::new(), Vec::new(), None);
    for _ in 0..1000 {
        let page = store.scan(c, since, cursor, 100).await.unwrap();
        records.extend(page.records);
        invalid.extend(page.invalid);
        match page.next {
            Some(n) => cursor = Some(n),
            None => return (records, invalid),
        }
    }
    panic!("scan does not end");
}

async fn apply_one(
    store: &Arc<dyn Store>,
    c: &str,
    record: ChangeRecord,
    expected: Option<String>,
) -> ApplyOutcome {
    store
        .apply(c, &[Write { record, expected }])
        .await
        .unwrap()
        .pop()
        .unwrap()
}

/// Upsert and delete apply, read back exactly, and re-applying changes nothing.
async fn upsert_delete_and_idempotent_reapply(kind: Kind, layout: Layout) {
    let (_ts, store, c) = open(kind, layout).await;
    let t = now_ms();
    let rec = upsert(&c, "1", "Ada", t);
    assert_eq!(
        apply_one(&store, &c, rec.clone(), None).await,
        ApplyOutcome::Applied
    );
    let got = present(read_one(&store, &c, "1").await);
    assert_eq!(got.updated_at_ms, Some(t));
    assert_eq!(
        canonical_hash(&got.doc),
        canonical_hash(rec.doc.as_ref().unwrap())
    );
    // A replay of the same write (same expectation) is harmless.
    assert_eq!(
        apply_one(&store, &c, rec.clone(), None).await,
        ApplyOutcome::Unchanged
    );
    assert_eq!(present(read_one(&store, &c, "1").await).etag, got.etag);

    let rec2 = upsert(&c, "1", "Ada Lovelace", t + 1);
    assert_eq!(
        apply_one(&store, &c, rec2.clone(), Some(got.etag.clone())).await,
        ApplyOutcome::Applied
    );
    assert_eq!(
        present(read_one(&store, &c, "1").await).doc["name"],
        "Ada Lovelace"
    );

    let cur = present(read_one(&store, &c, "1").await);
    assert_eq!(
        apply_one(&store, &c, delete(&c, "1", t + 2), Some(cur.etag.clone())).await,
        ApplyOutcome::Applied
    );
    assert_eq!(read_one(&store, &c, "1").await, Slot::Absent);
    assert_eq!(
        apply_one(&store, &c, delete(&c, "1", t + 2), Some(cur.etag)).await,
        ApplyOutcome::Unchanged
    );
    // Reads keep the order of the ids asked for, with absent ones in place.
    apply_one(&store, &c, upsert(&c, "2", "Grace", t), None).await;
    let slots = store
        .read(&c, &["x".into(), "2".into(), "y".into()])
        .await
        .unwrap();
    assert_eq!(slots[0], Slot::Absent);
    assert_eq!(present(slots[1].clone()).id, "2");
    assert_eq!(slots[2], Slot::Absent);
}

/// A write decided on an old read is refused once someone else wrote: no lost update.
async fn conditional_apply_refuses_a_stale_expectation(kind: Kind, layout: Layout) {
    let (ts, store, c) = open(kind, layout).await;
    let t = now_ms();
    apply_one(&store, &c, upsert(&c, "1", "v1", t), None).await;
    let seen = present(read_one(&store, &c, "1").await);
    // A client writes in between, knowing nothing of the bridge.
    ts.put(
        &c,
        "1",
        &json!({ "name": "client", "updatedAt": format_ts(t + 5) }),
    );
    let late = upsert(&c, "1", "bridge", t + 1);
    assert_eq!(
        apply_one(&store, &c, late.clone(), Some(seen.etag.clone())).await,
        ApplyOutcome::Conflict
    );
    assert_eq!(
        present(read_one(&store, &c, "1").await).doc["name"],
        "client"
    );
    // The same for a create racing a client's create, and a delete racing an update.
    ts.put(
        &c,
        "2",
        &json!({ "name": "client", "updatedAt": format_ts(t) }),
    );
    assert_eq!(
        apply_one(&store, &c, upsert(&c, "2", "bridge", t), None).await,
        ApplyOutcome::Conflict
    );
    assert_eq!(
        apply_one(&store, &c, delete(&c, "1", t + 9), Some(seen.etag)).await,
        ApplyOutcome::Conflict
    );
    assert_eq!(
        present(read_one(&store, &c, "1").await).doc["name"],
        "client"
    );
}

/// A batch of writes (one apply call, as the engine makes) decides each write on its own terms:
/// new records go in, updates with the right expectation apply, a stale expectation and a
/// create racing a client's create are refused, a replay changes nothing, and a delete in the
/// batch applies.
async fn a_batch_decides_each_write_on_its_own(kind: Kind, layout: Layout) {
    let (ts, store, c) = open(kind, layout).await;
    let t = now_ms();
    for id in ["u", "s", "r", "d"] {
        apply_one(&store, &c, upsert(&c, id, "v1", t), None).await;
    }
    let mut seen = Vec::new();
    for id in ["u", "s", "r", "d"] {
        seen.push(present(read_one(&store, &c, id).await).etag);
    }
    // Behind the bridge's back: `s` is edited and `raced` created.
    ts.put(
        &c,
        "s",
        &json!({ "name": "client", "updatedAt": format_ts(t + 5) }),
    );
    ts.put(
        &c,
        "raced",
        &json!({ "name": "client", "updatedAt": format_ts(t + 5) }),
    );
    let write = |record: ChangeRecord, expected: Option<&String>| Write {
        record,
        expected: expected.cloned(),
    };
    let outcomes = store
        .apply(
            &c,
            &[
                write(upsert(&c, "new", "fresh", t + 1), None),
                write(upsert(&c, "u", "v2", t + 1), Some(&seen[0])),
                write(upsert(&c, "s", "bridge", t + 1), Some(&seen[1])),
                write(upsert(&c, "r", "v1", t), None),
                write(upsert(&c, "raced", "bridge", t + 1), None),
                write(delete(&c, "d", t + 1), Some(&seen[3])),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ApplyOutcome::Applied,
            ApplyOutcome::Applied,
            ApplyOutcome::Conflict,
            ApplyOutcome::Unchanged,
            ApplyOutcome::Conflict,
            ApplyOutcome::Applied,
        ]
    );
    for (id, want) in [
        ("new", Some("fresh")),
        ("u", Some("v2")),
        ("s", Some("client")),
        ("raced", Some("client")),
        ("d", None),
    ] {
        let got = match read_one(&store, &c, id).await {
            Slot::Present(r) => r.doc["name"].as_str().map(str::to_string),
            _ => None,
        };
        assert_eq!(got.as_deref(), want, "{id}");
    }
}

/// Scans find what changed since a time, page by page, each record once.
async fn scan_since_pages_through_changes(kind: Kind, layout: Layout) {
    let (_ts, store, c) = open(kind, layout).await;
    let t = now_ms() - 100_000;
    let writes: Vec<Write> = (0..25)
        .map(|i| Write {
            // Five records share each time, and pages of four cut through them: the cursor
            // must order ties by id, never skip or repeat one.
            record: upsert(&c, &format!("r{i:02}"), "x", t + (i / 5) * 5000),
            expected: None,
        })
        .collect();
    assert!(
        store
            .apply(&c, &writes)
            .await
            .unwrap()
            .iter()
            .all(|o| *o == ApplyOutcome::Applied)
    );
    for (since, want) in [(None, 25usize), (Some(t + 20_000), 5)] {
        let mut seen = BTreeSet::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = store.scan(&c, since, cursor, 4).await.unwrap();
            pages += 1;
            for r in page.records {
                assert!(since.is_none_or(|s| r.updated_at_ms.unwrap() >= s));
                // An index-ordered scan gives each record once (Redis' SCAN may repeat one).
                let first = seen.insert(r.id.clone());
                assert!(
                    first || !store.capabilities().time_index,
                    "{} came twice",
                    r.id
                );
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
            assert!(pages < 100, "scan does not end");
        }
        assert_eq!(seen.len(), want, "since {since:?}");
    }
}

struct Listening {
    rx: mpsc::Receiver<ChangeBatch>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn listen(store: &Arc<dyn Store>, c: &str, checkpoint: Option<String>) -> Listening {
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let ctx = ListenContext {
        side: Side::Local,
        collections: vec![c.to_string()],
        checkpoint,
        sink: tx,
        shutdown: stop.clone(),
    };
    let s = store.clone();
    let task = tokio::spawn(async move { s.listen(ctx).await });
    Listening { rx, stop, task }
}

impl Listening {
    /// Collects records until `want` ids have been seen; returns them with their acks.
    async fn collect(&mut self, want: &[&str]) -> (Vec<ChangeRecord>, Vec<Ack>) {
        let mut records = Vec::new();
        let mut acks = Vec::new();
        let deadline = tokio::time::Instant::now() + common::DEADLINE;
        while !want
            .iter()
            .all(|w| records.iter().any(|r: &ChangeRecord| r.id == *w))
        {
            let batch = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("listener did not deliver {want:?}; got {records:?}"))
                .expect("listener open");
            records.extend(batch.records);
            acks.push(batch.ack);
        }
        (records, acks)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The listener hears writes made directly by a client that knows nothing of the bridge.
async fn listen_sees_direct_writes(kind: Kind, layout: Layout) {
    let (ts, store, c) = open(kind, layout).await;
    let mut l = listen(&store, &c, None);
    // Subscriptions are asynchronous; give it a moment to be in place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = now_ms();
    ts.put(
        &c,
        "a",
        &json!({ "name": "Ada", "updatedAt": format_ts(t) }),
    );
    let (recs, _) = l.collect(&["a"]).await;
    let a = recs.iter().rev().find(|r| r.id == "a").unwrap();
    assert_eq!(a.op, Op::Upsert);
    assert_eq!(a.side, Side::Local);
    assert_eq!(a.collection, c);
    assert_eq!(a.doc.as_ref().unwrap()["name"], "Ada");
    assert_eq!(a.updated_at_ms, t);
    assert_eq!(
        a.origin,
        Origin::Unknown,
        "a client's write is not tagged as the bridge's"
    );
    ts.delete(&c, "a");
    let (recs, _) = l.collect(&["a"]).await;
    assert_eq!(recs.last().unwrap().op, Op::Delete);
    l.stop().await;
}

/// After a stop, listening again from the persisted position delivers what changed meanwhile,
/// and nothing that was settled before (stores with a durable change log), or the sweep's scan
/// finds it (stores without one).
async fn checkpoint_resumes(kind: Kind, layout: Layout) {
    let (ts, store, c) = open(kind, layout).await;
    let mut l = listen(&store, &c, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = now_ms();
    ts.put(
        &c,
        "before",
        &json!({ "name": "before", "updatedAt": format_ts(t) }),
    );
    let (_, acks) = l.collect(&["before"]).await;
    let mut position = None;
    for ack in acks {
        if let Some(p) = store.settle(ack, true).await.unwrap() {
            position = Some(p);
        }
    }
    l.stop().await;

    ts.put(
        &c,
        "while-stopped",
        &json!({ "name": "missed?", "updatedAt": format_ts(t + 1) }),
    );
    if store.capabilities().durable_changes {
        let mut l = listen(&store, &c, position);
        let (recs, _) = l.collect(&["while-stopped"]).await;
        assert!(
            recs.iter().all(|r| r.id != "before"),
            "a settled change came back: {recs:?}"
        );
        // A batch released unapplied is delivered again.
        ts.put(
            &c,
            "released",
            &json!({ "name": "again", "updatedAt": format_ts(t + 2) }),
        );
        let (_, acks) = l.collect(&["released"]).await;
        for ack in acks {
            store.settle(ack, false).await.unwrap();
        }
        l.collect(&["released"]).await;
        l.stop().await;
    } else {
        let page = store.scan(&c, Some(t + 1), None, 100).await.unwrap();
        assert!(
            page.records.iter().any(|r| r.id == "while-stopped"),
            "the sweep's scan finds the missed change"
        );
    }
}

/// Values that cannot be records are reported as invalid, never as absent (which would read as
/// a delete).
async fn invalid_values_are_reported(kind: Kind, layout: Layout) {
    let (ts, store, c) = open(kind, layout).await;
    match kind {
        // Typed columns hold only their type; what cannot be a record is a row without a
        // readable modification time (and, on SQLite, which types nothing, a value that is
        // not of its column's type).
        _ if layout == Layout::Typed => {
            let bad = match kind {
                Kind::Sqlite => {
                    "('text', 'x', 'not a number', '2026-11-25T10:00:00.000Z'), ('hash', 'x', 1, 'yesterday')"
                }
                _ => "('text', 'x', 1, NULL), ('hash', 'x', 2, NULL)",
            };
            ts.raw(&[&format!(
                "INSERT INTO \"{c}\" (id, name, n, updated_at) VALUES {bad}"
            )]);
        }
        Kind::Redis => {
            ts.raw(&["HSET", &format!("{c}:hash"), "f", "v"]);
            ts.raw(&["SET", &format!("{c}:text"), "not json"]);
        }
        Kind::Sqlite => {
            ts.raw(&[&format!(
                "INSERT INTO \"{c}\" (id, doc) VALUES ('text', 'not json'), ('hash', '[1]')"
            )]);
        }
        // jsonb refuses text that is not JSON; an array is still not a record.
        Kind::Postgres => {
            ts.raw(&[&format!("INSERT INTO \"{c}\" (id, doc) VALUES ('text', '\"just a string\"'), ('hash', '[1]')")]);
        }
        // A JSON check refuses text that is not JSON, as on PostgreSQL.
        Kind::Mysql => {
            ts.raw(&[&format!("INSERT INTO \"{c}\" (id, doc) VALUES ('text', '\"just a string\"'), ('hash', '[1]')")]);
        }
        // Every BSON document is a document; what cannot be a record is an updatedAt the
        // bridge cannot read (and must not overwrite).
        Kind::Mongo => {
            ts.raw(&[&c, r#"{"_id": "hash", "updatedAt": true}"#]);
            ts.raw(&[&c, r#"{"_id": "text", "updatedAt": "not a time"}"#]);
        }
    }
    let slots = store
        .read(&c, &["hash".into(), "text".into()])
        .await
        .unwrap();
    for s in &slots {
        assert!(matches!(s, Slot::Invalid(_)), "{s:?}");
    }
    let (_, invalid) = scan_all(&store, &c, None).await;
    assert_eq!(invalid.len(), 2, "{invalid:?}");
    // And a conditional write does not clobber what it does not understand.
    let out = apply_one(&store, &c, upsert(&c, "hash", "x", now_ms()), None).await;
    assert!(
        matches!(out, ApplyOutcome::Conflict | ApplyOutcome::Rejected(_)),
        "{out:?}"
    );
}

/// Two bridges on one database (stores opened with different instance ids) each hear every
/// direct write, and one settling its delivery takes nothing from the other: with a durable
/// change log, the other's unsettled changes come back when it listens again. Each also hears
/// the other's writes (foreign changes for it, tagged with the writer where the store can say).
async fn every_consumer_hears_every_write(kind: Kind, layout: Layout) {
    let (ts, a, c) = open(kind, layout).await;
    let other = format!(
        "conformance-other-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let b = stores::open(&ts.uri, &other).await.expect("store opens");
    prepare(&b, &c, layout).await;
    let mut la = listen(&a, &c, None);
    let mut lb = listen(&b, &c, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = now_ms();
    ts.put(&c, "x", &json!({ "name": "x", "updatedAt": format_ts(t) }));
    ts.put(
        &c,
        "y",
        &json!({ "name": "y", "updatedAt": format_ts(t + 1) }),
    );
    let (_, acks) = la.collect(&["x", "y"]).await;
    for ack in acks {
        a.settle(ack, true).await.unwrap();
    }
    lb.collect(&["x", "y"]).await;
    // b's own apply is a foreign change for a.
    apply_one(&b, &c, upsert(&c, "z", "from b", t + 2), None).await;
    let (recs, acks) = la.collect(&["z"]).await;
    let z = recs.iter().find(|r| r.id == "z").unwrap();
    assert_eq!(z.doc.as_ref().unwrap()["name"], "from b");
    assert_ne!(
        z.origin,
        Origin::Bridge("conformance-instance".into()),
        "b's write is not a's own"
    );
    for ack in acks {
        a.settle(ack, true).await.unwrap();
    }
    la.stop().await;
    lb.stop().await;
    if b.capabilities().durable_changes {
        // b settled nothing: all of it is still in b's log, whatever a settled.
        let mut lb = listen(&b, &c, None);
        lb.collect(&["x", "y"]).await;
        lb.stop().await;
    }
}

macro_rules! conformance {
    ($(#[$gate:meta])* $store:ident, $kind:expr) => {
        conformance!($(#[$gate])* $store, $kind, Layout::Own);
    };
    ($(#[$gate:meta])* $store:ident, $kind:expr, $layout:expr) => {
        mod $store {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn upsert_delete_and_idempotent_reapply() {
                if !common::available($kind) {
                    return;
                }
                super::upsert_delete_and_idempotent_reapply($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn conditional_apply_refuses_a_stale_expectation() {
                if !common::available($kind) {
                    return;
                }
                super::conditional_apply_refuses_a_stale_expectation($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn a_batch_decides_each_write_on_its_own() {
                if !common::available($kind) {
                    return;
                }
                super::a_batch_decides_each_write_on_its_own($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn scan_since_pages_through_changes() {
                if !common::available($kind) {
                    return;
                }
                super::scan_since_pages_through_changes($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn listen_sees_direct_writes() {
                if !common::available($kind) {
                    return;
                }
                super::listen_sees_direct_writes($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn checkpoint_resumes() {
                if !common::available($kind) {
                    return;
                }
                super::checkpoint_resumes($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn every_consumer_hears_every_write() {
                if !common::available($kind) {
                    return;
                }
                super::every_consumer_hears_every_write($kind, $layout).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn invalid_values_are_reported() {
                if !common::available($kind) {
                    return;
                }
                super::invalid_values_are_reported($kind, $layout).await
            }
        }
    };
}

conformance!(redis, Kind::Redis);
conformance!(sqlite, Kind::Sqlite);
conformance!(postgres, Kind::Postgres);
conformance!(mysql, Kind::Mysql);
// The same suite on an application's own typed tables, mapped column by column.
conformance!(sqlite_typed, Kind::Sqlite, Layout::Typed);
conformance!(postgres_typed, Kind::Postgres, Layout::Typed);
conformance!(mysql_typed, Kind::Mysql, Layout::Typed);
// Built to run when MONGODB_URI names a replica set (build.rs sets `mongodb_tests`); otherwise
// reported by cargo as ignored, with the reason: never counted as passed.
conformance!(
    #[cfg_attr(
        not(mongodb_tests),
        ignore = "needs MONGODB_URI naming a MongoDB replica set"
    )]
    mongo,
    Kind::Mongo
);

/// What MySQL adds to the suite: the TIMESTAMP range is a per-record refusal (not a failed
/// batch), ids are exact (case and trailing spaces count), and the stamping rule (an UPDATE of
/// the document alone gets a new time; one that assigns updated_at keeps what it says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_ranges_ids_and_stamping() {
    let (ts, store, c) = open(Kind::Mysql, Layout::Own).await;
    let t = now_ms() - 60_000;
    let far = 2_200_000_000_000; // 2039-09: past a TIMESTAMP's end
    let outcomes = store
        .apply(
            &c,
            &[
                Write {
                    record: upsert(&c, "far", "future", far),
                    expected: None,
                },
                Write {
                    record: upsert(&c, "a", "lower", t),
                    expected: None,
                },
                Write {
                    record: upsert(&c, "A", "upper", t),
                    expected: None,
                },
                Write {
                    record: upsert(&c, "a ", "spaced", t),
                    expected: None,
                },
            ],
        )
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], ApplyOutcome::Rejected(r) if r.contains("TIMESTAMP")),
        "{outcomes:?}"
    );
    assert!(outcomes[1..].iter().all(|o| *o == ApplyOutcome::Applied));
    let slots = store
        .read(&c, &["a".into(), "A".into(), "a ".into(), "far".into()])
        .await
        .unwrap();
    let names: Vec<String> = slots[..3]
        .iter()
        .map(|s| present(s.clone()).doc["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["lower", "upper", "spaced"]);
    assert_eq!(slots[3], Slot::Absent);

    // An UPDATE that assigns updated_at (here to itself) states its version: not stamped.
    ts.raw(&[&format!(
        "UPDATE \"{c}\" SET doc = '{{\"name\":\"kept time\"}}', updated_at = updated_at WHERE id = 'a'"
    )]);
    let kept = present(read_one(&store, &c, "a").await);
    assert_eq!(kept.doc["name"], "kept time");
    assert_eq!(kept.updated_at_ms, Some(t));
    // One that changes the document alone is a new version of unknown time: stamped now.
    ts.edit_name_in_place(&c, "A", "edited").unwrap();
    let edited = present(read_one(&store, &c, "A").await);
    assert_eq!(edited.doc["name"], "edited");
    assert!(edited.updated_at_ms.unwrap() > t + 30_000, "{edited:?}");
}

/// The stamping rule on typed tables, in all three dialects: an application UPDATE that
/// leaves the modification time alone gets a new one (a new version of unknown time must not
/// lose to the old copy); one that assigns it keeps what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_tables_stamp_updates_that_leave_the_time_alone() {
    for kind in [Kind::Sqlite, Kind::Postgres, Kind::Mysql] {
        let (ts, store, c) = open(kind, Layout::Typed).await;
        let t = now_ms() - 60_000;
        ts.put(
            &c,
            "s",
            &json!({ "name": "old", "updatedAt": format_ts(t) }),
        );
        assert_eq!(
            present(read_one(&store, &c, "s").await).updated_at_ms,
            Some(t)
        );
        ts.raw(&[&format!("UPDATE \"{c}\" SET name = 'new' WHERE id = 's'")]);
        let stamped = present(read_one(&store, &c, "s").await);
        assert_eq!(stamped.doc["name"], "new");
        assert!(
            stamped.updated_at_ms.unwrap() > t + 30_000,
            "{kind:?}: an UPDATE of the name alone is a new version"
        );
        let stated = match kind {
            Kind::Mysql => format!("STR_TO_DATE('{}', '%Y-%m-%dT%H:%i:%s.%fZ')", format_ts(t)),
            _ => format!("'{}'", format_ts(t)),
        };
        ts.raw(&[&format!(
            "UPDATE \"{c}\" SET name = 'restored', updated_at = {stated} WHERE id = 's'"
        )]);
        assert_eq!(
            present(read_one(&store, &c, "s").await).updated_at_ms,
            Some(t),
            "{kind:?}: an UPDATE that states its time keeps it"
        );
    }
}

/// Change-log rows waiting for `consumer` in a SQL test store.
fn log_rows(ts: &TestStore, consumer: &str) -> usize {
    ts.raw(&[&format!(
        "SELECT COUNT(*) FROM _syncbridge_changes WHERE consumer = '{consumer}'"
    )])
    .trim()
    .parse()
    .expect("a count")
}

/// A consumer unseen for the retention period is dropped, with its rows, by another bridge's
/// `prepare`; nothing is logged for it afterwards. When it comes back, its listener reports its
/// position lost (the engine then runs a full sweep), and it hears writes again. Each SQL
/// dialect, in a database of its own (a one-second retention would drop other tests' bridges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_consumers_are_dropped_and_may_come_back() {
    use syncbridge::stores::sql::{SqlOptions, SqlStore};
    for kind in [Kind::Sqlite, Kind::Postgres, Kind::Mysql] {
        let ts = TestStore::fresh_database(kind);
        let c = collection("gone");
        let short = SqlOptions {
            consumer_retention: Duration::from_secs(1),
            ..SqlOptions::default()
        };
        let connect = |id: &'static str| {
            let (uri, short, c) = (ts.uri.clone(), short.clone(), c.clone());
            async move {
                let s: Arc<dyn Store> = Arc::new(
                    SqlStore::connect_with(&uri, id, short)
                        .await
                        .expect("store opens"),
                );
                s.prepare(std::slice::from_ref(&c)).await.expect("prepare");
                s
            }
        };
        let gone = connect("gone-bridge").await;
        let t = now_ms();
        ts.put(&c, "a", &json!({ "name": "a", "updatedAt": format_ts(t) }));
        assert_eq!(log_rows(&ts, "gone-bridge"), 1, "{kind:?}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let live = connect("live-bridge").await;
        assert_eq!(
            log_rows(&ts, "gone-bridge"),
            0,
            "{kind:?}: dropped with its rows"
        );
        ts.put(
            &c,
            "b",
            &json!({ "name": "b", "updatedAt": format_ts(t + 1) }),
        );
        assert_eq!(log_rows(&ts, "gone-bridge"), 0, "{kind:?}");
        assert_eq!(log_rows(&ts, "live-bridge"), 1, "{kind:?}");

        gone.prepare(std::slice::from_ref(&c)).await.unwrap();
        let l = listen(&gone, &c, None);
        let err = l.task.await.unwrap().expect_err("the gap is reported");
        assert!(
            err.chain().any(|e| e.is::<stores::PositionLost>()),
            "{kind:?}: {err:#}"
        );
        let mut l = listen(&gone, &c, None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        ts.put(
            &c,
            "c",
            &json!({ "name": "c", "updatedAt": format_ts(t + 2) }),
        );
        l.collect(&["c"]).await;
        l.stop().await;
        drop((gone, live));
        if kind != Kind::Sqlite {
            ts.drop_database();
        }
    }
}

/// A database prepared by the version before consumers (a change log without a `consumer`
/// column, triggers that log one row per change) is upgraded by `prepare`: the rows already
/// logged reach the bridge of their collection, and the recreated triggers log for every
/// consumer. Each SQL dialect, in a database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_log_of_the_previous_version_is_upgraded() {
    for kind in [Kind::Sqlite, Kind::Postgres, Kind::Mysql] {
        let ts = TestStore::fresh_database(kind);
        let c = collection("old");
        // The previous version's schema, as it made it (the insert trigger is enough).
        let old: Vec<String> = match kind {
            Kind::Sqlite => vec![
                format!("CREATE TABLE \"{c}\" (id TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_at TEXT NOT NULL)"),
                "CREATE TABLE _syncbridge_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, \
                 id TEXT NOT NULL, origin TEXT, changed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))".into(),
                format!("CREATE TRIGGER \"_syncbridge_{c}_ins\" AFTER INSERT ON \"{c}\" \
                 BEGIN INSERT INTO _syncbridge_changes(collection, id) VALUES ('{c}', NEW.id); END"),
            ],
            Kind::Postgres => vec![
                format!("CREATE TABLE \"{c}\" (id TEXT PRIMARY KEY, doc JSONB NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"),
                "CREATE TABLE _syncbridge_changes (seq BIGSERIAL PRIMARY KEY, collection TEXT NOT NULL, id TEXT NOT NULL, \
                 origin TEXT, changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())".into(),
                "CREATE FUNCTION _syncbridge_capture() RETURNS trigger LANGUAGE plpgsql AS $fn$ BEGIN \
                 INSERT INTO _syncbridge_changes(collection, id) VALUES (TG_ARGV[0], NEW.id); RETURN NULL; END $fn$".into(),
                format!("CREATE TRIGGER \"_syncbridge_capture\" AFTER INSERT OR UPDATE OR DELETE ON \"{c}\" \
                 FOR EACH ROW EXECUTE FUNCTION _syncbridge_capture('{c}')"),
            ],
            Kind::Mysql => vec![
                format!("CREATE TABLE \"{c}\" (id VARCHAR(255) NOT NULL PRIMARY KEY, doc LONGTEXT NOT NULL, \
                 updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6))"),
                "CREATE TABLE _syncbridge_changes (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, collection VARCHAR(64) NOT NULL, \
                 id VARCHAR(255) NOT NULL, origin TEXT, changed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))".into(),
                format!("CREATE TRIGGER \"_syncbridge_{c}_ins\" AFTER INSERT ON \"{c}\" FOR EACH ROW \
                 INSERT INTO _syncbridge_changes(collection, id, origin) VALUES ('{c}', NEW.id, @syncbridge_origin)"),
            ],
            _ => unreachable!(),
        };
        for sql in &old {
            ts.raw(&[sql]);
        }
        let t = now_ms();
        ts.put(
            &c,
            "logged-before",
            &json!({ "name": "old", "updatedAt": format_ts(t) }),
        );
        let store = stores::open(&ts.uri, "upgraded-bridge").await.unwrap();
        store.prepare(std::slice::from_ref(&c)).await.unwrap();
        let mut l = listen(&store, &c, None);
        l.collect(&["logged-before"]).await;
        ts.put(
            &c,
            "logged-after",
            &json!({ "name": "new", "updatedAt": format_ts(t + 1) }),
        );
        l.collect(&["logged-after"]).await;
        l.stop().await;
        assert!(
            log_rows(&ts, "upgraded-bridge") >= 1,
            "{kind:?}: the new trigger logs per consumer"
        );
        if kind != Kind::Sqlite {
            ts.drop_database();
        }
    }
}
