//! MongoDB connector (`mongodb://`, `mongodb+srv://`): each collection is a MongoDB collection
//! in the database named by the URI path (`mongodb://host:27017/app?replicaSet=rs0` → `app`).
//!
//! This file is the thin layer that talks to the driver; the rules live in pure, unit-tested
//! modules: [`convert`] (BSON ↔ JSON, ids, `updatedAt`, etags, filters) and [`events`]
//! (change events, error classification).
//!
//! - **Listening**: one change stream on the database (`watch` with `fullDocument:
//!   updateLookup`), limited to the configured collections. Change streams need a replica set
//!   (a single node is enough); a standalone server gets an error that names the fix.
//! - **Resume**: every batch carries the stream's resume token ([`Ack::Token`]); the engine
//!   persists it only after the batch is applied, and the next `listen` resumes after it
//!   (`startAfter`). Quiet streams still hand out their latest token every few seconds, so a
//!   restart never replays much. A batch released unapplied makes the listener reopen its
//!   stream after the last applied token, so nothing is skipped.
//! - **Lost position**: a token the oplog no longer covers (`ChangeStreamHistoryLost`), or a
//!   watched collection dropped or renamed, ends `listen` with [`PositionLost`]: the engine
//!   logs it, shows it in status, reopens the stream from now and runs a full sweep.
//! - **Conditional writes**: see [`convert::guard_filter`] (the etag is the whole stored
//!   document; a write is refused if anything changed since it was read). Creates go in one
//!   unordered `insertMany` per batch (a duplicate key means "someone created it first").
//!   Replaces and deletes are single-document commands sent concurrently: the legacy
//!   `update`/`delete` batch commands report only a total count, not which statement matched,
//!   and the per-operation results of `bulkWrite` need MongoDB 8.0.
//! - **Sweeps**: scans by `updatedAt` on an index `{updatedAt: 1, _id: 1}` that `prepare`
//!   creates if missing; full scans walk `_id` order.

pub mod convert;
pub mod events;

use super::{
    Ack, ApplyOutcome, Capabilities, ChangeBatch, ListenContext, PositionLost, ScanPage, Slot,
    Store, StoredRecord, Write, redact_uri,
};
use crate::record::{Op, canonical_hash, with_updated_at};
use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use convert::{NotARecord, ScanCursor};
use events::{ErrorClass, EventAction};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, Document, doc};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, FullDocumentType};
use mongodb::{Client, Collection, Database, IndexModel};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How long one `getMore` of the change stream waits for events; also how often the listener
/// looks at shutdown and rewind requests.
const MAX_AWAIT: Duration = Duration::from_millis(500);
/// A quiet stream hands out its latest resume token this often.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(5);
/// At most this many events go in one batch.
const MAX_BATCH: usize = 1000;
/// Concurrent single-document writes per apply.
const WRITE_CONCURRENCY: usize = 16;
/// Name of the index the sweep's scans use.
const UPDATED_AT_INDEX: &str = "syncbridge_updatedAt";
/// Duplicate key.
const DUPLICATE_KEY: i32 = 11000;

/// Positions handed out by the listener and what the engine did with them.
#[derive(Debug, Default)]
struct Positions {
    /// Bumped each time the listener reopens its stream after a release; tokens of older
    /// generations are never persisted (their stream's later batches will come again).
    generation: u64,
    /// A batch of the current generation was released unapplied: reopen after `settled`.
    rewind: bool,
    /// The last token the engine applied (and persists).
    settled: Option<String>,
}

/// A MongoDB database used as one side of the bridge.
pub struct MongoStore {
    db: Database,
    uri: String,
    positions: Arc<Mutex<Positions>>,
}

/// Keeps the driver error, but says it in words the operator can act on.
fn explain(uri: &str, e: MongoError) -> anyhow::Error {
    let class = events::classify_error(error_code(&e), &e.to_string());
    match class {
        ErrorClass::NotReplicaSet => anyhow!(events::not_replica_set_help(&redact_uri(uri))),
        ErrorClass::HistoryLost => anyhow::Error::new(PositionLost(format!(
            "MongoDB change stream history lost at {}: the saved resume token is no longer in \
             the oplog (the bridge was away longer than the oplog window); reopening from now \
             and running a full sweep ({e})",
            redact_uri(uri)
        ))),
        ErrorClass::Other => anyhow!(e).context(format!("MongoDB at {}", redact_uri(uri))),
    }
}

/// The server's error code, when the server gave one.
fn error_code(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

impl MongoStore {
    /// Connects to the deployment a `mongodb://` or `mongodb+srv://` URI names; the URI's path
    /// names the database.
    pub async fn connect(uri: &str) -> Result<MongoStore> {
        let mut options = ClientOptions::parse(uri)
            .await
            .with_context(|| format!("invalid MongoDB URI {}", redact_uri(uri)))?;
        let Some(db_name) = options.default_database.clone() else {
            bail!(
                "the MongoDB URI {} names no database: add it as the path, e.g. mongodb://host:27017/app?replicaSet=rs0",
                redact_uri(uri)
            );
        };
        options
            .app_name
            .get_or_insert_with(|| "syncbridge".to_string());
        options
            .server_selection_timeout
            .get_or_insert(Duration::from_secs(10));
        let client = Client::with_options(options)
            .with_context(|| format!("cannot open MongoDB client for {}", redact_uri(uri)))?;
        let db = client.database(&db_name);
        Ok(MongoStore {
            db,
            uri: uri.to_string(),
            positions: Arc::default(),
        })
    }

    fn coll(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }

    /// Fails with the fix spelled out when the server is not a replica set member (or mongos).
    async fn require_replica_set(&self) -> Result<()> {
        let hello = self
            .db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| explain(&self.uri, e))
            .with_context(|| format!("cannot reach MongoDB at {}", redact_uri(&self.uri)))?;
        let replica_set = hello.get_str("setName").is_ok();
        let mongos = hello.get_str("msg") == Ok("isdbgrid");
        if !replica_set && !mongos {
            bail!(events::not_replica_set_help(&redact_uri(&self.uri)));
        }
        Ok(())
    }

    /// Reads the documents behind some record ids, keyed by record id; an id held by two
    /// documents (an ObjectId and a string of the same hex) is reported invalid.
    async fn read_docs(&self, collection: &str, ids: &[String]) -> Result<Vec<Slot>> {
        let candidates: Vec<Bson> = ids.iter().flat_map(|i| convert::id_candidates(i)).collect();
        let docs: Vec<Document> = self
            .coll(collection)
            .find(doc! { "_id": { "$in": candidates } })
            .await
            .map_err(|e| explain(&self.uri, e))?
            .try_collect()
            .await
            .map_err(|e| explain(&self.uri, e))?;
        let mut found: HashMap<String, Slot> = HashMap::new();
        for d in docs {
            let Some(id) = d.get("_id").and_then(convert::id_to_string) else {
                continue;
            };
            let slot = slot_of(&d);
            if found.insert(id.clone(), slot).is_some() {
                found.insert(
                    id.clone(),
                    Slot::Invalid(format!(
                        "two documents stand for id {id}: an ObjectId and a string _id"
                    )),
                );
            }
        }
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or(Slot::Absent))
            .collect())
    }

    /// Opens the database's change stream after `token` (from the start when `None`).
    async fn open_stream(
        &self,
        collections: &[String],
        token: Option<ResumeToken>,
    ) -> Result<mongodb::change_stream::ChangeStream<Document>> {
        let mut watch = self
            .db
            .watch()
            .pipeline([events::match_stage(collections)])
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(MAX_AWAIT);
        if let Some(token) = token {
            // startAfter (unlike resumeAfter) also resumes after an invalidate event.
            watch = watch.start_after(token);
        }
        let stream = watch.await.map_err(|e| explain(&self.uri, e))?;
        Ok(stream.with_type::<Document>())
    }
}

/// A stored document as a [`Slot`].
fn slot_of(d: &Document) -> Slot {
    match convert::document_to_record(d) {
        Ok(m) => Slot::Present(StoredRecord {
            id: m.id,
            doc: m.doc,
            updated_at_ms: m.updated_at_ms,
            etag: convert::etag_of(d),
        }),
        Err(NotARecord::Invalid(_, reason)) => Slot::Invalid(reason),
        Err(NotARecord::UnsupportedId(id)) => {
            Slot::Invalid(format!("_id {id} is neither an ObjectId nor a string"))
        }
    }
}

/// What one write needs after the first attempt.
enum Pending {
    Done(ApplyOutcome),
    /// Not applied: the current state decides between `Unchanged` and `Conflict`.
    Check,
}

/// A single-document write error as `Rejected`; anything else stays an error.
fn rejected_or_err(uri: &str, e: MongoError) -> Result<ApplyOutcome> {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Ok(ApplyOutcome::Rejected(format!(
            "MongoDB refused the write ({}): {}",
            w.code, w.message
        ))),
        _ => Err(explain(uri, e)),
    }
}

#[async_trait]
impl Store for MongoStore {
    fn describe(&self) -> String {
        redact_uri(&self.uri)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_changes: true,
            time_index: true,
            typed_tables: false,
            delete_times: true,
        }
    }

    async fn prepare(&self, collections: &[String]) -> Result<()> {
        self.require_replica_set().await?;
        for c in collections {
            let model = IndexModel::builder()
                .keys(doc! { "updatedAt": 1, "_id": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name(UPDATED_AT_INDEX.to_string())
                        .build(),
                )
                .build();
            match self.coll(c).create_index(model).await {
                Ok(_) => {}
                // 85/86: the same keys are already indexed under another name or options.
                Err(e) if matches!(error_code(&e), Some(85 | 86)) => {
                    debug!(collection = %c, "an index on updatedAt already exists")
                }
                Err(e) => {
                    return Err(explain(&self.uri, e))
                        .with_context(|| format!("creating the updatedAt index on {c}"));
                }
            }
        }
        info!(store = %redact_uri(&self.uri), ?collections, "MongoDB replica set ready; updatedAt indexes in place");
        Ok(())
    }

    async fn read(&self, collection: &str, ids: &[String]) -> Result<Vec<Slot>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            out.extend(self.read_docs(collection, chunk).await?);
        }
        Ok(out)
    }

    async fn apply(&self, collection: &str, writes: &[Write]) -> Result<Vec<ApplyOutcome>> {
        let coll = self.coll(collection);
        let mut pending: Vec<Option<Pending>> = (0..writes.len()).map(|_| None).collect();

        // Creates: one unordered insertMany; a duplicate key means it exists now.
        let mut inserts: Vec<(usize, Document)> = Vec::new();
        // Replaces and deletes of a document read earlier, guarded by its full content.
        let mut guarded: Vec<(usize, Document, Option<Document>)> = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            let r = &w.record;
            let stored = match &w.expected {
                Some(etag) => Some(convert::parse_etag(etag).map_err(|e| anyhow!(e))?),
                None => None,
            };
            match (r.op, &r.doc, stored) {
                (Op::Upsert, Some(json), stored) => {
                    let id = match &stored {
                        Some(s) => s.get("_id").cloned().unwrap_or(Bson::Null),
                        None => convert::id_for_insert(&r.id),
                    };
                    match convert::record_to_document(id, json, r.updated_at_ms) {
                        Err(reason) => {
                            pending[i] = Some(Pending::Done(ApplyOutcome::Rejected(reason)))
                        }
                        Ok(new) => match stored {
                            None => inserts.push((i, new)),
                            Some(s) => guarded.push((i, convert::guard_filter(&s), Some(new))),
                        },
                    }
                }
                (Op::Upsert, None, _) => {
                    pending[i] = Some(Pending::Done(ApplyOutcome::Rejected(
                        "an upsert without a document".into(),
                    )))
                }
                (Op::Delete, _, Some(s)) => guarded.push((i, convert::guard_filter(&s), None)),
                // Nothing was there when the engine read: nothing to delete.
                (Op::Delete, _, None) => pending[i] = Some(Pending::Check),
            }
        }

        if !inserts.is_empty() {
            let docs: Vec<Document> = inserts.iter().map(|(_, d)| d.clone()).collect();
            let mut failed: HashMap<usize, (i32, String)> = HashMap::new();
            match coll.insert_many(docs).ordered(false).await {
                Ok(_) => {}
                Err(e) => match e.kind.as_ref() {
                    ErrorKind::InsertMany(ime) if ime.write_errors.is_some() => {
                        if let Some(wce) = &ime.write_concern_error {
                            bail!(
                                "MongoDB at {} did not confirm the writes: {}",
                                redact_uri(&self.uri),
                                wce.message
                            );
                        }
                        for we in ime.write_errors.iter().flatten() {
                            failed.insert(we.index, (we.code, we.message.clone()));
                        }
                    }
                    _ => return Err(explain(&self.uri, e)),
                },
            }
            for (n, (i, _)) in inserts.iter().enumerate() {
                pending[*i] = Some(match failed.remove(&n) {
                    None => Pending::Done(ApplyOutcome::Applied),
                    Some((DUPLICATE_KEY, _)) => Pending::Check,
                    Some((code, msg)) => Pending::Done(ApplyOutcome::Rejected(format!(
                        "MongoDB refused the insert ({code}): {msg}"
                    ))),
                });
            }
        }

        let results: Vec<(usize, Result<Pending>)> =
            futures::stream::iter(guarded.into_iter().map(|(i, filter, new)| {
                let coll = coll.clone();
                let uri = self.uri.clone();
                async move {
                    let res = match new {
                        Some(new) => match coll.replace_one(filter, new).await {
                            Ok(r) if r.matched_count == 1 => {
                                Ok(Pending::Done(ApplyOutcome::Applied))
                            }
                            Ok(_) => Ok(Pending::Check),
                            Err(e) => rejected_or_err(&uri, e).map(Pending::Done),
                        },
                        None => match coll.delete_one(filter).await {
                            Ok(r) if r.deleted_count == 1 => {
                                Ok(Pending::Done(ApplyOutcome::Applied))
                            }
                            Ok(_) => Ok(Pending::Check),
                            Err(e) => rejected_or_err(&uri, e).map(Pending::Done),
                        },
                    };
                    (i, res)
                }
            }))
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for (i, res) in results {
            pending[i] = Some(res?);
        }

        // Writes that did not apply: the store already holds the result (a replay), or it
        // moved on since the engine read it.
        let to_check: Vec<usize> = (0..writes.len())
            .filter(|i| matches!(pending[*i], Some(Pending::Check)))
            .collect();
        let mut outcomes: Vec<ApplyOutcome> = pending
            .into_iter()
            .map(|p| match p {
                Some(Pending::Done(o)) => o,
                _ => ApplyOutcome::Conflict,
            })
            .collect();
        if !to_check.is_empty() {
            let ids: Vec<String> = to_check
                .iter()
                .map(|i| writes[*i].record.id.clone())
                .collect();
            let current = self.read(collection, &ids).await?;
            for (i, slot) in to_check.into_iter().zip(current) {
                let r = &writes[i].record;
                outcomes[i] = match (slot, &r.doc, r.op) {
                    (Slot::Absent, _, Op::Delete) => ApplyOutcome::Unchanged,
                    (Slot::Present(cur), Some(doc), Op::Upsert)
                        if canonical_hash(&cur.doc)
                            == canonical_hash(&with_updated_at(doc.clone(), r.updated_at_ms)) =>
                    {
                        ApplyOutcome::Unchanged
                    }
                    _ => ApplyOutcome::Conflict,
                };
            }
        }
        Ok(outcomes)
    }

    async fn scan(
        &self,
        collection: &str,
        since_ms: Option<i64>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<ScanPage> {
        let cursor = cursor
            .as_deref()
            .map(ScanCursor::decode)
            .transpose()
            .map_err(|e| anyhow!(e))?;
        let (filter, sort) =
            convert::scan_query(since_ms, cursor.as_ref()).map_err(|e| anyhow!(e))?;
        let limit = limit.max(1);
        let docs: Vec<Document> = self
            .coll(collection)
            .find(filter)
            .sort(sort)
            .limit(limit as i64)
            .await
            .map_err(|e| explain(&self.uri, e))?
            .try_collect()
            .await
            .map_err(|e| explain(&self.uri, e))?;
        let mut page = ScanPage::default();
        for d in &docs {
            match convert::document_to_record(d) {
                Ok(_) => {
                    if let Slot::Present(r) = slot_of(d) {
                        page.records.push(r);
                    }
                }
                Err(NotARecord::Invalid(id, reason)) => page.invalid.push((id, reason)),
                Err(NotARecord::UnsupportedId(id)) => page.invalid.push((
                    id,
                    "_id is neither an ObjectId nor a string; not synced".into(),
                )),
            }
        }
        if docs.len() >= limit {
            page.next = docs
                .last()
                .map(|d| convert::cursor_after(since_ms, d).encode());
        }
        Ok(page)
    }

    async fn listen(&self, ctx: ListenContext) -> Result<()> {
        let mut resume_from = match &ctx.checkpoint {
            Some(text) => Some(convert::from_ejson_text::<ResumeToken>(text).map_err(|e| {
                anyhow::Error::new(PositionLost(format!(
                    "the saved MongoDB resume token is unreadable ({e}); starting from now"
                )))
            })?),
            None => None,
        };
        let mut generation = {
            let mut p = self.positions.lock().expect("positions lock");
            p.rewind = false;
            p.settled = ctx.checkpoint.clone();
            p.generation
        };
        'open: loop {
            let mut stream = self
                .open_stream(&ctx.collections, resume_from.clone())
                .await?;
            info!(side = %ctx.side, store = %redact_uri(&self.uri), resumed = resume_from.is_some(), "listening to the MongoDB change stream");
            // Hand out the opening position at once: a fresh stream's start is then persisted.
            let mut last_sent: Option<String> = None;
            let mut last_sent_at = Instant::now() - IDLE_CHECKPOINT;
            loop {
                {
                    let mut p = self.positions.lock().expect("positions lock");
                    if p.rewind {
                        p.rewind = false;
                        p.generation += 1;
                        generation = p.generation;
                        let settled = p.settled.clone();
                        drop(p);
                        debug!(side = %ctx.side, "a batch was released; reopening after the last applied change");
                        resume_from = match settled {
                            Some(t) => Some(convert::from_ejson_text(&t).map_err(|e| anyhow!(e))?),
                            None => resume_from,
                        };
                        continue 'open;
                    }
                }
                let mut records = Vec::new();
                let mut gap = None;
                while records.len() < MAX_BATCH {
                    let next = tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        next = stream.next_if_any() => next,
                    };
                    let ev = match next {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(e) => return Err(explain(&self.uri, e)),
                    };
                    match events::map_event(&ev, ctx.side, &ctx.collections) {
                        EventAction::Change(r) => records.push(r),
                        EventAction::Ignore(why) => debug!(side = %ctx.side, "ignoring {why}"),
                        EventAction::Gap(why) => {
                            gap = Some(why);
                            break;
                        }
                    }
                }
                if let Some(why) = gap {
                    // Deliver what came before; the gap itself is repaired by a full sweep.
                    if !records.is_empty() {
                        let batch = ChangeBatch {
                            side: ctx.side,
                            records,
                            ack: Ack::None,
                        };
                        let _ = ctx.sink.send(batch).await;
                    }
                    warn!(side = %ctx.side, store = %redact_uri(&self.uri), "{why}");
                    return Err(PositionLost(why).into());
                }
                if !stream.is_alive() {
                    return Err(PositionLost(
                        "the MongoDB change stream was closed by the server".into(),
                    )
                    .into());
                }
                let token = match stream.resume_token() {
                    Some(t) => Some(convert::to_ejson_text(&t).map_err(|e| anyhow!(e))?),
                    None => None,
                };
                let idle_due = last_sent_at.elapsed() >= IDLE_CHECKPOINT && token != last_sent;
                if records.is_empty() && !idle_due {
                    continue;
                }
                let ack = match &token {
                    Some(t) => Ack::Token(format!("{generation}\n{t}")),
                    None => Ack::None,
                };
                last_sent = token;
                last_sent_at = Instant::now();
                let batch = ChangeBatch {
                    side: ctx.side,
                    records,
                    ack,
                };
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    sent = ctx.sink.send(batch) => if sent.is_err() { return Ok(()) },
                }
            }
        }
    }

    async fn settle(&self, ack: Ack, applied: bool) -> Result<Option<String>> {
        let Ack::Token(tagged) = ack else {
            return Ok(None);
        };
        let (generation, token) = tagged
            .split_once('\n')
            .and_then(|(g, t)| Some((g.parse::<u64>().ok()?, t.to_string())))
            .ok_or_else(|| anyhow!("malformed MongoDB listener position"))?;
        let mut p = self.positions.lock().expect("positions lock");
        if generation != p.generation || p.rewind {
            // From a stream that is being (or has been) reopened before this batch: its
            // changes come again, and the position must not move past the released batch.
            return Ok(None);
        }
        if !applied {
            p.rewind = true;
            return Ok(None);
        }
        p.settled = Some(token.clone());
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MongoStore {
        // The driver connects lazily: building a client needs no server.
        let options = ClientOptions::builder()
            .hosts(vec![
                mongodb::options::ServerAddress::parse("127.0.0.1:1").unwrap(),
            ])
            .build();
        let client = Client::with_options(options).unwrap();
        MongoStore {
            db: client.database("app"),
            uri: "mongodb://u:secret@127.0.0.1:1/app".into(),
            positions: Arc::default(),
        }
    }

    fn token(generation: u64, t: &str) -> Ack {
        Ack::Token(format!("{generation}\n{t}"))
    }

    #[tokio::test]
    async fn positions_advance_only_past_applied_batches() {
        let s = store();
        assert_eq!(s.describe(), "mongodb://u:***@127.0.0.1:1/app");
        assert_eq!(s.settle(Ack::None, true).await.unwrap(), None);
        assert_eq!(
            s.settle(token(0, "A"), true).await.unwrap().as_deref(),
            Some("A")
        );
        // B is released: neither B nor anything after it (C) may be persisted.
        assert_eq!(s.settle(token(0, "B"), false).await.unwrap(), None);
        assert_eq!(s.settle(token(0, "C"), true).await.unwrap(), None);
        {
            let p = s.positions.lock().unwrap();
            assert!(p.rewind, "the listener is asked to reopen");
            assert_eq!(p.settled.as_deref(), Some("A"), "it reopens after A");
        }
        // The listener reopens (a new generation); late acks of the old stream stay ignored.
        {
            let mut p = s.positions.lock().unwrap();
            p.rewind = false;
            p.generation += 1;
        }
        assert_eq!(s.settle(token(0, "D"), true).await.unwrap(), None);
        assert_eq!(
            s.settle(token(1, "B2"), true).await.unwrap().as_deref(),
            Some("B2")
        );
        assert!(s.settle(Ack::Token("garbage".into()), true).await.is_err());
    }

    #[tokio::test]
    async fn an_unreadable_checkpoint_is_a_lost_position_not_a_crash_loop() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let ctx = ListenContext {
            side: crate::record::Side::Local,
            collections: vec!["users".into()],
            checkpoint: Some("{not a token".into()),
            sink: tx,
            shutdown: tokio_util::sync::CancellationToken::new(),
        };
        let err = store().listen(ctx).await.unwrap_err();
        assert!(err.chain().any(|c| c.is::<PositionLost>()), "{err:#}");
    }

    #[test]
    fn lost_history_is_a_position_lost_error() {
        let e: MongoError = ErrorKind::Command(
            mongodb::bson::from_document(doc! {
                "code": 286, "codeName": "ChangeStreamHistoryLost",
                "errmsg": "Resume of change stream was not possible, as the resume point may no longer be in the oplog."
            })
            .unwrap(),
        )
        .into();
        let err = explain("mongodb://u:secret@h/app", e);
        assert!(err.chain().any(|c| c.is::<PositionLost>()), "{err:#}");
        let text = format!("{err:#}");
        assert!(
            text.contains("full sweep") && !text.contains("secret"),
            "{text}"
        );

        let e: MongoError = ErrorKind::Command(
            mongodb::bson::from_document(doc! {
                "code": 40573, "codeName": "Location40573",
                "errmsg": "The $changeStream stage is only supported on replica sets"
            })
            .unwrap(),
        )
        .into();
        let text = format!("{:#}", explain("mongodb://h/app", e));
        assert!(
            text.contains("--replSet") && text.contains("rs.initiate()"),
            "{text}"
        );
    }
}
