//! The bridge's own state, in an embedded SQLite file in the data directory (`state.db`).
//!
//! It holds, per record, the last version both sides agreed on (this is what tells an echo from
//! a new change, and a delete from a create), the listeners' persisted positions, and when each
//! collection was last swept. It lives beside the bridge, never in the user's stores.

use crate::record::{Side, Version, now_ms};
use anyhow::{Context, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Appends ` IN (?, ?, ...)` binding `ids`: the id filter every batched state query uses.
pub(crate) fn push_in(qb: &mut QueryBuilder<Sqlite>, ids: &[String]) {
    qb.push(" IN (");
    let mut list = qb.separated(",");
    for id in ids {
        list.push_bind(id);
    }
    qb.push(")");
}

/// A decision being applied: the version it puts in place, and the stores it writes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The version the writes put in place.
    pub version: Version,
    /// The stores written (the others already held it).
    pub targets: Vec<Side>,
}

/// The version in columns 1-3 (`updated_at_ms, hash, deleted`) of an `agreed` or `pending` row.
fn version_at(row: &sqlx::sqlite::SqliteRow) -> Version {
    Version {
        updated_at_ms: row.get(1),
        hash: row.get(2),
        deleted: row.get::<i64, _>(3) != 0,
    }
}

fn side_bit(side: Side) -> i64 {
    match side {
        Side::Local => 1,
        Side::Cloud => 2,
    }
}

/// Handle to `state.db`.
#[derive(Clone)]
pub struct StateDb {
    pool: SqlitePool,
}

/// When a collection was last swept.
#[derive(Debug, Clone, Copy, Default)]
pub struct SweepMarks {
    /// Start time (ms) of the last incremental or full sweep that finished without errors.
    pub last_started_ms: Option<i64>,
    /// Start time (ms) of the last full sweep that finished without errors.
    pub last_full_ms: Option<i64>,
}

impl StateDb {
    /// Opens (creating if needed) `state.db` in `data_dir`.
    pub async fn open(data_dir: &Path) -> Result<StateDb> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("state.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Agreed versions must survive a crash once the apply they describe has happened.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open {}", data_dir.join("state.db").display()))?;
        for sql in [
            "CREATE TABLE IF NOT EXISTS agreed (collection TEXT NOT NULL, id TEXT NOT NULL, \
             updated_at_ms INTEGER NOT NULL, hash TEXT NOT NULL, deleted INTEGER NOT NULL, \
             synced_at_ms INTEGER NOT NULL, PRIMARY KEY (collection, id))",
            "CREATE INDEX IF NOT EXISTS agreed_tombstones ON agreed (deleted, synced_at_ms)",
            "CREATE TABLE IF NOT EXISTS pending (collection TEXT NOT NULL, id TEXT NOT NULL, \
             updated_at_ms INTEGER NOT NULL, hash TEXT NOT NULL, deleted INTEGER NOT NULL, \
             targets INTEGER NOT NULL, PRIMARY KEY (collection, id))",
            "CREATE TABLE IF NOT EXISTS checkpoints (side TEXT PRIMARY KEY, position TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS sweeps (collection TEXT PRIMARY KEY, \
             last_started_ms INTEGER, last_full_ms INTEGER)",
        ] {
            sqlx::query(sql).execute(&pool).await?;
        }
        // The agreed document, kept only for `merge` collections (the base of a three-way merge).
        // Added by ALTER so state files from before it keep working.
        let has_doc = sqlx::query("SELECT 1 FROM pragma_table_info('agreed') WHERE name = 'doc'")
            .fetch_optional(&pool)
            .await?
            .is_some();
        if !has_doc {
            sqlx::query("ALTER TABLE agreed ADD COLUMN doc TEXT")
                .execute(&pool)
                .await?;
        }
        Ok(StateDb { pool })
    }

    /// The underlying pool, shared with the retry queue (one database, one file).
    pub fn pool(&self) -> SqlitePool {
        self.pool.clone()
    }

    /// The agreed versions of these records (absent ids were never synced).
    pub async fn agreed(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Version>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT id, updated_at_ms, hash, deleted FROM agreed WHERE collection = ",
            );
            qb.push_bind(collection).push(" AND id");
            push_in(&mut qb, chunk);
            for row in qb.build().fetch_all(&self.pool).await? {
                out.insert(row.get::<String, _>(0), version_at(&row));
            }
        }
        Ok(out)
    }

    /// The versions writes in flight were putting in place (see [`StateDb::set_pending`]).
    pub async fn pending(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Pending>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT id, updated_at_ms, hash, deleted, targets FROM pending WHERE collection = ",
            );
            qb.push_bind(collection).push(" AND id");
            push_in(&mut qb, chunk);
            for row in qb.build().fetch_all(&self.pool).await? {
                let mask: i64 = row.get(4);
                out.insert(
                    row.get::<String, _>(0),
                    Pending {
                        version: version_at(&row),
                        targets: [Side::Local, Side::Cloud]
                            .into_iter()
                            .filter(|s| mask & side_bit(*s) != 0)
                            .collect(),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Writes down, before the stores are written, the versions a decision is about to put in
    /// place. A bridge killed between the writes and [`StateDb::set_agreed`] finds them on
    /// restart and knows a store holding one holds its own write, not an edit
    /// ([`crate::engine::policy::base_version`]). `set_agreed` clears them.
    pub async fn set_pending(
        &self,
        collection: &str,
        versions: &[(String, Pending)],
    ) -> Result<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in versions.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO pending (collection, id, updated_at_ms, hash, deleted, targets) ",
            );
            qb.push_values(chunk, |mut row, (id, p)| {
                row.push_bind(collection)
                    .push_bind(id)
                    .push_bind(p.version.updated_at_ms)
                    .push_bind(&p.version.hash)
                    .push_bind(p.version.deleted as i64)
                    .push_bind(p.targets.iter().map(|s| side_bit(*s)).sum::<i64>());
            });
            qb.push(
                " ON CONFLICT (collection, id) DO UPDATE SET updated_at_ms = excluded.updated_at_ms, \
                 hash = excluded.hash, deleted = excluded.deleted, targets = excluded.targets",
            );
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records versions as agreed, in one transaction, and forgets their pending versions.
    pub async fn set_agreed(&self, collection: &str, versions: &[(String, Version)]) -> Result<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for chunk in versions.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM pending WHERE collection = ");
            qb.push_bind(collection).push(" AND id");
            let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
            push_in(&mut qb, &ids);
            qb.build().execute(&mut *tx).await?;
        }
        // One multi-row statement per 500 records (3,000 bound values, far below SQLite's limit).
        for chunk in versions.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO agreed (collection, id, updated_at_ms, hash, deleted, synced_at_ms) ",
            );
            qb.push_values(chunk, |mut row, (id, v)| {
                row.push_bind(collection)
                    .push_bind(id)
                    .push_bind(v.updated_at_ms)
                    .push_bind(&v.hash)
                    .push_bind(v.deleted as i64)
                    .push_bind(now);
            });
            qb.push(
                " ON CONFLICT (collection, id) DO UPDATE SET updated_at_ms = excluded.updated_at_ms, \
                 hash = excluded.hash, deleted = excluded.deleted, synced_at_ms = excluded.synced_at_ms",
            );
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The agreed documents of these records (only `merge` collections keep them).
    pub async fn agreed_docs(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<HashMap<String, serde_json::Value>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT id, doc FROM agreed WHERE doc IS NOT NULL AND collection = ",
            );
            qb.push_bind(collection).push(" AND id");
            push_in(&mut qb, chunk);
            for row in qb.build().fetch_all(&self.pool).await? {
                if let Ok(doc) = serde_json::from_str(&row.get::<String, _>(1)) {
                    out.insert(row.get::<String, _>(0), doc);
                }
            }
        }
        Ok(out)
    }

    /// Keeps the agreed documents of records just agreed (for `merge` collections).
    pub async fn set_agreed_docs(
        &self,
        collection: &str,
        docs: &[(String, Option<String>)],
    ) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, doc) in docs {
            sqlx::query("UPDATE agreed SET doc = ?3 WHERE collection = ?1 AND id = ?2")
                .bind(collection)
                .bind(id)
                .bind(doc)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A page of ids agreed as live, after `after`, in id order: the full sweep walks these to
    /// find records deleted on one side while no listener was looking.
    pub async fn live_ids(&self, collection: &str, after: &str, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM agreed WHERE collection = ?1 AND deleted = 0 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .bind(collection)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Forgets tombstones synced before `before_ms`. They must outlive any delayed write they
    /// could still outvote, hence the long default retention.
    pub async fn prune_tombstones(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM agreed WHERE deleted = 1 AND synced_at_ms < ?1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// A listener's persisted position.
    pub async fn checkpoint(&self, side: Side) -> Result<Option<String>> {
        Ok(
            sqlx::query("SELECT position FROM checkpoints WHERE side = ?1")
                .bind(side.as_str())
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.get(0)),
        )
    }

    /// Persists a listener's position (only ever after the changes before it are applied).
    pub async fn set_checkpoint(&self, side: Side, position: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO checkpoints (side, position) VALUES (?1, ?2) \
             ON CONFLICT (side) DO UPDATE SET position = excluded.position",
        )
        .bind(side.as_str())
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When `collection` was last swept.
    pub async fn sweep_marks(&self, collection: &str) -> Result<SweepMarks> {
        let row =
            sqlx::query("SELECT last_started_ms, last_full_ms FROM sweeps WHERE collection = ?1")
                .bind(collection)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row
            .map(|r| SweepMarks {
                last_started_ms: r.get(0),
                last_full_ms: r.get(1),
            })
            .unwrap_or_default())
    }

    /// Records a sweep of `collection` that started at `started_ms` and finished cleanly.
    pub async fn set_swept(&self, collection: &str, started_ms: i64, full: bool) -> Result<()> {
        sqlx::query(
            "INSERT INTO sweeps (collection, last_started_ms, last_full_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (collection) DO UPDATE SET last_started_ms = excluded.last_started_ms, \
             last_full_ms = coalesce(excluded.last_full_ms, sweeps.last_full_ms)",
        )
        .bind(collection)
        .bind(started_ms)
        .bind(full.then_some(started_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
