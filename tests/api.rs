//! The HTTP API against a real bridge: SQLite as the local store, Redis as the cloud store,
//! the engine, the pipeline and the API running in-process on a free port, spoken to over
//! HTTP. What the API writes is checked in the stores themselves with their own CLIs.

mod common;

use common::{Kind, TestStore, collection, config, data_dir, eventually};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncbridge::api::{self, ApiState};
use syncbridge::config::Config;
use syncbridge::engine::Engine;
use syncbridge::engine::pipeline;
use syncbridge::engine::policy::Mode;
use syncbridge::engine::scheduler::{Passes, Schedule};
use syncbridge::record::{format_ts, now_ms};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A bridge with its API on a free loopback port.
struct ApiBridge {
    base: String,
    http: Client,
    token: Option<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl ApiBridge {
    /// Starts engine, API and (with `pipeline`) the listeners and sweeps; waits until ready.
    async fn start(mut config: Config, dir: tempfile::TempDir, pipeline_on: bool) -> ApiBridge {
        let token = config.api.token.clone();
        let schedule = config
            .sync
            .schedule
            .as_deref()
            .map(|s| Arc::new(Schedule::new(s).expect("valid schedule")));
        config.api.bind = "127.0.0.1:0".into();
        let api_config = config.api.clone();
        let engine = Arc::new(Engine::open(config).await.expect("bridge opens"));
        engine.prepare().await.expect("stores prepared");
        let passes = Arc::new(Passes::default());
        let state = ApiState::open(
            engine.clone(),
            passes.clone(),
            schedule.clone(),
            &api_config,
        )
        .await
        .expect("API state");
        let listener = api::bind(&api_config.bind).await.expect("free port");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(api::serve(listener, api::router(state), shutdown.clone()));
        if let Some(schedule) = schedule {
            let (e, p, s) = (engine.clone(), passes.clone(), shutdown.clone());
            tasks.spawn(async move {
                schedule.run(e, p, s).await;
                Ok(())
            });
        }
        if pipeline_on {
            tasks.spawn(pipeline::run(engine.clone(), shutdown.clone()));
            let started = Instant::now();
            while engine.last_sweep.lock().unwrap().is_none() {
                assert!(started.elapsed() < common::DEADLINE, "no start-up sweep");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        ApiBridge {
            base,
            http: Client::new(),
            token,
            shutdown,
            tasks,
            _dir: dir,
        }
    }

    /// Sends a request (with the token, if the bridge has one) and returns status and JSON.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("API answers");
        let code = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (code, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r.expect("task").expect("stopped cleanly");
        }
    }
}

/// A Redis store on a database of its own (emptied first), one per test: these tests write
/// thousands of keys, which must not slow other suites' scans of the shared database 0, and
/// one of them uses the fixed `customers` name.
fn redis_db(db: u32) -> TestStore {
    let mut s = TestStore::new(Kind::Redis);
    s.uri = format!("{}/{db}", s.uri.trim_end_matches('/'));
    s.raw(&["FLUSHDB"]);
    s
}

/// Polls `GET path` until `check` holds on the reply.
async fn until(b: &ApiBridge, path: &str, what: &str, check: impl Fn(StatusCode, &Value) -> bool) {
    let started = Instant::now();
    loop {
        let (code, v) = b.get(path).await;
        if check(code, &v) {
            return;
        }
        assert!(
            started.elapsed() < common::DEADLINE,
            "timed out waiting for {what}: last reply {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_created_on_v1_appear_on_v2_and_changes_flow_both_ways() {
    let local = TestStore::new(Kind::Sqlite);
    let cloud = redis_db(37);
    let dir = data_dir();
    let cfg = config(&local, &cloud, &["customers"], Mode::Both, dir.path());
    let b = ApiBridge::start(cfg, dir, true).await;

    // Create on /v1: a UUID v4 uid and a server-set updatedAt.
    let before = now_ms();
    let (code, created) = b
        .call(
            Method::POST,
            "/v1/customer",
            Some(json!({"name": "Ada", "updatedAt": "1999-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    let uid = created["uid"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&uid).unwrap().get_version_num(), 4);
    let stamped = syncbridge::record::parse_ts(created["updatedAt"].as_str().unwrap()).unwrap();
    assert!(
        stamped >= before,
        "updatedAt is set by the server, not taken from the body"
    );
    assert_eq!(
        local.get("customers", &uid).unwrap(),
        created,
        "stored in the local store as returned"
    );

    // It reaches /v2 and the cloud store itself.
    until(
        &b,
        &format!("/v2/customer/{uid}"),
        "the record on /v2",
        |c, v| c == StatusCode::OK && v["name"] == "Ada",
    )
    .await;
    assert_eq!(cloud.get("customers", &uid).unwrap(), created);

    // Update on /v2: only the given fields change, updatedAt moves on, and local follows.
    let (code, updated) = b
        .call(
            Method::PUT,
            &format!("/v2/customer/{uid}"),
            Some(json!({"city": "London"})),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{updated}");
    assert_eq!(updated["name"], "Ada");
    assert_eq!(updated["city"], "London");
    assert!(updated["updatedAt"].as_str().unwrap() > created["updatedAt"].as_str().unwrap());
    eventually("the update to reach the local store", || {
        local
            .get("customers", &uid)
            .is_some_and(|d| d["city"] == "London")
    })
    .await;
    let (_, on_v1) = b.get(&format!("/v1/customer/{uid}")).await;
    assert_eq!(on_v1, updated);

    // Delete on /v1: gone from the cloud store too.
    let (code, _) = b
        .call(Method::DELETE, &format!("/v1/customer/{uid}"), None)
        .await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    eventually("the delete to reach the cloud store", || {
        cloud.get("customers", &uid).is_none()
    })
    .await;
    let (code, err) = b.get(&format!("/v2/customer/{uid}")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], "not_found");

    // The other way round: create and delete on /v2.
    let (code, grace) = b
        .call(Method::POST, "/v2/customer", Some(json!({"name": "Grace"})))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let gid = grace["uid"].as_str().unwrap().to_string();
    eventually("the /v2 create to reach local", || {
        local.get("customers", &gid).is_some()
    })
    .await;
    let (code, _) = b
        .call(Method::DELETE, &format!("/v2/customer/{gid}"), None)
        .await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    eventually("the /v2 delete to reach local", || {
        local.get("customers", &gid).is_none()
    })
    .await;
    let (code, _) = b
        .call(Method::DELETE, &format!("/v2/customer/{gid}"), None)
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a second delete finds nothing");
    let (code, _) = b
        .call(
            Method::PUT,
            &format!("/v1/customer/{gid}"),
            Some(json!({"a": 1})),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "PUT does not create");

    // Lists page through everything with the cursor, on both APIs; the general form and the
    // `customer` alias serve the same collection.
    let mut ids = Vec::new();
    for i in 0..5 {
        let (code, v) = b
            .call(Method::POST, "/v1/records/customers", Some(json!({"n": i})))
            .await;
        assert_eq!(code, StatusCode::CREATED);
        ids.push(v["uid"].as_str().unwrap().to_string());
    }
    ids.sort();
    for api in ["v1", "v2"] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let started = Instant::now();
        loop {
            let path = match &cursor {
                Some(c) => format!("/{api}/customers?limit=2&cursor={c}"),
                None => format!("/{api}/customers?limit=2"),
            };
            let (code, page) = b.get(&path).await;
            assert_eq!(code, StatusCode::OK, "{page}");
            for r in page["records"].as_array().unwrap() {
                assert_eq!(r["doc"]["uid"], r["id"]);
                seen.push(r["id"].as_str().unwrap().to_string());
            }
            match page["next"].as_str() {
                Some(n) => cursor = Some(n.to_string()),
                None if seen.len() < ids.len() && api == "v2" => {
                    // The cloud side may still be receiving the creates: list again.
                    assert!(started.elapsed() < common::DEADLINE, "{api} lists {seen:?}");
                    seen.clear();
                    cursor = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => break,
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ids, "{api} lists every record once");
    }
    let (code, one) = b.get(&format!("/v2/records/customer/{}", ids[0])).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(one["uid"], ids[0].as_str());
    b.stop().await;
}

/// Prepares `a` only on local, `b` only on cloud, and `x` on both (cloud's edit is newer).
fn prepare_differences(local: &TestStore, cloud: &TestStore, c: &str) {
    let t = now_ms() - 60_000;
    local.put(
        c,
        "a",
        &json!({"name": "only local", "updatedAt": format_ts(t)}),
    );
    cloud.put(
        c,
        "b",
        &json!({"name": "only cloud", "updatedAt": format_ts(t)}),
    );
    local.put(
        c,
        "x",
        &json!({"name": "older", "updatedAt": format_ts(t + 1)}),
    );
    cloud.put(
        c,
        "x",
        &json!({"name": "newer", "updatedAt": format_ts(t + 2)}),
    );
}

fn names(store: &TestStore, c: &str) -> Vec<(String, String)> {
    ["a", "b", "x"]
        .iter()
        .filter_map(|id| {
            store.get(c, id).map(|d| {
                (
                    id.to_string(),
                    d["name"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sync_mode_repairs_prepared_differences_its_way() {
    // (mode as sent, via POST?, expected local, expected cloud, to_local, to_cloud, del_local, del_cloud)
    type Want = (
        &'static str,
        bool,
        Vec<(String, String)>,
        Vec<(String, String)>,
        [u64; 4],
    );
    let cases: Vec<Want> = vec![
        (
            "both",
            true,
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            [2, 1, 0, 0],
        ),
        (
            "both-ways",
            false,
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            [2, 1, 0, 0],
        ),
        (
            "local-to-cloud",
            true,
            pairs(&[("a", "only local"), ("x", "older")]),
            // x: cloud's newer edit wins, and this mode may not write it to local.
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            [0, 1, 0, 0],
        ),
        (
            "cloud-to-local",
            false,
            pairs(&[("a", "only local"), ("b", "only cloud"), ("x", "newer")]),
            pairs(&[("b", "only cloud"), ("x", "newer")]),
            [2, 0, 0, 0],
        ),
        (
            "overwrite-local",
            true,
            pairs(&[("b", "only cloud"), ("x", "newer")]),
            pairs(&[("b", "only cloud"), ("x", "newer")]),
            [2, 0, 1, 0],
        ),
        (
            "overwrite-cloud",
            false,
            pairs(&[("a", "only local"), ("x", "older")]),
            pairs(&[("a", "only local"), ("x", "older")]),
            [0, 2, 0, 1],
        ),
    ];
    for (mode, post, want_local, want_cloud, counts) in cases {
        let local = TestStore::new(Kind::Sqlite);
        let cloud = redis_db(38);
        let c = collection("mode");
        let dir = data_dir();
        // No listeners here: the differences must wait for the pass.
        let b = ApiBridge::start(
            config(&local, &cloud, &[&c], Mode::Both, dir.path()),
            dir,
            false,
        )
        .await;
        prepare_differences(&local, &cloud, &c);
        let (code, reply) = if post {
            b.call(Method::POST, "/api/sync", Some(json!({ "mode": mode })))
                .await
        } else {
            b.get(&format!("/api/sync/{mode}")).await
        };
        assert_eq!(code, StatusCode::OK, "{mode}: {reply}");
        let s = &reply["summary"];
        let got = [
            s["copied_to_local"].as_u64().unwrap(),
            s["copied_to_cloud"].as_u64().unwrap(),
            s["deleted_local"].as_u64().unwrap(),
            s["deleted_cloud"].as_u64().unwrap(),
        ];
        assert_eq!(got, counts, "{mode}: {reply}");
        assert!(s["full"].as_bool().unwrap());
        assert!(
            reply["pass"]["id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        assert_eq!(names(&local, &c), want_local, "{mode}: local");
        assert_eq!(names(&cloud, &c), want_cloud, "{mode}: cloud");
        if mode.starts_with("both") {
            let conflicts = s["conflicts"].as_array().unwrap();
            assert_eq!(conflicts.len(), 1, "{reply}");
            assert_eq!(conflicts[0]["id"], "x");
            assert_eq!(conflicts[0]["winner"], "cloud");
        }
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pass_while_one_runs_gets_409_with_the_running_id() {
    let local = TestStore::new(Kind::Sqlite);
    let cloud = redis_db(39);
    let c = collection("busy");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.sync.batch_size = 5; // many small rounds: a slow pass
    let b = Arc::new(ApiBridge::start(cfg, dir, false).await);
    local.raw(&[&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
         INSERT INTO \"{c}\" (id, doc, updated_at) SELECT 'r' || i, json_object('i', i), \
         strftime('%Y-%m-%dT%H:%M:%fZ','now') FROM n"
    )]);
    let first = {
        let b = b.clone();
        tokio::spawn(async move {
            b.call(
                Method::POST,
                "/api/sync",
                Some(json!({"mode": "local-to-cloud"})),
            )
            .await
        })
    };
    let mut running_id = None;
    let started = Instant::now();
    while running_id.is_none() {
        let (_, st) = b.get("/api/sync/status").await;
        running_id = st["running_pass"]["id"].as_str().map(str::to_string);
        assert!(
            started.elapsed() < common::DEADLINE && !first.is_finished(),
            "the pass never showed as running"
        );
    }
    let running_id = running_id.unwrap();
    let (code, busy) = b
        .call(Method::POST, "/api/sync", Some(json!({"mode": "both"})))
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{busy}");
    assert_eq!(busy["error"], "pass_running");
    assert_eq!(busy["pass_id"].as_str(), Some(running_id.as_str()));
    let (code, busy) = b.get("/api/sync/both").await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(busy["pass_id"].as_str(), Some(running_id.as_str()));

    let (code, done) = first.await.unwrap();
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["pass"]["id"].as_str(), Some(running_id.as_str()));
    assert_eq!(done["summary"]["copied_to_cloud"], 3000);
    assert_eq!(cloud.count(&c), 3000);
    let (_, st) = b.get("/api/sync/status").await;
    assert!(st.get("running_pass").is_none());
    assert_eq!(
        st["last_pass"]["pass"]["id"].as_str(),
        Some(running_id.as_str())
    );
    // Free again.
    let (code, _) = b.get("/api/sync/both").await;
    assert_eq!(code, StatusCode::OK);
    Arc::try_unwrap(b).ok().expect("sole owner").stop().await;
}

fn counter(status: &Value, name: &str, side: &str) -> u64 {
    status["counters"][name][side].as_u64().unwrap()
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_follow_what_the_bridge_does() {
    let local = TestStore::new(Kind::Sqlite);
    let cloud = redis_db(40);
    let c = collection("status");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.sync.schedule = Some("*/1 * * * * *".into()); // every second
    let b = ApiBridge::start(cfg, dir, true).await;

    let (code, st) = b.get("/api/sync/status").await;
    assert_eq!(code, StatusCode::OK, "{st}");
    for side in ["local", "cloud"] {
        assert_eq!(st["stores"][side]["connected"], true, "{st}");
        assert_eq!(st["stores"][side]["listening"], true, "{st}");
    }
    assert!(!st["stores"]["cloud"]["store"].as_str().unwrap().is_empty());
    assert!(st["last_sweep"]["started_at"].is_string(), "{st}");
    assert_eq!(st["schedule"], "*/1 * * * * *");
    assert!(st["next_run"].is_string());
    let seen_before = counter(&st, "changes_seen", "local");
    let applied_before = counter(&st, "applied", "cloud");

    let (code, _) = b
        .call(
            Method::POST,
            &format!("/v1/records/{c}"),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    until(&b, "/api/sync/status", "counters to move", |_, st| {
        counter(st, "applied", "cloud") == applied_before + 1
            && counter(st, "changes_seen", "local") > seen_before
            && st["stores"]["local"]["lag_ms"].is_i64()
    })
    .await;
    let (_, st) = b.get("/api/sync/status").await;
    assert_eq!(
        counter(&st, "applied", "local"),
        0,
        "nothing was written to local"
    );
    // The offline switch is off; the collection's own figures count the write.
    assert_eq!(st["paused"], false, "{st}");
    assert_eq!(st["pending"], 0, "{st}");
    let col = &st["by_collection"][&c];
    assert_eq!(
        (
            col["synced"].as_u64(),
            col["pending"].as_i64(),
            col["failed"].as_i64()
        ),
        (Some(1), Some(0), Some(0)),
        "{st}"
    );
    assert!(
        col["failures"].as_array().is_some_and(|f| f.is_empty()),
        "{st}"
    );

    let resp = b
        .http
        .get(format!("{}/metrics", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert_eq!(
        metric(&text, "syncbridge_applied_total{side=\"cloud\"}"),
        applied_before + 1
    );
    assert_eq!(metric(&text, "syncbridge_listener_up{side=\"local\"}"), 1);
    assert_eq!(metric(&text, "syncbridge_paused"), 0);

    // The schedule runs passes on its own, through the same guard as the API.
    until(&b, "/api/sync/status", "a scheduled pass", |_, st| {
        st["last_pass"]["pass"]["trigger"] == "schedule"
    })
    .await;
    let (code, h) = b.get("/healthz").await;
    assert_eq!((code, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_route_but_healthz_needs_it() {
    let local = TestStore::new(Kind::Sqlite);
    let cloud = redis_db(41);
    let c = collection("auth");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.api.token = Some("s3cret-token".into());
    let b = ApiBridge::start(cfg, dir, true).await;
    let anon = Client::new();
    let wrong = |path: &str| anon.get(format!("{}{path}", b.base)).bearer_auth("nope");
    for path in [
        "/api/sync/status",
        "/metrics",
        "/openapi.json",
        &format!("/v1/records/{c}"),
        "/api/sync/both",
        &format!("/api/replicate/{c}/pull"),
        &format!("/api/replicate/{c}/stream"),
        "/api/replicate/clients",
    ] {
        let r = anon.get(format!("{}{path}", b.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(
            wrong(path).send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let r = anon
        .post(format!("{}/v1/records/{c}", b.base))
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for path in ["/api/sync/pause", "/api/sync/resume"] {
        let r = anon.post(format!("{}{path}", b.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // A replication push without the token writes nothing.
    let r = anon
        .post(format!("{}/api/replicate/{c}/push", b.base))
        .json(&json!({"changes": [{"id": "p1", "doc": {"a": 1, "updatedAt": "2026-11-30T10:00:00.000Z"}, "assumed": null}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The browser pages themselves open without it (their data calls carry it).
    for path in ["/demo", "/client/syncbridge.js"] {
        let r = anon.get(format!("{}{path}", b.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(
        b.get("/api/sync/status").await.1["paused"],
        false,
        "an unauthorized pause pauses nothing"
    );
    assert_eq!(local.count(&c), 0, "an unauthorized write writes nothing");
    assert_eq!(
        anon.get(format!("{}/healthz", b.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // With the token (ApiBridge::call sends it) everything works.
    assert_eq!(b.get("/api/sync/status").await.0, StatusCode::OK);
    assert_eq!(b.get("/openapi.json").await.0, StatusCode::OK);
    let (code, _) = b
        .call(
            Method::POST,
            &format!("/v1/records/{c}"),
            Some(json!({"a": 1})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, pulled) = b.get(&format!("/api/replicate/{c}/pull")).await;
    assert_eq!(code, StatusCode::OK, "{pulled}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_json_error_and_writes_nothing() {
    let local = TestStore::new(Kind::Sqlite);
    let cloud = redis_db(42);
    let c = collection("bad");
    let dir = data_dir();
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, dir.path());
    cfg.api.body_limit = 4096;
    let b = ApiBridge::start(cfg, dir, true).await;
    let http = Client::new();
    let raw = |method: Method, path: &str, ctype: Option<&str>, body: String| {
        let mut r = http.request(method, format!("{}{path}", b.base)).body(body);
        if let Some(t) = ctype {
            r = r.header("content-type", t);
        }
        r
    };
    let json_ct = Some("application/json");
    let rec = format!("/v1/records/{c}");
    let cases = vec![
        (
            "malformed JSON",
            raw(Method::POST, &rec, json_ct, "{\"a\":".into()),
            400,
            "bad_json",
        ),
        (
            "array body",
            raw(Method::POST, &rec, json_ct, "[1,2]".into()),
            422,
            "bad_body",
        ),
        (
            "string body",
            raw(Method::POST, &rec, json_ct, "\"x\"".into()),
            422,
            "bad_body",
        ),
        (
            "no content type",
            raw(Method::POST, &rec, None, "{}".into()),
            415,
            "not_json",
        ),
        (
            "oversized body",
            raw(
                Method::POST,
                &rec,
                json_ct,
                format!("{{\"a\":\"{}\"}}", "x".repeat(5000)),
            ),
            413,
            "body_too_large",
        ),
        (
            "unknown collection",
            raw(Method::POST, "/v1/records/nope", json_ct, "{}".into()),
            404,
            "not_found",
        ),
        (
            "unknown API",
            raw(Method::GET, "/v9/customers", None, String::new()),
            404,
            "not_found",
        ),
        (
            "bad id",
            raw(Method::GET, &format!("{rec}/a%20b"), None, String::new()),
            400,
            "bad_id",
        ),
        (
            "bad id on PUT",
            raw(Method::PUT, &format!("{rec}/a*b"), json_ct, "{}".into()),
            400,
            "bad_id",
        ),
        (
            "id too long",
            raw(
                Method::DELETE,
                &format!("{rec}/{}", "x".repeat(200)),
                None,
                String::new(),
            ),
            400,
            "bad_id",
        ),
        (
            "bad limit",
            raw(Method::GET, &format!("{rec}?limit=0"), None, String::new()),
            400,
            "bad_limit",
        ),
        (
            "limit not a number",
            raw(
                Method::GET,
                &format!("{rec}?limit=ten"),
                None,
                String::new(),
            ),
            400,
            "bad_query",
        ),
        (
            "bad cursor",
            raw(
                Method::GET,
                &format!("{rec}?cursor=zz"),
                None,
                String::new(),
            ),
            400,
            "bad_cursor",
        ),
        (
            "unknown mode",
            raw(Method::GET, "/api/sync/sideways", None, String::new()),
            400,
            "bad_mode",
        ),
        (
            "unknown mode in body",
            raw(
                Method::POST,
                "/api/sync",
                json_ct,
                "{\"mode\":\"up\"}".into(),
            ),
            422,
            "bad_body",
        ),
        (
            "sync body not an object",
            raw(Method::POST, "/api/sync", json_ct, "7".into()),
            422,
            "bad_body",
        ),
        (
            "unknown route",
            raw(Method::GET, "/nowhere", None, String::new()),
            404,
            "not_found",
        ),
        (
            "wrong method",
            raw(Method::PATCH, &rec, json_ct, "{}".into()),
            405,
            "method_not_allowed",
        ),
        (
            "missing record",
            raw(Method::PUT, &format!("{rec}/ghost"), json_ct, "{}".into()),
            404,
            "not_found",
        ),
    ];
    for (what, req, want, code) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "{what}");
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {body}"
        );
    }
    assert_eq!(local.count(&c), 0, "nothing half-written");
    assert_eq!(cloud.count(&c), 0);
    // A value in the store that is not a record is reported, not a crash.
    cloud.raw(&["SET", &format!("{c}:junk"), "not json"]);
    let (code, body) = b.get(&format!("/v2/records/{c}/junk")).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_record"))
    );
    let (code, _) = b.get("/healthz").await;
    assert_eq!(code, StatusCode::OK, "the bridge keeps running");
    b.stop().await;
}
