//! End-to-end: a bridge between two real stores, with every change made directly through the
//! stores' own CLIs (redis-cli, psql, sqlite3, mysql), the way an application that knows nothing of
//! syncbridge writes. The same scenarios run for every pair of stores.

mod common;

use common::{
    Kind, TestBridge, TestStore, collection, config, data_dir, eventually, name_of, path,
};
use serde_json::{Value, json};
use std::time::Duration;
use syncbridge::engine::policy::Mode;
use syncbridge::record::{canonical_hash, format_ts, now_ms, with_updated_at};

fn doc(name: &str, at_ms: i64) -> Value {
    common::named(name, at_ms)
}

async fn same_everywhere(
    local: &TestStore,
    cloud: &TestStore,
    coll: &str,
    id: &str,
    want: Option<&str>,
) {
    eventually(&format!("{coll}/{id} to be {want:?} on both sides"), || {
        name_of(local, coll, id).as_deref() == want && name_of(cloud, coll, id).as_deref() == want
    })
    .await;
    assert_eq!(
        local.get(coll, id),
        cloud.get(coll, id),
        "both sides hold the same document"
    );
}

/// Create, update and delete on either side arrive on the other.
async fn changes_flow_both_ways(lk: Kind, ck: Kind) {
    let (local, cloud, c, dir) = (
        TestStore::new(lk),
        TestStore::new(ck),
        collection("flow"),
        data_dir(),
    );
    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    let t = now_ms();
    local.put(&c, "42", &doc("Ada", t));
    same_everywhere(&local, &cloud, &c, "42", Some("Ada")).await;
    cloud.put(&c, "42", &doc("Ada Lovelace", t + 10));
    same_everywhere(&local, &cloud, &c, "42", Some("Ada Lovelace")).await;
    local.delete(&c, "42");
    same_everywhere(&local, &cloud, &c, "42", None).await;
    cloud.put(&c, "7", &doc("Grace", t + 20));
    same_everywhere(&local, &cloud, &c, "7", Some("Grace")).await;
    // An UPDATE of the document alone (updated_at untouched) is a new version, and wins.
    for (store, name) in [(&local, "edited in local"), (&cloud, "edited in cloud")] {
        if store.edit_name_in_place(&c, "7", name).is_none() {
            continue;
        }
        same_everywhere(&local, &cloud, &c, "7", Some(name)).await;
    }
    cloud.delete(&c, "7");
    same_everywhere(&local, &cloud, &c, "7", None).await;
    // A record written without updatedAt is stamped, and the stamp reaches both sides.
    cloud.put(&c, "8", &json!({ "name": "Edsger" }));
    same_everywhere(&local, &cloud, &c, "8", Some("Edsger")).await;
    assert!(local.get(&c, "8").unwrap()["updatedAt"].is_string());
    bridge.stop().await;
}

/// One write produces exactly one apply: the change does not come back as a new change.
async fn no_echo_loop(lk: Kind, ck: Kind) {
    let (local, cloud, c, dir) = (
        TestStore::new(lk),
        TestStore::new(ck),
        collection("echo"),
        data_dir(),
    );
    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    let t = now_ms();
    cloud.put(&c, "1", &doc("once", t));
    same_everywhere(&local, &cloud, &c, "1", Some("once")).await;
    local.put(&c, "2", &doc("twice", t));
    same_everywhere(&local, &cloud, &c, "2", Some("twice")).await;
    // Give any echo time to travel round.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = bridge.engine.stats.snapshot();
    assert_eq!(
        s.applied.local, 1,
        "local received exactly one apply: {s:?}"
    );
    assert_eq!(
        s.applied.cloud, 1,
        "cloud received exactly one apply: {s:?}"
    );
    // PostgreSQL and MySQL know the writer and log no change of the bridge's own for it; the
    // other stores' applies come back and are recognized.
    let returning = [lk, ck]
        .iter()
        .filter(|k| !matches!(k, Kind::Postgres | Kind::Mysql))
        .count() as u64;
    assert!(
        s.echoes_suppressed >= returning,
        "each apply that comes back came back once and was recognized: {s:?}"
    );
    assert_eq!(s.conflicts.local + s.conflicts.cloud, 0, "{s:?}");
    bridge.stop().await;
}

/// Edits of one key on both sides converge on the last writer, and on a deterministic winner
/// when the times are equal, whether the bridge was running or not.
async fn concurrent_edits_converge(lk: Kind, ck: Kind) {
    let (local, cloud, c, dir) = (
        TestStore::new(lk),
        TestStore::new(ck),
        collection("race"),
        data_dir(),
    );
    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    let t = now_ms();
    for round in 0..5 {
        let id = format!("k{round}");
        let (older, newer) = (
            doc(&format!("local-{round}"), t + round),
            doc(&format!("cloud-{round}"), t + round + 5),
        );
        // Written as close together as two processes allow.
        std::thread::scope(|s| {
            s.spawn(|| local.put(&c, &id, &older));
            s.spawn(|| cloud.put(&c, &id, &newer));
        });
        same_everywhere(&local, &cloud, &c, &id, Some(&format!("cloud-{round}"))).await;
    }
    // Equal updatedAt, different content: the hash decides, the same way on both sides.
    let (a, b) = (doc("alpha", t + 100), doc("beta", t + 100));
    let expected = if canonical_hash(&with_updated_at(a.clone(), t + 100))
        > canonical_hash(&with_updated_at(b.clone(), t + 100))
    {
        "alpha"
    } else {
        "beta"
    };
    std::thread::scope(|s| {
        s.spawn(|| local.put(&c, "tie", &a));
        s.spawn(|| cloud.put(&c, "tie", &b));
    });
    same_everywhere(&local, &cloud, &c, "tie", Some(expected)).await;
    bridge.stop().await;

    // The same with the bridge stopped: both sides changed behind its back.
    local.put(&c, "k0", &doc("offline-local", t + 300));
    cloud.put(&c, "k0", &doc("offline-cloud", t + 200));
    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    same_everywhere(&local, &cloud, &c, "k0", Some("offline-local")).await;
    let s = bridge.engine.stats.snapshot();
    bridge.stop().await;
    assert!(
        s.conflicts.local >= 1,
        "the offline conflict was counted: {s:?}"
    );
}

/// Changes made while the bridge is stopped (creates, updates, deletes on both sides) arrive
/// after a restart; deleted records stay deleted.
async fn offline_changes_arrive_after_restart(lk: Kind, ck: Kind) {
    let (local, cloud, c, dir) = (
        TestStore::new(lk),
        TestStore::new(ck),
        collection("offline"),
        data_dir(),
    );
    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    let t = now_ms() - 60_000;
    for id in ["a", "b", "c", "d"] {
        local.put(&c, id, &doc(&format!("{id}-v1"), t));
    }
    for id in ["a", "b", "c", "d"] {
        same_everywhere(&local, &cloud, &c, id, Some(&format!("{id}-v1"))).await;
    }
    bridge.stop().await;

    local.put(&c, "a", &doc("a-v2", t + 1000));
    cloud.delete(&c, "b");
    local.delete(&c, "c");
    cloud.put(&c, "e", &doc("e-v1", t + 1000));
    local.put(&c, "d", &doc("d-local", t + 1000));
    cloud.put(&c, "d", &doc("d-cloud", t + 2000));

    let bridge = TestBridge::start(config(&local, &cloud, &[&c], Mode::Both, &path(&dir))).await;
    same_everywhere(&local, &cloud, &c, "a", Some("a-v2")).await;
    same_everywhere(&local, &cloud, &c, "b", None).await;
    same_everywhere(&local, &cloud, &c, "c", None).await;
    same_everywhere(&local, &cloud, &c, "e", Some("e-v1")).await;
    same_everywhere(&local, &cloud, &c, "d", Some("d-cloud")).await;
    // And the listeners are live again after the restart.
    cloud.put(&c, "f", &doc("f-v1", now_ms()));
    same_everywhere(&local, &cloud, &c, "f", Some("f-v1")).await;
    bridge.stop().await;
    assert_eq!(local.count(&c), 4);
    assert_eq!(cloud.count(&c), 4);
}

/// One-way modes copy one way only; overwrite modes make one side an exact copy.
async fn modes_do_what_they_say(lk: Kind, ck: Kind) {
    let (local, cloud, dir) = (TestStore::new(lk), TestStore::new(ck), data_dir());
    let t = now_ms();

    let c = collection("l2c");
    let bridge = TestBridge::start(config(
        &local,
        &cloud,
        &[&c],
        Mode::LocalToCloud,
        &path(&dir),
    ))
    .await;
    cloud.put(&c, "from-cloud", &doc("stays in cloud", t));
    local.put(&c, "from-local", &doc("goes to cloud", t));
    eventually("local change to reach cloud", || {
        name_of(&cloud, &c, "from-local").is_some()
    })
    .await;
    // The cloud write had every chance to travel (it was written first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(name_of(&local, &c, "from-cloud"), None);
    bridge.stop().await;

    let c = collection("c2l");
    let dir2 = data_dir();
    let bridge = TestBridge::start(config(
        &local,
        &cloud,
        &[&c],
        Mode::CloudToLocal,
        &path(&dir2),
    ))
    .await;
    local.put(&c, "from-local", &doc("stays in local", t));
    cloud.put(&c, "from-cloud", &doc("goes to local", t));
    eventually("cloud change to reach local", || {
        name_of(&local, &c, "from-cloud").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(name_of(&cloud, &c, "from-local"), None);
    bridge.stop().await;

    // Overwrite: one pass, as `syncbridge sync --mode overwrite-local` runs it.
    for (mode, target) in [
        (Mode::OverwriteLocal, &local),
        (Mode::OverwriteCloud, &cloud),
    ] {
        let source = if mode == Mode::OverwriteLocal {
            &cloud
        } else {
            &local
        };
        let c = collection("over");
        let dir = data_dir();
        let engine =
            syncbridge::engine::Engine::open(config(&local, &cloud, &[&c], mode, &path(&dir)))
                .await
                .unwrap();
        engine.prepare().await.unwrap();
        source.put(&c, "same", &doc("source", t));
        source.put(&c, "older-in-source", &doc("source wins anyway", t));
        target.put(&c, "older-in-source", &doc("newer in target", t + 10_000));
        target.put(&c, "only-in-target", &doc("deleted by overwrite", t));
        let report = engine.sweep(mode, true, None).await.unwrap();
        assert!(
            report.summary.errors.is_empty(),
            "{:?}",
            report.summary.errors
        );
        for id in ["same", "older-in-source", "only-in-target"] {
            assert_eq!(target.get(&c, id), source.get(&c, id), "{mode}: {id}");
        }
        assert_eq!(
            name_of(source, &c, "older-in-source").as_deref(),
            Some("source wins anyway")
        );
        assert_eq!(target.count(&c), 2, "{mode}: the target is an exact copy");
    }
}

macro_rules! pair_tests {
    ($(#[$gate:meta])* $pair:ident, $local:expr, $cloud:expr) => {
        mod $pair {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn changes_flow_both_ways() {
                if !common::available($local) || !common::available($cloud) {
                    return;
                }
                super::changes_flow_both_ways($local, $cloud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn no_echo_loop() {
                if !common::available($local) || !common::available($cloud) {
                    return;
                }
                super::no_echo_loop($local, $cloud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn concurrent_edits_converge() {
                if !common::available($local) || !common::available($cloud) {
                    return;
                }
                super::concurrent_edits_converge($local, $cloud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn offline_changes_arrive_after_restart() {
                if !common::available($local) || !common::available($cloud) {
                    return;
                }
                super::offline_changes_arrive_after_restart($local, $cloud).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$gate])*
            async fn modes_do_what_they_say() {
                if !common::available($local) || !common::available($cloud) {
                    return;
                }
                super::modes_do_what_they_say($local, $cloud).await
            }
        }
    };
}

pair_tests!(postgres_redis, Kind::Postgres, Kind::Redis);
pair_tests!(sqlite_redis, Kind::Sqlite, Kind::Redis);
pair_tests!(sqlite_postgres, Kind::Sqlite, Kind::Postgres);
pair_tests!(mysql_redis, Kind::Mysql, Kind::Redis);
pair_tests!(mysql_postgres, Kind::Mysql, Kind::Postgres);
// The pair the bridge was first asked for; runs when MONGODB_URI names a replica set.
pair_tests!(
    #[cfg_attr(
        not(mongodb_tests),
        ignore = "needs MONGODB_URI naming a MongoDB replica set"
    )]
    mongo_redis,
    Kind::Mongo,
    Kind::Redis
);

/// Bad input in a synced namespace (a key of another Redis type, a value that is not JSON, a
/// document over the size limit) is skipped with a counter and dead-lettered after its
/// attempts; the bridge goes on syncing everything else, and a fixed record syncs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_is_counted_dead_lettered_and_the_bridge_goes_on() {
    let (local, cloud, c, dir) = (
        TestStore::new(Kind::Sqlite),
        TestStore::new(Kind::Redis),
        collection("bad"),
        data_dir(),
    );
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, &path(&dir));
    cfg.sync.retry_max_attempts = 2;
    cfg.sync.retry_base_ms = 50;
    cfg.sync.retry_max_secs = 1;
    cfg.sync.max_doc_bytes = 2048;
    let bridge = TestBridge::start(cfg).await;
    cloud.raw(&["HSET", &format!("{c}:hash"), "f", "v"]);
    cloud.raw(&["SET", &format!("{c}:text"), "not json"]);
    cloud.put(
        &c,
        "big",
        &json!({ "blob": "x".repeat(4096), "updatedAt": format_ts(now_ms()) }),
    );
    cloud.put(&c, "good", &doc("fine", now_ms()));
    same_everywhere(&local, &cloud, &c, "good", Some("fine")).await;
    let engine = bridge.engine.clone();
    // HSET is not among the notified classes (K$gxe): the full sweep, due every
    // full_sweep_interval_secs on Redis, is what finds a hash in the namespace. Run one now.
    engine.sweep(Mode::Both, true, None).await.unwrap();
    let mut failed = Vec::new();
    for _ in 0..200 {
        failed = engine.queue.list(true, 10).await.unwrap();
        if failed.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<&str> = failed.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys.len(), 3, "dead letters: {failed:?}");
    for id in ["big", "hash", "text"] {
        assert!(
            keys.contains(&format!("{c}/{id}").as_str()),
            "{id} dead-lettered: {failed:?}"
        );
    }
    assert!(
        failed
            .iter()
            .any(|e| e.last_error.contains("max_doc_bytes")),
        "{failed:?}"
    );
    let status = engine.status().await.unwrap();
    assert_eq!(status.queue.failed, 3);
    assert!(
        status.counters.invalid.cloud >= 2 && status.counters.rejected.local >= 1,
        "{status:?}"
    );
    assert_eq!(local.count(&c), 1, "nothing bad reached local");

    // The source is fixed: a new change to a dead-lettered record makes it sync.
    cloud.raw(&["DEL", &format!("{c}:text")]);
    cloud.put(&c, "text", &doc("now valid", now_ms()));
    same_everywhere(&local, &cloud, &c, "text", Some("now valid")).await;
    eventually("the fixed record to leave the queue", || {
        futures::executor::block_on(engine.queue.list(true, 10))
            .unwrap()
            .len()
            == 2
    })
    .await;
    // An operator gives up on one and retries the other by hand.
    assert!(engine.queue.discard(&format!("{c}/hash")).await.unwrap());
    assert!(engine.queue.retry(&format!("{c}/big")).await.unwrap());
    bridge.stop().await;
}
