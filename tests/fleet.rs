//! The fleet test: many local databases, one cloud. 20 bridges run in-process, each with its own
//! SQLite file and its own data directory (so its own instance id), all against one PostgreSQL
//! database made fresh for the run. A seeded workload writes concurrently, straight to all 20
//! SQLite files and to PostgreSQL (as applications would, not through the bridges). Then every
//! SQLite file and the cloud table must be identical, record for record, and equal to what
//! last-writer-wins predicts from the workload's own log.
//!
//! Sweeps run only at start-up (before the workload): every change must travel through the
//! change-log listeners, so a bridge that took another's changes (a shared, destructively read
//! log) would leave the fleet diverged, not rescued by a sweep.
//!
//! The seed is printed; replay one with `SYNCBRIDGE_FLEET_SEED=<seed>`.
//! `SYNCBRIDGE_FLEET_OPS` sets the operations per writer (default 60).
//!
//! The prediction is exact by the key classes of `tests/faults.rs`: *contended* keys are
//! upserted by every writer (never deleted), so the greatest `updatedAt` wins; each writer also
//! *owns* one key that only it creates, updates and finally may delete, so its last operation
//! decides it. (A delete carries the time its store logged it, and a delete relayed through
//! the cloud carries the time of the relay: racing deletes against other writers' edits would
//! make the outcome depend on relay timing, which the policy's unit tests cover instead.)

mod common;

use common::{Kind, TestBridge, TestStore, config, data_dir, path};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use syncbridge::engine::policy::Mode;
use syncbridge::record::{format_ts, now_ms, parse_ts};

const COLLECTION: &str = "fleet";
const BRIDGES: usize = 20;
const CONTENDED: usize = 40;
/// How long the fleet may take to converge after the workload.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(90);

/// id -> (value, updatedAt ms): a store's whole collection, or the prediction.
type Rows = BTreeMap<String, (String, i64)>;

/// A fresh `updatedAt`: the wall clock, but always after the last one handed out, so no two
/// writes of the workload tie (as in `tests/faults.rs`).
fn stamp(clock: &AtomicI64) -> i64 {
    let next = |last: i64| now_ms().max(last + 1);
    let last = clock
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(next(l)))
        .unwrap();
    next(last).max(last + 1)
}

/// An application's connection to one store (a SQLite file or the PostgreSQL database).
struct Client {
    pool: AnyPool,
    pg: bool,
}

impl Client {
    async fn connect(uri: &str, pg: bool) -> Client {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(uri)
            .await
            .unwrap();
        if !pg {
            sqlx::query("PRAGMA busy_timeout = 10000")
                .execute(&pool)
                .await
                .unwrap();
        }
        Client { pool, pg }
    }

    async fn upsert(&self, id: &str, v: &str, at: i64) {
        let (i, d, t) = if self.pg {
            ("$1", "$2::jsonb", "$3::timestamptz")
        } else {
            ("?1", "?2", "?3")
        };
        let doc = json!({ "v": v, "updatedAt": format_ts(at) });
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {COLLECTION} (id, doc, updated_at) VALUES ({i}, {d}, {t}) \
             ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
        )))
        .bind(id.to_string())
        .bind(doc.to_string())
        .bind(format_ts(at))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn delete(&self, id: &str) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {COLLECTION} WHERE id = {}",
            if self.pg { "$1" } else { "?1" }
        )))
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn dump(&self) -> Rows {
        let (ts, doc) = if self.pg {
            (
                "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
                "doc::text",
            )
        } else {
            ("updated_at", "doc")
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, {doc} AS doc, {ts} AS ts FROM {COLLECTION}"
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| {
                let doc: Value = serde_json::from_str(&r.get::<String, _>("doc")).unwrap();
                (
                    r.get::<String, _>("id"),
                    (
                        doc["v"].as_str().unwrap_or("?").to_string(),
                        parse_ts(&r.get::<String, _>("ts")).unwrap(),
                    ),
                )
            })
            .collect()
    }
}

/// The records where `got` differs from `want`, one line each.
fn diff(name: &str, got: &Rows, want: &Rows) -> Vec<String> {
    let mut out = Vec::new();
    for id in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, w) = (got.get(id), want.get(id));
        if g != w {
            out.push(format!("{name} {id}: has {g:?}, expected {w:?}"));
        }
    }
    out
}

/// One writer's log: id -> its last operation on that id (`None` = deleted), with the
/// `updatedAt` of upserts.
type WriterLog = Vec<(String, Option<(i64, String)>)>;

/// One writer's seeded stream of operations against its store.
async fn write(
    writer: usize,
    client: Arc<Client>,
    clock: Arc<AtomicI64>,
    seed: u64,
    ops: usize,
) -> WriterLog {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(writer as u64));
    let mut log = Vec::new();
    let owned = format!("o{writer:02}");
    let mut owned_alive = false;
    let mut owned_deleted = false;
    for n in 0..ops {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..25))).await;
        if owned_deleted || rng.random_bool(0.6) {
            let id = format!("c{:02}", rng.random_range(0..CONTENDED));
            let at = stamp(&clock);
            let v = format!("w{writer}-{n}");
            client.upsert(&id, &v, at).await;
            log.push((id, Some((at, v))));
        } else if owned_alive && rng.random_bool(0.1) {
            // The delete's time is the store's; no later write of this writer can precede it.
            client.delete(&owned).await;
            log.push((owned.clone(), None));
            owned_deleted = true;
        } else {
            let at = stamp(&clock);
            let v = format!("w{writer}-{n}");
            client.upsert(&owned, &v, at).await;
            log.push((owned.clone(), Some((at, v))));
            owned_alive = true;
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_bridges_one_postgres_converge_on_last_writer_wins() {
    let seed: u64 = std::env::var("SYNCBRIDGE_FLEET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let ops: usize = std::env::var("SYNCBRIDGE_FLEET_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    println!("fleet test seed {seed}: replay with SYNCBRIDGE_FLEET_SEED={seed}");
    let started = Instant::now();
    let cloud = TestStore::fresh_database(Kind::Postgres);
    let db_name = cloud.uri.rsplit_once('/').unwrap().1.to_string();
    let locals: Vec<TestStore> = (0..BRIDGES).map(|_| TestStore::new(Kind::Sqlite)).collect();
    let dirs: Vec<_> = (0..BRIDGES).map(|_| data_dir()).collect();
    let mut bridges = Vec::new();
    for (local, dir) in locals.iter().zip(&dirs) {
        let mut cfg = config(local, &cloud, &[COLLECTION], Mode::Both, &path(dir));
        cfg.api.enabled = false;
        bridges.push(TestBridge::start(cfg).await);
    }
    let start_secs = started.elapsed().as_secs_f64();

    // Watches the cloud database's connections while the fleet works.
    let peak = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (peak, uri, db) = (peak.clone(), cloud.uri.clone(), db_name.clone());
        tokio::spawn(async move {
            let c = Client::connect(&uri, true).await;
            loop {
                let n: i64 =
                    sqlx::query("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                        .bind(db.clone())
                        .fetch_one(&c.pool)
                        .await
                        .unwrap()
                        .get(0);
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let mut clients = Vec::new();
    for l in &locals {
        clients.push(Arc::new(Client::connect(&l.uri, false).await));
    }
    clients.push(Arc::new(Client::connect(&cloud.uri, true).await));
    let clock = Arc::new(AtomicI64::new(0));
    let work_started = Instant::now();
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(w, c)| tokio::spawn(write(w, c.clone(), clock.clone(), seed, ops)))
        .collect();
    let mut want: Rows = BTreeMap::new();
    let (mut writes, mut deletes, mut contended_writes) = (0usize, 0usize, 0usize);
    for w in writers {
        for (id, op) in w.await.unwrap() {
            writes += 1;
            match op {
                None => {
                    deletes += 1;
                    want.remove(&id);
                }
                Some((at, v)) => {
                    if id.starts_with('c') {
                        contended_writes += 1;
                        // Greatest updatedAt wins, whoever wrote it.
                        if want.get(&id).is_none_or(|(_, t)| *t < at) {
                            want.insert(id, (v, at));
                        }
                    } else {
                        // Owned: one writer, in order; the last operation decides.
                        want.insert(id, (v, at));
                    }
                }
            }
        }
    }
    let work_secs = work_started.elapsed().as_secs_f64();

    // Wait until every store holds the prediction, then check it holds still.
    let settle_started = Instant::now();
    let mut problems;
    loop {
        problems = diff("cloud", &clients[BRIDGES].dump().await, &want);
        for (i, c) in clients[..BRIDGES].iter().enumerate() {
            problems.extend(diff(&format!("local{i:02}"), &c.dump().await, &want));
        }
        if problems.is_empty() || settle_started.elapsed() > CONVERGE_DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge_secs = settle_started.elapsed().as_secs_f64();
    if problems.is_empty() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        problems = diff("cloud", &clients[BRIDGES].dump().await, &want);
        for (i, c) in clients[..BRIDGES].iter().enumerate() {
            problems.extend(diff(&format!("local{i:02}"), &c.dump().await, &want));
        }
    }
    watcher.abort();

    let (mut applied, mut conflicts, mut echoes, mut stale) = (0, 0, 0, 0);
    for b in &bridges {
        let s = b.engine.stats.snapshot();
        applied += s.applied.local + s.applied.cloud;
        conflicts += s.conflicts.local + s.conflicts.cloud;
        echoes += s.echoes_suppressed;
        stale += s.stale_reverted;
    }
    println!(
        "fleet: {BRIDGES} bridges (SQLite each) + 1 PostgreSQL, seed {seed}: {writes} direct writes \
         ({contended_writes} to {CONTENDED} contended ids, {} of them overwritten by a newer write \
         elsewhere; {deletes} deletes) by {} writers in {work_secs:.1} s; {} records at the end; \
         converged {converge_secs:.1} s after the workload; bridges applied {applied} writes, \
         {conflicts} conditional-write conflicts, {stale} stale versions reverted, {echoes} echoes \
         suppressed; start-up of the fleet {start_secs:.1} s; peak PostgreSQL connections {} \
         (server max 300); total {:.1} s",
        contended_writes - want.keys().filter(|k| k.starts_with('c')).count(),
        BRIDGES + 1,
        want.len(),
        peak.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "seed {seed}: the fleet did not converge on the prediction within {CONVERGE_DEADLINE:?} \
         ({} differences):\n{}",
        problems.len(),
        problems
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for b in bridges {
        b.stop().await;
    }
    drop(clients);
    cloud.drop_database();
}
