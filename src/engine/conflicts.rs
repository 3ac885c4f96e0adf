//! The conflict log: parked conflicts of `manual` collections, and the losing version of every
//! conflict decided automatically (the audit), in the bridge's state database.
//!
//! A parked conflict keeps both current versions and the base; later changes to the record update
//! it instead of syncing around it. Resolving one (`take` local or cloud, or a new document) is
//! done by the engine, which writes the result to both stores and then marks the entry resolved.
//! Resolved entries are kept for `conflict_retention_days`.

use crate::record::now_ms;
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::HashMap;

/// One conflict, parked or resolved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConflictEntry {
    /// Its id in the log (what the API and CLI take).
    pub id: i64,
    /// Collection.
    pub collection: String,
    /// Record id.
    pub record_id: String,
    /// The policy that handled it.
    pub policy: String,
    /// `parked` or `resolved`.
    pub status: String,
    /// Which version won (`local`, `cloud`, `merged`, `doc`), once resolved.
    pub winner: Option<String>,
    /// The local version when it was decided (or last seen, while parked); `null` if deleted.
    pub local: Option<Value>,
    /// The cloud version, likewise.
    pub cloud: Option<Value>,
    /// The last agreed document, where kept.
    pub base: Option<Value>,
    /// The version that lost (`null` for a delete that lost or a merge, which keeps both above).
    pub loser: Option<Value>,
    /// When (ms) it was first seen.
    pub created_ms: i64,
    /// When (ms) it was resolved.
    pub resolved_ms: Option<i64>,
}

/// The log, in the state database.
#[derive(Clone)]
pub struct ConflictLog {
    pool: SqlitePool,
}

fn text(v: Option<&Value>) -> Option<String> {
    v.map(|v| v.to_string())
}

impl ConflictLog {
    /// Opens (creating) the log table in `pool`.
    pub async fn open(pool: SqlitePool) -> Result<ConflictLog> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS conflicts (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             collection TEXT NOT NULL, record_id TEXT NOT NULL, policy TEXT NOT NULL, status TEXT NOT NULL, \
             winner TEXT, local_doc TEXT, cloud_doc TEXT, base_doc TEXT, loser_doc TEXT, \
             created_ms INTEGER NOT NULL, resolved_ms INTEGER)",
            "CREATE UNIQUE INDEX IF NOT EXISTS conflicts_parked ON conflicts (collection, record_id) WHERE status = 'parked'",
            "CREATE INDEX IF NOT EXISTS conflicts_resolved ON conflicts (status, resolved_ms)",
        ] {
            sqlx::query(sql).execute(&pool).await?;
        }
        Ok(ConflictLog { pool })
    }

    /// Parks a conflict, or refreshes the parked one with the versions seen now.
    pub async fn park(
        &self,
        collection: &str,
        record_id: &str,
        local: Option<&Value>,
        cloud: Option<&Value>,
        base: Option<&Value>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO conflicts (collection, record_id, policy, status, local_doc, cloud_doc, base_doc, created_ms) \
             VALUES (?1, ?2, 'manual', 'parked', ?3, ?4, ?5, ?6) \
             ON CONFLICT (collection, record_id) WHERE status = 'parked' DO UPDATE SET \
             local_doc = excluded.local_doc, cloud_doc = excluded.cloud_doc",
        )
        .bind(collection)
        .bind(record_id)
        .bind(text(local))
        .bind(text(cloud))
        .bind(text(base))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a conflict decided automatically, with the losing version, for the audit.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_decided(
        &self,
        collection: &str,
        record_id: &str,
        policy: &str,
        winner: &str,
        local: Option<&Value>,
        cloud: Option<&Value>,
        base: Option<&Value>,
        loser: Option<&Value>,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO conflicts (collection, record_id, policy, status, winner, local_doc, cloud_doc, base_doc, \
             loser_doc, created_ms, resolved_ms) VALUES (?1, ?2, ?3, 'resolved', ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        )
        .bind(collection)
        .bind(record_id)
        .bind(policy)
        .bind(winner)
        .bind(text(local))
        .bind(text(cloud))
        .bind(text(base))
        .bind(text(loser))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The parked conflicts among these ids, by record id: one query for a whole batch.
    pub async fn parked_among(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<HashMap<String, ConflictEntry>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT * FROM conflicts WHERE status = 'parked' AND collection = ",
            );
            qb.push_bind(collection).push(" AND record_id");
            super::state::push_in(&mut qb, chunk);
            for row in qb.build().fetch_all(&self.pool).await? {
                let e = Self::entry(&row);
                out.insert(e.record_id.clone(), e);
            }
        }
        Ok(out)
    }

    fn entry(r: &sqlx::sqlite::SqliteRow) -> ConflictEntry {
        let json = |col: &str| {
            r.get::<Option<String>, _>(col)
                .and_then(|t| serde_json::from_str(&t).ok())
        };
        ConflictEntry {
            id: r.get("id"),
            collection: r.get("collection"),
            record_id: r.get("record_id"),
            policy: r.get("policy"),
            status: r.get("status"),
            winner: r.get("winner"),
            local: json("local_doc"),
            cloud: json("cloud_doc"),
            base: json("base_doc"),
            loser: json("loser_doc"),
            created_ms: r.get("created_ms"),
            resolved_ms: r.get("resolved_ms"),
        }
    }

    /// Parked conflicts (or resolved ones, newest first), at most `limit`.
    pub async fn list(&self, resolved: bool, limit: i64) -> Result<Vec<ConflictEntry>> {
        let sql = if resolved {
            "SELECT * FROM conflicts WHERE status = 'resolved' ORDER BY resolved_ms DESC, id DESC LIMIT ?1"
        } else {
            "SELECT * FROM conflicts WHERE status = 'parked' ORDER BY created_ms, id LIMIT ?1"
        };
        let rows = sqlx::query(sql).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(Self::entry).collect())
    }

    /// One conflict by id.
    pub async fn get(&self, id: i64) -> Result<Option<ConflictEntry>> {
        let row = sqlx::query("SELECT * FROM conflicts WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::entry))
    }

    /// Marks a parked conflict resolved: `winner` says how, `loser` keeps what was overwritten.
    pub async fn mark_resolved(&self, id: i64, winner: &str, loser: Option<&Value>) -> Result<()> {
        sqlx::query("UPDATE conflicts SET status = 'resolved', winner = ?2, loser_doc = ?3, resolved_ms = ?4 WHERE id = ?1")
            .bind(id)
            .bind(winner)
            .bind(text(loser))
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Counts: parked now, resolved in the log.
    pub async fn counts(&self) -> Result<(i64, i64)> {
        let row = sqlx::query("SELECT coalesce(sum(status = 'parked'), 0), coalesce(sum(status = 'resolved'), 0) FROM conflicts")
            .fetch_one(&self.pool)
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Forgets resolved conflicts older than `before_ms` (the audit's retention).
    pub async fn prune(&self, before_ms: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM conflicts WHERE status = 'resolved' AND resolved_ms < ?1")
                .bind(before_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

/// How a person settles a parked conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Keep what this side holds now (a deletion included) and copy it to the other.
    Take(crate::record::Side),
    /// Write this document to both sides.
    Doc(Value),
}

/// Why a resolution did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No conflict has that id.
    #[error("no conflict {0}")]
    NotFound(i64),
    /// It was resolved already.
    #[error("conflict {0} is already resolved")]
    AlreadyResolved(i64),
    /// The document given is not a JSON object.
    #[error("the document must be a JSON object")]
    NotAnObject,
    /// A store changed the record during the resolution; nothing was recorded. Try again.
    #[error("the record changed while the conflict was being resolved; try again")]
    Changed,
    /// A store failed.
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl super::Engine {
    /// Resolves parked conflict `id`: writes the chosen state to both stores (as a new version,
    /// newer than both sides), records it as agreed, and keeps the overwritten version(s) in the
    /// log. Conditional writes make it safe while the bridge runs, in this process or another.
    pub async fn resolve_conflict(
        &self,
        id: i64,
        how: Resolution,
    ) -> Result<ConflictEntry, ResolveError> {
        use super::policy::Target;
        use crate::record::{Side, Version, now_ms, with_updated_at};
        use crate::stores::{ApplyOutcome, Slot, Write};

        let entry = self
            .conflicts
            .get(id)
            .await?
            .ok_or(ResolveError::NotFound(id))?;
        if entry.status != "parked" {
            return Err(ResolveError::AlreadyResolved(id));
        }
        if matches!(&how, Resolution::Doc(d) if !d.is_object()) {
            return Err(ResolveError::NotAnObject);
        }
        let _guard = self.reconcile_lock.lock().await;
        let (collection, rid) = (
            entry.collection.as_str(),
            std::slice::from_ref(&entry.record_id),
        );
        let (local, cloud) = tokio::try_join!(
            self.store(Side::Local).read(collection, rid),
            self.store(Side::Cloud).read(collection, rid)
        )?;
        let slots = [
            local.into_iter().next().unwrap_or(Slot::Absent),
            cloud.into_iter().next().unwrap_or(Slot::Absent),
        ];
        let time_of = |s: &Slot| match s {
            Slot::Present(r) => r.updated_at_ms.unwrap_or(0),
            _ => 0,
        };
        let at = now_ms().max(time_of(&slots[0]).max(time_of(&slots[1])) + 1);
        let doc_of = |s: &Slot| match s {
            Slot::Present(r) => Some(r.doc.clone()),
            _ => None,
        };
        let chosen = match &how {
            Resolution::Take(side) => doc_of(&slots[super::side_idx(*side)]),
            Resolution::Doc(d) => Some(d.clone()),
        };
        let target = match chosen {
            Some(doc) => {
                let doc = with_updated_at(doc, at);
                Target::Live {
                    version: Version::of_doc(at, &doc),
                    doc,
                }
            }
            None => Target::Deleted(Version::tombstone(at)),
        };
        let mut outcomes = Vec::new();
        for side in [Side::Local, Side::Cloud] {
            let slot = &slots[super::side_idx(side)];
            let expected = match slot {
                Slot::Present(r) => Some(r.etag.clone()),
                _ => None,
            };
            let write = Write {
                record: super::record_for(
                    side,
                    collection,
                    &entry.record_id,
                    &target,
                    &self.instance_id,
                ),
                expected,
            };
            outcomes.push(self.store(side).apply(collection, &[write]).await?);
        }
        if outcomes
            .iter()
            .flatten()
            .any(|o| *o != ApplyOutcome::Applied && *o != ApplyOutcome::Unchanged)
        {
            return Err(ResolveError::Changed);
        }
        self.state
            .set_agreed(
                collection,
                &[(entry.record_id.clone(), target.version().clone())],
            )
            .await?;
        let (winner, loser) = match &how {
            Resolution::Take(side) => {
                (side.as_str(), doc_of(&slots[super::side_idx(side.other())]))
            }
            Resolution::Doc(_) => ("doc", None),
        };
        self.conflicts
            .mark_resolved(id, winner, loser.as_ref())
            .await?;
        self.stats
            .conflict_outcome("manual", &format!("resolved-{winner}"));
        self.conflicts
            .get(id)
            .await?
            .ok_or(ResolveError::NotFound(id))
    }
}
