//! The bench's own store clients: they write load the way an application would and observe
//! arrival on the target by their own means, knowing nothing of the bridge's internals.
//!
//! Observation is built so the observer does not dominate what it measures: on Redis it is a
//! keyspace subscription (pushed, no polling); on PostgreSQL it waits for the change-capture
//! trigger's `NOTIFY` and then asks only for the ids still outstanding; on SQLite (no
//! notifications across processes) it polls the cheap `PRAGMA data_version` every millisecond
//! and reads ids only when the file changed; on MySQL/MariaDB (no notifications either) it
//! registers as a reader of the change log, so every write the bridge applies logs a row for
//! it, and reads its new rows every millisecond (one index range, the ids that landed).

use crate::record::format_ts;
use crate::stores::redact_uri;
use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::json;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Connection, QueryBuilder, Row};
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Ids written and not yet seen on the target, shared by the writer and the observer.
pub type Pending = Arc<Mutex<HashSet<String>>>;

/// A direct client for one store.
#[derive(Clone)]
pub enum Client {
    /// A Redis database (records are strings at `<collection>:<id>`).
    Redis {
        /// For subscriptions.
        client: redis::Client,
        /// For commands.
        conn: redis::aio::MultiplexedConnection,
        /// The database number, for keyspace channel names.
        db: i64,
    },
    /// A PostgreSQL database.
    Postgres {
        /// Pool for writes and reads.
        pool: PgPool,
        /// For LISTEN.
        uri: String,
    },
    /// A SQLite file.
    Sqlite {
        /// Pool for writes and reads.
        pool: SqlitePool,
        /// To open the observer's own connection.
        options: SqliteConnectOptions,
    },
    /// A MySQL or MariaDB database (sessions in UTC, sqlx's default).
    Mysql {
        /// Pool for writes and reads.
        pool: MySqlPool,
        /// To open the observer's own connection.
        options: MySqlConnectOptions,
    },
}

/// One record to write: id, document text, version time.
pub type Row3 = (String, String, i64);

/// A benchmark document: a realistic small record (~150 bytes) carrying its version time.
pub fn doc(id: &str, n: u64, ms: i64) -> String {
    json!({
        "id": id,
        "n": n,
        "name": format!("customer {n}"),
        "email": format!("c{n}@example.com"),
        "balance": (n % 10_000) as f64 / 7.0,
        "updatedAt": format_ts(ms),
    })
    .to_string()
}

/// A version time as the `TIMESTAMP(6)` value to bind (sessions are in UTC).
fn utc(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Client {
    /// Connects to the store a URI names.
    pub async fn connect(uri: &str) -> Result<Client> {
        let what = || format!("bench client cannot connect to {}", redact_uri(uri));
        if uri.starts_with("redis") {
            let client = redis::Client::open(uri).with_context(what)?;
            let db = client.get_connection_info().redis_settings().db();
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .with_context(what)?;
            Ok(Client::Redis { client, conn, db })
        } else if uri.starts_with("postgres") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect(uri)
                .await
                .with_context(what)?;
            Ok(Client::Postgres {
                pool,
                uri: uri.to_string(),
            })
        } else if uri.starts_with("sqlite") {
            let options = SqliteConnectOptions::from_str(uri)
                .with_context(what)?
                .create_if_missing(true)
                .busy_timeout(Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options.clone())
                .await
                .with_context(what)?;
            Ok(Client::Sqlite { pool, options })
        } else if let Some(rest) = uri
            .strip_prefix("mysql:")
            .or_else(|| uri.strip_prefix("mariadb:"))
        {
            let options =
                MySqlConnectOptions::from_str(&format!("mysql:{rest}")).with_context(what)?;
            let pool = MySqlPoolOptions::new()
                .max_connections(8)
                .connect_with(options.clone())
                .await
                .with_context(what)?;
            Ok(Client::Mysql { pool, options })
        } else {
            anyhow::bail!(
                "the bench supports redis://, postgres://, sqlite:// and mysql:// stores, not {}",
                redact_uri(uri)
            )
        }
    }

    /// A short human name of the kind of store.
    pub fn kind(&self) -> &'static str {
        match self {
            Client::Redis { .. } => "Redis",
            Client::Postgres { .. } => "PostgreSQL",
            Client::Sqlite { .. } => "SQLite",
            Client::Mysql { .. } => "MySQL",
        }
    }

    /// Upserts one record, as an application would.
    pub async fn write_one(&self, collection: &str, id: &str, doc: &str, ms: i64) -> Result<()> {
        match self {
            Client::Redis { conn, .. } => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(format!("{collection}:{id}"))
                    .arg(doc)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Client::Postgres { pool, .. } => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES ($1, $2::jsonb, $3::timestamptz) \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                )))
                .bind(id)
                .bind(doc)
                .bind(format_ts(ms))
                .execute(pool)
                .await?;
            }
            Client::Sqlite { pool, .. } => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                )))
                .bind(id)
                .bind(doc)
                .bind(format_ts(ms))
                .execute(pool)
                .await?;
            }
            Client::Mysql { pool, .. } => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO `{collection}` (id, doc, updated_at) VALUES (?, ?, ?) \
                     ON DUPLICATE KEY UPDATE doc = VALUES(doc), updated_at = VALUES(updated_at)"
                )))
                .bind(id)
                .bind(doc)
                .bind(utc(ms))
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Upserts many records in one round trip (a pipeline, or one multi-row statement).
    /// With `quiet`, PostgreSQL skips the capture triggers where the role allows it (bulk
    /// loads that both sides receive identically, so there is nothing to sync). MySQL has no
    /// such switch: its triggers log the load, and [`Client::clear_log`] removes the rows.
    pub async fn write_many(&self, collection: &str, rows: &[Row3], quiet: bool) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Client::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                for (id, doc, _) in rows {
                    pipe.set(format!("{collection}:{id}"), doc).ignore();
                }
                pipe.query_async::<()>(&mut conn).await?;
            }
            Client::Postgres { pool, .. } => {
                let mut conn = pool.acquire().await?;
                let replica = quiet
                    && sqlx::query("SET session_replication_role = replica")
                        .execute(&mut *conn)
                        .await
                        .is_ok();
                let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                let docs: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
                let ts: Vec<String> = rows.iter().map(|r| format_ts(r.2)).collect();
                let done = sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) \
                     SELECT i, d::jsonb, t::timestamptz FROM unnest($1::text[], $2::text[], $3::text[]) AS u(i, d, t) \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                )))
                .bind(ids)
                .bind(docs)
                .bind(ts)
                .execute(&mut *conn)
                .await;
                if replica {
                    sqlx::query("RESET session_replication_role")
                        .execute(&mut *conn)
                        .await?;
                }
                done?;
            }
            Client::Sqlite { pool, .. } => {
                let payload: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(id, doc, ms)| json!([id, doc, format_ts(*ms)]))
                    .collect();
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{collection}\" (id, doc, updated_at) \
                     SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1) WHERE true \
                     ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at"
                )))
                .bind(serde_json::Value::Array(payload).to_string())
                .execute(pool)
                .await?;
            }
            Client::Mysql { pool, .. } => {
                let mut q =
                    QueryBuilder::new(format!("INSERT INTO `{collection}` (id, doc, updated_at) "));
                q.push_values(rows, |mut b, (id, doc, ms)| {
                    b.push_bind(id.as_str())
                        .push_bind(doc.as_str())
                        .push_bind(utc(*ms));
                });
                q.push(
                    " ON DUPLICATE KEY UPDATE doc = VALUES(doc), updated_at = VALUES(updated_at)",
                );
                q.build().execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Which of `ids` the store holds.
    pub async fn present(&self, collection: &str, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Client::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                for id in ids {
                    pipe.exists(format!("{collection}:{id}"));
                }
                let found: Vec<bool> = pipe.query_async(&mut conn).await?;
                Ok(ids
                    .iter()
                    .zip(found)
                    .filter(|(_, f)| *f)
                    .map(|(id, _)| id.clone())
                    .collect())
            }
            Client::Postgres { pool, .. } => {
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT id FROM \"{collection}\" WHERE id = ANY($1)"
                )))
                .bind(ids)
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(|r| r.get(0)).collect())
            }
            Client::Sqlite { pool, .. } => {
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT id FROM \"{collection}\" WHERE id IN (SELECT value FROM json_each(?1))"
                )))
                .bind(serde_json::to_string(ids)?)
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(|r| r.get(0)).collect())
            }
            Client::Mysql { pool, .. } => {
                let mut found = Vec::new();
                // Well under the protocol's 65,535 placeholders per statement.
                for chunk in ids.chunks(10_000) {
                    let mut q =
                        QueryBuilder::new(format!("SELECT id FROM `{collection}` WHERE id IN ("));
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(id.as_str());
                    }
                    q.push(")");
                    let rows = q.build().fetch_all(pool).await?;
                    found.extend(rows.into_iter().map(|r| r.get::<String, _>(0)));
                }
                Ok(found)
            }
        }
    }

    /// Waits until every id is on the store, checking every `every`; returns when the last was
    /// found, or fails after `timeout`.
    pub async fn wait_all(
        &self,
        collection: &str,
        ids: Vec<String>,
        every: Duration,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut missing = ids;
        loop {
            let mut still = Vec::new();
            for chunk in missing.chunks(10_000) {
                let found: HashSet<String> =
                    self.present(collection, chunk).await?.into_iter().collect();
                still.extend(chunk.iter().filter(|id| !found.contains(*id)).cloned());
                if !still.is_empty() {
                    // Arrival is roughly in order: once a chunk has gaps, later ones will too.
                    let at = missing.iter().position(|m| m == &still[0]).unwrap_or(0);
                    still = missing[at..].to_vec();
                    break;
                }
            }
            if still.is_empty() {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} of the records never reached the target within {timeout:?}",
                still.len()
            );
            missing = still;
            tokio::time::sleep(every).await;
        }
    }

    /// Removes a collection the bench created (table and its change-log rows, or its keys).
    pub async fn drop_collection(&self, collection: &str) -> Result<()> {
        match self {
            Client::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{collection}:*"))
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut conn)
                        .await?;
                    if !keys.is_empty() {
                        redis::cmd("UNLINK")
                            .arg(keys)
                            .query_async::<()>(&mut conn)
                            .await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Client::Postgres { pool, .. } => {
                sqlx::query(AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS \"{collection}\""
                )))
                .execute(pool)
                .await?;
                self.clear_log(collection).await?;
            }
            Client::Sqlite { pool, .. } => {
                sqlx::query(AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS \"{collection}\""
                )))
                .execute(pool)
                .await?;
                self.clear_log(collection).await?;
            }
            Client::Mysql { pool, .. } => {
                // Its triggers go with it.
                sqlx::query(AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS `{collection}`"
                )))
                .execute(pool)
                .await?;
                self.clear_log(collection).await?;
            }
        }
        Ok(())
    }

    /// Deletes a collection's change-log rows (after a bulk load both sides got identically).
    pub async fn clear_log(&self, collection: &str) -> Result<()> {
        let sql = format!(
            "DELETE FROM {} WHERE collection = $1",
            crate::stores::sql::CHANGE_LOG
        );
        match self {
            Client::Redis { .. } => {}
            Client::Postgres { pool, .. } => {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(collection)
                    .execute(pool)
                    .await?;
            }
            Client::Sqlite { pool, .. } => {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(collection)
                    .execute(pool)
                    .await?;
            }
            Client::Mysql { pool, .. } => {
                // In slices, so a million-row load does not become one huge undo log.
                let sql = format!(
                    "DELETE FROM {} WHERE collection = ? LIMIT 50000",
                    crate::stores::sql::CHANGE_LOG
                );
                while sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(collection)
                    .execute(pool)
                    .await?
                    .rows_affected()
                    > 0
                {}
            }
        }
        Ok(())
    }

    /// Forgets every bridge registered as a reader of the store's change log, with the rows
    /// kept for it. Only between phases, when no bridge runs: each phase's bridge is a new
    /// instance, and the change log keeps a copy of every write for every registered reader
    /// (see `stores::sql`), so readers of finished phases (and the bench's own `prepare`)
    /// would make every later write cost more than it does in production.
    pub async fn forget_bridges(&self) -> Result<()> {
        let statements = [
            format!("DELETE FROM {}", crate::stores::sql::CONSUMERS),
            format!("DELETE FROM {}", crate::stores::sql::CHANGE_LOG),
        ];
        for sql in statements {
            let done = match self {
                Client::Redis { .. } => return Ok(()),
                Client::Postgres { pool, .. } => sqlx::query(AssertSqlSafe(sql))
                    .execute(pool)
                    .await
                    .map(|_| ()),
                Client::Sqlite { pool, .. } => sqlx::query(AssertSqlSafe(sql))
                    .execute(pool)
                    .await
                    .map(|_| ()),
                Client::Mysql { pool, .. } => sqlx::query(AssertSqlSafe(sql))
                    .execute(pool)
                    .await
                    .map(|_| ()),
            };
            done.context("forgetting the previous phases' bridges")?;
        }
        Ok(())
    }

    /// Watches the store for the ids in `pending`; sends each id with the moment it was first
    /// seen, and removes it from `pending`. Runs until `stop` is cancelled.
    pub async fn observe(
        &self,
        collection: String,
        pending: Pending,
        seen: mpsc::UnboundedSender<(String, Instant)>,
        stop: CancellationToken,
    ) -> Result<()> {
        match self {
            Client::Redis { client, db, .. } => {
                let mut pubsub = client.get_async_pubsub().await?;
                let prefix = format!("__keyspace@{db}__:{collection}:");
                pubsub.psubscribe(format!("{prefix}*")).await?;
                let mut stream = pubsub.on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else {
                        anyhow::bail!("the observer's Redis subscription closed")
                    };
                    let at = Instant::now();
                    if let Some(id) = msg.get_channel_name().strip_prefix(&prefix)
                        && pending.lock().expect("pending").remove(id)
                    {
                        let _ = seen.send((id.to_string(), at));
                    }
                }
            }
            Client::Postgres { uri, .. } => {
                let mut listener = PgListener::connect(uri).await?;
                listener.listen(crate::stores::sql::NOTIFY_CHANNEL).await?;
                loop {
                    // Wake on the trigger's NOTIFY (sent at commit); a slow poll backs it up.
                    let woke = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        n = tokio::time::timeout(Duration::from_millis(50), listener.recv()) => n,
                    };
                    if let Ok(n) = woke {
                        let n = n?;
                        if n.payload() != collection {
                            continue;
                        }
                    }
                    let at = Instant::now();
                    self.mark_seen(&collection, &pending, &seen, at).await?;
                }
            }
            Client::Sqlite { options, .. } => {
                let mut conn = sqlx::SqliteConnection::connect_with(options).await?;
                let mut version: i64 = -1;
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    let v: i64 = sqlx::query("PRAGMA data_version")
                        .fetch_one(&mut conn)
                        .await?
                        .get(0);
                    if v == version {
                        continue;
                    }
                    version = v;
                    let at = Instant::now();
                    self.mark_seen(&collection, &pending, &seen, at).await?;
                }
            }
            Client::Mysql { options, .. } => {
                let mut conn = sqlx::MySqlConnection::connect_with(options).await?;
                // The change log keeps rows only for its registered readers, and never for the
                // bridge that made the write: registered as a reader of its own, the observer
                // sees the log move on every write the bridge applies (one more log row per
                // write, what a second bridge on this database would cost).
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {} (name, last_seen) VALUES ('bench-observer', UTC_TIMESTAMP(6)) \
                     ON DUPLICATE KEY UPDATE last_seen = VALUES(last_seen), dropped_at = NULL",
                    crate::stores::sql::CONSUMERS
                )))
                .execute(&mut conn)
                .await
                .context("registering the observer as a change-log reader")?;
                // Read the observer's own log rows (one index range on `(consumer, seq)`): the
                // ids that just landed, whatever the number still pending. Asking the table
                // for every pending id on each move of the log, as the other stores' observers
                // do, makes MariaDB answer an IN list of thousands of ids every millisecond
                // during a burst or a catch-up, and the bench measures its own load.
                let sql = format!(
                    "SELECT seq, CAST(id AS CHAR) FROM {} WHERE consumer = 'bench-observer' \
                     AND collection = ? AND seq > ? ORDER BY seq LIMIT 10000",
                    crate::stores::sql::CHANGE_LOG
                );
                let mut last: i64 = 0;
                let mut checked = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    // A safety net, four times a second: a write applied before the observer
                    // was registered has no log row for it.
                    if checked.elapsed() >= Duration::from_millis(250) {
                        checked = Instant::now();
                        self.mark_seen(&collection, &pending, &seen, checked)
                            .await?;
                    }
                    let rows = sqlx::query(AssertSqlSafe(sql.clone()))
                        .bind(&collection)
                        .bind(last)
                        .fetch_all(&mut conn)
                        .await?;
                    let Some(newest) = rows.last() else {
                        continue;
                    };
                    last = newest.get(0);
                    let at = Instant::now();
                    let mut p = pending.lock().expect("pending");
                    for row in &rows {
                        let id: String = row.get(1);
                        if p.remove(&id) {
                            let _ = seen.send((id, at));
                        }
                    }
                }
            }
        }
    }

    async fn mark_seen(
        &self,
        collection: &str,
        pending: &Pending,
        seen: &mpsc::UnboundedSender<(String, Instant)>,
        at: Instant,
    ) -> Result<()> {
        let ids: Vec<String> = pending.lock().expect("pending").iter().cloned().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let found = self.present(collection, &ids).await?;
        let mut p = pending.lock().expect("pending");
        for id in found {
            if p.remove(&id) {
                let _ = seen.send((id, at));
            }
        }
        Ok(())
    }
}
