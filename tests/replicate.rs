//! The replication protocol (`/api/replicate/...`) against a real bridge: SQLite as the local
//! store, PostgreSQL as the cloud store, the engine, the pipeline and the API running
//! in-process on a free port, spoken to over HTTP. Direct writes go through `psql`, the way an
//! application writes.

mod common;

use common::{Kind, TestStore, collection, config, data_dir};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncbridge::api::{self, ApiState};
use syncbridge::engine::Engine;
use syncbridge::engine::pipeline;
use syncbridge::engine::policy::Mode;
use syncbridge::engine::scheduler::Passes;
use syncbridge::record::{format_ts, now_ms};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

struct Bridge {
    base: String,
    http: Client,
    coll: String,
    cloud: TestStore,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    _local: TestStore,
    _dir: tempfile::TempDir,
}

impl Bridge {
    async fn start() -> Bridge {
        let local = TestStore::new(Kind::Sqlite);
        let cloud = TestStore::new(Kind::Postgres);
        let coll = collection("repl");
        let dir = data_dir();
        let mut cfg = config(&local, &cloud, &[&coll], Mode::Both, dir.path());
        cfg.api.bind = "127.0.0.1:0".into();
        let engine = Arc::new(Engine::open(cfg.clone()).await.expect("bridge opens"));
        engine.prepare().await.expect("stores prepared");
        let state = ApiState::open(engine.clone(), Arc::new(Passes::default()), None, &cfg.api)
            .await
            .expect("API state");
        let listener = api::bind(&cfg.api.bind).await.expect("free port");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(api::serve(listener, api::router(state), shutdown.clone()));
        tasks.spawn(pipeline::run(engine.clone(), shutdown.clone()));
        let started = Instant::now();
        while engine.last_sweep.lock().unwrap().is_none() {
            assert!(started.elapsed() < common::DEADLINE, "no start-up sweep");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Bridge {
            base,
            http: Client::new(),
            coll,
            cloud,
            shutdown,
            tasks,
            _local: local,
            _dir: dir,
        }
    }

    async fn pull(&self, checkpoint: &str, limit: usize) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!(
                "{}/api/replicate/{}/pull?checkpoint={checkpoint}&limit={limit}",
                self.base, self.coll
            ))
            .header("X-Client-Id", "rust-test")
            .send()
            .await
            .expect("API answers");
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn push(&self, changes: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/api/replicate/{}/push", self.base, self.coll))
            .header("X-Client-Id", "rust-test")
            .json(&json!({ "changes": changes }))
            .send()
            .await
            .expect("API answers");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// A GET of the API as JSON.
    async fn get_json(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("API answers");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        resp.json().await.unwrap()
    }

    /// Pulls from `checkpoint` until nothing more comes; returns every document delivered (in
    /// order) and the last checkpoint.
    async fn drain(&self, mut checkpoint: String, limit: usize) -> (Vec<Value>, String) {
        let mut docs = Vec::new();
        loop {
            let (code, page) = self.pull(&checkpoint, limit).await;
            assert_eq!(code, StatusCode::OK, "{page}");
            docs.extend(page["documents"].as_array().unwrap().iter().cloned());
            checkpoint = page["checkpoint"].as_str().unwrap().to_string();
            if !page["hasMore"].as_bool().unwrap() {
                return (docs, checkpoint);
            }
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r.expect("task").expect("stopped cleanly");
        }
    }
}

fn doc(id: &str, n: i64, at: i64) -> Value {
    json!({"id": id, "n": n, "updatedAt": format_ts(at)})
}

/// Follows a puller's view: the latest delivery per id wins.
fn apply(view: &mut HashMap<String, Value>, delivered: &[Value]) {
    for d in delivered {
        let id = d["id"].as_str().unwrap().to_string();
        view.insert(id, d.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pulls_miss_nothing_under_concurrent_writes_sharing_updated_at() {
    let b = Arc::new(Bridge::start().await);
    // Records before the first pull: the first pull walks the collection.
    let t0 = now_ms() - 60_000;
    for i in 0..30 {
        b.cloud.put(
            &b.coll,
            &format!("pre{i:02}"),
            &doc(&format!("pre{i:02}"), 0, t0),
        );
    }
    // A puller follows with small pages while writers write, many with one shared updatedAt
    // and some with an updatedAt in the past (an offline client's old edit).
    let shared = now_ms();
    let stop = CancellationToken::new();
    let puller = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut view = HashMap::new();
            let mut checkpoint = String::new();
            let mut pulls = 0;
            loop {
                let done = stop.is_cancelled();
                let (docs, cp) = b.drain(checkpoint.clone(), 7).await;
                pulls += 1;
                apply(&mut view, &docs);
                checkpoint = cp;
                if done {
                    return (view, checkpoint, pulls);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let b = b.clone();
        writers.spawn(async move {
            for i in 0..40 {
                // Ids interleave across writers, so records sharing an updatedAt land out of id
                // order; every tenth write is dated an hour back.
                let id = format!("k{:03}", i * 4 + (3 - w));
                let at = if i % 10 == 0 {
                    shared - 3_600_000
                } else {
                    shared
                };
                let r = b
                    .push(json!([{"id": id, "doc": doc(&id, w, at), "assumed": null}]))
                    .await;
                assert_eq!(r["applied"].as_array().unwrap().len(), 1, "{r}");
            }
        });
    }
    // And an application writing straight to PostgreSQL, same updatedAt, also seen by the
    // listener rather than the push path.
    let direct = {
        let b = b.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..20 {
                let id = format!("d{i:02}");
                b.cloud.put(&b.coll, &id, &doc(&id, 9, shared));
            }
            for i in 0..5 {
                b.cloud.put(
                    &b.coll,
                    &format!("pre{i:02}"),
                    &doc(&format!("pre{i:02}"), 1, shared),
                );
            }
        })
    };
    while writers.join_next().await.is_some() {}
    direct.await.unwrap();
    // Let the listener carry the last direct writes into the feed, then finish the pull.
    let (all, _) = b.drain(String::new(), 1000).await;
    let expected: HashMap<String, Value> = all
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_string(), d["doc"].clone()))
        .collect();
    assert_eq!(
        expected.len(),
        30 + 160 + 20,
        "the cloud holds every record"
    );
    let deadline = Instant::now() + common::DEADLINE;
    // The puller's view must catch up with the store through the feed alone.
    stop.cancel();
    let (mut view, mut checkpoint, pulls) = puller.await.unwrap();
    while Instant::now() < deadline {
        let matches = expected
            .iter()
            .all(|(id, d)| view.get(id).is_some_and(|v| &v["doc"] == d));
        if matches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (docs, next) = b.drain(checkpoint.clone(), 7).await;
        apply(&mut view, &docs);
        checkpoint = next;
    }
    assert!(
        pulls > 3,
        "the puller pulled while writes landed ({pulls} times)"
    );
    for (id, d) in &expected {
        assert_eq!(view.get(id).map(|v| &v["doc"]), Some(d), "{id} as pulled");
    }
    // An idle pull from the last checkpoint brings nothing and keeps the checkpoint.
    let (_, page) = b.pull(&checkpoint, 100).await;
    assert_eq!(page["documents"], json!([]), "{page}");
    assert_eq!(page["checkpoint"], json!(checkpoint));
    let b = Arc::into_inner(b).expect("sole owner");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_idempotent_and_conflicts_come_back_with_the_server_version() {
    let b = Bridge::start().await;
    let (_, cp) = b.drain(String::new(), 100).await;
    let at = now_ms();
    let change = json!([{"id": "a", "doc": doc("a", 1, at), "assumed": null}]);
    let first = b.push(change.clone()).await;
    let v1 = first["applied"][0]["version"].clone();
    assert_eq!(first["conflicts"], json!([]), "{first}");
    // The same push again (a retry after a lost response): applied, nothing changes.
    let again = b.push(change).await;
    assert_eq!(again["applied"][0]["version"], v1, "{again}");
    assert_eq!(again["conflicts"], json!([]));
    let (docs, cp) = b.drain(cp, 100).await;
    assert_eq!(docs.len(), 1, "one change, delivered once: {docs:?}");
    assert_eq!(docs[0]["version"], v1);
    assert_eq!(b.cloud.get(&b.coll, "a").unwrap()["n"], json!(1));

    // Someone else changes it; a client still assuming v1 gets a conflict with the server's.
    b.cloud.put(&b.coll, "a", &doc("a", 2, at + 10));
    let stale = b
        .push(json!([{"id": "a", "doc": doc("a", 3, at + 20), "assumed": v1}]))
        .await;
    assert_eq!(stale["applied"], json!([]), "{stale}");
    let conflict = &stale["conflicts"][0];
    assert_eq!(conflict["id"], json!("a"));
    assert_eq!(
        conflict["doc"]["n"],
        json!(2),
        "the server's current document"
    );
    assert_eq!(
        b.cloud.get(&b.coll, "a").unwrap()["n"],
        json!(2),
        "nothing overwritten"
    );
    // A client that never saw the record (assumed null) conflicts too.
    let blind = b
        .push(json!([{"id": "a", "doc": doc("a", 4, at + 30), "assumed": null}]))
        .await;
    assert_eq!(blind["conflicts"][0]["doc"]["n"], json!(2), "{blind}");
    // Resolved: pushed again assuming the server's version, it applies.
    let resolved = b
        .push(json!([{"id": "a", "doc": doc("a", 5, at + 40), "assumed": conflict["version"]}]))
        .await;
    assert_eq!(
        resolved["applied"].as_array().unwrap().len(),
        1,
        "{resolved}"
    );
    assert_eq!(b.cloud.get(&b.coll, "a").unwrap()["n"], json!(5));
    // Malformed changes are refused one by one, the rest of the batch applies.
    let mixed = b
        .push(json!([
            {"id": "bad id", "doc": doc("x", 1, at), "assumed": null},
            {"id": "nodate", "doc": {"n": 1}, "assumed": null},
            {"id": "b", "doc": doc("b", 1, at), "assumed": null},
        ]))
        .await;
    assert_eq!(mixed["rejected"].as_array().unwrap().len(), 2, "{mixed}");
    assert_eq!(mixed["applied"][0]["id"], json!("b"));
    let (docs, _) = b.drain(cp, 100).await;
    let ids: Vec<&str> = docs.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"a") && ids.contains(&"b"), "{ids:?}");
    // Bad input: a clear 4xx, and the bridge keeps serving.
    let (code, body) = b.pull("nonsense", 10).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], json!("bad_checkpoint"));
    let (code, _) = b.pull("", 0).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // The client list shows the client, and so does the bridge's status, each with its last
    // pull and push.
    let this_client = |list: &Value| -> Value {
        let me = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_id"] == json!("rust-test"))
            .unwrap_or_else(|| panic!("client listed: {list}"))
            .clone();
        assert!(
            me["last_pull"].is_string() && me["last_push"].is_string(),
            "{me}"
        );
        me
    };
    let me = this_client(&b.get_json("/api/replicate/clients").await);
    assert!(me["pushes"].as_i64().unwrap() >= 6);
    let status = b.get_json("/api/sync/status").await;
    let seen = &status["replication_clients"];
    assert!(seen["total"].as_i64().unwrap() >= 1, "{seen}");
    this_client(&seen["recent"]);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_delivered_and_the_stream_announces_them() {
    let b = Bridge::start().await;
    let at = now_ms();
    for id in ["x", "y", "z"] {
        b.cloud.put(&b.coll, id, &doc(id, 1, at));
    }
    let (docs, cp) = b.drain(String::new(), 100).await;
    let ids: std::collections::BTreeSet<&str> =
        docs.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{docs:?}");
    // The walk may be followed by the feed's notes of the same writes: absorb them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, cp) = b.drain(cp, 100).await;
    // Follow the stream from the current checkpoint.
    let mut stream = b
        .http
        .get(format!(
            "{}/api/replicate/{}/stream?heartbeat=1",
            b.base, b.coll
        ))
        .header("Last-Event-ID", &cp)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // Deleted by an application (seen by the listener) and by a client push.
    let t = Instant::now();
    b.cloud.delete(&b.coll, "x");
    let mut seen = String::new();
    let announced = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
            .await
            .expect("the stream speaks within 5 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if seen.contains("event: checkpoint") {
            break t.elapsed();
        }
    };
    assert!(
        announced < Duration::from_secs(1),
        "the delete was announced in {announced:?}"
    );
    let (docs, cp2) = b.drain(cp.clone(), 100).await;
    assert_eq!(docs.len(), 1, "{docs:?}");
    assert_eq!(docs[0]["id"], json!("x"));
    assert_eq!(docs[0]["deleted"], json!(true));
    assert!(docs[0].get("doc").is_none());
    let version = b.drain(String::new(), 100).await.0;
    let y = version.iter().find(|d| d["id"] == json!("y")).unwrap();
    let r = b
        .push(json!([{"id": "y", "deleted": true, "assumed": y["version"]}]))
        .await;
    assert_eq!(r["applied"].as_array().unwrap().len(), 1, "{r}");
    assert!(b.cloud.get(&b.coll, "y").is_none());
    let (docs, _) = b.drain(cp2, 100).await;
    assert_eq!(docs.len(), 1, "{docs:?}");
    assert_eq!(
        (&docs[0]["id"], &docs[0]["deleted"]),
        (&json!("y"), &json!(true))
    );
    // Heartbeats keep coming.
    let mut beat = String::new();
    while !beat.contains("event: heartbeat") {
        let chunk = tokio::time::timeout(Duration::from_secs(3), stream.chunk())
            .await
            .expect("a heartbeat within 3 s")
            .unwrap()
            .unwrap();
        beat.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    // A reconnect with an old Last-Event-ID is told the newer checkpoint at once.
    let mut again = b
        .http
        .get(format!("{}/api/replicate/{}/stream", b.base, b.coll))
        .header("Last-Event-ID", &cp)
        .send()
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), again.chunk())
        .await
        .expect("announced at once")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&first).to_string();
    assert!(text.contains("event: checkpoint"), "{text}");
    assert!(
        !text.contains(&format!("id: {cp}\n")),
        "a newer checkpoint: {text}"
    );
    drop(again);
    // The deletes reached the local store too (the bridge still syncs).
    b.stop().await;
}
