//! The durable retry queue: records whose sync failed, kept in `state.db` until they sync.
//!
//! The queue holds record *keys*, not payloads: the change itself is still in the source store,
//! and a retry reconciles the record's current state on both sides. That is why nothing accepted
//! is lost (the key is durable before the listener's position advances) and why order per id is
//! kept by construction: a retry always syncs the newest state, so an earlier change can never
//! land after a later one. While a key is queued, new changes to it join its queue entry instead
//! of being applied around it.
//!
//! Failures come in two kinds. A *store* failure (connection refused, timeout) says nothing about
//! the record: it is retried with backoff for as long as it takes, and all such entries are
//! retried at once when a store comes back. A *record* failure (the target refused the value, the
//! source holds something that is not a record) is retried `retry_max_attempts` times and then
//! dead-lettered: kept, shown in status, retried or discarded by hand.
//!
//! While the bridge is paused (see [`super::pause`]) the queue also holds the keys the listeners
//! captured, as *held* entries: not failures (no attempts, never dead-lettered), numbered in the
//! order they were first seen (`seq`), with the deletion times the listeners learned. Resume
//! drains them oldest first. Keeping them in the same table as the retries means a key is in
//! the queue once, whichever reason put it there, and the rule "a new change to a queued key
//! joins its entry" covers both.

use crate::record::now_ms;
use anyhow::Result;
use serde::Serialize;
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
use std::time::Duration;

/// Why a record is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A store was unreachable or failed as a whole; retried until it comes back.
    Store,
    /// The record itself could not be synced; dead-lettered after the configured attempts.
    Record,
}

/// One queued record, as status and the API show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueEntry {
    /// `collection/id`: the handle the API and CLI take.
    pub key: String,
    /// Collection.
    pub collection: String,
    /// Record id.
    pub id: String,
    /// Failed attempts so far.
    pub attempts: i64,
    /// The last error, already redacted.
    pub last_error: String,
    /// When (ms) the next attempt is due.
    pub next_attempt_ms: i64,
    /// When (ms) the record first failed.
    pub first_failed_ms: i64,
    /// Dead-lettered: no more automatic attempts.
    pub dead: bool,
}

/// Queue totals for status.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Records waiting for a retry.
    pub pending: i64,
    /// Dead-lettered records.
    pub failed: i64,
    /// Age (ms) of the oldest failed record (retrying or dead), if any.
    pub oldest_age_ms: Option<i64>,
    /// Records captured while paused, waiting for resume (or for the drain after it).
    pub held: i64,
    /// Age (ms) of the oldest record waiting to be applied (held or retrying), if any.
    pub oldest_waiting_age_ms: Option<i64>,
}

/// One collection's queue totals, for the per-collection status.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct CollectionCounts {
    /// Held while paused.
    pub held: i64,
    /// Failed, waiting for a retry.
    pub retrying: i64,
    /// Dead-lettered.
    pub failed: i64,
    /// When (ms) the oldest record waiting to be applied (held or retrying) was first queued.
    pub oldest_waiting_ms: Option<i64>,
}

/// A held key as the drain takes it: collection, id, and the deletion times the listeners
/// learned, per side (local, cloud).
pub type HeldKey = (String, String, [Option<i64>; 2]);

/// Backoff and dead-letter settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Record failures are dead-lettered after this many attempts.
    pub max_attempts: i64,
    /// First retry delay; doubles each attempt.
    pub base: Duration,
    /// Longest delay between attempts.
    pub max: Duration,
}

impl RetryPolicy {
    /// The policy the `[sync]` settings describe.
    pub fn from_config(sync: &crate::config::SyncConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: sync.retry_max_attempts,
            base: Duration::from_millis(sync.retry_base_ms),
            max: Duration::from_secs(sync.retry_max_secs),
        }
    }

    /// The delay before attempt `attempts + 1`: exponential, capped, with up to 25% jitter so a
    /// thousand records failed together do not retry in lockstep.
    pub fn delay(&self, attempts: i64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempts.clamp(0, 20) as u32);
        let capped = exp.min(self.max);
        let jitter = rand::random_range(0..=capped.as_millis() as u64 / 4);
        capped + Duration::from_millis(jitter)
    }
}

/// The queue, in the bridge's state database.
#[derive(Clone)]
pub struct RetryQueue {
    pool: SqlitePool,
    policy: RetryPolicy,
}

impl RetryQueue {
    /// Opens the queue table in `pool` (the state database).
    pub async fn open(pool: SqlitePool, policy: RetryPolicy) -> Result<RetryQueue> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS retry_queue (collection TEXT NOT NULL, id TEXT NOT NULL, \
             attempts INTEGER NOT NULL, last_error TEXT NOT NULL, next_attempt_ms INTEGER NOT NULL, \
             first_failed_ms INTEGER NOT NULL, dead INTEGER NOT NULL DEFAULT 0, \
             PRIMARY KEY (collection, id))",
        )
        .execute(&pool)
        .await?;
        // Columns added for held entries (pause); state databases from before get them here.
        let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('retry_queue')")
            .fetch_all(&pool)
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        for (name, ddl) in [
            ("held", "held INTEGER NOT NULL DEFAULT 0"),
            ("seq", "seq INTEGER NOT NULL DEFAULT 0"),
            ("changed_ms", "changed_ms INTEGER NOT NULL DEFAULT 0"),
            ("local_deleted_ms", "local_deleted_ms INTEGER"),
            ("cloud_deleted_ms", "cloud_deleted_ms INTEGER"),
        ] {
            if !columns.iter().any(|c| c == name) {
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE retry_queue ADD COLUMN {ddl}"
                )))
                .execute(&pool)
                .await?;
            }
        }
        for ddl in [
            "CREATE INDEX IF NOT EXISTS retry_queue_due ON retry_queue (dead, next_attempt_ms)",
            "CREATE INDEX IF NOT EXISTS retry_queue_seq ON retry_queue (seq)",
            "CREATE INDEX IF NOT EXISTS retry_queue_held ON retry_queue (held, seq)",
            "CREATE TABLE IF NOT EXISTS sync_control (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&pool).await?;
        }
        Ok(RetryQueue { pool, policy })
    }

    /// Records failed attempts for these ids, in one transaction.
    pub async fn fail(
        &self,
        collection: &str,
        failures: &[(String, String, FailureKind)],
    ) -> Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for (id, error, kind) in failures {
            let attempts: i64 =
                sqlx::query("SELECT attempts FROM retry_queue WHERE collection = ?1 AND id = ?2")
                    .bind(collection)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.get(0))
                    .unwrap_or(0)
                    + 1;
            let dead = *kind == FailureKind::Record && attempts >= self.policy.max_attempts;
            let next = now + self.policy.delay(attempts - 1).as_millis() as i64;
            sqlx::query(
                "INSERT INTO retry_queue (collection, id, attempts, last_error, next_attempt_ms, first_failed_ms, dead, changed_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6) ON CONFLICT (collection, id) DO UPDATE SET \
                 attempts = excluded.attempts, last_error = excluded.last_error, \
                 next_attempt_ms = excluded.next_attempt_ms, dead = excluded.dead, held = 0",
            )
            .bind(collection)
            .bind(id)
            .bind(attempts)
            .bind(error)
            .bind(next)
            .bind(now)
            .bind(dead as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records keys the listeners captured while the bridge is paused, in the order given
    /// (which becomes their drain order), in one transaction. A key already queued keeps its
    /// place and its first-seen time; the new change joins it, as [`RetryQueue::touch`] does.
    pub async fn hold(&self, keys: &[HeldKey]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for (collection, id, [local_del, cloud_del]) in keys {
            // One statement, so the next number is read under the write lock it takes.
            sqlx::query(
                "INSERT INTO retry_queue (collection, id, attempts, last_error, next_attempt_ms, \
                 first_failed_ms, dead, held, seq, changed_ms, local_deleted_ms, cloud_deleted_ms) \
                 VALUES (?1, ?2, 0, 'held while the bridge is paused', ?3, ?3, 0, 1, \
                 (SELECT coalesce(max(seq), 0) + 1 FROM retry_queue), ?3, ?4, ?5) \
                 ON CONFLICT (collection, id) DO UPDATE SET changed_ms = excluded.changed_ms, \
                 next_attempt_ms = min(next_attempt_ms, excluded.next_attempt_ms), \
                 attempts = CASE WHEN dead = 1 THEN 0 ELSE attempts END, dead = 0, \
                 local_deleted_ms = coalesce(excluded.local_deleted_ms, local_deleted_ms), \
                 cloud_deleted_ms = coalesce(excluded.cloud_deleted_ms, cloud_deleted_ms)",
            )
            .bind(collection)
            .bind(id)
            .bind(now)
            .bind(local_del)
            .bind(cloud_del)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` held keys, in the order they were first seen.
    pub async fn held(&self, limit: i64) -> Result<Vec<HeldKey>> {
        let rows = sqlx::query(
            "SELECT collection, id, local_deleted_ms, cloud_deleted_ms FROM retry_queue \
             WHERE held = 1 AND dead = 0 ORDER BY seq LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), [r.get(2), r.get(3)]))
            .collect())
    }

    /// Removes entries of ids that synced, unless a new change joined them at or after
    /// `started_ms` (when the reconcile that synced them began): that change may not have been
    /// read, so its entry stays for another pass instead of being lost.
    pub async fn remove_settled(
        &self,
        collection: &str,
        ids: &[String],
        started_ms: i64,
    ) -> Result<u64> {
        let mut removed = 0;
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM retry_queue WHERE changed_ms < ");
            qb.push_bind(started_ms)
                .push(" AND collection = ")
                .push_bind(collection)
                .push(" AND id");
            super::state::push_in(&mut qb, chunk);
            removed += qb.build().execute(&self.pool).await?.rows_affected();
        }
        Ok(removed)
    }

    /// The paused flag as last persisted; `None` if the bridge was never paused or resumed.
    pub async fn paused_flag(&self) -> Result<Option<bool>> {
        let row = sqlx::query("SELECT value FROM sync_control WHERE key = 'paused'")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0) == "true"))
    }

    /// Persists the paused flag, so a restarted bridge stays paused (or running).
    pub async fn set_paused_flag(&self, paused: bool) -> Result<()> {
        sqlx::query(
            "INSERT INTO sync_control (key, value) VALUES ('paused', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(if paused { "true" } else { "false" })
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes ids that synced.
    pub async fn remove(&self, collection: &str, ids: &[String]) -> Result<u64> {
        let mut removed = 0;
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM retry_queue WHERE collection = ");
            qb.push_bind(collection).push(" AND id");
            super::state::push_in(&mut qb, chunk);
            removed += qb.build().execute(&self.pool).await?.rows_affected();
        }
        Ok(removed)
    }

    /// Which of these ids are queued (pending or dead).
    pub async fn queued(&self, collection: &str, ids: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT id FROM retry_queue WHERE collection = ");
            qb.push_bind(collection).push(" AND id");
            super::state::push_in(&mut qb, chunk);
            out.extend(
                qb.build()
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(|r| r.get::<String, _>(0)),
            );
        }
        Ok(out)
    }

    /// A new change arrived for queued ids: make them due now, and give dead-lettered ones a
    /// fresh set of attempts (the new state may well sync).
    pub async fn touch(&self, collection: &str, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("UPDATE retry_queue SET changed_ms = ");
            let now = now_ms();
            qb.push_bind(now)
                .push(", next_attempt_ms = ")
                .push_bind(now)
                .push(", attempts = CASE WHEN dead = 1 THEN 0 ELSE attempts END, dead = 0 WHERE collection = ")
                .push_bind(collection)
                .push(" AND id");
            super::state::push_in(&mut qb, chunk);
            qb.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Up to `limit` failed entries whose next attempt is due, oldest due first (held entries
    /// are drained by [`RetryQueue::held`], in their own order).
    pub async fn due(&self, limit: i64) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT collection, id FROM retry_queue WHERE dead = 0 AND held = 0 AND next_attempt_ms <= ?1 \
             ORDER BY next_attempt_ms LIMIT ?2",
        )
        .bind(now_ms())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Makes every pending entry due now (a store came back).
    pub async fn kick(&self) -> Result<()> {
        sqlx::query(
            "UPDATE retry_queue SET next_attempt_ms = ?1 WHERE dead = 0 AND next_attempt_ms > ?1",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Totals for status.
    pub async fn counts(&self) -> Result<QueueCounts> {
        let row = sqlx::query(
            "SELECT coalesce(sum(dead = 0 AND held = 0), 0), coalesce(sum(dead = 1), 0), \
             min(CASE WHEN held = 0 THEN first_failed_ms END), coalesce(sum(held = 1 AND dead = 0), 0), \
             min(CASE WHEN dead = 0 THEN first_failed_ms END) FROM retry_queue",
        )
        .fetch_one(&self.pool)
        .await?;
        let now = now_ms();
        let age = |t: Option<i64>| t.map(|t| (now - t).max(0));
        Ok(QueueCounts {
            pending: row.get(0),
            failed: row.get(1),
            oldest_age_ms: age(row.get(2)),
            held: row.get(3),
            oldest_waiting_age_ms: age(row.get(4)),
        })
    }

    /// Totals per collection (only collections with queued records appear).
    pub async fn counts_by_collection(
        &self,
    ) -> Result<std::collections::BTreeMap<String, CollectionCounts>> {
        let rows = sqlx::query(
            "SELECT collection, coalesce(sum(held = 1 AND dead = 0), 0), \
             coalesce(sum(held = 0 AND dead = 0), 0), coalesce(sum(dead = 1), 0), \
             min(CASE WHEN dead = 0 THEN first_failed_ms END) FROM retry_queue GROUP BY collection",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    CollectionCounts {
                        held: r.get(1),
                        retrying: r.get(2),
                        failed: r.get(3),
                        oldest_waiting_ms: r.get(4),
                    },
                )
            })
            .collect())
    }

    /// Up to `limit` records of `collection` that failed at least once (dead letters first,
    /// then oldest first), with their attempts and last error.
    pub async fn failures(&self, collection: &str, limit: i64) -> Result<Vec<QueueEntry>> {
        let rows = sqlx::query(
            "SELECT collection, id, attempts, last_error, next_attempt_ms, first_failed_ms, dead \
             FROM retry_queue WHERE collection = ?1 AND held = 0 AND attempts > 0 \
             ORDER BY dead DESC, first_failed_ms, id LIMIT ?2",
        )
        .bind(collection)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(entry).collect())
    }

    /// Queued entries, dead-lettered only or all, oldest first.
    pub async fn list(&self, dead_only: bool, limit: i64) -> Result<Vec<QueueEntry>> {
        let rows = sqlx::query(
            "SELECT collection, id, attempts, last_error, next_attempt_ms, first_failed_ms, dead \
             FROM retry_queue WHERE dead >= ?1 AND held = 0 ORDER BY first_failed_ms, collection, id LIMIT ?2",
        )
        .bind(dead_only as i64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(entry).collect())
    }

    /// Puts a dead-lettered (or pending) entry back in line for an attempt now. Returns whether
    /// the key was queued.
    pub async fn retry(&self, key: &str) -> Result<bool> {
        let Some((collection, id)) = key.split_once('/') else {
            return Ok(false);
        };
        let done = sqlx::query(
            "UPDATE retry_queue SET dead = 0, attempts = 0, next_attempt_ms = ?3 WHERE collection = ?1 AND id = ?2",
        )
        .bind(collection)
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Drops an entry for good (the operator decided the record need not sync). Returns whether
    /// the key was queued.
    pub async fn discard(&self, key: &str) -> Result<bool> {
        let Some((collection, id)) = key.split_once('/') else {
            return Ok(false);
        };
        Ok(self.remove(collection, &[id.to_string()]).await? > 0)
    }
}

/// A queue row (collection, id, attempts, last_error, next_attempt_ms, first_failed_ms, dead)
/// as an entry.
fn entry(r: sqlx::sqlite::SqliteRow) -> QueueEntry {
    let (collection, id): (String, String) = (r.get(0), r.get(1));
    QueueEntry {
        key: format!("{collection}/{id}"),
        collection,
        id,
        attempts: r.get(2),
        last_error: r.get(3),
        next_attempt_ms: r.get(4),
        first_failed_ms: r.get(5),
        dead: r.get::<i64, _>(6) != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(max_attempts: i64) -> (tempfile::TempDir, RetryQueue) {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::engine::state::StateDb::open(dir.path())
            .await
            .unwrap();
        let policy = RetryPolicy {
            max_attempts,
            base: Duration::from_millis(0),
            max: Duration::from_millis(0),
        };
        (dir, RetryQueue::open(state.pool(), policy).await.unwrap())
    }

    #[tokio::test]
    async fn record_failures_dead_letter_and_store_failures_do_not() {
        let (_d, q) = queue(3).await;
        for _ in 0..5 {
            q.fail(
                "c",
                &[("bad".into(), "refused".into(), FailureKind::Record)],
            )
            .await
            .unwrap();
            q.fail(
                "c",
                &[(
                    "down".into(),
                    "connection refused".into(),
                    FailureKind::Store,
                )],
            )
            .await
            .unwrap();
        }
        let counts = q.counts().await.unwrap();
        assert_eq!((counts.pending, counts.failed), (1, 1));
        assert!(counts.oldest_age_ms.is_some());
        let due = q.due(10).await.unwrap();
        assert_eq!(due, vec![("c".to_string(), "down".to_string())]);
        let dead = q.list(true, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].key, "c/bad");
        assert_eq!(dead[0].attempts, 5);
        // Retried by hand, it is due again with fresh attempts; discarded, it is gone.
        assert!(q.retry("c/bad").await.unwrap());
        assert_eq!(q.due(10).await.unwrap().len(), 2);
        assert!(q.discard("c/bad").await.unwrap());
        assert!(!q.discard("c/bad").await.unwrap());
        assert_eq!(
            q.queued("c", &["bad".into(), "down".into()]).await.unwrap(),
            vec!["down".to_string()]
        );
        q.remove("c", &["down".into()]).await.unwrap();
        assert_eq!(q.counts().await.unwrap(), QueueCounts::default());
    }

    #[tokio::test]
    async fn held_keys_drain_in_first_seen_order_and_are_not_failures() {
        let (_d, q) = queue(1).await;
        let key = |c: &str, id: &str| (c.to_string(), id.to_string(), [None, None]);
        // First seen: b/9, a/1, b/2; then a/1 again (keeps its place), and a delete time.
        q.hold(&[key("b", "9"), key("a", "1"), key("b", "2")])
            .await
            .unwrap();
        q.hold(&[("a".into(), "1".into(), [Some(42), None])])
            .await
            .unwrap();
        let held = q.held(10).await.unwrap();
        let order: Vec<(&str, &str)> = held
            .iter()
            .map(|(c, id, _)| (c.as_str(), id.as_str()))
            .collect();
        assert_eq!(order, vec![("b", "9"), ("a", "1"), ("b", "2")]);
        assert_eq!(
            held[1].2,
            [Some(42), None],
            "the delete time joined the entry"
        );
        let counts = q.counts().await.unwrap();
        assert_eq!((counts.held, counts.pending, counts.failed), (3, 0, 0));
        assert!(counts.oldest_waiting_age_ms.is_some() && counts.oldest_age_ms.is_none());
        // Held entries are neither retries (due) nor failures (list, failures).
        assert!(q.due(10).await.unwrap().is_empty());
        assert!(q.list(false, 10).await.unwrap().is_empty());
        assert!(q.failures("b", 10).await.unwrap().is_empty());
        // A held key whose apply fails leaves the line and becomes an ordinary failure.
        q.fail("b", &[("2".into(), "refused".into(), FailureKind::Record)])
            .await
            .unwrap();
        assert_eq!(q.held(10).await.unwrap().len(), 2);
        let by = q.counts_by_collection().await.unwrap();
        assert_eq!((by["b"].held, by["b"].failed), (1, 1));
        assert_eq!(q.failures("b", 10).await.unwrap()[0].attempts, 1);
        // An entry a change joined after the reconcile started is not removed by it.
        let started = now_ms();
        tokio::time::sleep(Duration::from_millis(5)).await;
        q.hold(&[key("b", "9")]).await.unwrap();
        assert_eq!(
            q.remove_settled("b", &["9".into()], started).await.unwrap(),
            0
        );
        assert_eq!(
            q.remove_settled("a", &["1".into()], now_ms() + 1)
                .await
                .unwrap(),
            1
        );
        // The paused flag persists.
        assert_eq!(q.paused_flag().await.unwrap(), None);
        q.set_paused_flag(true).await.unwrap();
        assert_eq!(q.paused_flag().await.unwrap(), Some(true));
        q.set_paused_flag(false).await.unwrap();
        assert_eq!(q.paused_flag().await.unwrap(), Some(false));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        assert!(p.delay(0) >= Duration::from_secs(1) && p.delay(0) <= Duration::from_millis(1250));
        assert!(p.delay(3) >= Duration::from_secs(8));
        assert!(p.delay(30) <= Duration::from_secs(75));
    }
}
