//! Test kit shared by the integration suites: store URIs from `scripts/test.sh`, clients that
//! write to a store the way an application would (the stores' own CLIs, knowing nothing of
//! syncbridge), a bridge run in-process, and waiting for convergence.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncbridge::config::{Config, StoreConfig};
use syncbridge::engine::policy::Mode;
use syncbridge::engine::{Engine, pipeline};
use syncbridge::stores::mongo::convert;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for the stores to converge. Generous: tests check behaviour, not speed.
pub const DEADLINE: Duration = Duration::from_secs(15);

fn env_uri(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which starts Redis and PostgreSQL (MongoDB: see common::available)")
    })
}

/// A fresh, unique collection name, so tests sharing one server never see each other's data.
pub fn collection(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A kind of store a test can run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Postgres,
    Sqlite,
    /// The MariaDB server `scripts/stores.sh` starts (`SYNCBRIDGE_TEST_MYSQL_URL`).
    Mysql,
    /// A MongoDB replica set named by `MONGODB_URI` (none can run on our machines; see
    /// [`available`]).
    Mongo,
}

/// The line printed when the MongoDB tests cannot run.
pub const MONGO_SKIPPED: &str = "SKIPPED: MongoDB integration tests need MONGODB_URI pointing at a replica set \
     (docker compose up mongo; then MONGODB_URI=mongodb://127.0.0.1:27017/synctest?replicaSet=rs0 \
     with port 27017 published, or any other replica set)";

/// Whether a test against `kind` can run here. Redis, PostgreSQL and SQLite always can (the
/// test script starts them). MongoDB only when `MONGODB_URI` is set; otherwise this says so
/// once, on stderr past the test harness's capture, and the test must return without
/// asserting anything: it has tested nothing, and the line says so.
pub fn available(kind: Kind) -> bool {
    if kind != Kind::Mongo || std::env::var("MONGODB_URI").is_ok_and(|u| !u.is_empty()) {
        return true;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{MONGO_SKIPPED}");
    });
    false
}

/// Runs `f` against the `MONGODB_URI` database on a thread of its own (the kit's clients are
/// synchronous, and may be called from inside the tests' runtime), as an application would:
/// with the official driver, knowing nothing of syncbridge.
pub fn mongo<T, F, Fut>(uri: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(mongodb::Database) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let uri = uri.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let client = mongodb::Client::with_uri_str(&uri)
                .await
                .expect("MongoDB client");
            let db = client
                .default_database()
                .expect("MONGODB_URI names a database (mongodb://host/db?replicaSet=rs0)");
            f(db).await
        })
    })
    .join()
    .expect("MongoDB client thread")
}

/// A store for one test: its URI and a CLI client that writes to it directly.
#[derive(Debug, Clone)]
pub struct TestStore {
    pub kind: Kind,
    pub uri: String,
    /// Collections live in typed tables `(id, name, n, updated_at)` (see
    /// [`TestStore::create_typed_table`]) instead of the bridge's `(id, doc, updated_at)`.
    pub typed: bool,
    _dir: Option<Arc<tempfile::TempDir>>,
}

impl TestStore {
    pub fn new(kind: Kind) -> TestStore {
        match kind {
            Kind::Redis => TestStore {
                kind,
                uri: env_uri("SYNCBRIDGE_TEST_REDIS_URL"),
                typed: false,
                _dir: None,
            },
            Kind::Postgres => TestStore {
                kind,
                uri: env_uri("SYNCBRIDGE_TEST_PG_URL"),
                typed: false,
                _dir: None,
            },
            Kind::Mongo => TestStore {
                kind,
                uri: env_uri("MONGODB_URI"),
                typed: false,
                _dir: None,
            },
            Kind::Mysql => TestStore {
                kind,
                uri: env_uri("SYNCBRIDGE_TEST_MYSQL_URL"),
                typed: false,
                _dir: None,
            },
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let uri = format!("sqlite://{}", dir.path().join("store.db").display());
                TestStore {
                    kind,
                    uri,
                    typed: false,
                    _dir: Some(Arc::new(dir)),
                }
            }
        }
    }

    /// A database of its own on the PostgreSQL or MySQL test server (a fresh one, uniquely
    /// named), for tests that change database-wide state (change-log consumers, their
    /// retention) or must count what happens in a database nobody else writes to. Other kinds
    /// get [`TestStore::new`], which is already private (SQLite) or has no databases to make.
    pub fn fresh_database(kind: Kind) -> TestStore {
        if !matches!(kind, Kind::Postgres | Kind::Mysql) {
            return TestStore::new(kind);
        }
        let server = TestStore::new(kind);
        let name = collection("db");
        server.cli(&[&format!("CREATE DATABASE {name}")]);
        let (base, _) = server
            .uri
            .rsplit_once('/')
            .expect("a URI naming a database");
        TestStore {
            kind,
            uri: format!("{base}/{name}"),
            typed: false,
            _dir: None,
        }
    }

    /// Drops a database made by [`TestStore::fresh_database`], once nothing uses it.
    pub fn drop_database(&self) {
        let server = TestStore::new(self.kind);
        let name = self
            .uri
            .rsplit_once('/')
            .expect("a URI naming a database")
            .1;
        let sql = match self.kind {
            Kind::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            _ => format!("DROP DATABASE IF EXISTS {name}"),
        };
        server.cli(&[&sql]);
    }

    fn sqlite_path(&self) -> &str {
        self.uri.strip_prefix("sqlite://").expect("sqlite uri")
    }

    /// Runs the store's own CLI with `args`, returning stdout; panics with stderr on failure.
    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = match self.kind {
            Kind::Redis => {
                let mut c = Command::new("redis-cli");
                c.args(["-u", &self.uri]);
                c
            }
            Kind::Postgres => {
                let mut c = Command::new("psql");
                c.args([&self.uri, "-v", "ON_ERROR_STOP=1", "-qAt", "-c"]);
                c
            }
            Kind::Sqlite => {
                let mut c = Command::new("sqlite3");
                c.args(["-cmd", ".timeout 10000", self.sqlite_path()]);
                c
            }
            Kind::Mysql => {
                // mysql://user[:password]@host:port/db, as the test script exports it.
                let rest = self.uri.split_once("://").expect("mysql uri").1;
                let (auth, rest) = rest.rsplit_once('@').unwrap_or(("root", rest));
                let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
                let (hostport, db) = rest.split_once('/').expect("mysql uri names a database");
                let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
                let mut c = Command::new("mysql");
                c.arg("--no-defaults");
                if !password.is_empty() {
                    c.env("MYSQL_PWD", password);
                }
                // As an application's session, except that the test's literal timestamps are
                // UTC and its SQL quotes identifiers with "..." like the other stores'.
                c.args([
                    &format!("-h{host}"),
                    &format!("-P{port}"),
                    &format!("-u{user}"),
                    "--init-command=SET time_zone = '+00:00', sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES')",
                    "-N",
                    "-B",
                    "-r",
                    db.split('?').next().unwrap_or(db),
                    "-e",
                ]);
                c
            }
            Kind::Mongo => unreachable!("MongoDB is written through the driver, not a CLI"),
        };
        let out = cmd.args(args).output().expect("store CLI runs");
        assert!(
            out.status.success(),
            "{:?} {:?} failed: {}",
            self.kind,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if self.kind == Kind::Redis && stdout.starts_with("ERR") {
            panic!("redis-cli {args:?}: {stdout}");
        }
        stdout
    }

    /// Writes `doc` under `id` as an application would: `SET`, or an upsert of the row.
    pub fn put(&self, collection: &str, id: &str, doc: &Value) {
        if self.typed {
            return self.put_typed(collection, id, doc);
        }
        let text = doc.to_string();
        match self.kind {
            Kind::Mongo => {
                // As an application writes: updatedAt a BSON Date when the document has one.
                let at = syncbridge::record::doc_updated_at(doc);
                let mut d = syncbridge::stores::mongo::convert::record_to_document(
                    convert::id_for_insert(id),
                    doc,
                    at.unwrap_or(0),
                )
                .expect("a document MongoDB can store");
                if at.is_none() {
                    d.remove("updatedAt");
                }
                let (c, filter) = (
                    collection.to_string(),
                    mongodb::bson::doc! { "_id": d.get("_id").cloned() },
                );
                mongo(&self.uri, move |db| async move {
                    db.collection::<mongodb::bson::Document>(&c)
                        .replace_one(filter, d)
                        .upsert(true)
                        .await
                        .expect("MongoDB replace");
                });
            }
            Kind::Redis => {
                self.cli(&["SET", &format!("{collection}:{id}"), &text]);
            }
            Kind::Postgres | Kind::Sqlite => {
                let text = text.replace('\'', "''");
                // updated_at follows the document's updatedAt when it has one.
                let ts = doc
                    .get("updatedAt")
                    .and_then(Value::as_str)
                    .map(|t| format!("'{t}'"))
                    .unwrap_or_else(|| {
                        if self.kind == Kind::Postgres {
                            "now()".into()
                        } else {
                            "strftime('%Y-%m-%dT%H:%M:%fZ','now')".into()
                        }
                    });
                self.cli(&[&format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES ('{id}', '{text}', {ts}) \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                )]);
            }
            Kind::Mysql => {
                let text = text.replace('\\', "\\\\").replace('\'', "''");
                let ts = doc
                    .get("updatedAt")
                    .and_then(Value::as_str)
                    .map(|t| format!("STR_TO_DATE('{t}', '%Y-%m-%dT%H:%i:%s.%fZ')"))
                    .unwrap_or_else(|| "NOW(6)".into());
                self.cli(&[&format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES ('{id}', '{text}', {ts}) \
                     ON DUPLICATE KEY UPDATE doc = VALUES(doc), updated_at = VALUES(updated_at)"
                )]);
            }
        }
    }

    /// Renames the record the way a person at a SQL prompt would: an UPDATE of the document
    /// alone, leaving updated_at as it was (the README's demo). `None` for Redis, where the
    /// equivalent is a SET that copies the old updatedAt: a tie, by design.
    pub fn edit_name_in_place(&self, collection: &str, id: &str, name: &str) -> Option<()> {
        let sql = match self.kind {
            Kind::Redis | Kind::Mongo => return None,
            Kind::Sqlite => format!(
                "UPDATE \"{collection}\" SET doc = json_set(doc, '$.name', '{name}') WHERE id = '{id}'"
            ),
            Kind::Postgres => format!(
                "UPDATE \"{collection}\" SET doc = jsonb_set(doc, '{{name}}', to_jsonb('{name}'::text)) WHERE id = '{id}'"
            ),
            Kind::Mysql => format!(
                "UPDATE \"{collection}\" SET doc = JSON_SET(doc, '$.name', '{name}') WHERE id = '{id}'"
            ),
        };
        self.cli(&[&sql]);
        Some(())
    }

    /// Deletes `id` directly: `DEL`, or `DELETE` of the row.
    pub fn delete(&self, collection: &str, id: &str) {
        match self.kind {
            Kind::Mongo => {
                let (c, ids) = (collection.to_string(), convert::id_candidates(id));
                mongo(&self.uri, move |db| async move {
                    db.collection::<mongodb::bson::Document>(&c)
                        .delete_many(mongodb::bson::doc! { "_id": { "$in": ids } })
                        .await
                        .expect("MongoDB delete");
                });
            }
            Kind::Redis => {
                self.cli(&["DEL", &format!("{collection}:{id}")]);
            }
            _ => {
                self.cli(&[&format!("DELETE FROM \"{collection}\" WHERE id = '{id}'")]);
            }
        }
    }

    /// Runs a raw statement or command through the CLI. On MongoDB, `[collection, document]`
    /// inserts the document, given as Extended JSON, exactly as written.
    pub fn raw(&self, args: &[&str]) -> String {
        if self.kind == Kind::Mongo {
            let json: Value = serde_json::from_str(args[1]).expect("Extended JSON");
            let d = match mongodb::bson::Bson::try_from(json).expect("Extended JSON") {
                mongodb::bson::Bson::Document(d) => d,
                other => panic!("not a document: {other}"),
            };
            let c = args[0].to_string();
            mongo(&self.uri, move |db| async move {
                db.collection::<mongodb::bson::Document>(&c)
                    .insert_one(d)
                    .await
                    .expect("MongoDB insert");
            });
            return String::new();
        }
        self.cli(args)
    }

    /// The raw MongoDB document stored under a record id (either `_id` form).
    pub fn mongo_doc(&self, collection: &str, id: &str) -> Option<mongodb::bson::Document> {
        let (c, ids) = (collection.to_string(), convert::id_candidates(id));
        mongo(&self.uri, move |db| async move {
            db.collection::<mongodb::bson::Document>(&c)
                .find_one(mongodb::bson::doc! { "_id": { "$in": ids } })
                .await
                .expect("MongoDB find")
        })
    }

    /// The document stored under `id`, read with the CLI; `updatedAt` is taken from the
    /// `updated_at` column on SQL stores (the column is the version there).
    pub fn get(&self, collection: &str, id: &str) -> Option<Value> {
        if self.kind == Kind::Mongo {
            // The record's JSON form: Extended JSON without `_id`, updatedAt as RFC 3339.
            return self
                .mongo_doc(collection, id)
                .map(|d| convert::document_to_record(&d).expect("a valid record").doc);
        }
        let out = match self.kind {
            Kind::Redis => self.cli(&["--no-raw", "GET", &format!("{collection}:{id}")]),
            Kind::Postgres => self.cli(&[&format!(
                "SELECT json_build_object('doc', doc, 'ts', to_char(updated_at AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) FROM \"{collection}\" WHERE id = '{id}'"
            )]),
            Kind::Sqlite => self.cli(&[&format!(
                "SELECT json_object('doc', json(doc), 'ts', updated_at) FROM \"{collection}\" WHERE id = '{id}'"
            )]),
            Kind::Mysql => self.cli(&[&format!(
                "SELECT JSON_OBJECT('doc', JSON_EXTRACT(doc, '$'), 'ts', \
                 CONCAT(LEFT(DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%s.%f'), 23), 'Z')) \
                 FROM \"{collection}\" WHERE id = '{id}'"
            )]),
            Kind::Mongo => unreachable!("handled above"),
        };
        let out = out.trim();
        if out.is_empty() || out == "(nil)" {
            return None;
        }
        match self.kind {
            Kind::Redis => {
                // --no-raw prints a quoted string, bytes outside printable ASCII as \xNN.
                Some(serde_json::from_slice(&unquote_redis(out)).expect("JSON document"))
            }
            _ => {
                let v: Value = serde_json::from_str(out).expect("JSON row");
                let mut doc = v["doc"].clone();
                doc["updatedAt"] = v["ts"].clone();
                Some(doc)
            }
        }
    }

    /// Number of records in `collection`.
    pub fn count(&self, collection: &str) -> usize {
        if self.kind == Kind::Mongo {
            let c = collection.to_string();
            return mongo(&self.uri, move |db| async move {
                db.collection::<mongodb::bson::Document>(&c)
                    .count_documents(mongodb::bson::doc! {})
                    .await
                    .expect("MongoDB count") as usize
            });
        }
        let out = match self.kind {
            Kind::Redis => self.cli(&["--scan", "--pattern", &format!("{collection}:*")]),
            _ => self.cli(&[&format!("SELECT id FROM \"{collection}\"")]),
        };
        out.lines().filter(|l| !l.trim().is_empty()).count()
    }
}

impl TestStore {
    /// The same SQL store, with collections in typed tables (the conformance suite's second
    /// layout).
    pub fn typed(kind: Kind) -> TestStore {
        assert!(matches!(kind, Kind::Sqlite | Kind::Postgres | Kind::Mysql));
        TestStore {
            typed: true,
            ..TestStore::new(kind)
        }
    }

    /// An application's own table for `collection`: `id` text key, a text and an integer
    /// column, and a nullable modification time (so a test can store one the bridge cannot
    /// read).
    pub fn create_typed_table(&self, collection: &str) {
        let sql = match self.kind {
            Kind::Sqlite => format!(
                "CREATE TABLE \"{collection}\" (id TEXT PRIMARY KEY, name TEXT, n INTEGER, updated_at TEXT)"
            ),
            Kind::Postgres => format!(
                "CREATE TABLE \"{collection}\" (id TEXT PRIMARY KEY, name TEXT, n BIGINT, updated_at TIMESTAMPTZ(3))"
            ),
            Kind::Mysql => format!(
                "CREATE TABLE \"{collection}\" (id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY, \
                 name TEXT, n BIGINT, \
                 updated_at TIMESTAMP(3) NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3))"
            ),
            _ => unreachable!("typed tables are SQL"),
        };
        self.cli(&[&sql]);
    }

    /// An upsert of the typed row, as the application's own SQL.
    fn put_typed(&self, collection: &str, id: &str, doc: &Value) {
        let quote = |v: Option<&Value>| match v {
            Some(Value::String(s)) => format!("'{}'", s.replace('\'', "''")),
            Some(Value::Number(n)) => n.to_string(),
            _ => "NULL".into(),
        };
        let (name, n) = (quote(doc.get("name")), quote(doc.get("n")));
        let ts = doc.get("updatedAt").and_then(Value::as_str);
        let sql = match self.kind {
            Kind::Sqlite | Kind::Postgres => {
                let ts = ts.map(|t| format!("'{t}'")).unwrap_or_else(|| {
                    if self.kind == Kind::Postgres {
                        "now()".into()
                    } else {
                        "strftime('%Y-%m-%dT%H:%M:%fZ','now')".into()
                    }
                });
                format!(
                    "INSERT INTO \"{collection}\" (id, name, n, updated_at) VALUES ('{id}', {name}, {n}, {ts}) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, n = excluded.n, updated_at = excluded.updated_at"
                )
            }
            Kind::Mysql => {
                let ts = ts
                    .map(|t| format!("STR_TO_DATE('{t}', '%Y-%m-%dT%H:%i:%s.%fZ')"))
                    .unwrap_or_else(|| "NOW(3)".into());
                format!(
                    "INSERT INTO \"{collection}\" (id, name, n, updated_at) VALUES ('{id}', {name}, {n}, {ts}) \
                     ON DUPLICATE KEY UPDATE name = VALUES(name), n = VALUES(n), updated_at = VALUES(updated_at)"
                )
            }
            _ => unreachable!("typed tables are SQL"),
        };
        self.cli(&[&sql]);
    }
}

/// The bytes of a string as `redis-cli --no-raw` quotes it (`"..."` with C-style escapes).
fn unquote_redis(quoted: &str) -> Vec<u8> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .expect("quoted redis value");
    let bytes = inner.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' || i + 1 == bytes.len() {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            b'x' => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).expect("escape");
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 4;
                continue;
            }
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            other => out.push(other),
        }
        i += 2;
    }
    out
}

/// A bridge running in-process on a data directory that outlives restarts.
pub struct TestBridge {
    pub engine: Arc<Engine>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Config for a pair of stores, one collection, and a data directory.
pub fn config(
    local: &TestStore,
    cloud: &TestStore,
    collections: &[&str],
    mode: Mode,
    data_dir: &Path,
) -> Config {
    let mut c = Config {
        local: StoreConfig {
            uri: local.uri.clone(),
        },
        cloud: StoreConfig {
            uri: cloud.uri.clone(),
        },
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    c.sync.collections = collections.iter().map(|s| s.to_string()).collect();
    c.sync.mode = mode;
    // Sweeps here only at start-up: tests of the listeners must not be rescued by a sweep.
    c.sync.sweep_interval_secs = 3600;
    c.sync.full_sweep_interval_secs = 3600;
    c
}

impl TestBridge {
    /// Starts a bridge and waits until it has prepared the stores and swept once.
    pub async fn start(config: Config) -> TestBridge {
        let shutdown = CancellationToken::new();
        let engine = pipeline::open_when_ready(config, &shutdown)
            .await
            .expect("bridge opens")
            .expect("not shut down");
        let engine = Arc::new(engine);
        let task = tokio::spawn(pipeline::run(engine.clone(), shutdown.clone()));
        let started = Instant::now();
        while engine.last_sweep.lock().unwrap().is_none() {
            assert!(
                started.elapsed() < DEADLINE,
                "bridge did not finish its start-up sweep"
            );
            assert!(!task.is_finished(), "bridge stopped during start-up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestBridge {
            engine,
            shutdown,
            task,
        }
    }

    /// Stops the bridge gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("bridge task")
            .expect("bridge ran cleanly");
    }
}

/// Waits until `check` holds, panicking with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    loop {
        if check() {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A document `{name, updatedAt}`, the shape the bridge scenarios write.
pub fn named(name: &str, at_ms: i64) -> Value {
    serde_json::json!({ "name": name, "updatedAt": syncbridge::record::format_ts(at_ms) })
}

/// The `name` of a record as `store` holds it, `None` if it holds none.
pub fn name_of(store: &TestStore, coll: &str, id: &str) -> Option<String> {
    store
        .get(coll, id)
        .map(|d| d["name"].as_str().unwrap_or_default().to_string())
}

/// A data directory for a bridge.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// The data directory's path, for configs.
pub fn path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().to_path_buf()
}

impl TestStore {
    /// A fresh database on the same server (MySQL/MariaDB and PostgreSQL), for tests that
    /// need whole schemas of their own: `CREATE DATABASE` through the CLI, then a store whose
    /// URI names it.
    pub fn new_database(&self, prefix: &str) -> TestStore {
        let name = collection(prefix);
        let charset = if self.kind == Kind::Mysql {
            " CHARACTER SET utf8mb4"
        } else {
            ""
        };
        self.raw(&[&format!("CREATE DATABASE {name}{charset}")]);
        let (base, query) = match self.uri.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (self.uri.as_str(), String::new()),
        };
        let (server, _) = base.rsplit_once('/').expect("URI names a database");
        TestStore {
            kind: self.kind,
            uri: format!("{server}/{name}{query}"),
            typed: self.typed,
            _dir: self._dir.clone(),
        }
    }
}
