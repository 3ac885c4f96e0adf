//! Conflict policies end to end: both sides change one record while the bridge is down (so the
//! bridge sees a true conflict when it comes back), and each policy must leave both stores as it
//! promises. Runs on SQLite ↔ Redis and PostgreSQL ↔ Redis, with every write made through the
//! stores' own CLIs.

mod common;

use common::{Kind, TestBridge, TestStore, collection, config, data_dir, eventually, path};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use syncbridge::api::{self, ApiState};
use syncbridge::config::{ApiConfig, CollectionConfig};
use syncbridge::engine::conflicts::Resolution;
use syncbridge::engine::policy::{ConflictPolicy, MergePrefer, Mode};
use syncbridge::engine::scheduler::Passes;
use syncbridge::record::{Side, format_ts, now_ms};

/// What both sides hold: (name, city) or `None` when deleted.
type Fields = Option<(String, String)>;

fn fields(store: &TestStore, c: &str, id: &str) -> Fields {
    store.get(c, id).map(|d| {
        (
            d["name"].as_str().unwrap_or("").to_string(),
            d["city"].as_str().unwrap_or("").to_string(),
        )
    })
}

fn doc(name: &str, city: &str, at: i64) -> Value {
    json!({ "name": name, "city": city, "updatedAt": format_ts(at) })
}

#[derive(Clone, Copy, Debug)]
enum Edit {
    Name(&'static str, i64),
    City(&'static str, i64),
    Delete,
}

fn apply(store: &TestStore, c: &str, id: &str, base: (&str, &str), t0: i64, edit: Edit) {
    match edit {
        Edit::Name(n, dt) => store.put(c, id, &doc(n, base.1, t0 + dt)),
        Edit::City(city, dt) => store.put(c, id, &doc(base.0, city, t0 + dt)),
        Edit::Delete => store.delete(c, id),
    }
}

/// Runs one scenario under one policy: base synced, bridge stopped, both edits, bridge started;
/// returns what each side holds once the bridge has acted, and the bridge (still running).
async fn scenario(
    lk: Kind,
    policy: ConflictPolicy,
    local_edit: Edit,
    cloud_edit: Edit,
) -> (TestBridge, TestStore, TestStore, String, tempfile::TempDir) {
    let (local, cloud, c, dir) = (
        TestStore::new(lk),
        TestStore::new(Kind::Redis),
        collection("cf"),
        data_dir(),
    );
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: c.clone(),
        conflict: policy,
        merge_prefer: MergePrefer::Latest,
        ..Default::default()
    }];
    let t0 = now_ms() - 60_000;
    let bridge = TestBridge::start(cfg.clone()).await;
    local.put(&c, "r", &doc("A", "X", t0));
    eventually("the base to sync", || {
        fields(&cloud, &c, "r") == Some(("A".into(), "X".into()))
    })
    .await;
    bridge.stop().await;

    apply(&local, &c, "r", ("A", "X"), t0, local_edit);
    apply(&cloud, &c, "r", ("A", "X"), t0, cloud_edit);
    let bridge = TestBridge::start(cfg).await;
    (bridge, local, cloud, c, dir)
}

async fn expect_both(local: &TestStore, cloud: &TestStore, c: &str, want: Fields, what: &str) {
    eventually(&format!("{what}: both sides {want:?}"), || {
        fields(local, c, "r") == want && fields(cloud, c, "r") == want
    })
    .await;
}

fn f(name: &str, city: &str) -> Fields {
    Some((name.to_string(), city.to_string()))
}

/// Every automatic policy, every kind of conflict, as the README's table says.
async fn automatic_policies_end_as_documented(lk: Kind) {
    use ConflictPolicy::*;
    use Edit::*;
    let same_field = (Name("L", 10), Name("C", 20));
    let different_fields = (Name("L", 10), City("Y", 20));
    let edit_vs_delete = (Delete, Name("C", 20));
    let both_delete = (Delete, Delete);
    let cases: Vec<(ConflictPolicy, (Edit, Edit), Fields)> = vec![
        (Lww, same_field, f("C", "X")),
        (LocalWins, same_field, f("L", "X")),
        (CloudWins, same_field, f("C", "X")),
        (Merge, same_field, f("C", "X")),
        (Lww, different_fields, f("A", "Y")),
        (LocalWins, different_fields, f("L", "X")),
        (CloudWins, different_fields, f("A", "Y")),
        (Merge, different_fields, f("L", "Y")),
        // The local delete happens now, long after the cloud edit's updatedAt: it is the later write.
        (Lww, edit_vs_delete, None),
        (LocalWins, edit_vs_delete, None),
        (CloudWins, edit_vs_delete, f("C", "X")),
        (Merge, edit_vs_delete, None),
        (Lww, both_delete, None),
        (Merge, both_delete, None),
    ];
    for (policy, (l, c), want) in cases {
        let (bridge, local, cloud, coll, _dir) = scenario(lk, policy, l, c).await;
        expect_both(
            &local,
            &cloud,
            &coll,
            want.clone(),
            &format!("{policy:?} with local {l:?}, cloud {c:?}"),
        )
        .await;
        // The result holds: nothing flips back afterwards.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            fields(&local, &coll, "r"),
            want,
            "{policy:?} {l:?} {c:?}: local after settling"
        );
        assert_eq!(
            fields(&cloud, &coll, "r"),
            want,
            "{policy:?} {l:?} {c:?}: cloud after settling"
        );
        // Every conflict keeps its loser in the audit log (a double delete is no conflict).
        let audit = bridge.engine.conflicts.list(true, 10).await.unwrap();
        if matches!((l, c), (Delete, Delete)) {
            assert!(audit.is_empty(), "{audit:?}");
        } else {
            assert_eq!(audit.len(), 1, "{policy:?} {l:?} {c:?}: {audit:?}");
            assert_eq!(audit[0].policy, policy.as_str());
        }
        bridge.stop().await;
    }
}

/// `manual`: nothing is written, the conflict is parked with both versions, it survives a
/// restart, later edits update it, and it resolves through the HTTP API and the CLI.
async fn manual_conflicts_park_and_resolve(lk: Kind) {
    let (bridge, local, cloud, c, dir) = scenario(
        lk,
        ConflictPolicy::Manual,
        Edit::Name("L", 10),
        Edit::Name("C", 20),
    )
    .await;
    let engine = bridge.engine.clone();
    let mut parked = Vec::new();
    for _ in 0..200 {
        parked = engine.conflicts.list(false, 10).await.unwrap();
        if !parked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(parked.len(), 1, "one parked conflict");
    assert_eq!(parked[0].local.as_ref().unwrap()["name"], "L");
    assert_eq!(parked[0].cloud.as_ref().unwrap()["name"], "C");
    assert_eq!(
        fields(&local, &c, "r"),
        f("L", "X"),
        "manual writes nothing"
    );
    assert_eq!(fields(&cloud, &c, "r"), f("C", "X"));
    let status = engine.status().await.unwrap();
    assert_eq!(
        status.counters.conflict_outcomes.get("manual:parked"),
        Some(&1)
    );

    // A later edit on one side updates the parked conflict; it does not sync around it.
    cloud.put(&c, "r", &doc("C2", "X", now_ms()));
    eventually(
        "the parked conflict to follow the new cloud version",
        || {
            let p = futures::executor::block_on(engine.conflicts.list(false, 10)).unwrap();
            p.len() == 1 && p[0].cloud.as_ref().is_some_and(|d| d["name"] == "C2")
        },
    )
    .await;
    assert_eq!(fields(&local, &c, "r"), f("L", "X"));

    // It survives a restart.
    let mut cfg = config(&local, &cloud, &[&c], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: c.clone(),
        conflict: ConflictPolicy::Manual,
        merge_prefer: MergePrefer::Latest,
        ..Default::default()
    }];
    bridge.stop().await;
    let bridge = TestBridge::start(cfg.clone()).await;
    let parked = bridge.engine.conflicts.list(false, 10).await.unwrap();
    assert_eq!(parked.len(), 1, "still parked after a restart");
    let id = parked[0].id;

    // Resolved through the HTTP API: take local.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let api_cfg = ApiConfig {
        bind: "127.0.0.1:0".into(),
        ..ApiConfig::default()
    };
    let state = ApiState::open(
        bridge.engine.clone(),
        Arc::new(Passes::default()),
        None,
        &api_cfg,
    )
    .await
    .unwrap();
    let listener = api::bind(&api_cfg.bind).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(api::serve(listener, api::router(state), shutdown.clone()));
    let http = reqwest::Client::new();
    let listed: Value = http
        .get(format!("{base}/api/conflicts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["id"], id);
    let bad = http
        .post(format!("{base}/api/conflicts/{id}/resolve"))
        .json(&json!({"take": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let ok = http
        .post(format!("{base}/api/conflicts/{id}/resolve"))
        .json(&json!({"take": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "{:?}", ok.text().await);
    expect_both(&local, &cloud, &c, f("L", "X"), "resolved to local").await;
    let again = http
        .post(format!("{base}/api/conflicts/{id}/resolve"))
        .json(&json!({"take": "cloud"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        409,
        "a resolved conflict cannot be resolved twice"
    );
    let audit: Value = http
        .get(format!("{base}/api/conflicts?resolved=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit[0]["winner"], "local");
    assert_eq!(
        audit[0]["loser"]["name"], "C2",
        "the overwritten version is kept"
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();

    // A second conflict, resolved through the CLI with a document of its own.
    bridge.stop().await;
    local.put(&c, "r", &doc("L3", "X", now_ms()));
    cloud.put(&c, "r", &doc("C3", "X", now_ms() + 1));
    let bridge = TestBridge::start(cfg.clone()).await;
    eventually("a new parked conflict", || {
        futures::executor::block_on(bridge.engine.conflicts.list(false, 10))
            .unwrap()
            .len()
            == 1
    })
    .await;
    let id = bridge.engine.conflicts.list(false, 10).await.unwrap()[0].id;
    let toml = dir.path().join("bridge.toml");
    std::fs::write(
        &toml,
        format!(
            "data_dir = \"{}\"\n[local]\nuri = \"{}\"\n[cloud]\nuri = \"{}\"\n[sync]\ncollections = [\"{c}\"]\n[[collections]]\nname = \"{c}\"\nconflict = \"manual\"\n",
            dir.path().display(),
            local.uri,
            cloud.uri
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncbridge"))
            .args(args)
            .arg("--config")
            .arg(&toml)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(cli(&["conflicts", "list"]).contains(&format!("{c}/r")));
    cli(&[
        "conflicts",
        "resolve",
        &id.to_string(),
        "--doc",
        r#"{"name": "By hand", "city": "Z"}"#,
    ]);
    expect_both(&local, &cloud, &c, f("By hand", "Z"), "resolved by the CLI").await;
    assert!(cli(&["conflicts", "list"]).contains("no parked conflicts"));
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_redis_automatic_policies() {
    automatic_policies_end_as_documented(Kind::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_redis_automatic_policies() {
    automatic_policies_end_as_documented(Kind::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_redis_manual_conflicts() {
    manual_conflicts_park_and_resolve(Kind::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_redis_manual_conflicts() {
    manual_conflicts_park_and_resolve(Kind::Postgres).await
}

#[test]
fn sides_parse_for_the_cli() {
    assert_eq!("local".parse::<Side>().unwrap(), Side::Local);
    assert!("sideways".parse::<Side>().is_err());
    let _ = Resolution::Take(Side::Cloud);
}
