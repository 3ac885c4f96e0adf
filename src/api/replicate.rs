//! The replication protocol: how offline-first clients (the browser client in `clients/js/`,
//! or anything speaking HTTP) keep a copy of the `cloud` store's collections and write back.
//!
//! - `GET  /api/replicate/{collection}/pull?checkpoint=…&limit=…`: what changed after a
//!   checkpoint (documents, and deletes as tombstones), with the next checkpoint.
//! - `POST /api/replicate/{collection}/push`: a batch of client changes, each applied with the
//!   store's conditional write only if the server still holds the version the client assumed;
//!   the others come back as conflicts with the server's current version.
//! - `GET  /api/replicate/{collection}/stream`: Server-Sent Events announcing new checkpoints.
//!
//! **Why a change feed, not `(updatedAt, id)` order.** Paging by the documents' own
//! `updatedAt` skips changes: an offline client pushes an edit made an hour ago, and every
//! client whose checkpoint is already past that hour never pulls it; a transaction that
//! commits late with an earlier `updatedAt` (or the same one and a smaller id) is skipped the
//! same way, and Redis has no index by time at all. So the bridge keeps its own feed, in its
//! state database: one row per record with a sequence number that grows each time the
//! record's version in the cloud store changes. Sequence numbers are handed out one at a time,
//! under a lock, after the change is visible in the store, so a pull that sees sequence `n`
//! has seen every change numbered below it, and a change that lands after the pull gets a
//! greater number: nothing is skipped, whatever the `updatedAt` values. Pages are in sequence
//! order (a record appears once, at its latest change); the document itself is read from the
//! store at pull time, so a client always gets the current version.
//!
//! The feed learns of changes from the engine's listeners ([`Engine::changes`], fired after
//! each batch is reconciled) and from this API's own pushes. Deletes are kept in the feed as
//! tombstones with their time (the stores keep no deleted rows). A client without a
//! checkpoint first walks the whole collection with the store's scan (its cursor is in the
//! checkpoint), then follows the feed from the sequence number it started at; changes made
//! during the walk come again from the feed (harmless: clients apply by version).
//!
//! A known limit: a change the listeners never saw (a Redis notification dropped while the
//! bridge was away) reaches the feed only when something touches the record again or a
//! client starts from scratch; the engine's sweep still carries it to the `local` store.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use crate::engine::Engine;
use crate::engine::pipeline::Changed;
use crate::record::{
    ChangeRecord, Op, Origin, Side, TOMBSTONE_HASH, Version, doc_updated_at, format_ts, now_ms,
    parse_ts, with_updated_at,
};
use crate::stores::{ApplyOutcome, Slot, Store, Write};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, broadcast, watch};
use tracing::warn;
use utoipa::{IntoParams, ToSchema};

use super::records::{ApiJson, ApiPath, ApiQuery};

/// Page size bounds for pulls.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Most changes one push may carry.
const MAX_PUSH: usize = 1000;
/// Ids read from the store per query.
const READ_CHUNK: usize = 500;
/// Scan pages a pull may skip when they come back empty (Redis SCAN does that).
const EMPTY_PAGES: usize = 64;
/// Default and bounds of the stream's heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The header naming a client, for status.
pub const CLIENT_HEADER: &str = "x-client-id";

/// The replication feed and the client registry, in the bridge's state database.
pub struct Replica {
    pool: SqlitePool,
    engine: Arc<Engine>,
    cloud: Arc<dyn Store>,
    /// The next sequence number; held while a change is numbered and recorded, so numbers are
    /// committed in order.
    next_seq: Mutex<i64>,
    /// The latest sequence number per collection, for the streams.
    heads: std::sync::Mutex<HashMap<String, watch::Sender<i64>>>,
}

impl Replica {
    /// Creates the feed tables if needed and starts following the engine's change
    /// announcements. `cloud` is the API's own handle on the cloud store.
    pub async fn open(engine: Arc<Engine>, cloud: Arc<dyn Store>) -> Result<Arc<Replica>> {
        let pool = engine.state.pool();
        for ddl in [
            "CREATE TABLE IF NOT EXISTS replica_feed (collection TEXT NOT NULL, id TEXT NOT NULL, \
             seq INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL, hash TEXT NOT NULL, \
             deleted INTEGER NOT NULL, PRIMARY KEY (collection, id))",
            "CREATE INDEX IF NOT EXISTS replica_feed_seq ON replica_feed (collection, seq)",
            "CREATE INDEX IF NOT EXISTS replica_feed_seq_all ON replica_feed (seq)",
            "CREATE TABLE IF NOT EXISTS replica_clients (client_id TEXT PRIMARY KEY, \
             last_pull_ms INTEGER, last_push_ms INTEGER, last_checkpoint TEXT, \
             pulls INTEGER NOT NULL DEFAULT 0, pushes INTEGER NOT NULL DEFAULT 0)",
        ] {
            sqlx::query(ddl)
                .execute(&pool)
                .await
                .context("cannot create the replication feed tables")?;
        }
        let max: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM replica_feed")
            .fetch_one(&pool)
            .await?;
        let mut heads = HashMap::new();
        for c in &engine.config.sync.collections {
            let head: Option<i64> =
                sqlx::query_scalar("SELECT max(seq) FROM replica_feed WHERE collection = ?")
                    .bind(c)
                    .fetch_one(&pool)
                    .await?;
            heads.insert(c.clone(), watch::channel(head.unwrap_or(0)).0);
        }
        let changes = engine.changes.subscribe();
        let replica = Arc::new(Replica {
            pool,
            engine,
            cloud,
            next_seq: Mutex::new(max.unwrap_or(0) + 1),
            heads: std::sync::Mutex::new(heads),
        });
        tokio::spawn(follow(replica.clone(), changes));
        Ok(replica)
    }

    fn head(&self, collection: &str) -> watch::Receiver<i64> {
        let mut heads = self.heads.lock().expect("heads lock");
        heads
            .entry(collection.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Records the cloud store's current version of these records in the feed, with a new
    /// sequence number for each one whose version changed since it was last recorded.
    pub async fn note(&self, collection: &str, ids: &[String]) -> Result<()> {
        let mut ids = ids.to_vec();
        ids.sort();
        ids.dedup();
        let mut next = self.next_seq.lock().await;
        for chunk in ids.chunks(READ_CHUNK) {
            // Read the store after taking the lock: whatever is read is visible to any pull
            // that sees the number handed out below.
            let slots = self.cloud.read(collection, chunk).await?;
            let known = self.feed_rows(collection, chunk).await?;
            let agreed = self.engine.state.agreed(collection, chunk).await?;
            let mut tx = self.pool.begin().await?;
            let mut last = None;
            for (id, slot) in chunk.iter().zip(slots) {
                let version = match slot {
                    Slot::Present(r) => Version::of_doc(r.updated_at_ms.unwrap_or(0), &r.doc),
                    Slot::Absent => match known.get(id) {
                        Some(v) if v.deleted => continue,
                        _ => Version::tombstone(
                            agreed
                                .get(id)
                                .filter(|v| v.deleted)
                                .map(|v| v.updated_at_ms)
                                .unwrap_or_else(now_ms),
                        ),
                    },
                    Slot::Invalid(_) => continue,
                };
                if known.get(id) == Some(&version) {
                    continue;
                }
                sqlx::query(
                    "INSERT INTO replica_feed (collection, id, seq, updated_at_ms, hash, deleted) \
                     VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, id) DO UPDATE SET \
                     seq = excluded.seq, updated_at_ms = excluded.updated_at_ms, \
                     hash = excluded.hash, deleted = excluded.deleted",
                )
                .bind(collection)
                .bind(id)
                .bind(*next)
                .bind(version.updated_at_ms)
                .bind(&version.hash)
                .bind(version.deleted as i64)
                .execute(&mut *tx)
                .await?;
                last = Some(*next);
                *next += 1;
            }
            tx.commit().await?;
            if let Some(seq) = last {
                let heads = self.heads.lock().expect("heads lock");
                if let Some(h) = heads.get(collection) {
                    h.send_replace(seq);
                }
            }
        }
        Ok(())
    }

    async fn feed_rows(
        &self,
        collection: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Version>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, updated_at_ms, hash, deleted FROM replica_feed WHERE collection = ",
        );
        qb.push_bind(collection).push(" AND id IN (");
        let mut sep = qb.separated(",");
        for id in ids {
            sep.push_bind(id);
        }
        qb.push(")");
        let mut out = HashMap::new();
        for row in qb.build().fetch_all(&self.pool).await? {
            out.insert(
                row.get::<String, _>(0),
                Version {
                    updated_at_ms: row.get(1),
                    hash: row.get(2),
                    deleted: row.get::<i64, _>(3) != 0,
                },
            );
        }
        Ok(out)
    }

    async fn seen(&self, client: Option<&str>, pull: bool, checkpoint: Option<&str>) {
        let Some(client) = client else { return };
        let sql = if pull {
            "INSERT INTO replica_clients (client_id, last_pull_ms, last_checkpoint, pulls) \
             VALUES (?1, ?2, ?3, 1) ON CONFLICT (client_id) DO UPDATE SET \
             last_pull_ms = ?2, last_checkpoint = ?3, pulls = pulls + 1"
        } else {
            "INSERT INTO replica_clients (client_id, last_push_ms, pushes) VALUES (?1, ?2, 1) \
             ON CONFLICT (client_id) DO UPDATE SET last_push_ms = ?2, pushes = pushes + 1"
        };
        let mut q = sqlx::query(sql).bind(client).bind(now_ms());
        if pull {
            q = q.bind(checkpoint);
        }
        if let Err(e) = q.execute(&self.pool).await {
            warn!(error = %e, "could not record a replication client's visit");
        }
    }
}

/// Follows the engine's announcements into the feed until the engine goes away.
async fn follow(replica: Arc<Replica>, mut changes: broadcast::Receiver<Changed>) {
    loop {
        match changes.recv().await {
            Ok(c) => {
                if let Err(e) = replica.note(&c.collection, &c.ids).await {
                    warn!(collection = %c.collection, error = %format!("{e:#}"), "could not record changes in the replication feed");
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "the replication feed fell behind the listeners; re-reading recent changes"
                );
                catch_up(&replica).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// After missed announcements: records whatever changed in the last minutes (the store's
/// scan since a time) in the feed.
async fn catch_up(replica: &Replica) {
    let since = now_ms() - 5 * 60_000;
    for collection in replica.engine.config.sync.collections.clone() {
        let mut cursor = None;
        loop {
            match replica
                .cloud
                .scan(&collection, Some(since), cursor, READ_CHUNK)
                .await
            {
                Ok(page) => {
                    let ids: Vec<String> = page.records.into_iter().map(|r| r.id).collect();
                    if let Err(e) = replica.note(&collection, &ids).await {
                        warn!(error = %format!("{e:#}"), "replication feed catch-up failed");
                        break;
                    }
                    match page.next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "replication feed catch-up failed");
                    break;
                }
            }
        }
    }
}

/// A record version as the protocol carries it: clients quote it back as `assumed`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WireVersion {
    /// The record's `updatedAt` (RFC 3339 with ms; a number of ms is accepted too).
    #[serde(rename = "updatedAt")]
    #[schema(value_type = String)]
    pub updated_at: Value,
    /// Hash of the canonical document, or all zeros for a delete.
    pub hash: String,
    /// Whether this version is a delete.
    #[serde(default)]
    pub deleted: bool,
}

impl WireVersion {
    fn of(v: &Version) -> WireVersion {
        WireVersion {
            updated_at: Value::String(format_ts(v.updated_at_ms)),
            hash: v.hash.clone(),
            deleted: v.deleted,
        }
    }

    fn ms(&self) -> Option<i64> {
        match &self.updated_at {
            Value::String(s) => parse_ts(s),
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }
}

/// One record in a pull: its current document, or a tombstone.
#[derive(Debug, Serialize, ToSchema)]
pub struct PulledDoc {
    /// Record id.
    pub id: String,
    /// The document; absent for a tombstone.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub doc: Option<Value>,
    /// Whether the record was deleted.
    pub deleted: bool,
    /// The server's version of the record: quote it as `assumed` when pushing a change to it.
    pub version: WireVersion,
}

/// One page of a pull.
#[derive(Debug, Serialize, ToSchema)]
pub struct PullPage {
    /// Changed records, each at most once, in feed order.
    pub documents: Vec<PulledDoc>,
    /// Pass as `checkpoint` on the next pull.
    pub checkpoint: String,
    /// More changes are waiting: pull again at once.
    #[serde(rename = "hasMore")]
    pub has_more: bool,
}

/// Where a pull starts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PullQuery {
    /// The `checkpoint` of the previous pull; absent or empty to start from scratch.
    pub checkpoint: Option<String>,
    /// Records per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// Where the stream's heartbeat is set.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Seconds between heartbeats, 1 to 60 (default 15).
    #[param(minimum = 1, maximum = 60)]
    pub heartbeat: Option<u64>,
}

/// One client change.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PushChange {
    /// Record id.
    pub id: String,
    /// The new document (must carry `updatedAt`); omit for a delete.
    #[schema(value_type = Option<Object>)]
    pub doc: Option<Value>,
    /// `true` for a delete.
    #[serde(default)]
    pub deleted: bool,
    /// For a delete: when it happened (RFC 3339 or ms); now when absent.
    #[serde(rename = "updatedAt")]
    #[schema(value_type = Option<String>)]
    pub updated_at: Option<Value>,
    /// The server version the client last saw (from a pull or a push result), or null if it
    /// saw none: the change applies only if the server still holds exactly that.
    pub assumed: Option<WireVersion>,
}

/// A batch of client changes.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PushBody {
    /// Up to 1000 changes, applied in order.
    pub changes: Vec<PushChange>,
}

/// A change the server now holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct Applied {
    /// Record id.
    pub id: String,
    /// The server's version now: the client's next `assumed`.
    pub version: WireVersion,
}

/// A change refused as malformed or by the store.
#[derive(Debug, Serialize, ToSchema)]
pub struct Refused {
    /// Record id.
    pub id: String,
    /// Why.
    pub detail: String,
}

/// What a push did.
#[derive(Debug, Serialize, ToSchema)]
pub struct PushResult {
    /// Changes the server holds now (including retries of changes it already held).
    pub applied: Vec<Applied>,
    /// Changes whose `assumed` version was not the server's: the server's current version,
    /// for the client to resolve and push again with it as `assumed`.
    pub conflicts: Vec<PulledDoc>,
    /// Changes that can never apply as sent.
    pub rejected: Vec<Refused>,
}

/// One Server-Sent Event of the stream, as the OpenAPI document describes it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEvent {
    /// `checkpoint` or `heartbeat`.
    pub event: String,
    /// For `checkpoint`: the new checkpoint (what `Last-Event-ID` sends back).
    pub id: Option<String>,
    /// JSON text: `{"collection", "checkpoint"}` for `checkpoint`, `{}` for `heartbeat`.
    pub data: String,
}

/// A replication client's last visits.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientStatus {
    /// The `X-Client-Id` it sent.
    pub client_id: String,
    /// Its last pull (RFC 3339), if any.
    pub last_pull: Option<String>,
    /// Its last push (RFC 3339), if any.
    pub last_push: Option<String>,
    /// The checkpoint it last pulled from.
    pub last_checkpoint: Option<String>,
    /// Pulls so far.
    pub pulls: i64,
    /// Pushes so far.
    pub pushes: i64,
}

/// A position in the protocol. `f<seq>`: following the feed after sequence `seq`;
/// `i<seq>-<hex cursor>`: walking the collection from scratch, to follow the feed after `seq`
/// once the walk ends.
#[derive(Debug, Clone, PartialEq)]
enum Checkpoint {
    Feed(i64),
    Initial(i64, Option<String>),
}

impl Checkpoint {
    fn parse(text: &str) -> Option<Checkpoint> {
        if let Some(seq) = text.strip_prefix('f') {
            return seq.parse().ok().filter(|s| *s >= 0).map(Checkpoint::Feed);
        }
        let (seq, cursor) = text.strip_prefix('i')?.split_once('-')?;
        let seq = seq.parse().ok().filter(|s: &i64| *s >= 0)?;
        let cursor = if cursor.is_empty() {
            None
        } else {
            Some(String::from_utf8(hex::decode(cursor).ok()?).ok()?)
        };
        Some(Checkpoint::Initial(seq, cursor))
    }

    fn render(&self) -> String {
        match self {
            Checkpoint::Feed(seq) => format!("f{seq}"),
            Checkpoint::Initial(seq, cursor) => {
                format!(
                    "i{seq}-{}",
                    cursor.as_deref().map(hex::encode).unwrap_or_default()
                )
            }
        }
    }
}

fn collection_of(state: &ApiState, name: &str) -> Result<String, ApiError> {
    let configured = &state.engine.config.sync.collections;
    if configured.iter().any(|c| c == name) {
        Ok(name.to_string())
    } else {
        Err(ApiError::not_found(format!(
            "unknown collection {name:?}: this bridge replicates {configured:?}"
        )))
    }
}

/// The `X-Client-Id`, if sent and sane (1 to 128 printable ASCII characters).
fn client_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(CLIENT_HEADER) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()) => {
            Ok(Some(s.to_string()))
        }
        _ => Err(ApiError::bad_request(
            "bad_client_id",
            "X-Client-Id must be 1 to 128 printable ASCII characters",
        )),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~:@-".contains(c))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "record id {id:?} is not a valid key: use 1 to 128 of A-Z a-z 0-9 . _ ~ : @ -"
        ))
    }
}

fn version_of(slot: &Slot) -> Option<Version> {
    match slot {
        Slot::Present(r) => Some(Version::of_doc(r.updated_at_ms.unwrap_or(0), &r.doc)),
        _ => None,
    }
}

fn pulled(id: &str, slot: Slot, tombstone_ms: i64) -> Option<PulledDoc> {
    match slot {
        Slot::Present(r) => {
            let v = Version::of_doc(r.updated_at_ms.unwrap_or(0), &r.doc);
            Some(PulledDoc {
                id: id.to_string(),
                doc: Some(r.doc),
                deleted: false,
                version: WireVersion::of(&v),
            })
        }
        Slot::Absent => Some(PulledDoc {
            id: id.to_string(),
            doc: None,
            deleted: true,
            version: WireVersion::of(&Version::tombstone(tombstone_ms)),
        }),
        Slot::Invalid(_) => None,
    }
}

type St = State<Arc<ApiState>>;

/// Changes after a checkpoint.
#[utoipa::path(get, path = "/api/replicate/{collection}/pull", tag = "replication",
    params(("collection" = String, Path, description = "A configured collection of the cloud store"),
           ("X-Client-Id" = Option<String>, Header, description = "Names the client in /api/replicate/clients"),
           PullQuery),
    responses(
        (status = 200, description = "Documents and tombstones changed after the checkpoint, and the next checkpoint", body = PullPage),
        (status = 400, description = "Bad checkpoint, limit or client id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown collection", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn pull(
    State(s): St,
    ApiPath(collection): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<PullQuery>,
) -> Result<axum::Json<PullPage>, ApiError> {
    let collection = collection_of(&s, &collection)?;
    let client = client_id(&headers)?;
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                "bad_limit",
                format!("limit {n} is outside 1..={MAX_LIMIT}"),
            ));
        }
    };
    let given = q.checkpoint.as_deref().filter(|c| !c.is_empty());
    let replica = &s.replica;
    let from = match given {
        None => Checkpoint::Initial(*replica.head(&collection).borrow(), None),
        Some(text) => Checkpoint::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "bad_checkpoint",
                format!("checkpoint {text:?} is not one this API handed out"),
            )
        })?,
    };
    replica.seen(client.as_deref(), true, given).await;
    let page = match from {
        Checkpoint::Initial(seq, mut cursor) => {
            let mut documents = Vec::new();
            let mut next = None;
            for _ in 0..EMPTY_PAGES {
                let page = replica
                    .cloud
                    .scan(&collection, None, cursor.clone(), limit)
                    .await
                    .map_err(ApiError::store)?;
                next = page.next.clone();
                documents.extend(page.records.into_iter().map(|r| PulledDoc {
                    id: r.id,
                    version: WireVersion::of(&Version::of_doc(
                        r.updated_at_ms.unwrap_or(0),
                        &r.doc,
                    )),
                    doc: Some(r.doc),
                    deleted: false,
                }));
                if !documents.is_empty() || page.next.is_none() {
                    break;
                }
                cursor = page.next;
            }
            let checkpoint = match next {
                Some(c) => Checkpoint::Initial(seq, Some(c)),
                None => Checkpoint::Feed(seq),
            };
            PullPage {
                documents,
                checkpoint: checkpoint.render(),
                // After the walk the feed may hold changes: ask again either way.
                has_more: true,
            }
        }
        Checkpoint::Feed(after) => {
            let rows = sqlx::query(
                "SELECT id, seq, updated_at_ms, deleted FROM replica_feed \
                 WHERE collection = ? AND seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(&collection)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&replica.pool)
            .await
            .map_err(|e| ApiError::store(e.into()))?;
            let ids: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
            let last = rows.last().map(|r| r.get::<i64, _>(1)).unwrap_or(after);
            let mut documents = Vec::with_capacity(ids.len());
            for (chunk, rows) in ids.chunks(READ_CHUNK).zip(rows.chunks(READ_CHUNK)) {
                let slots = replica
                    .cloud
                    .read(&collection, chunk)
                    .await
                    .map_err(ApiError::store)?;
                for ((id, row), slot) in chunk.iter().zip(rows).zip(slots) {
                    let tomb_ms = if row.get::<i64, _>(3) != 0 {
                        row.get::<i64, _>(2)
                    } else {
                        now_ms()
                    };
                    documents.extend(pulled(id, slot, tomb_ms));
                }
            }
            PullPage {
                documents,
                checkpoint: Checkpoint::Feed(last).render(),
                has_more: rows.len() == limit,
            }
        }
    };
    Ok(axum::Json(page))
}

/// Applies client changes, returning conflicts.
#[utoipa::path(post, path = "/api/replicate/{collection}/push", tag = "replication",
    params(("collection" = String, Path, description = "A configured collection of the cloud store"),
           ("X-Client-Id" = Option<String>, Header, description = "Names the client in /api/replicate/clients")),
    request_body = PushBody,
    responses(
        (status = 200, description = "What was applied, what conflicts (with the server's version) and what was refused", body = PushResult),
        (status = 400, description = "Malformed JSON, too many changes, bad client id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown collection", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Not a push body", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn push(
    State(s): St,
    ApiPath(collection): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PushBody>,
) -> Result<axum::Json<PushResult>, ApiError> {
    let collection = collection_of(&s, &collection)?;
    let client = client_id(&headers)?;
    if body.changes.len() > MAX_PUSH {
        return Err(ApiError::bad_request(
            "too_many_changes",
            format!(
                "a push carries at most {MAX_PUSH} changes, not {}",
                body.changes.len()
            ),
        ));
    }
    s.replica.seen(client.as_deref(), false, None).await;
    let store = s.writer(Side::Cloud);
    let mut result = PushResult {
        applied: Vec::new(),
        conflicts: Vec::new(),
        rejected: Vec::new(),
    };
    let mut touched = Vec::new();
    for change in body.changes {
        let id = change.id.clone();
        match push_one(store, &collection, change).await? {
            Outcome::Applied(v) => {
                touched.push(id.clone());
                result.applied.push(Applied {
                    id,
                    version: WireVersion::of(&v),
                });
            }
            Outcome::Conflict(current) => result.conflicts.extend(current),
            Outcome::Rejected(detail) => result.rejected.push(Refused { id, detail }),
        }
    }
    if !touched.is_empty()
        && let Err(e) = s.replica.note(&collection, &touched).await
    {
        warn!(error = %format!("{e:#}"), "could not record pushed changes in the replication feed; the listener will");
    }
    Ok(axum::Json(result))
}

enum Outcome {
    Applied(Version),
    Conflict(Option<PulledDoc>),
    Rejected(String),
}

/// Whether the server's current version is the one the client assumed. No record and a
/// tombstone are the same thing (the stores keep no tombstones).
fn assumed_matches(assumed: Option<&WireVersion>, current: Option<&Version>) -> bool {
    match (assumed, current) {
        (None, None) => true,
        (Some(a), None) => a.deleted || a.hash == TOMBSTONE_HASH,
        (None, Some(_)) => false,
        (Some(a), Some(c)) => !a.deleted && a.hash == c.hash && a.ms() == Some(c.updated_at_ms),
    }
}

async fn push_one(
    store: &Arc<dyn Store>,
    collection: &str,
    c: PushChange,
) -> Result<Outcome, ApiError> {
    if let Err(e) = check_id(&c.id) {
        return Ok(Outcome::Rejected(e));
    }
    let (doc, at) = if c.deleted {
        let at = match &c.updated_at {
            None | Some(Value::Null) => now_ms(),
            Some(Value::String(s)) => match parse_ts(s) {
                Some(ms) => ms,
                None => return Ok(Outcome::Rejected(format!("updatedAt {s:?} is not a time"))),
            },
            Some(Value::Number(n)) => match n.as_i64() {
                Some(ms) => ms,
                None => return Ok(Outcome::Rejected(format!("updatedAt {n} is not ms"))),
            },
            Some(other) => {
                return Ok(Outcome::Rejected(format!(
                    "updatedAt {other} is not a time"
                )));
            }
        };
        (None, at)
    } else {
        let Some(doc @ Value::Object(_)) = c.doc else {
            return Ok(Outcome::Rejected(
                "a change needs `doc` (a JSON object) or `deleted: true`".into(),
            ));
        };
        let Some(at) = doc_updated_at(&doc) else {
            return Ok(Outcome::Rejected(
                "the document needs an `updatedAt` (RFC 3339 or ms)".into(),
            ));
        };
        (Some(with_updated_at(doc, at)), at)
    };
    let wanted = match &doc {
        Some(d) => Version::of_doc(at, d),
        None => Version::tombstone(at),
    };
    let read = |store: &Arc<dyn Store>| {
        let store = store.clone();
        let (collection, id) = (collection.to_string(), c.id.clone());
        async move {
            let mut slots = store
                .read(&collection, std::slice::from_ref(&id))
                .await
                .map_err(ApiError::store)?;
            Ok::<Slot, ApiError>(slots.pop().unwrap_or(Slot::Absent))
        }
    };
    let slot = read(store).await?;
    if let Slot::Invalid(reason) = &slot {
        return Ok(Outcome::Rejected(format!(
            "the server holds something that is not a record: {reason}"
        )));
    }
    let current = version_of(&slot);
    // A retry of a change the server already holds: nothing to do.
    match (&current, wanted.deleted) {
        (Some(cv), false) if cv.hash == wanted.hash && cv.updated_at_ms == wanted.updated_at_ms => {
            return Ok(Outcome::Applied(wanted));
        }
        (None, true) => return Ok(Outcome::Applied(wanted)),
        _ => {}
    }
    if !assumed_matches(c.assumed.as_ref(), current.as_ref()) {
        return Ok(Outcome::Conflict(pulled(&c.id, slot, now_ms())));
    }
    let expected = match &slot {
        Slot::Present(r) => Some(r.etag.clone()),
        _ => None,
    };
    let write = Write {
        record: ChangeRecord {
            side: Side::Cloud,
            collection: collection.to_string(),
            id: c.id.clone(),
            op: if doc.is_some() {
                Op::Upsert
            } else {
                Op::Delete
            },
            doc,
            updated_at_ms: at,
            origin: Origin::Unknown,
        },
        expected,
    };
    let outcome = store
        .apply(collection, std::slice::from_ref(&write))
        .await
        .map_err(ApiError::store)?
        .pop()
        .unwrap_or(ApplyOutcome::Conflict);
    match outcome {
        ApplyOutcome::Applied | ApplyOutcome::Unchanged => Ok(Outcome::Applied(wanted)),
        ApplyOutcome::Conflict => {
            // Someone wrote in between: the client resolves against what is there now.
            let slot = read(store).await?;
            Ok(Outcome::Conflict(pulled(&c.id, slot, now_ms())))
        }
        ApplyOutcome::Rejected(reason) => Ok(Outcome::Rejected(format!(
            "the store refused the record: {reason}"
        ))),
        ApplyOutcome::Deferred(reason) => Ok(Outcome::Rejected(format!(
            "the store cannot take the record yet (push it again later): {reason}"
        ))),
    }
}

/// Server-Sent Events: a `checkpoint` event (id = the checkpoint) whenever changes land.
#[utoipa::path(get, path = "/api/replicate/{collection}/stream", tag = "replication",
    params(("collection" = String, Path, description = "A configured collection of the cloud store"),
           ("Last-Event-ID" = Option<String>, Header, description = "The last checkpoint seen; a newer one is announced at once"),
           StreamQuery),
    responses(
        (status = 200, description = "An event stream: `checkpoint` events with data `{\"collection\", \"checkpoint\"}`, and `heartbeat` events", content_type = "text/event-stream", body = StreamEvent),
        (status = 400, description = "Bad heartbeat", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown collection", body = ErrorBody),
    ))]
pub async fn stream(
    State(s): St,
    ApiPath(collection): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let collection = collection_of(&s, &collection)?;
    let heartbeat = match q.heartbeat {
        None => HEARTBEAT,
        Some(n) if (1..=60).contains(&n) => Duration::from_secs(n),
        Some(n) => {
            return Err(ApiError::bad_request(
                "bad_heartbeat",
                format!("heartbeat {n} is outside 1..=60 seconds"),
            ));
        }
    };
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Checkpoint::parse)
        .and_then(|c| match c {
            Checkpoint::Feed(seq) => Some(seq),
            Checkpoint::Initial(..) => None,
        });
    let rx = s.replica.head(&collection);
    // Without a Last-Event-ID the current head is announced at once; with one, only if newer.
    let state = (rx, last_seen.unwrap_or(-1), collection);
    let events = futures::stream::unfold(state, |(mut rx, mut seen, collection)| async move {
        loop {
            let head = *rx.borrow_and_update();
            if head > seen {
                seen = head;
                let checkpoint = Checkpoint::Feed(head).render();
                let data = serde_json::json!({"collection": collection, "checkpoint": checkpoint});
                let event = Event::default()
                    .event("checkpoint")
                    .id(checkpoint)
                    .data(data.to_string());
                return Some((Ok(event), (rx, seen, collection)));
            }
            rx.changed().await.ok()?;
        }
    });
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(heartbeat)
            .event(Event::default().event("heartbeat").data("{}")),
    ))
}

/// Replication clients and their last pull and push.
#[utoipa::path(get, path = "/api/replicate/clients", tag = "replication",
    responses(
        (status = 200, description = "Every client that sent X-Client-Id", body = [ClientStatus]),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "State database unavailable", body = ErrorBody),
    ))]
pub async fn clients(State(s): St) -> Result<axum::Json<Vec<ClientStatus>>, ApiError> {
    let clients = s
        .replica
        .client_statuses(ClientOrder::ById, 10_000)
        .await
        .map_err(|e| ApiError::store(e.into()))?;
    Ok(axum::Json(clients))
}

/// How [`Replica::client_statuses`] orders its list.
pub enum ClientOrder {
    /// By client id (the full listing).
    ById,
    /// The most recently seen first (status shows the active ones).
    LastSeen,
}

impl Replica {
    /// Up to `limit` clients that sent `X-Client-Id`, with their last pull and push.
    pub async fn client_statuses(
        &self,
        order: ClientOrder,
        limit: i64,
    ) -> sqlx::Result<Vec<ClientStatus>> {
        let order = match order {
            ClientOrder::ById => "client_id",
            ClientOrder::LastSeen => {
                "max(coalesce(last_pull_ms, 0), coalesce(last_push_ms, 0)) DESC, client_id"
            }
        };
        // `order` is one of the two constant clauses above.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT client_id, last_pull_ms, last_push_ms, last_checkpoint, pulls, pushes \
             FROM replica_clients ORDER BY {order} LIMIT ?"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ClientStatus {
                client_id: r.get(0),
                last_pull: r.get::<Option<i64>, _>(1).map(format_ts),
                last_push: r.get::<Option<i64>, _>(2).map(format_ts),
                last_checkpoint: r.get(3),
                pulls: r.get(4),
                pushes: r.get(5),
            })
            .collect())
    }

    /// How many clients have sent `X-Client-Id`.
    pub async fn client_count(&self) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM replica_clients")
            .fetch_one(&self.pool)
            .await
    }
}

/// The browser client, an ES module.
#[utoipa::path(get, path = "/client/syncbridge.js", tag = "replication",
    responses((status = 200, description = "The browser client (ES module)", content_type = "text/javascript", body = String)))]
pub async fn client_js() -> impl axum::response::IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../clients/js/syncbridge.js"),
    )
}

/// The demo page: the browser's IndexedDB records beside the server's, live.
#[utoipa::path(get, path = "/demo", tag = "replication",
    responses((status = 200, description = "The demo page", content_type = "text/html", body = String)))]
pub async fn demo() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../clients/js/demo.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_refuse_junk() {
        for c in [
            Checkpoint::Feed(0),
            Checkpoint::Feed(42),
            Checkpoint::Initial(7, None),
            Checkpoint::Initial(7, Some("0:abc".into())),
        ] {
            assert_eq!(Checkpoint::parse(&c.render()), Some(c));
        }
        for bad in ["", "x", "f", "f-1", "fz", "i7", "i7-zz", "i-1-", "g3"] {
            assert_eq!(Checkpoint::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn assumed_versions_match_only_the_exact_current_one() {
        let v = Version::of_doc(1000, &serde_json::json!({"a": 1}));
        let w = WireVersion::of(&v);
        assert!(assumed_matches(Some(&w), Some(&v)));
        assert!(assumed_matches(None, None));
        assert!(!assumed_matches(None, Some(&v)));
        let older = Version::of_doc(999, &serde_json::json!({"a": 1}));
        assert!(!assumed_matches(Some(&WireVersion::of(&older)), Some(&v)));
        let tomb = WireVersion::of(&Version::tombstone(5));
        assert!(assumed_matches(Some(&tomb), None));
        assert!(!assumed_matches(Some(&tomb), Some(&v)));
        assert!(!assumed_matches(Some(&w), None));
    }
}
