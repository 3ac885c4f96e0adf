//! SQL connector for SQLite (the embedded local client database), PostgreSQL and MySQL/MariaDB,
//! through `sqlx`'s `Any` driver so the dialects share one code path.
//!
//! Each collection is a table `<collection>(id TEXT PRIMARY KEY, doc <json>, updated_at <ts>)`;
//! the `updated_at` column is the record's version time (the document's `updatedAt` field is set
//! from it on read). Triggers write every insert, update and delete, whoever made it, into the
//! change-log table `_syncbridge_changes`; the listener reads the log (PostgreSQL wakes it with
//! NOTIFY, SQLite and MySQL are polled: see the constants below), reads the current rows, and delivers them. Log rows are
//! deleted only once the engine has applied what they carried ([`Store::settle`]), so a crash
//! replays them: the log itself is the durable checkpoint.
//!
//! On PostgreSQL the bridge's own transactions set `syncbridge.origin` to the instance id, and
//! the trigger records it, so the listener can tag the bridge's own writes.
//!
//! **Many bridges, one database (fan-out).** Each bridge registers its instance id in
//! `_syncbridge_consumers` when it prepares the store, and the triggers write one log row per
//! registered consumer ([`Dialect::log_insert`]), except for the consumer that made the write
//! (PostgreSQL and MySQL know the writer; SQLite does not, and logs for all). A bridge reads,
//! settles (deletes) and consults only its own rows (`WHERE consumer = <instance id>`, on a
//! `(consumer, seq)` index), so bridges sharing one PostgreSQL never take each other's changes,
//! and one bridge's writes are foreign changes for all the others. The listener refreshes its
//! consumer's `last_seen` every minute; a consumer unseen for `sync.consumer_retention_days`
//! is dropped with its rows by whichever bridge notices (at `prepare`, and hourly), and the
//! bridge, if it comes back, registers again and runs a full sweep for what it missed. A
//! database prepared by an older version is upgraded in place by `prepare` (see
//! [`SqlStore::upgrade_log`]).
//!
//! MySQL/MariaDB (`mysql://`) captures changes with triggers too, not by reading the row binlog:
//! triggers work on any server and need no privilege beyond the tables (the binlog needs
//! `REPLICATION SLAVE/CLIENT`, a server started with `log_bin` and `binlog_format=ROW`, which
//! managed databases often do not give), the change log is a durable, replayable checkpoint in
//! the same transaction as the write (a binlog position must be stored elsewhere, and a rotated
//! binlog loses changes), and one code path serves all three SQL stores. The cost is a row in
//! `_syncbridge_changes` per write, and a poll: MySQL has no NOTIFY, so the listener asks
//! `SELECT MAX(seq)` (answered from the end of the primary key, no table scan) every
//! [`MYSQL_POLL`] and reads the log only when it moved. Every bridge connection sets the user
//! variable `@syncbridge_origin` to the instance id, and the triggers record it. The stamping
//! rule (an UPDATE that changes the document without assigning `updated_at` gets the current
//! time) is MySQL's own `ON UPDATE CURRENT_TIMESTAMP(6)`, which behaves exactly that way.
//! README.md, "MySQL and MariaDB", has the column types and why.

mod typed;

use super::{
    Ack, ApplyOutcome, Capabilities, ChangeBatch, ListenContext, PositionLost, ScanPage, Slot,
    Store, StoredRecord, TableFacts, TableSpec, Write, redact_uri,
};
use crate::record::{
    ChangeRecord, Op, Origin, canonical_hash, canonical_json, format_ts, now_ms, parse_ts,
    with_updated_at,
};
use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The change-log table the triggers fill.
pub const CHANGE_LOG: &str = "_syncbridge_changes";
/// The bridges that read the change log: the triggers write one log row per registered,
/// not dropped consumer (see [`Dialect::log_insert`]).
pub const CONSUMERS: &str = "_syncbridge_consumers";
/// The index that serves every change-log query of a consumer: `(consumer, seq)`.
const LOG_CONSUMER_IDX: &str = "_syncbridge_changes_consumer_idx";
/// The MySQL consumer column (indexed, so a bounded binary string).
const MYSQL_CONSUMER_COL: &str =
    "consumer VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL";
/// How often a listener refreshes its consumer's `last_seen` (and checks it is still
/// registered).
const CONSUMER_HEARTBEAT: Duration = Duration::from_secs(60);
/// How often a listener drops consumers unseen for the retention period.
const CONSUMER_CLEANUP_EVERY: Duration = Duration::from_secs(3600);
/// How long a consumer may stay unseen before another bridge drops it (and its log rows),
/// unless the configuration says otherwise (`sync.consumer_retention_days`).
pub const DEFAULT_CONSUMER_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// SQLite rows whose UPDATE assigned updated_at, between the BEFORE and AFTER triggers.
const TS_MARKS: &str = "_syncbridge_ts_marks";
/// The NOTIFY channel PostgreSQL triggers signal (the bench listens to it too).
pub const NOTIFY_CHANNEL: &str = "syncbridge_changes";
/// How often SQLite's change log is read at the latest (it has no notifications across
/// processes).
const SQLITE_POLL: Duration = Duration::from_millis(25);
/// How often the SQLite listener asks `PRAGMA data_version` whether another connection
/// committed. The check touches no table, so it can run far more often than a log read;
/// the log is read as soon as it answers yes.
const SQLITE_WAKE_CHECK: Duration = Duration::from_millis(2);
/// How often the MySQL listener asks `SELECT MAX(seq)` of the change log (MySQL has no
/// notifications). The query reads the last entry of the primary key, so it is as cheap as a
/// query can be, and 5 ms keeps the capture delay well inside the latency target.
pub const MYSQL_POLL: Duration = Duration::from_millis(5);
/// The `STR_TO_DATE` format of the RFC 3339 text the bridge binds for MySQL timestamps.
const MYSQL_TS_IN: &str = "%Y-%m-%dT%H:%i:%s.%fZ";
/// A MySQL `TIMESTAMP` holds 1970-01-01 00:00:01 to 2038-01-19 03:14:07.999999 UTC: a version
/// time outside is refused with this reason rather than failing the whole batch.
const MYSQL_TS_RANGE_MS: (i64, i64) = (1_000, 2_147_483_647_999);
/// PostgreSQL listeners poll this often too, in case a notification was missed.
const PG_FALLBACK_POLL: Duration = Duration::from_secs(1);
/// How often rows left behind the read position (late commits, released batches) are re-read.
const BEHIND_SCAN_EVERY: Duration = Duration::from_secs(1);
/// Log rows read per query.
const LOG_BATCH: i64 = 1000;

/// The SQL dialect, which decides placeholders, types and trigger syntax.
///
/// Statements are built with `format!` only from constants and collection names, which
/// [`crate::config::Config::validate`] restricts to `[A-Za-z_][A-Za-z0-9_]*`; every value is a
/// bound parameter. That is the audit behind each `AssertSqlSafe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
    /// MySQL 8.0.29+ or MariaDB 10.5+. Sessions run with `ANSI_QUOTES` (so `"table"` quotes
    /// an identifier as in the other dialects) and `time_zone = '+00:00'`.
    Mysql,
}

impl Dialect {
    /// Placeholder for the n-th (1-based) bound parameter.
    fn p(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
            // Positional only: statements bind MySQL parameters in the order they appear.
            Dialect::Mysql => "?".to_string(),
        }
    }

    /// Placeholder for a JSON document parameter.
    fn p_doc(self, n: usize) -> String {
        match self {
            Dialect::Sqlite | Dialect::Mysql => self.p(n),
            Dialect::Postgres => format!("${n}::jsonb"),
        }
    }

    /// Placeholder for a timestamp parameter given as RFC 3339 text.
    fn p_ts(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => self.p(n),
            Dialect::Postgres => format!("${n}::timestamptz"),
            Dialect::Mysql => format!("STR_TO_DATE(?, '{MYSQL_TS_IN}')"),
        }
    }

    /// A timestamp column as exact RFC 3339 text (microseconds on PostgreSQL).
    fn ts_text(self, col: &str) -> String {
        match self {
            Dialect::Sqlite => col.to_string(),
            Dialect::Postgres => {
                format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            }
            // The session time zone is UTC, so a TIMESTAMP reads back as UTC.
            Dialect::Mysql => format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
        }
    }

    /// The document column as text.
    fn doc_text(self) -> &'static str {
        match self {
            Dialect::Sqlite | Dialect::Mysql => "doc",
            Dialect::Postgres => "doc::text",
        }
    }

    /// The statement a capture trigger runs to log one change of `id` (an SQL expression such
    /// as `NEW.id`) in `collection` (an SQL expression: a quoted table name or `TG_ARGV[0]`),
    /// when the optional condition `when` holds: one change-log row per registered consumer,
    /// so every bridge reading this database gets its own copy of every change (fan-out) and
    /// settles it without touching the others'. The consumer whose instance id is the
    /// writing origin gets none: a bridge's own writes need not come back to it. SQLite
    /// records no origin (a file has no session settings the bridge could tag), so there
    /// every consumer gets every change and the engine recognizes its echoes as before.
    ///
    /// Every trigger that feeds the change log goes through here, so the fan-out rule lives in
    /// one place.
    fn log_insert(self, collection: &str, id: &str, when: Option<&str>) -> String {
        let (origin, skip_own) = match self {
            Dialect::Sqlite => ("NULL", String::new()),
            Dialect::Postgres => (
                "nullif(current_setting('syncbridge.origin', true), '')",
                " AND name IS DISTINCT FROM nullif(current_setting('syncbridge.origin', true), '')"
                    .to_string(),
            ),
            // The variable is compared under the names' own binary collation, whatever the
            // session's collation is (a mix of two implicit collations is an error in MySQL).
            Dialect::Mysql => (
                "@syncbridge_origin",
                " AND (@syncbridge_origin IS NULL OR \
                 name <> CONVERT(@syncbridge_origin USING utf8mb4) COLLATE utf8mb4_bin)"
                    .to_string(),
            ),
        };
        let when = when.map(|w| format!(" AND ({w})")).unwrap_or_default();
        format!(
            "INSERT INTO {CHANGE_LOG}(consumer, collection, id, origin) \
             SELECT name, {collection}, {id}, {origin} FROM {CONSUMERS} \
             WHERE dropped_at IS NULL{skip_own}{when}"
        )
    }

    /// The database's current time, as stored in the consumers table.
    fn now_sql(self) -> &'static str {
        match self {
            Dialect::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ','now')",
            Dialect::Postgres => "now()",
            Dialect::Mysql => "UTC_TIMESTAMP(6)",
        }
    }

    /// The database's time `secs` seconds ago (a number, never user text).
    fn ago_sql(self, secs: u64) -> String {
        match self {
            Dialect::Sqlite => format!("strftime('%Y-%m-%dT%H:%M:%fZ','now','-{secs} seconds')"),
            Dialect::Postgres => format!("(now() - make_interval(secs => {secs}))"),
            Dialect::Mysql => format!("(UTC_TIMESTAMP(6) - INTERVAL {secs} SECOND)"),
        }
    }

    /// Schema statements for one collection table, its index and its capture triggers.
    /// `key_collation` is the MySQL collation of ids (see [`SqlStore::mysql_key_collation`]).
    fn collection_ddl(self, table: &str, key_collation: &str) -> Vec<String> {
        match self {
            Dialect::Sqlite => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS \"{table}\" (id TEXT PRIMARY KEY, doc TEXT NOT NULL, \
                     updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS \"{table}_updated_at_idx\" ON \"{table}\" (updated_at, id)"
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_ins\" AFTER INSERT ON \"{table}\" \
                     BEGIN {}; END",
                    self.log_insert(&format!("'{table}'"), "NEW.id", None)
                ),
                // An UPDATE that changes the document without assigning updated_at is a new
                // version of unknown time: stamp it now, or last-writer-wins could take it for a
                // stale copy and put the old one back. An UPDATE that assigns updated_at (even to
                // its old value) states its version and is left alone; the BEFORE trigger marks
                // those rows, and the AFTER trigger reads and clears the mark in one program, so
                // the order is fixed.
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_mark\" BEFORE UPDATE OF updated_at ON \"{table}\" \
                     BEGIN INSERT OR REPLACE INTO {TS_MARKS}(collection, id) VALUES ('{table}', NEW.id); END"
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_upd\" AFTER UPDATE ON \"{table}\" \
                     BEGIN \
                     UPDATE \"{table}\" SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ','now') \
                       WHERE id = NEW.id AND NEW.updated_at = OLD.updated_at AND NEW.doc IS NOT OLD.doc \
                       AND NOT EXISTS (SELECT 1 FROM {TS_MARKS} WHERE collection = '{table}' AND id = NEW.id); \
                     DELETE FROM {TS_MARKS} WHERE collection = '{table}' AND id = NEW.id; \
                     {}; {}; END",
                    self.log_insert(&format!("'{table}'"), "NEW.id", None),
                    self.log_insert(&format!("'{table}'"), "OLD.id", Some("OLD.id <> NEW.id"))
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_del\" AFTER DELETE ON \"{table}\" \
                     BEGIN {}; END",
                    self.log_insert(&format!("'{table}'"), "OLD.id", None)
                ),
            ],
            Dialect::Postgres => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS \"{table}\" (id TEXT PRIMARY KEY, doc JSONB NOT NULL, \
                     updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS \"{table}_updated_at_idx\" ON \"{table}\" (updated_at, id)"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_capture\" AFTER INSERT OR UPDATE OR DELETE \
                     ON \"{table}\" FOR EACH ROW EXECUTE FUNCTION _syncbridge_capture('{table}')"
                ),
                // Stamping as on SQLite: BEFORE triggers run in name order, so the mark
                // ("_syncbridge_mark", only when the UPDATE assigns updated_at) precedes the stamp.
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_mark\" BEFORE UPDATE OF updated_at \
                     ON \"{table}\" FOR EACH ROW EXECUTE FUNCTION _syncbridge_mark()"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_stamp\" BEFORE UPDATE \
                     ON \"{table}\" FOR EACH ROW EXECUTE FUNCTION _syncbridge_stamp()"
                ),
            ],
            // The document is text with a JSON check, not MySQL's binary JSON: MySQL 8
            // rewrites JSON text (key order, spacing, number forms), MariaDB's JSON is this
            // same text type, and only exact text makes the etag guard (`doc = ?`) mean "nobody
            // wrote since". `utf8mb4_bin` compares it byte for byte (not case-blind). Ids use a
            // NO PAD binary collation where the server has one, so "a" and "a " are two ids.
            // `ON UPDATE CURRENT_TIMESTAMP(6)` is the stamping rule: MySQL stamps an UPDATE
            // that changes the row without assigning updated_at, and only that one.
            Dialect::Mysql => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS \"{table}\" (\
                     id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {key_collation} NOT NULL PRIMARY KEY, \
                     doc LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (JSON_VALID(doc)), \
                     updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6), \
                     INDEX \"{table}_updated_at_idx\" (updated_at, id)) ENGINE = InnoDB"
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_ins\" AFTER INSERT ON \"{table}\" \
                     FOR EACH ROW {}",
                    self.log_insert(&format!("'{table}'"), "NEW.id", None)
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_upd\" AFTER UPDATE ON \"{table}\" \
                     FOR EACH ROW BEGIN {}; {}; END",
                    self.log_insert(&format!("'{table}'"), "NEW.id", None),
                    self.log_insert(&format!("'{table}'"), "OLD.id", Some("OLD.id <> NEW.id"))
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS \"_syncbridge_{table}_del\" AFTER DELETE ON \"{table}\" \
                     FOR EACH ROW {}",
                    self.log_insert(&format!("'{table}'"), "OLD.id", None)
                ),
            ],
        }
    }

    /// Schema statements shared by all collections: the consumers, the change log (and the
    /// trigger function). A log made by a version before consumers is upgraded afterwards by
    /// [`SqlStore::upgrade_log`]; its `(consumer, seq)` index is made there too.
    fn log_ddl(self) -> Vec<String> {
        match self {
            Dialect::Sqlite => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {CONSUMERS} (name TEXT PRIMARY KEY, \
                     last_seen TEXT NOT NULL, dropped_at TEXT)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {CHANGE_LOG} (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
                     collection TEXT NOT NULL, id TEXT NOT NULL, origin TEXT, \
                     changed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')), \
                     consumer TEXT)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {TS_MARKS} (collection TEXT NOT NULL, id TEXT NOT NULL, \
                     PRIMARY KEY (collection, id))"
                ),
            ],
            Dialect::Postgres => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {CONSUMERS} (name TEXT PRIMARY KEY, \
                     last_seen TIMESTAMPTZ NOT NULL, dropped_at TIMESTAMPTZ)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {CHANGE_LOG} (seq BIGSERIAL PRIMARY KEY, \
                     collection TEXT NOT NULL, id TEXT NOT NULL, origin TEXT, \
                     changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), consumer TEXT)"
                ),
                format!(
                    "CREATE OR REPLACE FUNCTION _syncbridge_capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
                     BEGIN
                       IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.id IS DISTINCT FROM NEW.id) THEN
                         {old_row};
                       END IF;
                       IF TG_OP <> 'DELETE' THEN
                         {new_row};
                       END IF;
                       PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_ARGV[0]);
                       RETURN NULL;
                     END $fn$",
                    old_row = self.log_insert("TG_ARGV[0]", "OLD.id", None),
                    new_row = self.log_insert("TG_ARGV[0]", "NEW.id", None),
                ),
                "CREATE OR REPLACE FUNCTION _syncbridge_mark() RETURNS trigger LANGUAGE plpgsql AS $fn$
                 BEGIN
                   PERFORM set_config('syncbridge.ts_assigned', NEW.id, true);
                   RETURN NEW;
                 END $fn$"
                    .to_string(),
                "CREATE OR REPLACE FUNCTION _syncbridge_stamp() RETURNS trigger LANGUAGE plpgsql AS $fn$
                 DECLARE assigned BOOLEAN := coalesce(current_setting('syncbridge.ts_assigned', true), '') = NEW.id;
                 BEGIN
                   PERFORM set_config('syncbridge.ts_assigned', '', true);
                   IF NOT assigned AND NEW.updated_at = OLD.updated_at AND NEW.doc IS DISTINCT FROM OLD.doc THEN
                     NEW.updated_at := clock_timestamp();
                   END IF;
                   RETURN NEW;
                 END $fn$"
                    .to_string(),
            ],
            // DATETIME, not TIMESTAMP, for the consumers: always written explicitly, in UTC,
            // so no server default (explicit_defaults_for_timestamp) can stamp them.
            Dialect::Mysql => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {CONSUMERS} (\
                     name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY, \
                     last_seen DATETIME(6) NOT NULL, dropped_at DATETIME(6) NULL) ENGINE = InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {CHANGE_LOG} (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
                     collection VARCHAR(64) NOT NULL, \
                     id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, origin TEXT, \
                     changed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
                     {MYSQL_CONSUMER_COL}, INDEX \"{LOG_CONSUMER_IDX}\" (consumer, seq)) ENGINE = InnoDB"
                ),
            ],
        }
    }
}

/// A SQLite file, PostgreSQL or MySQL/MariaDB database used as one side of the bridge.
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    uri: String,
    instance_id: String,
    /// Log rows delivered to the engine and not yet settled; the behind-scan skips them.
    in_flight: Arc<Mutex<HashSet<i64>>>,
    /// Collections kept in the application's own typed tables, by collection name.
    typed: RwLock<HashMap<String, Arc<typed::TypedTable>>>,
    /// Consumers unseen this long are dropped, with their log rows.
    consumer_retention: Duration,
    /// Set by `prepare` when it found this bridge's consumer dropped (away longer than the
    /// retention) and registered it again: changes made meanwhile were never logged for it, so
    /// the next `listen` reports [`PositionLost`] and the engine runs a full sweep.
    registration_lost: AtomicBool,
}

/// Connection settings of a [`SqlStore`] beyond its URI.
#[derive(Debug, Clone)]
pub struct SqlOptions {
    /// Consumers of the change log unseen this long are dropped (`sync.consumer_retention_days`).
    pub consumer_retention: Duration,
    /// Most pooled connections; `None` for the default (4 for SQLite, 8 for a server). Many
    /// bridges against one server may need fewer each.
    pub max_connections: Option<u32>,
}

impl Default for SqlOptions {
    fn default() -> Self {
        SqlOptions {
            consumer_retention: DEFAULT_CONSUMER_RETENTION,
            max_connections: None,
        }
    }
}

/// Whether this bridge's consumer registration was found, when `prepare` made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// It was there and live: the log kept everything for it.
    Live,
    /// It was never there (a bridge new to this database, or a log made by an older version):
    /// the engine's first sweep is a full one for a new bridge.
    New,
    /// It had been dropped as abandoned: changes meanwhile are not in the log.
    Dropped,
}

/// A change-log row.
struct LogRow {
    seq: i64,
    collection: String,
    id: String,
    origin: Option<String>,
    changed_at: String,
}

impl SqlStore {
    /// Connects to a `sqlite://` (file created if missing), `postgres://` or `mysql://` URI.
    pub async fn connect(uri: &str, instance_id: &str) -> Result<SqlStore> {
        Self::connect_with(uri, instance_id, SqlOptions::default()).await
    }

    /// [`Self::connect`] with settings beyond the URI.
    pub async fn connect_with(
        uri: &str,
        instance_id: &str,
        options: SqlOptions,
    ) -> Result<SqlStore> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (dialect, conn_uri) = if uri.starts_with("sqlite:") {
            (Dialect::Sqlite, sqlite_uri(uri)?)
        } else if uri.starts_with("mysql:") || uri.starts_with("mariadb:") {
            (
                Dialect::Mysql,
                format!(
                    "mysql:{}",
                    uri.split_once(':').map(|x| x.1).unwrap_or_default()
                ),
            )
        } else {
            (Dialect::Postgres, uri.to_string())
        };
        let origin = instance_id.to_string();
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections.unwrap_or(if dialect == Dialect::Sqlite {
                4
            } else {
                8
            }))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                let origin = origin.clone();
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // Other programs write the same file; wait for their locks, do not fail.
                        // Foreign keys, off by default per connection, hold for our writes too.
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    if dialect == Dialect::Postgres {
                        // Zoneless timestamps of typed tables are read and written as UTC.
                        conn.execute("SET TIME ZONE 'UTC'").await?;
                    }
                    if dialect == Dialect::Mysql {
                        // UTC timestamps whatever the URI or server say; "quoted" identifiers as
                        // in the other dialects; strict mode, so a value a column cannot hold
                        // is an error, never a silent truncation; and the origin the triggers
                        // record: every connection of this pool writes for this bridge.
                        sqlx::query(
                            "SET time_zone = '+00:00', \
                             sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'ANSI_QUOTES', 'STRICT_ALL_TABLES'), \
                             @syncbridge_origin = ?",
                        )
                        .bind(origin.clone())
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&conn_uri)
            .await
            .with_context(|| format!("cannot connect to {}", redact_uri(uri)))?;
        Ok(SqlStore {
            pool,
            dialect,
            uri: uri.to_string(),
            instance_id: instance_id.to_string(),
            in_flight: Arc::default(),
            typed: RwLock::default(),
            consumer_retention: options.consumer_retention,
            registration_lost: AtomicBool::new(false),
        })
    }

    /// Turns a row of `(id, ts_text, doc_text)` into a [`Slot`].
    fn row_slot(id: &str, ts: &str, doc_text: &str) -> Slot {
        let Some(ms) = parse_ts(ts) else {
            return Slot::Invalid(format!("updated_at {ts:?} is not a timestamp"));
        };
        match serde_json::from_str::<Value>(doc_text) {
            Ok(doc @ Value::Object(_)) => Slot::Present(StoredRecord {
                id: id.to_string(),
                doc: with_updated_at(doc, ms),
                updated_at_ms: Some(ms),
                etag: format!("{ts}\n{doc_text}"),
            }),
            Ok(_) => Slot::Invalid("doc is JSON but not an object".into()),
            Err(e) => Slot::Invalid(format!("doc is not JSON: {e}")),
        }
    }

    /// The typed table of `collection`, if it lives in one.
    fn typed(&self, collection: &str) -> Option<Arc<typed::TypedTable>> {
        self.typed
            .read()
            .expect("typed tables lock")
            .get(collection)
            .cloned()
    }

    fn select_cols(&self) -> String {
        format!(
            "id, {} AS ts, {} AS doc",
            self.dialect.ts_text("updated_at"),
            self.dialect.doc_text()
        )
    }

    async fn read_with<'e, E>(&self, exec: E, collection: &str, ids: &[String]) -> Result<Vec<Slot>>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(t) = self.typed(collection) {
            return t.read(self.dialect, exec, ids).await;
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| self.dialect.p(i)).collect();
        let sql = format!(
            "SELECT {} FROM \"{collection}\" WHERE id IN ({})",
            self.select_cols(),
            placeholders.join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id.clone());
        }
        let rows = q.fetch_all(exec).await?;
        let mut found: BTreeMap<String, Slot> = BTreeMap::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let slot = Self::row_slot(
                &id,
                &row.try_get::<String, _>("ts")?,
                &row.try_get::<String, _>("doc")?,
            );
            found.insert(id, slot);
        }
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or(Slot::Absent))
            .collect())
    }

    /// Reads change-log rows for our collections: after `after` (ahead of the read position)
    /// or at/below it (behind it: late commits and released batches).
    async fn read_log(
        &self,
        collections: &[String],
        after: i64,
        behind: bool,
    ) -> Result<Vec<LogRow>> {
        let d = self.dialect;
        let names: Vec<String> = (0..collections.len()).map(|i| d.p(i + 3)).collect();
        let sql = format!(
            "SELECT seq, collection, id, origin, {} AS changed_at FROM {CHANGE_LOG} \
             WHERE consumer = {} AND seq {} {} AND collection IN ({}) ORDER BY seq LIMIT {LOG_BATCH}",
            d.ts_text("changed_at"),
            d.p(1),
            if behind { "<=" } else { ">" },
            d.p(2),
            names.join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(self.instance_id.clone())
            .bind(after);
        for c in collections {
            q = q.bind(c.clone());
        }
        let rows: Vec<AnyRow> = q.fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|r| {
                Ok(LogRow {
                    seq: r.try_get("seq")?,
                    collection: r.try_get("collection")?,
                    id: r.try_get("id")?,
                    origin: r.try_get("origin")?,
                    changed_at: r.try_get("changed_at")?,
                })
            })
            .collect()
    }

    /// Reads the current rows behind some log rows and sends them as one batch.
    async fn deliver(&self, ctx: &ListenContext, rows: Vec<LogRow>) -> Result<bool> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        // Per key: the latest change time, and the writer if every row agrees on one
        // (`Some(None)`: rows disagree or name no writer).
        type Seen = (String, Option<Option<String>>);
        let mut keys: BTreeMap<(String, String), Seen> = BTreeMap::new();
        let mut first: HashMap<(String, String), i64> = HashMap::new();
        for r in rows {
            first
                .entry((r.collection.clone(), r.id.clone()))
                .or_insert(r.seq);
            let entry = keys
                .entry((r.collection, r.id))
                .or_insert((r.changed_at.clone(), None));
            entry.0 = r.changed_at;
            entry.1 = match entry.1.take() {
                None => Some(r.origin),
                Some(prev) if prev == r.origin => Some(prev),
                Some(_) => Some(None),
            };
        }
        let mut by_collection: BTreeMap<String, Vec<(String, String, Option<String>)>> =
            BTreeMap::new();
        for ((c, id), (at, origin)) in keys {
            by_collection
                .entry(c)
                .or_default()
                .push((id, at, origin.flatten()));
        }
        let mut records = Vec::new();
        for (collection, entries) in by_collection {
            let ids: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
            let slots = self.read(&collection, &ids).await?;
            for ((id, at, origin), slot) in entries.into_iter().zip(slots) {
                let at_ms = parse_ts(&at).unwrap_or_else(now_ms);
                let (op, doc, ms) = match slot {
                    Slot::Present(r) => (Op::Upsert, Some(r.doc), r.updated_at_ms.unwrap_or(at_ms)),
                    Slot::Absent => (Op::Delete, None, at_ms),
                    Slot::Invalid(_) => (Op::Upsert, None, at_ms),
                };
                records.push(ChangeRecord {
                    side: ctx.side,
                    collection: collection.clone(),
                    id,
                    op,
                    doc,
                    updated_at_ms: ms,
                    origin: origin.map(Origin::Bridge).unwrap_or_default(),
                });
            }
        }
        // In the order the changes were made (each key at its first log row), not grouped by
        // collection and id: a held (paused) batch is applied in first-seen order.
        records.sort_by_key(|r| first.get(&(r.collection.clone(), r.id.clone())).copied());
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .extend(seqs.iter().copied());
        let batch = ChangeBatch {
            side: ctx.side,
            records,
            ack: Ack::Seqs(seqs),
        };
        Ok(ctx.sink.send(batch).await.is_ok())
    }

    /// Rows of a JSON array parameter (`[[a, b, ...], ...]`) as a subquery with columns
    /// `c0..cN`: one statement carries a whole batch, in both dialects, through the `Any`
    /// driver (which cannot bind arrays).
    fn json_rows(self_dialect: Dialect, columns: usize) -> String {
        let cols: Vec<String> = (0..columns)
            .map(|i| match self_dialect {
                Dialect::Postgres => format!("x->>{i} AS c{i}"),
                Dialect::Sqlite | Dialect::Mysql => {
                    format!("json_extract(value, '$[{i}]') AS c{i}")
                }
            })
            .collect();
        match self_dialect {
            Dialect::Postgres => format!(
                "(SELECT {} FROM jsonb_array_elements($1::jsonb) AS x)",
                cols.join(", ")
            ),
            // MySQL never takes the batch path (see `apply`).
            Dialect::Sqlite | Dialect::Mysql => {
                format!("(SELECT {} FROM json_each(?1))", cols.join(", "))
            }
        }
    }

    /// Runs one batch statement over JSON rows, returning the ids it changed.
    async fn batch_statement(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        sql: String,
        rows: Vec<Value>,
    ) -> Result<HashSet<String>> {
        if rows.is_empty() {
            return Ok(HashSet::new());
        }
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(Value::Array(rows).to_string())
            .fetch_all(&mut **tx)
            .await?;
        done.into_iter()
            .map(|r| Ok(r.try_get::<String, _>(0)?))
            .collect()
    }

    /// Applies writes with distinct ids in a few multi-row statements (one for new records,
    /// one for conditional updates; deletes, rare, go one by one), then classifies the writes
    /// that did not apply from one read, exactly as [`Self::apply_one`] does.
    async fn apply_batch(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        collection: &str,
        writes: &[Write],
    ) -> Result<Vec<ApplyOutcome>> {
        let d = self.dialect;
        let mut inserts = Vec::new();
        let mut updates = Vec::new();
        let mut outcomes: Vec<Option<ApplyOutcome>> = vec![None; writes.len()];
        for (i, w) in writes.iter().enumerate() {
            match (&w.record.doc, w.record.op, &w.expected) {
                (Some(doc), Op::Upsert, None) => inserts.push(serde_json::json!([
                    w.record.id,
                    canonical_json(doc),
                    format_ts(w.record.updated_at_ms)
                ])),
                (Some(doc), Op::Upsert, Some(etag)) => {
                    let (e_ts, e_doc) = etag.split_once('\n').ok_or_else(|| {
                        anyhow!("malformed etag for {collection}/{}", w.record.id)
                    })?;
                    updates.push(serde_json::json!([
                        w.record.id,
                        e_ts,
                        e_doc,
                        canonical_json(doc),
                        format_ts(w.record.updated_at_ms)
                    ]))
                }
                _ => outcomes[i] = Some(self.apply_one(tx, collection, w).await?),
            }
        }
        let (doc_cast, ts_cast) = match d {
            Dialect::Postgres => ("::jsonb", "::timestamptz"),
            Dialect::Sqlite | Dialect::Mysql => ("", ""),
        };
        let insert_sql = format!(
            "INSERT INTO \"{collection}\" (id, doc, updated_at) \
             SELECT c0, c1{doc_cast}, c2{ts_cast} FROM {} AS u WHERE true \
             ON CONFLICT (id) DO NOTHING RETURNING id",
            Self::json_rows(d, 3)
        );
        let t = format!("\"{collection}\"");
        let (returning, cur_doc) = match d {
            Dialect::Postgres => (format!("{t}.id"), format!("{t}.doc::text")),
            Dialect::Sqlite | Dialect::Mysql => ("id".to_string(), format!("{t}.doc")),
        };
        let update_sql = format!(
            "UPDATE {t} SET doc = u.c3{doc_cast}, updated_at = u.c4{ts_cast} FROM {} AS u \
             WHERE {t}.id = u.c0 AND {} = u.c1 AND {cur_doc} = u.c2 RETURNING {returning}",
            Self::json_rows(d, 5),
            d.ts_text(&format!("{t}.updated_at")),
        );
        let mut applied = Self::batch_statement(tx, insert_sql, inserts).await?;
        applied.extend(Self::batch_statement(tx, update_sql, updates).await?);
        let unsure: Vec<String> = writes
            .iter()
            .zip(&outcomes)
            .filter(|(w, o)| o.is_none() && !applied.contains(&w.record.id))
            .map(|(w, _)| w.record.id.clone())
            .collect();
        let mut current: BTreeMap<String, Slot> = BTreeMap::new();
        for chunk in unsure.chunks(500) {
            let slots = self.read_with(&mut **tx, collection, chunk).await?;
            current.extend(chunk.iter().cloned().zip(slots));
        }
        Ok(writes
            .iter()
            .zip(outcomes)
            .map(|(w, o)| {
                if let Some(o) = o {
                    return o;
                }
                if applied.contains(&w.record.id) {
                    return ApplyOutcome::Applied;
                }
                not_applied(current.get(&w.record.id).unwrap_or(&Slot::Absent), w)
            })
            .collect())
    }

    /// MySQL's batch of writes with distinct ids. MySQL has no `UPDATE … RETURNING` to say
    /// which rows of one statement applied, so the rows are read first with `FOR UPDATE` (which
    /// locks each row, and the gap an absent one would go in, until the commit), each upsert's
    /// expectation is checked against that read, and the upserts that hold go in one multi-row
    /// `INSERT … ON DUPLICATE KEY UPDATE`. One statement per write cost a round trip each and
    /// capped writes into MySQL at about 1,500/s on our machines. A statement the server
    /// refuses is rolled back to a savepoint and the writes go one by one, as before.
    async fn apply_batch_mysql(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        collection: &str,
        writes: &[Write],
    ) -> Result<Vec<ApplyOutcome>> {
        let d = self.dialect;
        let mut outcomes: Vec<Option<ApplyOutcome>> = vec![None; writes.len()];
        let mut batch = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            let in_range =
                (MYSQL_TS_RANGE_MS.0..=MYSQL_TS_RANGE_MS.1).contains(&w.record.updated_at_ms);
            if w.record.op == Op::Upsert && w.record.doc.is_some() && in_range {
                batch.push(i);
            } else {
                // Deletes (rare) and writes MySQL refuses go one by one.
                outcomes[i] = Some(self.apply_one(tx, collection, w).await?);
            }
        }
        if !batch.is_empty() {
            let sql = format!(
                "SELECT {} FROM \"{collection}\" WHERE id IN ({}) FOR UPDATE",
                self.select_cols(),
                vec!["?"; batch.len()].join(",")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for &i in &batch {
                q = q.bind(writes[i].record.id.clone());
            }
            let mut current: HashMap<String, Slot> = HashMap::new();
            for row in q.fetch_all(&mut **tx).await? {
                let id: String = row.try_get("id")?;
                let slot = Self::row_slot(
                    &id,
                    &row.try_get::<String, _>("ts")?,
                    &row.try_get::<String, _>("doc")?,
                );
                current.insert(id, slot);
            }
            let mut go = Vec::new();
            for &i in &batch {
                let w = &writes[i];
                let cur = current.get(&w.record.id);
                let holds = match (cur, &w.expected) {
                    (None, None) => true,
                    (Some(Slot::Present(r)), Some(etag)) => &r.etag == etag,
                    _ => false,
                };
                if holds {
                    go.push(i);
                    continue;
                }
                outcomes[i] = Some(not_applied(cur.unwrap_or(&Slot::Absent), w));
            }
            if !go.is_empty() {
                let sql = format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES {} \
                     ON DUPLICATE KEY UPDATE doc = VALUES(doc), updated_at = VALUES(updated_at)",
                    vec![format!("(?, ?, {})", d.p_ts(0)); go.len()].join(",")
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for &i in &go {
                    let r = &writes[i].record;
                    q = q
                        .bind(r.id.clone())
                        .bind(canonical_json(
                            r.doc.as_ref().expect("upserts carry a document"),
                        ))
                        .bind(format_ts(r.updated_at_ms));
                }
                sqlx::query("SAVEPOINT syncbridge_batch")
                    .execute(&mut **tx)
                    .await?;
                match q.execute(&mut **tx).await {
                    Ok(_) => {
                        for &i in &go {
                            outcomes[i] = Some(ApplyOutcome::Applied);
                        }
                    }
                    Err(sqlx::Error::Database(e)) => {
                        debug!(error = %e, "MySQL refused a batch; applying its writes one by one");
                        sqlx::query("ROLLBACK TO SAVEPOINT syncbridge_batch")
                            .execute(&mut **tx)
                            .await?;
                        for &i in &go {
                            outcomes[i] = Some(self.apply_one(tx, collection, &writes[i]).await?);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every write has an outcome"))
            .collect())
    }

    /// Applies one write inside the transaction, returning its outcome.
    async fn apply_one(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        collection: &str,
        w: &Write,
    ) -> Result<ApplyOutcome> {
        let d = self.dialect;
        let id = w.record.id.clone();
        let expected = match &w.expected {
            Some(etag) => Some(
                etag.split_once('\n')
                    .ok_or_else(|| anyhow!("malformed etag for {collection}/{id}"))?,
            ),
            None => None,
        };
        let guard = format!(
            "{} = {} AND {} = {}",
            d.ts_text("updated_at"),
            d.p(2),
            d.doc_text(),
            d.p(3)
        );
        if d == Dialect::Mysql
            && w.record.op == Op::Upsert
            && !(MYSQL_TS_RANGE_MS.0..=MYSQL_TS_RANGE_MS.1).contains(&w.record.updated_at_ms)
        {
            return Ok(ApplyOutcome::Rejected(format!(
                "updatedAt {} is outside the range of a MySQL TIMESTAMP column (1970-01-01 to 2038-01-19 UTC)",
                format_ts(w.record.updated_at_ms)
            )));
        }
        let affected = match (&w.record.doc, w.record.op) {
            (Some(doc), Op::Upsert) => {
                let doc_text = canonical_json(doc);
                let ts = format_ts(w.record.updated_at_ms);
                let sql = match (expected, d) {
                    // MySQL binds by position: the same statement, its parameters in the order
                    // they appear (id, expected time and document, then the new ones).
                    (Some(_), Dialect::Mysql) => format!(
                        "UPDATE \"{collection}\" SET doc = ?, updated_at = {} WHERE id = ? AND {guard}",
                        d.p_ts(0),
                    ),
                    (Some(_), _) => format!(
                        "UPDATE \"{collection}\" SET doc = {}, updated_at = {} WHERE id = {} AND {guard}",
                        d.p_doc(4),
                        d.p_ts(5),
                        d.p(1)
                    ),
                    // MySQL has no ON CONFLICT DO NOTHING (INSERT IGNORE would also swallow
                    // truncation errors): a duplicate key fails this statement alone, and the
                    // read below classifies the write.
                    (None, Dialect::Mysql) => format!(
                        "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES (?, ?, {})",
                        d.p_ts(0)
                    ),
                    (None, _) => format!(
                        "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES ({}, {}, {}) \
                         ON CONFLICT (id) DO NOTHING",
                        d.p(1),
                        d.p_doc(2),
                        d.p_ts(3)
                    ),
                };
                let q = sqlx::query(AssertSqlSafe(sql));
                let q = match (expected, d) {
                    (Some((e_ts, e_doc)), Dialect::Mysql) => q
                        .bind(doc_text)
                        .bind(ts)
                        .bind(id.clone())
                        .bind(e_ts.to_string())
                        .bind(e_doc.to_string()),
                    (Some((e_ts, e_doc)), _) => q
                        .bind(id.clone())
                        .bind(e_ts.to_string())
                        .bind(e_doc.to_string())
                        .bind(doc_text)
                        .bind(ts),
                    (None, _) => q.bind(id.clone()).bind(doc_text).bind(ts),
                };
                match q.execute(&mut **tx).await {
                    Ok(done) => done.rows_affected(),
                    Err(sqlx::Error::Database(e))
                        if d == Dialect::Mysql
                            && e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
                    {
                        0
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => match expected {
                Some((e_ts, e_doc)) => {
                    let sql = format!(
                        "DELETE FROM \"{collection}\" WHERE id = {} AND {guard}",
                        d.p(1)
                    );
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(id.clone())
                        .bind(e_ts.to_string())
                        .bind(e_doc.to_string())
                        .execute(&mut **tx)
                        .await?
                        .rows_affected()
                }
                None => 0,
            },
        };
        if affected == 1 {
            return Ok(ApplyOutcome::Applied);
        }
        // Not applied: either the store already holds the result (a replay) or it moved on.
        let current = self
            .read_with(&mut **tx, collection, std::slice::from_ref(&id))
            .await?
            .pop()
            .unwrap_or(Slot::Absent);
        Ok(not_applied(&current, w))
    }
}

/// The outcome of a conditional write that did not apply, from what the store holds now: a
/// replay of what is there already (`Unchanged`), or the record moved on (`Conflict`).
fn not_applied(current: &Slot, w: &Write) -> ApplyOutcome {
    match (current, &w.record.doc, w.record.op) {
        (Slot::Absent, _, Op::Delete) => ApplyOutcome::Unchanged,
        (Slot::Present(cur), Some(doc), Op::Upsert)
            if canonical_hash(&cur.doc) == canonical_hash(doc) =>
        {
            ApplyOutcome::Unchanged
        }
        _ => ApplyOutcome::Conflict,
    }
}

impl SqlStore {
    /// Brings a change log made by an older version up to date: adds the `consumer` column
    /// (rows already there keep no consumer until a bridge of their collections adopts them, see
    /// [`Self::register`]), makes the `(consumer, seq)` index, and drops the capture triggers
    /// that do not fan out, so the collection DDL that follows makes them anew (SQLite and MySQL
    /// only create a missing trigger; PostgreSQL's triggers call `_syncbridge_capture`, which
    /// `log_ddl` has just replaced). On SQLite and PostgreSQL this runs in `prepare`'s
    /// transaction, so no write goes unlogged in between; MySQL cannot make DDL transactional,
    /// so there a write landing between the DROP and the CREATE of the one-time upgrade is
    /// missed by the listener (the sweeps still find it).
    async fn upgrade_log(&self, conn: &mut sqlx::AnyConnection) -> Result<()> {
        let d = self.dialect;
        let probe = match d {
            Dialect::Sqlite => format!(
                "SELECT COUNT(*) FROM pragma_table_info('{CHANGE_LOG}') WHERE name = 'consumer'"
            ),
            Dialect::Postgres => format!(
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() \
                 AND table_name = '{CHANGE_LOG}' AND column_name = 'consumer'"
            ),
            Dialect::Mysql => format!(
                "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME = '{CHANGE_LOG}' AND COLUMN_NAME = 'consumer'"
            ),
        };
        let has: i64 = sqlx::query(AssertSqlSafe(probe))
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        if has == 0 {
            let sql = match d {
                Dialect::Mysql => format!(
                    "ALTER TABLE {CHANGE_LOG} ADD COLUMN {MYSQL_CONSUMER_COL}, \
                     ADD INDEX \"{LOG_CONSUMER_IDX}\" (consumer, seq)"
                ),
                _ => format!("ALTER TABLE {CHANGE_LOG} ADD COLUMN consumer TEXT"),
            };
            conn.execute(AssertSqlSafe(sql)).await?;
            info!(store = %redact_uri(&self.uri), "change log upgraded: one copy per consumer");
        }
        if d != Dialect::Mysql {
            conn.execute(AssertSqlSafe(format!(
                "CREATE INDEX IF NOT EXISTS \"{LOG_CONSUMER_IDX}\" ON {CHANGE_LOG} (consumer, seq)"
            )))
            .await?;
        }
        let outdated = match d {
            Dialect::Postgres => return Ok(()),
            Dialect::Sqlite => format!(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' \
                 AND sql LIKE '%{CHANGE_LOG}%' AND sql NOT LIKE '%{CONSUMERS}%'"
            ),
            Dialect::Mysql => format!(
                "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() \
                 AND ACTION_STATEMENT LIKE '%{CHANGE_LOG}%' AND ACTION_STATEMENT NOT LIKE '%{CONSUMERS}%'"
            ),
        };
        let names: Vec<String> = sqlx::query(AssertSqlSafe(outdated))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        // Only our own triggers (named by us, so no quote inside); a user's trigger that writes
        // to the log is theirs to change.
        for name in names
            .iter()
            .filter(|n| n.starts_with("_syncbridge_") && !n.contains('"'))
        {
            conn.execute(AssertSqlSafe(format!("DROP TRIGGER IF EXISTS \"{name}\"")))
                .await?;
            debug!(trigger = %name, "dropped a capture trigger that does not fan out");
        }
        Ok(())
    }

    /// Registers this bridge as a consumer of the change log (or refreshes its registration),
    /// and adopts the log rows no consumer owns (left by a version before consumers) of its
    /// collections. Says what it found, so a registration that had been dropped is noticed.
    async fn register(
        &self,
        conn: &mut sqlx::AnyConnection,
        collections: &[String],
    ) -> Result<Registration> {
        let d = self.dialect;
        let found = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} AS dropped FROM {CONSUMERS} WHERE name = {}",
            d.ts_text("dropped_at"),
            d.p(1)
        )))
        .bind(self.instance_id.clone())
        .fetch_optional(&mut *conn)
        .await?;
        let registration = match found {
            None => Registration::New,
            Some(row) => match row.try_get::<Option<String>, _>("dropped")? {
                None => Registration::Live,
                Some(_) => Registration::Dropped,
            },
        };
        let now = d.now_sql();
        let upsert = match d {
            Dialect::Mysql => format!(
                "INSERT INTO {CONSUMERS} (name, last_seen, dropped_at) VALUES (?, {now}, NULL) \
                 ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen), dropped_at = NULL"
            ),
            _ => format!(
                "INSERT INTO {CONSUMERS} (name, last_seen, dropped_at) VALUES ({}, {now}, NULL) \
                 ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, dropped_at = NULL",
                d.p(1)
            ),
        };
        sqlx::query(AssertSqlSafe(upsert))
            .bind(self.instance_id.clone())
            .execute(&mut *conn)
            .await?;
        if !collections.is_empty() {
            let names: Vec<String> = (0..collections.len()).map(|i| d.p(i + 2)).collect();
            let mut q = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {CHANGE_LOG} SET consumer = {} WHERE consumer IS NULL AND collection IN ({})",
                d.p(1),
                names.join(",")
            )))
            .bind(self.instance_id.clone());
            for c in collections {
                q = q.bind(c.clone());
            }
            let adopted = q.execute(&mut *conn).await?.rows_affected();
            if adopted > 0 {
                info!(store = %redact_uri(&self.uri), rows = adopted, "adopted change-log rows of an older version");
            }
        }
        if registration == Registration::Dropped {
            warn!(
                store = %redact_uri(&self.uri),
                instance = %self.instance_id,
                "this bridge's change-log registration had been dropped (unseen longer than the retention); registered again, a full sweep finds what changed meanwhile"
            );
            self.registration_lost.store(true, Ordering::SeqCst);
        }
        Ok(registration)
    }

    /// Drops the consumers unseen for the retention period, and their log rows, so a bridge
    /// that never comes back does not make the log grow forever. A dropped consumer keeps its
    /// row (marked `dropped_at`), so the bridge, if it does come back, can tell it missed
    /// changes. Rows no consumer owns go after the same period.
    async fn drop_abandoned(&self, conn: &mut sqlx::AnyConnection) -> Result<()> {
        let d = self.dialect;
        let cutoff = d.ago_sql(self.consumer_retention.as_secs());
        let names: Vec<String> = sqlx::query(AssertSqlSafe(format!(
            "SELECT name FROM {CONSUMERS} WHERE dropped_at IS NULL AND last_seen < {cutoff} AND name <> {}",
            d.p(1)
        )))
        .bind(self.instance_id.clone())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        for name in names {
            // Checked again in the UPDATE: the consumer may have come back since the SELECT.
            let dropped = sqlx::query(AssertSqlSafe(format!(
                "UPDATE {CONSUMERS} SET dropped_at = {} WHERE name = {} AND dropped_at IS NULL \
                 AND last_seen < {cutoff}",
                d.now_sql(),
                d.p(1)
            )))
            .bind(name.clone())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if dropped == 0 {
                continue;
            }
            let rows = sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {CHANGE_LOG} WHERE consumer = {}",
                d.p(1)
            )))
            .bind(name.clone())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            warn!(
                store = %redact_uri(&self.uri),
                consumer = %name,
                rows,
                retention_secs = self.consumer_retention.as_secs(),
                "dropped a change-log consumer unseen longer than the retention, with its rows"
            );
        }
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {CHANGE_LOG} WHERE consumer IS NULL AND changed_at < {cutoff}"
        )))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Refreshes this bridge's `last_seen`. If the registration is gone (dropped by another
    /// bridge while this one was stalled or its clock of the retention was shorter), registers
    /// again and reports [`PositionLost`]: changes were not logged for it meanwhile.
    async fn heartbeat(&self, collections: &[String]) -> Result<()> {
        let d = self.dialect;
        let seen = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {CONSUMERS} SET last_seen = {} WHERE name = {} AND dropped_at IS NULL",
            d.now_sql(),
            d.p(1)
        )))
        .bind(self.instance_id.clone())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if seen > 0 {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        self.register(&mut conn, collections).await?;
        self.registration_lost.store(false, Ordering::SeqCst);
        Err(PositionLost(format!(
            "this bridge's change-log registration on {} was dropped; registered again",
            redact_uri(&self.uri)
        ))
        .into())
    }

    /// The collation for MySQL ids: binary (case matters) and NO PAD (a trailing space
    /// matters) where the server has one (`utf8mb4_nopad_bin` on MariaDB, `utf8mb4_0900_bin`
    /// on MySQL 8), else `utf8mb4_bin`, which ignores trailing spaces in comparisons.
    async fn mysql_key_collation(
        conn: &mut sqlx::pool::PoolConnection<sqlx::Any>,
    ) -> Result<String> {
        let found: Option<String> = sqlx::query(
            "SELECT COLLATION_NAME FROM information_schema.COLLATIONS \
             WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin') \
             ORDER BY COLLATION_NAME DESC LIMIT 1",
        )
        .fetch_optional(&mut **conn)
        .await?
        .map(|r| r.try_get::<String, _>(0))
        .transpose()?;
        Ok(found.unwrap_or_else(|| "utf8mb4_bin".to_string()))
    }

    /// The body of `prepare`, on the connection holding the prepare lock (in its transaction
    /// where the dialect has transactional DDL): the change log and consumers, the upgrade of
    /// an older log, the collections' `statements`, then this bridge's registration and the
    /// drop of abandoned consumers.
    ///
    /// Registration happens here, before the listener starts, so nothing written after
    /// `prepare` escapes this bridge's log. Writes made while a bridge was not registered at
    /// all are not in its log; the engine's sweeps cover them: a bridge new to a database runs
    /// a full sweep first (it has no sweep marks yet), and one whose registration had been
    /// dropped is told so (`registration_lost`, then [`PositionLost`] from `listen`), which
    /// makes the engine run a full sweep.
    async fn prepare_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        collections: &[String],
        statements: Vec<String>,
    ) -> Result<()> {
        for sql in self.dialect.log_ddl() {
            conn.execute(AssertSqlSafe(sql.clone()))
                .await
                .with_context(|| format!("preparing {}: {sql}", redact_uri(&self.uri)))?;
        }
        self.upgrade_log(conn)
            .await
            .with_context(|| format!("upgrading the change log of {}", redact_uri(&self.uri)))?;
        for sql in statements {
            conn.execute(AssertSqlSafe(sql.clone()))
                .await
                .with_context(|| format!("preparing {}: {sql}", redact_uri(&self.uri)))?;
        }
        self.register(conn, collections)
            .await
            .with_context(|| format!("registering as a consumer of {}", redact_uri(&self.uri)))?;
        self.drop_abandoned(conn)
            .await
            .with_context(|| format!("dropping abandoned consumers of {}", redact_uri(&self.uri)))
    }

    /// MySQL's prepare: DDL commits implicitly (no transaction to hold it), so a named lock
    /// keeps bridges preparing one database at once from racing.
    async fn prepare_mysql(&self, collections: &[String]) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        let locked: Option<i64> = sqlx::query("SELECT GET_LOCK('syncbridge_prepare', 30)")
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        if locked != Some(1) {
            bail!(
                "{}: another bridge held the prepare lock for 30 s",
                redact_uri(&self.uri)
            );
        }
        let result = async {
            let collation = Self::mysql_key_collation(&mut conn).await?;
            let mut statements = Vec::new();
            for c in collections {
                statements.extend(self.dialect.collection_ddl(c, &collation));
            }
            self.prepare_on(&mut conn, collections, statements).await
        }
        .await;
        sqlx::query("SELECT RELEASE_LOCK('syncbridge_prepare')")
            .execute(&mut *conn)
            .await?;
        result?;
        info!(store = %redact_uri(&self.uri), ?collections, "tables and change-capture triggers ready");
        Ok(())
    }
}

/// Adds `mode=rwc` (create the file) to a SQLite URI and makes its directory.
fn sqlite_uri(uri: &str) -> Result<String> {
    let rest = uri
        .strip_prefix("sqlite://")
        .or_else(|| uri.strip_prefix("sqlite:"))
        .unwrap_or(uri);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        bail!(
            "a SQLite store needs a file path (sqlite://path/to/file.db): another process must see it"
        );
    }
    if let Some(dir) = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(if rest.contains("mode=") {
        uri.to_string()
    } else if rest.contains('?') {
        format!("{uri}&mode=rwc")
    } else {
        format!("{uri}?mode=rwc")
    })
}

#[async_trait]
impl Store for SqlStore {
    fn describe(&self) -> String {
        redact_uri(&self.uri)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_changes: true,
            time_index: true,
            typed_tables: true,
            delete_times: true,
        }
    }

    async fn prepare(&self, collections: &[String]) -> Result<()> {
        if self.dialect == Dialect::Mysql {
            return self.prepare_mysql(collections).await;
        }
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            // Many bridges may prepare one database at once; DDL must not race.
            tx.execute("SELECT pg_advisory_xact_lock(7252011)").await?;
        } else {
            // WAL lets the listener read while the application writes.
            sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_all(&self.pool)
                .await?;
        }
        let mut statements = Vec::new();
        for c in collections {
            statements.extend(self.dialect.collection_ddl(c, ""));
        }
        self.prepare_on(&mut tx, collections, statements).await?;
        tx.commit().await?;
        info!(store = %redact_uri(&self.uri), ?collections, "tables and change-capture triggers ready");
        Ok(())
    }

    async fn prepare_tables(&self, specs: &[TableSpec]) -> Result<Vec<TableFacts>> {
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        // The change log the triggers write to, then the tables one by one, under the same
        // lock `prepare` takes so bridges starting together do not race on DDL.
        let mut lock_conn = self.pool.acquire().await?;
        match self.dialect {
            Dialect::Postgres => {
                lock_conn
                    .execute("SELECT pg_advisory_lock(7252011)")
                    .await?;
            }
            Dialect::Mysql => {
                sqlx::query("SELECT GET_LOCK('syncbridge_prepare', 30)")
                    .execute(&mut *lock_conn)
                    .await?;
            }
            Dialect::Sqlite => {}
        }
        let result = async {
            for sql in self.dialect.log_ddl() {
                sqlx::query(AssertSqlSafe(sql.clone()))
                    .execute(&self.pool)
                    .await
                    .with_context(|| format!("preparing {}: {sql}", redact_uri(&self.uri)))?;
            }
            let mut facts = Vec::new();
            for spec in specs {
                let (table, f) = typed::prepare(&self.pool, self.dialect, spec)
                    .await
                    .with_context(|| {
                        format!("mapping {} onto {}", spec.collection, redact_uri(&self.uri))
                    })?;
                self.typed
                    .write()
                    .expect("typed tables lock")
                    .insert(spec.collection.clone(), Arc::new(table));
                facts.push(f);
            }
            anyhow::Ok(facts)
        }
        .await;
        match self.dialect {
            Dialect::Postgres => {
                lock_conn
                    .execute("SELECT pg_advisory_unlock(7252011)")
                    .await?;
            }
            Dialect::Mysql => {
                sqlx::query("SELECT RELEASE_LOCK('syncbridge_prepare')")
                    .execute(&mut *lock_conn)
                    .await?;
            }
            Dialect::Sqlite => {}
        }
        result
    }

    async fn read(&self, collection: &str, ids: &[String]) -> Result<Vec<Slot>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            out.extend(self.read_with(&self.pool, collection, chunk).await?);
        }
        Ok(out)
    }

    async fn apply(&self, collection: &str, writes: &[Write]) -> Result<Vec<ApplyOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            // Tags this transaction's change-log rows as ours.
            sqlx::query("SELECT set_config('syncbridge.origin', $1, true)")
                .bind(self.instance_id.clone())
                .execute(&mut *tx)
                .await?;
        }
        if let Some(t) = self.typed(collection) {
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                outcomes.push(
                    t.apply_one(self.dialect, &mut tx, &w.record, w.expected.as_deref())
                        .await?,
                );
            }
            tx.commit().await?;
            return Ok(outcomes);
        }
        let ids: HashSet<&str> = writes.iter().map(|w| w.record.id.as_str()).collect();
        // MySQL has no UPDATE ... RETURNING to tell which rows of a batch statement applied:
        // its writes go one statement each, still in one transaction.
        let distinct = ids.len() == writes.len() && writes.len() > 1;
        let outcomes = if distinct && self.dialect == Dialect::Mysql {
            self.apply_batch_mysql(&mut tx, collection, writes).await?
        } else if distinct {
            self.apply_batch(&mut tx, collection, writes).await?
        } else {
            // One write, or an id twice (order matters then): statement by statement.
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                outcomes.push(self.apply_one(&mut tx, collection, w).await?);
            }
            outcomes
        };
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn scan(
        &self,
        collection: &str,
        since_ms: Option<i64>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<ScanPage> {
        let d = self.dialect;
        if let Some(t) = self.typed(collection) {
            return t.scan(d, &self.pool, since_ms, cursor, limit).await;
        }
        let mut conds = Vec::new();
        let mut binds = Vec::new();
        if let Some(s) = since_ms {
            binds.push(format_ts(s));
            conds.push(format!("updated_at >= {}", d.p_ts(binds.len())));
        }
        if let Some((ts, id)) = cursor.as_deref().and_then(|c| c.split_once('\n')) {
            binds.push(ts.to_string());
            let t1 = d.p_ts(binds.len());
            if d == Dialect::Mysql {
                // Each placeholder bound once, in order (MySQL's are positional).
                binds.push(ts.to_string());
                let t2 = d.p_ts(binds.len());
                binds.push(id.to_string());
                let i = d.p(binds.len());
                conds.push(format!(
                    "(updated_at > {t1} OR (updated_at = {t2} AND id > {i}))"
                ));
            } else {
                // A row comparison is one index range: the OR form made PostgreSQL filter
                // every row of the current time before the cursor (155 ms vs 0.8 ms for a page
                // 900,000 rows into a million that share one updatedAt).
                binds.push(id.to_string());
                let i = d.p(binds.len());
                conds.push(format!("(updated_at, id) > ({t1}, {i})"));
            }
        }
        let sql = format!(
            "SELECT {} FROM \"{collection}\" {} ORDER BY updated_at, id LIMIT {}",
            self.select_cols(),
            if conds.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conds.join(" AND "))
            },
            limit.max(1)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut page = ScanPage::default();
        let full = rows.len() >= limit.max(1);
        let mut last = None;
        for row in rows {
            let id: String = row.try_get("id")?;
            let ts: String = row.try_get("ts")?;
            match Self::row_slot(&id, &ts, &row.try_get::<String, _>("doc")?) {
                Slot::Present(r) => page.records.push(r),
                Slot::Invalid(reason) => page.invalid.push((id.clone(), reason)),
                Slot::Absent => {}
            }
            last = Some(format!("{ts}\n{id}"));
        }
        page.next = if full { last } else { None };
        Ok(page)
    }

    async fn deletion_times(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>> {
        let d = self.dialect;
        let mut out = std::collections::HashMap::new();
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (3..chunk.len() + 3).map(|i| d.p(i)).collect();
            let sql = format!(
                "SELECT id, max({}) AS at FROM {CHANGE_LOG} \
                 WHERE consumer = {} AND collection = {} AND id IN ({}) GROUP BY id",
                d.ts_text("changed_at"),
                d.p(1),
                d.p(2),
                placeholders.join(",")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql))
                .bind(self.instance_id.clone())
                .bind(collection.to_string());
            for id in chunk {
                q = q.bind(id.clone());
            }
            for row in q.fetch_all(&self.pool).await? {
                if let Some(ms) = parse_ts(&row.try_get::<String, _>("at")?) {
                    out.insert(row.try_get::<String, _>("id")?, ms);
                }
            }
        }
        Ok(out)
    }

    async fn listen(&self, ctx: ListenContext) -> Result<()> {
        if self.registration_lost.swap(false, Ordering::SeqCst) {
            return Err(PositionLost(format!(
                "this bridge's change-log registration on {} had been dropped as abandoned; registered again",
                redact_uri(&self.uri)
            ))
            .into());
        }
        let mut pg_listener = if self.dialect == Dialect::Postgres {
            let mut l = sqlx::postgres::PgListener::connect(&self.uri)
                .await
                .with_context(|| format!("cannot LISTEN on {}", redact_uri(&self.uri)))?;
            l.listen(NOTIFY_CHANNEL).await?;
            Some(l)
        } else {
            None
        };
        // SQLite: one connection kept to watch data_version (it only moves on other
        // connections' commits, so it must be the same connection every time).
        // MySQL: one connection kept to poll the log's highest sequence number.
        let mut watch = if self.dialect != Dialect::Postgres {
            Some(self.pool.acquire().await?)
        } else {
            None
        };
        let mut data_version: i64 = -1;
        let (poll, check_every, watch_sql) = match self.dialect {
            Dialect::Mysql => (
                PG_FALLBACK_POLL,
                MYSQL_POLL,
                format!("SELECT COALESCE(MAX(seq), 0) FROM {CHANGE_LOG} WHERE consumer = ?"),
            ),
            _ => (
                SQLITE_POLL,
                SQLITE_WAKE_CHECK,
                "PRAGMA data_version".to_string(),
            ),
        };
        info!(side = %ctx.side, store = %redact_uri(&self.uri), "listening to the change log");
        // Start behind everything: whatever is still in the log was never settled.
        let mut position = 0i64;
        let mut last_behind_scan = Instant::now() - BEHIND_SCAN_EVERY;
        // Both due at once: a listener that (re)starts confirms its registration first.
        let mut last_heartbeat = Instant::now() - CONSUMER_HEARTBEAT;
        let mut last_cleanup = Instant::now();
        loop {
            if last_heartbeat.elapsed() >= CONSUMER_HEARTBEAT {
                last_heartbeat = Instant::now();
                self.heartbeat(&ctx.collections).await?;
            }
            if last_cleanup.elapsed() >= CONSUMER_CLEANUP_EVERY {
                last_cleanup = Instant::now();
                let mut conn = self.pool.acquire().await?;
                if let Err(e) = self.drop_abandoned(&mut conn).await {
                    warn!(error = %format!("{e:#}"), "could not drop abandoned change-log consumers");
                }
            }
            // Drain what is ahead of the read position.
            loop {
                if !wait_until_taken(&ctx).await {
                    return Ok(());
                }
                let rows = self.read_log(&ctx.collections, position, false).await?;
                let Some(last) = rows.last() else { break };
                position = last.seq;
                let n = rows.len();
                if !self.deliver(&ctx, rows).await? {
                    return Ok(());
                }
                if (n as i64) < LOG_BATCH {
                    break;
                }
            }
            if last_behind_scan.elapsed() >= BEHIND_SCAN_EVERY {
                last_behind_scan = Instant::now();
                let rows = self.read_log(&ctx.collections, position, true).await?;
                let rows: Vec<LogRow> = {
                    let in_flight = self.in_flight.lock().expect("in-flight lock");
                    rows.into_iter()
                        .filter(|r| !in_flight.contains(&r.seq))
                        .collect()
                };
                if !rows.is_empty() {
                    debug!(
                        count = rows.len(),
                        "re-reading change-log rows behind the read position"
                    );
                    if !self.deliver(&ctx, rows).await? {
                        return Ok(());
                    }
                }
            }
            match &mut pg_listener {
                Some(l) => tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    n = tokio::time::timeout(PG_FALLBACK_POLL, l.recv()) => {
                        if let Ok(Err(e)) = n {
                            return Err(anyhow!(e).context(format!("lost LISTEN connection to {}", redact_uri(&self.uri))));
                        }
                        // One read of the log covers every notification already here.
                        while l.next_buffered().is_some() {}
                    }
                },
                None => {
                    let until = Instant::now() + poll;
                    while Instant::now() < until {
                        tokio::select! {
                            _ = ctx.shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(check_every) => {}
                        }
                        if let Some(conn) = watch.as_mut() {
                            let mut q = sqlx::query(AssertSqlSafe(watch_sql.as_str()));
                            if self.dialect == Dialect::Mysql {
                                q = q.bind(self.instance_id.clone());
                            }
                            let v: i64 = q.fetch_one(&mut **conn).await?.try_get(0)?;
                            if v != data_version {
                                data_version = v;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn settle(&self, ack: Ack, applied: bool) -> Result<Option<String>> {
        let Ack::Seqs(seqs) = ack else {
            return Ok(None);
        };
        if applied {
            for chunk in seqs.chunks(500) {
                let placeholders: Vec<String> =
                    (2..chunk.len() + 2).map(|i| self.dialect.p(i)).collect();
                let sql = format!(
                    "DELETE FROM {CHANGE_LOG} WHERE consumer = {} AND seq IN ({})",
                    self.dialect.p(1),
                    placeholders.join(",")
                );
                let mut q = sqlx::query(AssertSqlSafe(sql)).bind(self.instance_id.clone());
                for s in chunk {
                    q = q.bind(*s);
                }
                if let Err(e) = q.execute(&self.pool).await {
                    // Keep the rows in flight: they stay in the log and are replayed after a
                    // restart, which conditional applies make harmless.
                    warn!(error = %e, "could not trim the change log");
                    return Err(e.into());
                }
            }
        }
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        for s in &seqs {
            in_flight.remove(s);
        }
        Ok(None)
    }
}

/// Waits (up to [`TAKEN_WAIT_MAX`]) until the engine has taken every batch waiting in the
/// channel; `false` on shutdown.
///
/// This is what sizes batches to the load. Reading the log while earlier batches still wait
/// (the engine busy with a pass) cuts it into many small batches, and a pass takes at most the
/// channel's worth of them: fed by one NOTIFY per write, PostgreSQL's listener sent batches of
/// one or two rows, passes were capped at about 35 records, and PostgreSQL → MySQL fell behind
/// at 1,000 writes/s (p50 0.4 s). Waiting lets the next read take everything that arrived
/// during the pass, in one batch; when the engine is idle there is nothing to wait for.
async fn wait_until_taken(ctx: &ListenContext) -> bool {
    let deadline = Instant::now() + TAKEN_WAIT_MAX;
    while ctx.sink.capacity() < ctx.sink.max_capacity() && Instant::now() < deadline {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
    true
}

/// The longest a listener waits for the engine to take earlier batches before it reads anyway
/// (the other listener may keep the channel busy).
const TAKEN_WAIT_MAX: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_uris_create_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("sqlite://{}/sub/x.db", dir.path().display());
        assert_eq!(sqlite_uri(&uri).unwrap(), format!("{uri}?mode=rwc"));
        assert!(dir.path().join("sub").is_dir());
        assert!(sqlite_uri("sqlite::memory:").is_err());
    }

    #[test]
    fn rows_become_slots() {
        match SqlStore::row_slot("1", "2026-11-24T10:00:00.123Z", r#"{"a":1}"#) {
            Slot::Present(r) => {
                assert_eq!(r.doc["updatedAt"], "2026-11-24T10:00:00.123Z");
                assert_eq!(r.etag, "2026-11-24T10:00:00.123Z\n{\"a\":1}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            SqlStore::row_slot("1", "x", "{}"),
            Slot::Invalid(_)
        ));
        assert!(matches!(
            SqlStore::row_slot("1", "2026-11-24T10:00:00Z", "[1]"),
            Slot::Invalid(_)
        ));
    }
}
