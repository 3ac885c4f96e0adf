//! The fault test: the real `syncbridge` binary between real stores, under a seeded random
//! workload written directly to both stores at once, while the bridge is SIGKILLed and
//! restarted and the Redis and PostgreSQL servers are stopped and started under it. At the end
//! the bridge settles, one sweep runs, and both stores must be identical, record for record, and
//! equal to what last-writer-wins predicts from the workload's own log.
//!
//! The seed is printed; replay one with `SYNCBRIDGE_FAULT_SEED=<seed>`. `SYNCBRIDGE_FAULT_RUNS`
//! sets how many seeds a run tries (default 2).
//!
//! Key classes keep the prediction exact: *contended* keys are upserted from both sides (never
//! deleted), so LWW on `updatedAt` decides them; *owned* keys are upserted and deleted by one
//! side only, so their last operation decides them. (A delete racing an edit on the other side
//! is decided by the delete's time, which a Redis `DEL` does not carry: that case is covered by
//! the policy's unit tests, not predicted here.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use syncbridge::record::{format_ts, now_ms, parse_ts};
use tokio::sync::RwLock;

const COLLECTION: &str = "faulty";
const CONTENDED: usize = 40;
const OWNED: usize = 25;

/// A server the test can stop and start (Redis or PostgreSQL), or an embedded SQLite file.
#[derive(Clone)]
enum Server {
    Redis { dir: PathBuf, port: u16 },
    Postgres { dir: PathBuf, port: u16 },
    Sqlite { file: PathBuf },
}

fn script(args: &[&str]) {
    let status = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stores.sh"))
        .args(args)
        .status()
        .expect("scripts/stores.sh runs");
    assert!(status.success(), "scripts/stores.sh {args:?} failed");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    fn start(&self) {
        match self {
            Server::Redis { dir, port } => {
                script(&["start_redis", dir.to_str().unwrap(), &port.to_string()])
            }
            Server::Postgres { dir, port } => {
                script(&["start_pg", dir.to_str().unwrap(), &port.to_string()])
            }
            Server::Sqlite { .. } => {}
        }
    }

    fn stop(&self) {
        match self {
            Server::Redis { dir, .. } => script(&["stop_redis", dir.to_str().unwrap()]),
            Server::Postgres { dir, .. } => script(&["stop_pg", dir.to_str().unwrap()]),
            Server::Sqlite { .. } => {}
        }
    }

    fn uri(&self) -> String {
        match self {
            Server::Redis { port, .. } => format!("redis://127.0.0.1:{port}/0"),
            Server::Postgres { port, .. } => {
                format!("postgres://postgres@127.0.0.1:{port}/postgres")
            }
            Server::Sqlite { file } => format!("sqlite://{}", file.display()),
        }
    }

    fn restartable(&self) -> bool {
        !matches!(self, Server::Sqlite { .. })
    }
}

/// The application's own client: writes straight to a store, knowing nothing of syncbridge.
enum Client {
    Redis(redis::aio::ConnectionManager),
    Sql(AnyPool, bool),
}

impl Client {
    async fn connect(server: &Server) -> Client {
        match server {
            Server::Redis { .. } => {
                let client = redis::Client::open(server.uri()).unwrap();
                Client::Redis(client.get_connection_manager().await.unwrap())
            }
            _ => {
                sqlx::any::install_default_drivers();
                let pg = matches!(server, Server::Postgres { .. });
                let pool = sqlx::any::AnyPoolOptions::new()
                    .max_connections(2)
                    .connect(&server.uri())
                    .await
                    .unwrap();
                if !pg {
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                Client::Sql(pool, pg)
            }
        }
    }

    /// One write; retried until the store takes it (the orchestrator only stops a server while
    /// no write is in flight, but a connection can need a moment to come back afterwards).
    async fn write(&self, key: &str, value: Option<&Value>) {
        for attempt in 0.. {
            let result: anyhow::Result<()> = match (self, value) {
                (Client::Redis(c), Some(v)) => {
                    let mut c = c.clone();
                    c.set::<_, _, ()>(format!("{COLLECTION}:{key}"), v.to_string())
                        .await
                        .map_err(Into::into)
                }
                (Client::Redis(c), None) => {
                    let mut c = c.clone();
                    c.del::<_, ()>(format!("{COLLECTION}:{key}"))
                        .await
                        .map_err(Into::into)
                }
                (Client::Sql(pool, pg), Some(v)) => {
                    let (id, doc, ts) = if *pg {
                        ("$1", "$2::jsonb", "$3::timestamptz")
                    } else {
                        ("?1", "?2", "?3")
                    };
                    let sql = format!(
                        "INSERT INTO {COLLECTION} (id, doc, updated_at) VALUES ({id}, {doc}, {ts}) \
                         ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                    );
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(key.to_string())
                        .bind(v.to_string())
                        .bind(v["updatedAt"].as_str().unwrap().to_string())
                        .execute(pool)
                        .await
                        .map(|_| ())
                        .map_err(Into::into)
                }
                (Client::Sql(pool, pg), None) => sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {COLLECTION} WHERE id = {}",
                    if *pg { "$1" } else { "?1" }
                )))
                .bind(key.to_string())
                .execute(pool)
                .await
                .map(|_| ())
                .map_err(Into::into),
            };
            match result {
                Ok(()) => return,
                Err(e) if attempt < 200 => {
                    if attempt == 0 {
                        eprintln!("workload write to {key} failed ({e}); retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("workload write to {key} keeps failing: {e}"),
            }
        }
    }

    /// Every record: id -> (value, updatedAt ms).
    async fn dump(&self) -> BTreeMap<String, (String, i64)> {
        let mut out = BTreeMap::new();
        match self {
            Client::Redis(c) => {
                let mut c = c.clone();
                let keys: Vec<String> = c.keys(format!("{COLLECTION}:*")).await.unwrap();
                for k in keys {
                    let text: String = c.get(&k).await.unwrap();
                    let doc: Value = serde_json::from_str(&text).unwrap();
                    let id = k[COLLECTION.len() + 1..].to_string();
                    out.insert(
                        id,
                        (
                            doc["v"].as_str().unwrap().to_string(),
                            parse_ts(doc["updatedAt"].as_str().unwrap()).unwrap(),
                        ),
                    );
                }
            }
            Client::Sql(pool, pg) => {
                let ts = if *pg {
                    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
                } else {
                    "updated_at"
                };
                let doc = if *pg { "doc::text" } else { "doc" };
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT id, {doc} AS doc, {ts} AS ts FROM {COLLECTION}"
                )))
                .fetch_all(pool)
                .await
                .unwrap();
                for r in rows {
                    let doc: Value = serde_json::from_str(&r.get::<String, _>("doc")).unwrap();
                    out.insert(
                        r.get::<String, _>("id"),
                        (
                            doc["v"].as_str().unwrap().to_string(),
                            parse_ts(&r.get::<String, _>("ts")).unwrap(),
                        ),
                    );
                }
            }
        }
        out
    }
}

/// The bridge as a child process, its log appended to one file across restarts.
struct Bridge {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Bridge {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_syncbridge"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env("SYNCBRIDGE_LOG_FORMAT", "json");
        cmd
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("bridge starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(c.id());
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "bridge did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                c.wait().unwrap().success(),
                "bridge exited with an error; see {}",
                self.log.display()
            );
        }
    }
}

/// A test that fails mid-run must not leave its bridge running to load every test after it.
impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sigterm(pid: u32) {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// A fresh `updatedAt`: the wall clock, but always after the last one handed out, so no two
/// writes of the workload tie.
fn stamp(clock: &AtomicI64) -> i64 {
    let next = |last: i64| now_ms().max(last + 1);
    let last = clock
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(next(l)))
        .unwrap();
    next(last).max(last + 1)
}

#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    kills: AtomicU64,
    restarts: AtomicU64,
}

/// The workload's log, reduced to what each key must end as.
#[derive(Default)]
struct Expected {
    /// key -> (updatedAt, value) of the newest upsert, for contended keys.
    contended: BTreeMap<String, (i64, String)>,
    /// key -> last operation (`None` = deleted), for owned keys.
    owned: BTreeMap<String, Option<(i64, String)>>,
}

async fn run_seed(seed: u64, local: Server, cloud: Server, work: &Path) {
    println!("fault test seed {seed}: replay with SYNCBRIDGE_FAULT_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    local.start();
    cloud.start();
    let data = work.join("data");
    let config = work.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[local]\nuri = \"{}\"\n[cloud]\nuri = \"{}\"\n[sync]\ncollections = [\"{COLLECTION}\"]\n\
             sweep_interval_secs = 5\nfull_sweep_interval_secs = 10\nsweep_margin_secs = 1\nretry_base_ms = 200\nretry_max_secs = 2\n[api]\nenabled = false\n",
            data.display(),
            local.uri(),
            cloud.uri()
        ),
    )
    .unwrap();
    let mut bridge = Bridge {
        config,
        log: work.join("bridge.log"),
        child: None,
    };
    bridge.start();
    // The bridge creates the SQL table; wait for it before the workload writes.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&bridge.log)
        .unwrap_or_default()
        .contains("syncbridge running")
    {
        assert!(
            Instant::now() < deadline,
            "bridge did not start; see {}",
            bridge.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let clients = Arc::new([Client::connect(&local).await, Client::connect(&cloud).await]);
    let gates = Arc::new([RwLock::new(()), RwLock::new(())]);
    let clock = Arc::new(AtomicI64::new(0));
    let counts = Arc::new(Counts::default());
    let ops_per_side = 1500;

    // Two writers, one per side, each with its own seeded stream of operations.
    let mut writers = Vec::new();
    for side in 0..2 {
        let (clients, gates, clock, counts) = (
            clients.clone(),
            gates.clone(),
            clock.clone(),
            counts.clone(),
        );
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(side as u64));
        writers.push(tokio::spawn(async move {
            let mut log: Vec<(String, Option<(i64, String)>)> = Vec::new();
            let owner = if side == 0 { "l" } else { "r" };
            // Cold records: written once now, deleted (some of them) at the very end, while the
            // bridge is down, long after a sweep last saw them change.
            for i in 0..10 {
                let (key, at) = (format!("{owner}cold{i}"), stamp(&clock));
                let doc = json!({ "v": format!("{owner}-cold"), "updatedAt": format_ts(at) });
                clients[side].write(&key, Some(&doc)).await;
                log.push((key, Some((at, format!("{owner}-cold")))));
                counts.writes.fetch_add(1, Ordering::Relaxed);
            }
            for n in 0..ops_per_side {
                let contended = rng.random_bool(0.5);
                let key = if contended {
                    format!("c{}", rng.random_range(0..CONTENDED))
                } else {
                    format!("{owner}{}", rng.random_range(0..OWNED))
                };
                let delete = !contended && rng.random_bool(0.25);
                let _open = gates[side].read().await;
                let at = stamp(&clock);
                let value = format!("{owner}-{n}");
                if delete {
                    clients[side].write(&key, None).await;
                    log.push((key, None));
                } else {
                    let doc = json!({ "v": value, "updatedAt": format_ts(at) });
                    clients[side].write(&key, Some(&doc)).await;
                    log.push((key, Some((at, value))));
                }
                counts.writes.fetch_add(1, Ordering::Relaxed);
                drop(_open);
                tokio::time::sleep(Duration::from_millis(rng.random_range(2..10))).await;
            }
            for i in 0..10 {
                if rng.random_bool(0.5) {
                    let key = format!("{owner}cold{i}");
                    let _open = gates[side].read().await;
                    clients[side].write(&key, None).await;
                    log.push((key, None));
                    counts.writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            log
        }));
    }

    // Faults while the workload runs: kills, and each restartable server stopped and started once.
    let mut faults: Vec<(u64, &str)> = (0..3)
        .map(|_| (rng.random_range(500..9000), "kill"))
        .collect();
    if local.restartable() {
        faults.push((rng.random_range(1000..5000), "local-server"));
    }
    if cloud.restartable() {
        faults.push((rng.random_range(1000..5000), "cloud-server"));
    }
    faults.sort();
    let began = Instant::now();
    for (at, what) in faults {
        let wait = Duration::from_millis(at).saturating_sub(began.elapsed());
        tokio::time::sleep(wait).await;
        match what {
            "kill" => {
                bridge.kill();
                counts.kills.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..1500))).await;
                bridge.start();
            }
            side => {
                let (i, server) = if side == "local-server" {
                    (0, &local)
                } else {
                    (1, &cloud)
                };
                // No write in flight while the server goes down: an acknowledged write is durable.
                let _closed = gates[i].write().await;
                server.stop();
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
                server.start();
                counts.restarts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // A last kill while the workload's final tenth is written: those changes, deletes included,
    // are the records' final states, and only a restarted bridge can carry them over.
    while counts.writes.load(Ordering::Relaxed) < 20 + (2 * ops_per_side) * 9 / 10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        counts.writes.load(Ordering::Relaxed) < 20 + 2 * ops_per_side,
        "the workload ended before the final outage began: the test no longer covers it"
    );
    bridge.kill();
    counts.kills.fetch_add(1, Ordering::Relaxed);
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.unwrap());
    }
    bridge.start();

    let mut expected = Expected::default();
    for log in logs {
        for (key, op) in log {
            if key.starts_with('c') {
                let (at, value) = op.expect("contended keys are never deleted");
                let e = expected.contended.entry(key).or_insert((at, value.clone()));
                if at > e.0 {
                    *e = (at, value);
                }
            } else {
                expected.owned.insert(key, op);
            }
        }
    }
    let mut want: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for (k, (at, v)) in &expected.contended {
        want.insert(k.clone(), (v.clone(), *at));
    }
    for (k, op) in &expected.owned {
        if let Some((at, v)) = op {
            want.insert(k.clone(), (v.clone(), *at));
        }
    }

    // Let the running bridge settle on its own.
    let settle = Instant::now();
    let mut converged = false;
    while settle.elapsed() < Duration::from_secs(60) {
        if clients[0].dump().await == want && clients[1].dump().await == want {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settle_ms = settle.elapsed().as_millis();
    bridge.stop();
    let log = std::fs::read_to_string(&bridge.log).unwrap();
    let final_counters: Value = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|l| {
            l["fields"]["counters"]
                .as_str()
                .and_then(|c| serde_json::from_str(c).ok())
        })
        .unwrap_or(Value::Null);

    // One sweep, then the verdict.
    let sweep = bridge
        .command(&["sync", "--mode", "both"])
        .output()
        .unwrap();
    let sweep_out = String::from_utf8_lossy(&sweep.stdout).to_string();
    assert!(
        sweep.status.success(),
        "final sweep failed: {sweep_out}\n{}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    let (l, c) = (clients[0].dump().await, clients[1].dump().await);
    let dead = Command::new("sqlite3")
        .arg(data.join("state.db"))
        .arg("SELECT count(*) FROM retry_queue WHERE dead = 1")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "seed {seed}: writes {}, kills {}, server restarts {}, records compared {}, converged before the final sweep: {converged} \
         ({settle_ms} ms after the workload), retries (last run) {}, store errors (last run) {}, dead letters {dead}, final sweep: {}",
        counts.writes.load(Ordering::Relaxed),
        counts.kills.load(Ordering::Relaxed),
        counts.restarts.load(Ordering::Relaxed),
        want.len(),
        final_counters["retries"],
        final_counters["errors"],
        sweep_out.lines().next().unwrap_or_default()
    );
    for (k, v) in &want {
        assert_eq!(l.get(k), Some(v), "seed {seed}: local {k}");
        assert_eq!(c.get(k), Some(v), "seed {seed}: cloud {k}");
    }
    assert_eq!(
        l.len(),
        want.len(),
        "seed {seed}: local holds records that should be gone: {:?}",
        l.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        c.len(),
        want.len(),
        "seed {seed}: cloud holds records that should be gone: {:?}",
        c.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert!(
        converged,
        "seed {seed}: the bridge did not converge by itself within 60 s (the final sweep had to repair)"
    );
    assert_eq!(
        dead, "0",
        "seed {seed}: nothing in this workload should be dead-lettered"
    );
    local.stop();
    cloud.stop();
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SYNCBRIDGE_FAULT_SEED") {
        return vec![s.parse().expect("SYNCBRIDGE_FAULT_SEED is a number")];
    }
    let runs: usize = std::env::var("SYNCBRIDGE_FAULT_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    (0..runs).map(|_| rand::random::<u32>() as u64).collect()
}

/// The run's directory (servers, bridge config, state, log); `SYNCBRIDGE_FAULT_KEEP=1` keeps it
/// for a post-mortem.
fn workdir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("SYNCBRIDGE_FAULT_KEEP").is_some() {
        dir.disable_cleanup(true);
        println!("fault test work directory: {}", dir.path().display());
    }
    // PostgreSQL runs as its own user and must reach its data directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_redis_converge_under_faults() {
    script(&["ensure_packages"]);
    for seed in seeds() {
        let work = workdir();
        let local = Server::Postgres {
            dir: work.path().join("pg"),
            port: free_port(),
        };
        let cloud = Server::Redis {
            dir: work.path().join("redis"),
            port: free_port(),
        };
        run_seed(seed, local, cloud, work.path()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_redis_converge_under_faults() {
    script(&["ensure_packages"]);
    for seed in seeds() {
        let work = workdir();
        let local = Server::Sqlite {
            file: work.path().join("local.db"),
        };
        let cloud = Server::Redis {
            dir: work.path().join("redis"),
            port: free_port(),
        };
        run_seed(seed, local, cloud, work.path()).await;
    }
}
