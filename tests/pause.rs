//! The offline switch and the per-collection status, against real stores: MariaDB (generic
//! tables) as the local store, PostgreSQL as the cloud store, the engine, the pipeline and the
//! HTTP API in-process, every change written through the stores' own clients (mysql, psql).

mod common;

use common::{Kind, TestStore, collection, config, data_dir, eventually};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncbridge::api::{self, ApiState};
use syncbridge::config::Config;
use syncbridge::engine::policy::Mode;
use syncbridge::engine::scheduler::Passes;
use syncbridge::engine::{Engine, pipeline};
use syncbridge::record::{format_ts, now_ms};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A bridge with its API on a free loopback port; its data directory belongs to the test, so
/// it can be stopped and started again on the same state.
struct Bridge {
    base: String,
    http: Client,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Bridge {
    /// Starts engine, API and pipeline; waits until both listeners follow their stores (and,
    /// when the bridge runs, until the start-up sweep is done: a paused bridge does not sweep).
    async fn start(mut config: Config) -> Bridge {
        config.api.bind = "127.0.0.1:0".into();
        let api_config = config.api.clone();
        let shutdown = CancellationToken::new();
        let engine = pipeline::open_when_ready(config, &shutdown)
            .await
            .expect("bridge opens")
            .expect("not shut down");
        let engine = Arc::new(engine);
        let state = ApiState::open(
            engine.clone(),
            Arc::new(Passes::default()),
            None,
            &api_config,
        )
        .await
        .expect("API state");
        let listener = api::bind(&api_config.bind).await.expect("free port");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut tasks = JoinSet::new();
        tasks.spawn(api::serve(listener, api::router(state), shutdown.clone()));
        tasks.spawn(pipeline::run(engine.clone(), shutdown.clone()));
        let started = Instant::now();
        loop {
            let s = engine.stats.snapshot();
            let swept = engine.is_paused() || engine.last_sweep.lock().unwrap().is_some();
            if s.local.listening && s.cloud.listening && swept {
                break;
            }
            assert!(started.elapsed() < common::DEADLINE, "bridge not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Bridge {
            base,
            http: Client::new(),
            engine,
            shutdown,
            tasks,
        }
    }

    async fn call(&self, method: Method, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .send()
            .await
            .expect("API answers");
        let code = resp.status();
        (code, resp.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self) -> Value {
        let (code, st) = self.call(Method::GET, "/api/sync/status").await;
        assert_eq!(code, StatusCode::OK, "{st}");
        st
    }

    /// Polls status until `check` holds.
    async fn until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let st = self.status().await;
            if check(&st) {
                return st;
            }
            assert!(
                started.elapsed() < common::DEADLINE,
                "timed out waiting for {what}: last status {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r.expect("task").expect("stopped cleanly");
        }
    }
}

/// MariaDB as local, PostgreSQL as cloud, `collections` of fresh names.
fn stores() -> (TestStore, TestStore) {
    (TestStore::new(Kind::Mysql), TestStore::new(Kind::Postgres))
}

/// The PostgreSQL transaction that last wrote each row of `coll` (its `xmin`), by id: a batch
/// the bridge applies is one transaction, and transaction ids grow in the order they start.
fn pg_writer_xids(cloud: &TestStore, coll: &str) -> HashMap<String, u64> {
    cloud
        .raw(&[&format!("SELECT id || ' ' || xmin::text FROM \"{coll}\"")])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, x)| (id.to_string(), x.trim().parse().expect("an xid")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_writes_are_held_across_a_restart_and_resume_applies_them_in_order() {
    const N: usize = 1000;
    const BATCH: usize = 100;
    let (local, cloud) = stores();
    let c = collection("pause");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.sync.batch_size = BATCH;
    let b = Bridge::start(cfg.clone()).await;

    let (code, p) = b.call(Method::POST, "/api/sync/pause").await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(
        (p["paused"].as_bool(), p["changed"].as_bool()),
        (Some(true), Some(true))
    );
    let (code, p) = b.call(Method::POST, "/api/sync/pause").await;
    assert_eq!(
        (code, p["changed"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{p}"
    );
    // On-demand passes are refused while paused, with a code a client can act on.
    let (code, e) = b.call(Method::GET, "/api/sync/both").await;
    assert_eq!(
        (code, e["error"].as_str()),
        (StatusCode::CONFLICT, Some("paused")),
        "{e}"
    );
    let resp = b
        .http
        .post(format!("{}/api/sync", b.base))
        .json(&json!({"mode": "both"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "paused");

    // 1,000 writes through MariaDB's own client, one transaction each, in an order that is not
    // the ids' order (position k writes id (k * 7919) mod 1000), so a drain in id order would
    // show at the target. Five rounds of 200; each round is seen by the listener before the
    // next is written, so the bridge's first-seen order must follow the rounds.
    let base_ms = now_ms() - 60_000;
    let order: Vec<String> = (0..N).map(|k| format!("r{:04}", (k * 7919) % N)).collect();
    let statements: Vec<String> = order
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let doc =
                json!({ "name": format!("n-{id}"), "updatedAt": format_ts(base_ms + k as i64) });
            format!(
                "INSERT INTO \"{c}\" (id, doc, updated_at) VALUES ('{id}', '{doc}', \
                 STR_TO_DATE('{}', '%Y-%m-%dT%H:%i:%s.%fZ'));\n",
                doc["updatedAt"].as_str().unwrap()
            )
        })
        .collect();
    const ROUND: usize = 200;
    let mut st = Value::Null;
    for (i, chunk) in statements.chunks(ROUND).enumerate() {
        local.raw(&[&chunk.concat()]);
        st = b
            .until("the round's writes to be held", |st| {
                st["pending"] == (i + 1) * ROUND
            })
            .await;
    }
    assert_eq!(local.count(&c), N);
    assert_eq!(st["paused"], true, "{st}");
    assert!(st["oldest_pending_age_secs"].is_i64(), "{st}");
    assert_eq!(st["queue"]["held"], N, "{st}");
    assert_eq!(st["by_collection"][&c]["held"], N, "{st}");
    assert_eq!(st["by_collection"][&c]["pending"], N, "{st}");
    assert_eq!(st["by_collection"][&c]["failed"], 0, "{st}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cloud.count(&c), 0, "nothing is applied while paused");

    // A restart keeps the bridge paused and the held keys, in their first-seen order.
    b.stop().await;
    let b = Bridge::start(cfg.clone()).await;
    let held: Vec<String> = b
        .engine
        .queue
        .held(N as i64 + 1)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(held.len(), N);
    let round_of: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(k, id)| (id.as_str(), k / ROUND))
        .collect();
    assert!(
        held.windows(2)
            .all(|w| round_of[w[0].as_str()] <= round_of[w[1].as_str()]),
        "first-seen order follows the order of the writes"
    );
    let st = b.status().await;
    assert_eq!(
        (st["paused"].as_bool(), st["pending"].as_u64()),
        (Some(true), Some(N as u64)),
        "{st}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cloud.count(&c),
        0,
        "still nothing applied after the restart"
    );
    let st = b.status().await;
    assert!(st["oldest_pending_age_secs"].as_i64().unwrap() >= 3, "{st}");

    // Resume with the CLI, as an operator would.
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncbridge"))
        .args(["resume", "--url", &b.base])
        .env_remove("SYNCBRIDGE_CONFIG")
        .output()
        .expect("syncbridge resume runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("the CLI prints the JSON reply");
    assert_eq!(
        (reply["paused"].as_bool(), reply["changed"].as_bool()),
        (Some(false), Some(true)),
        "{reply}"
    );
    eventually("all held writes to arrive", || cloud.count(&c) == N).await;
    let st = b
        .until("the queue to empty", |st| {
            st["pending"] == 0 && st["draining"] == false
        })
        .await;
    let drained = started.elapsed();
    eprintln!("drained {N} held records in {} ms", drained.as_millis());
    assert_eq!(
        st["by_collection"][&c]["synced"], N,
        "each record applied once: {st}"
    );
    assert!(st["oldest_pending_age_secs"].is_null(), "{st}");

    // In first-seen order: group the rows by the transaction that wrote them; in transaction
    // order, each group's first-seen positions all come after the previous group's.
    let position: HashMap<&str, usize> = held
        .iter()
        .enumerate()
        .map(|(k, id)| (id.as_str(), k))
        .collect();
    let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut rounds: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (id, xid) in pg_writer_xids(&cloud, &c) {
        groups.entry(xid).or_default().push(position[id.as_str()]);
        rounds.entry(xid).or_default().push(round_of[id.as_str()]);
    }
    // The same in terms of the rounds the test wrote, independent of the bridge's own record.
    let rounds: Vec<(usize, usize)> = rounds
        .values()
        .map(|r| (*r.iter().min().unwrap(), *r.iter().max().unwrap()))
        .collect();
    assert!(
        rounds.windows(2).all(|w| w[0].1 <= w[1].0),
        "batches applied out of the order of the writes: rounds per transaction {rounds:?}"
    );
    assert!(
        groups.len() >= N / BATCH,
        "applied in batches: {} transactions",
        groups.len()
    );
    let mut last_max = None;
    for positions in groups.values() {
        let (lo, hi) = (
            positions.iter().min().unwrap(),
            positions.iter().max().unwrap(),
        );
        if let Some(prev) = last_max {
            assert!(
                *lo > prev,
                "a batch applied out of first-seen order: {groups:?}"
            );
        }
        last_max = Some(*hi);
    }
    for id in ["r0000", "r0999", &order[500]] {
        assert_eq!(cloud.get(&c, id).unwrap()["name"], format!("n-{id}"));
    }
    // Back to normal: a new write flows at once.
    local.put(
        &c,
        "after",
        &json!({ "name": "after", "updatedAt": format_ts(now_ms()) }),
    );
    eventually("a write after the drain to arrive", || {
        cloud.get(&c, "after").is_some()
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_setting_wins_over_the_persisted_state_at_start_up() {
    let (local, cloud) = stores();
    let c = collection("pausecfg");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.sync.paused = Some(true);
    let b = Bridge::start(cfg.clone()).await;
    assert!(b.engine.is_paused());
    let t = now_ms();
    for i in 0..3 {
        cloud.put(
            &c,
            &format!("k{i}"),
            &json!({ "name": i, "updatedAt": format_ts(t + i) }),
        );
    }
    b.until("three held", |st| st["pending"] == 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(local.count(&c), 0);
    b.stop().await;
    // Unset, the persisted state (paused) decides; set to false, the setting wins and the
    // held records drain without anyone calling resume.
    cfg.sync.paused = None;
    let b = Bridge::start(cfg.clone()).await;
    assert!(b.engine.is_paused(), "the persisted state keeps it paused");
    b.stop().await;
    cfg.sync.paused = Some(false);
    let b = Bridge::start(cfg).await;
    eventually("the held records to arrive", || local.count(&c) == 3).await;
    let st = b.until("the queue to empty", |st| st["pending"] == 0).await;
    assert_eq!(st["paused"], false, "{st}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_collections_failures_while_other_records_keep_flowing() {
    let (local, cloud) = stores();
    let (bad, good) = (collection("pstbad"), collection("pstgood"));
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&bad, &good], Mode::Both, dir.path());
    cfg.sync.retry_max_attempts = 2;
    cfg.sync.retry_base_ms = 50;
    cfg.sync.retry_max_secs = 1;
    let b = Bridge::start(cfg).await;
    let t = now_ms();
    // A version time before 1970-01-01 00:00:01: PostgreSQL keeps it, MariaDB's TIMESTAMP
    // column cannot, so the local store refuses the write.
    cloud.put(
        &bad,
        "old",
        &json!({ "name": "old", "updatedAt": "1969-12-31T00:00:00.000Z" }),
    );
    cloud.put(
        &bad,
        "fine",
        &json!({ "name": "fine", "updatedAt": format_ts(t) }),
    );
    cloud.put(
        &good,
        "g1",
        &json!({ "name": "g1", "updatedAt": format_ts(t) }),
    );
    let st = b
        .until("the refused record to be dead-lettered", |st| {
            st["by_collection"][&bad]["failed"] == 1
        })
        .await;
    let col = &st["by_collection"][&bad];
    let f = &col["failures"][0];
    assert_eq!(
        (
            f["id"].as_str(),
            f["attempts"].as_i64(),
            f["dead"].as_bool()
        ),
        (Some("old"), Some(2), Some(true)),
        "{st}"
    );
    assert!(
        f["last_error"]
            .as_str()
            .unwrap()
            .contains("outside the range of a MySQL TIMESTAMP"),
        "{st}"
    );
    assert_eq!(col["pending"], 0, "{st}");
    assert_eq!(col["failures"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["by_collection"][&good]["failed"], 0, "{st}");
    assert!(
        st["by_collection"][&good]["failures"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The other records flowed, and keep flowing.
    eventually("the good records to arrive", || {
        local.get(&bad, "fine").is_some() && local.get(&good, "g1").is_some()
    })
    .await;
    assert!(local.get(&bad, "old").is_none());
    cloud.put(
        &good,
        "g2",
        &json!({ "name": "g2", "updatedAt": format_ts(t + 1) }),
    );
    cloud.put(
        &bad,
        "later",
        &json!({ "name": "later", "updatedAt": format_ts(t + 1) }),
    );
    eventually("later records to arrive", || {
        local.get(&good, "g2").is_some() && local.get(&bad, "later").is_some()
    })
    .await;
    let st = b
        .until("the counters", |st| {
            st["by_collection"][&bad]["synced"] == 2 && st["by_collection"][&good]["synced"] == 2
        })
        .await;
    assert_eq!(st["by_collection"][&bad]["failed"], 1, "{st}");
    assert_eq!(st["queue"]["failed"], 1, "{st}");
    b.stop().await;
}
