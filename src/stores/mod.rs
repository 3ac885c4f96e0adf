//! Stores: one module per kind of data store, all behind the one [`Store`] trait.
//!
//! A connector knows only its own store. It turns the store's change notifications into
//! [`ChangeRecord`]s, reads records by id, scans what changed since a time, and applies
//! writes *conditionally*: a write names the exact state it expects to replace (an opaque
//! `etag` the connector handed out when it read the record) and is refused if the store has
//! moved on. That single rule is what keeps a late echo or a racing client write from being
//! overwritten; the engine decides, the connector only refuses to apply a stale decision.
//!
//! Delivery guarantee: a listener delivers every change it can see **at least once**; what it
//! cannot see (Redis notifications while disconnected) is found by the engine's sweep. Applies
//! are idempotent: applying a write whose result the store already holds reports
//! [`ApplyOutcome::Unchanged`] and changes nothing.

pub mod mongo;
pub mod redis;
pub mod sql;

use crate::record::{ChangeRecord, Side};
use anyhow::Result;
use async_trait::async_trait;
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A record as a store holds it right now.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// Record id within its collection.
    pub id: String,
    /// The document, with `updatedAt` normalized when the store gave one.
    pub doc: Value,
    /// The record's modification time; `None` when the writer left no usable `updatedAt`.
    pub updated_at_ms: Option<i64>,
    /// The exact stored state, opaque to the engine; a conditional write quotes it back.
    pub etag: String,
}

/// What a read found under one id.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// A record is there.
    Present(StoredRecord),
    /// Nothing is stored under the id.
    Absent,
    /// Something is there that cannot be a record (wrong Redis type, not JSON, not an object).
    Invalid(String),
}

/// One conditional write.
#[derive(Debug, Clone)]
pub struct Write {
    /// What to store: an upsert with its document, or a delete.
    pub record: ChangeRecord,
    /// The state the engine decided from: `Some(etag)` of the record it read, or `None` if it
    /// read no record. The store applies the write only if it still holds exactly that.
    pub expected: Option<String>,
}

/// The result of one conditional write.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutcome {
    /// The store now holds the record.
    Applied,
    /// The store already held the record's content (a replay); nothing was written.
    Unchanged,
    /// The store no longer holds the expected state: someone wrote in between. The engine
    /// reconciles the record again from fresh reads.
    Conflict,
    /// The store refused this record (too large, bad value); the reason says why.
    Rejected(String),
    /// The store cannot take this record *yet*: it references a row that has not arrived (a
    /// foreign key to a parent still on its way). Retried later, never dead-lettered.
    Deferred(String),
}

/// One page of a scan.
#[derive(Debug, Default)]
pub struct ScanPage {
    /// Records found on this page.
    pub records: Vec<StoredRecord>,
    /// Ids whose stored value is not a valid record, with the reason.
    pub invalid: Vec<(String, String)>,
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<String>,
}

/// How a listener's delivery is settled once the engine has applied what it carried.
#[derive(Debug, Clone, Default)]
pub enum Ack {
    /// Nothing to settle (Redis notifications are fire-and-forget).
    #[default]
    None,
    /// Change-log rows to remove now that their changes are applied.
    Seqs(Vec<i64>),
    /// A position (resume token) to persist now that everything before it is applied.
    Token(String),
}

/// A batch of changes from one listener.
#[derive(Debug)]
pub struct ChangeBatch {
    /// Which store the changes were seen on.
    pub side: Side,
    /// The changes, each with the document as the store held it when the listener read it.
    pub records: Vec<ChangeRecord>,
    /// Settled by the engine after the batch is applied (or failed).
    pub ack: Ack,
}

/// Everything a listener needs: what to watch, where to resume, where to send, when to stop.
#[derive(Clone)]
pub struct ListenContext {
    /// The side this store plays, stamped on every record.
    pub side: Side,
    /// Collections to watch.
    pub collections: Vec<String>,
    /// The last persisted position (see [`Ack::Token`]), if the store uses one.
    pub checkpoint: Option<String>,
    /// Bounded: a slow engine slows the listener instead of growing memory.
    pub sink: mpsc::Sender<ChangeBatch>,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
}

/// A listener error that means "my saved position is useless": the store can no longer replay
/// the changes after it (a MongoDB resume token that fell off the oplog), or what it watched was
/// dropped, renamed or invalidated. Changes may have been missed, so the engine restarts the
/// listener from the present (ignoring the checkpoint) and runs a full sweep to find them.
/// Returning this instead of a plain error is what keeps such a listener out of a crash loop.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PositionLost(pub String);

/// What a store can do, so the engine can plan sweeps without naming stores.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Changes made while the bridge is away are kept (trigger log, oplog) and replayed by
    /// the listener. Without it, deletes made while away are found only by a full sweep.
    pub durable_changes: bool,
    /// `scan` with `since` uses an index; without one it walks every record.
    pub time_index: bool,
    /// Collections can live in the application's own typed tables
    /// ([`Store::prepare_tables`]); `table` settings apply to SQL stores only.
    pub typed_tables: bool,
    /// The listener's deletes carry when they happened (a trigger's clock, a change event's
    /// `wallTime`). A Redis `DEL` notification carries no time; the time it was seen is only an
    /// upper bound, which the engine does not use (see [`crate::engine::policy::unknown_delete_time`]).
    pub delete_times: bool,
}

/// A collection kept in an existing typed table (`[[collections]] table = ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// The collection name the engine and the other store know it by.
    pub collection: String,
    /// The table in this store.
    pub table: String,
    /// The primary-key column(s). One column: its value is the record id. Several: each
    /// value with `~` and `:` escaped (`~7E`, `~3A`), joined with `:` (`12:3`), so the id is
    /// one string every store can key by and the values come back out of it exactly.
    pub key: Vec<String>,
    /// The column holding the row's modification time (the record's `updatedAt`).
    pub updated_at: String,
    /// The columns to sync besides the key and `updated_at`; `None` syncs all.
    pub columns: Option<Vec<String>>,
    /// Add the `updated_at` column if the table has none (only when the config says so).
    pub add_updated_at: bool,
}

/// What preparing a typed table found out, for the engine's start-up checks and ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    /// The collection.
    pub collection: String,
    /// Tables this table's foreign keys reference (parents), as named in this store.
    pub references: Vec<String>,
    /// The key is allocated by the database (auto-increment, serial, identity, rowid).
    pub auto_increment: bool,
    /// The progression the database allocates new keys from, when it is known (MySQL
    /// `auto_increment_increment`/`auto_increment_offset`, a sequence's increment and start):
    /// two tables whose progressions share no value cannot give two new rows the same id.
    pub key_range: Option<KeyRange>,
}

/// New keys are `offset + k * step` (k = 0, 1, …): how a server's auto-increment or sequence
/// allocates them, so a start-up check can tell whether two servers' keys can collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange {
    /// The distance between two allocated keys (never 0).
    pub step: i64,
    /// Any one key of the progression (the first one).
    pub offset: i64,
}

impl KeyRange {
    /// Whether no key can be allocated by both: `offset1 + i*step1 = offset2 + j*step2` has a
    /// solution exactly when gcd(step1, step2) divides the offsets' difference.
    pub fn disjoint_from(&self, other: &KeyRange) -> bool {
        fn gcd(a: i128, b: i128) -> i128 {
            if b == 0 { a.abs() } else { gcd(b, a % b) }
        }
        let g = gcd(self.step as i128, other.step as i128);
        g != 0 && (self.offset as i128 - other.offset as i128) % g != 0
    }
}

/// One data store the bridge can keep in step.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The store's URI with any password removed, for logs and status.
    fn describe(&self) -> String;

    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates what the bridge needs (tables, triggers, notification settings). Idempotent.
    async fn prepare(&self, collections: &[String]) -> Result<()>;

    /// Maps collections onto existing typed tables of the application's own schema (column
    /// by column) and installs change capture on them. Idempotent. Only SQL stores have
    /// tables; the others refuse.
    async fn prepare_tables(&self, specs: &[TableSpec]) -> Result<Vec<TableFacts>> {
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        Err(Fatal(format!(
            "{} has no tables: `table` applies only to SQLite, PostgreSQL and MySQL stores",
            self.describe()
        ))
        .into())
    }

    /// Reads the records with these ids, one [`Slot`] per id, in order.
    async fn read(&self, collection: &str, ids: &[String]) -> Result<Vec<Slot>>;

    /// Applies conditional writes, one [`ApplyOutcome`] per write, in order. A store-wide
    /// failure (connection lost) is an `Err`; nothing can be assumed applied then.
    async fn apply(&self, collection: &str, writes: &[Write]) -> Result<Vec<ApplyOutcome>>;

    /// Lists records changed at or after `since_ms` (every record when `None`), a page at a
    /// time, starting from `cursor` (`None` for the first page).
    async fn scan(
        &self,
        collection: &str,
        since_ms: Option<i64>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<ScanPage>;

    /// When these (absent) records were deleted, for the ids the store can still say (a change
    /// log not yet settled). A sweep uses it so a delete it finds competes by its real time
    /// rather than as a delete of unknown time. Stores that keep no such record return nothing.
    async fn deletion_times(
        &self,
        _collection: &str,
        _ids: &[String],
    ) -> Result<std::collections::HashMap<String, i64>> {
        Ok(std::collections::HashMap::new())
    }

    /// Follows the store's changes and sends them to `ctx.sink` until `ctx.shutdown` is
    /// cancelled (returns `Ok`) or the store goes away (returns `Err`; the engine restarts it).
    async fn listen(&self, ctx: ListenContext) -> Result<()>;

    /// Settles a delivered batch: `applied` when everything it carried is applied or durably
    /// queued, so the position may advance; otherwise it is released for redelivery. Returns a
    /// position for the engine to persist, if this store uses one.
    async fn settle(&self, ack: Ack, applied: bool) -> Result<Option<String>>;
}

/// An error that retrying cannot fix (a refused server setting, an unsupported URI): the bridge
/// exits with it instead of waiting for the store to come back.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Whether `e` (or anything in its chain) is [`Fatal`].
pub fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Fatal>())
}

/// Whether `e` is a deadlock or serialization failure the database resolved by aborting our
/// transaction (PostgreSQL `40P01`/`40001`, MySQL 1213): running it again is the remedy. A
/// one-shot `syncbridge sync` preparing tables while an application writes to them met one.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|db| db.code())
            .is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001" | "1213" | "40000"))
    })
}

/// Settings a store takes from the configuration rather than its URI.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// SQL change-log consumers unseen this long are dropped (`sync.consumer_retention_days`).
    pub consumer_retention: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            consumer_retention: sql::DEFAULT_CONSUMER_RETENTION,
        }
    }
}

/// Opens the store a URI names, with default [`StoreOptions`].
pub async fn open(uri: &str, instance_id: &str) -> Result<Arc<dyn Store>> {
    open_with(uri, instance_id, &StoreOptions::default()).await
}

/// Opens the store a URI names, with settings from the configuration.
pub async fn open_with(
    uri: &str,
    instance_id: &str,
    options: &StoreOptions,
) -> Result<Arc<dyn Store>> {
    install_tls_provider();
    let scheme = uri.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "rediss" => Ok(Arc::new(redis::RedisStore::connect(uri).await?)),
        "sqlite" | "postgres" | "postgresql" | "mysql" | "mariadb" => {
            Ok(Arc::new(
                sql::SqlStore::connect_with(
                    uri,
                    instance_id,
                    sql::SqlOptions {
                        consumer_retention: options.consumer_retention,
                        ..sql::SqlOptions::default()
                    },
                )
                .await?,
            ))
        }
        "mongodb" | "mongodb+srv" => Ok(Arc::new(mongo::MongoStore::connect(uri).await?)),
        other => Err(Fatal(format!(
            "unsupported store URI scheme {other:?} in {}: use redis://, sqlite://, postgres://, mysql://, mongodb:// or mongodb+srv://",
            redact_uri(uri)
        ))
        .into()),
    }
}

/// Picks rustls' crypto provider once for the process. Several drivers bring rustls with
/// different providers (ring, aws-lc-rs); with more than one compiled in, rustls refuses to guess
/// and a `rediss://` connection would panic instead of connecting.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Removes the password from a URI (`scheme://user:secret@host` → `scheme://user:***@host`),
/// so URIs can be logged. Query parameters named like secrets are masked too.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None if scheme.starts_with("redis") && !userinfo.is_empty() => {
                // redis://secret@host: a lone userinfo is the password.
                format!("***@{host}")
            }
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = tail
        .split('&')
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            if ["password=", "pass=", "secret=", "token="]
                .iter()
                .any(|k| lower.contains(k))
            {
                let key = part.split('=').next().unwrap_or_default();
                format!("{key}=***")
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_uri;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_uri("postgres://app:hunter2@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_uri("redis://:hunter2@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact_uri("redis://hunter2@h/0"), "redis://***@h/0");
        assert_eq!(
            redact_uri("sqlite://data/local.db"),
            "sqlite://data/local.db"
        );
        assert_eq!(
            redact_uri("postgres://h/x?user=a&password=hunter2"),
            "postgres://h/x?user=a&password=***"
        );
        assert!(!redact_uri("mongodb+srv://u:hunter2@c.example.net/db").contains("hunter2"));
    }
}
