//! The engine: store-agnostic reconciliation of records between the `local` and `cloud` stores.
//!
//! Every path that moves data (a listener's batch, a sweep page, an on-demand sync) ends in
//! [`Engine::reconcile`]: read the record on both sides, decide with the [`policy`] against the
//! agreed version from [`state`], write conditionally, and record the new agreed version only
//! once the writes are done. A listener event is only a hint that a record may have changed:
//! the decision is always made from fresh reads, so a late or replayed event cannot do harm.

pub mod conflicts;
pub mod echo;
pub mod merge;
pub mod order;
pub mod pause;
pub mod pipeline;
pub mod policy;
pub mod queue;
pub mod scheduler;
pub mod state;
pub mod stats;
pub mod sweep;

use crate::config::Config;
use crate::record::{ChangeRecord, Op, Origin, Side, Version, now_ms};
use crate::stores::{ApplyOutcome, Slot, Store, Write};
use anyhow::Result;
use conflicts::ConflictLog;
use policy::{ConflictPolicy, Decision, Mode, Reason, SideState, Target, decide};
use queue::{FailureKind, QueueCounts, RetryPolicy, RetryQueue};
use serde::Serialize;
use serde_json::Value;
use state::StateDb;
use stats::Stats;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{debug, error, warn};

/// Deletion times a listener learned from its store, per (side, record id).
pub type DeleteHints = HashMap<(Side, String), i64>;

/// How many times a record is re-read and re-decided when a conditional write finds that the
/// target moved on, before it is left to the next event or sweep.
const MAX_ROUNDS: usize = 5;

/// The two stores, the bridge's state, and the rules that keep them in step.
pub struct Engine {
    /// Loaded configuration.
    pub config: Config,
    /// This bridge's identity, persisted in the data directory; tags its own writes.
    pub instance_id: String,
    local: Arc<dyn Store>,
    cloud: Arc<dyn Store>,
    /// The bridge's own state.
    pub state: StateDb,
    /// Counters and health.
    pub stats: Arc<Stats>,
    /// Serializes reconcile rounds so two paths never decide the same record at once.
    reconcile_lock: tokio::sync::Mutex<()>,
    /// The last sweep's report, for status.
    pub last_sweep: std::sync::Mutex<Option<sweep::SweepReport>>,
    /// Records that could not be synced yet, kept on disk until they are.
    pub queue: RetryQueue,
    /// Parked conflicts and the audit of decided ones.
    pub conflicts: ConflictLog,
    /// Whether the queue may hold entries; keeps queue look-ups off the hot path when empty.
    queue_in_use: AtomicBool,
    /// Announces the records each listener batch touched, after it is reconciled (see
    /// [`pipeline::Changed`]); the replication API follows it. Sending costs nothing when
    /// nobody subscribed.
    pub changes: tokio::sync::broadcast::Sender<pipeline::Changed>,
    /// Collections' dependency ranks (parents first), known once the stores are prepared.
    ranks: std::sync::RwLock<order::Ranks>,
    /// The offline switch (see [`pause`]).
    pub pause: pause::PauseSwitch,
}

/// What a reconcile (or a whole sweep) did, for logs, the CLI and the API.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    /// Records looked at.
    pub examined: u64,
    /// Records already equal on both sides.
    pub in_sync: u64,
    /// Records written to local / cloud (upserts).
    pub copied_to_local: u64,
    /// Records written to cloud.
    pub copied_to_cloud: u64,
    /// Records deleted on local.
    pub deleted_local: u64,
    /// Records deleted on cloud.
    pub deleted_cloud: u64,
    /// Conflicts, each with its winner.
    pub conflicts: Vec<ConflictNote>,
    /// Records left alone because the mode forbids the write.
    pub skipped_by_mode: u64,
    /// Conflicts parked for a person to resolve (`manual` collections).
    pub parked: u64,
    /// Records that could not be synced, with the reason.
    pub errors: Vec<String>,
    /// Records that could not be synced now and went to the durable retry queue.
    pub queued: u64,
    /// Records that could not even be queued (the state database failed): the caller must keep
    /// their changes unsettled so they are delivered again.
    #[serde(skip)]
    pub unfinished: u64,
}

/// One conflict and how it was decided.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictNote {
    /// Collection.
    pub collection: String,
    /// Record id.
    pub id: String,
    /// Which version won: `local`, `cloud` or `merged`.
    pub winner: String,
    /// Decided by the hash because both `updatedAt`s were equal.
    pub tie_break: bool,
}

impl Summary {
    /// Adds another summary's counts into this one.
    pub fn absorb(&mut self, other: Summary) {
        self.examined += other.examined;
        self.in_sync += other.in_sync;
        self.copied_to_local += other.copied_to_local;
        self.copied_to_cloud += other.copied_to_cloud;
        self.deleted_local += other.deleted_local;
        self.deleted_cloud += other.deleted_cloud;
        self.conflicts.extend(other.conflicts);
        self.skipped_by_mode += other.skipped_by_mode;
        self.parked += other.parked;
        self.errors.extend(other.errors);
        self.queued += other.queued;
        self.unfinished += other.unfinished;
    }

    /// Writes that changed a store.
    pub fn writes(&self) -> u64 {
        self.copied_to_local + self.copied_to_cloud + self.deleted_local + self.deleted_cloud
    }
}

impl Engine {
    /// Builds an engine over two opened stores.
    pub async fn new(
        config: Config,
        instance_id: String,
        local: Arc<dyn Store>,
        cloud: Arc<dyn Store>,
    ) -> Result<Engine> {
        let state = StateDb::open(&config.data_dir).await?;
        let queue = RetryQueue::open(state.pool(), RetryPolicy::from_config(&config.sync)).await?;
        let conflicts = ConflictLog::open(state.pool()).await?;
        let counts = queue.counts().await?;
        let queue_in_use = counts.pending + counts.failed + counts.held > 0;
        // `[sync] paused` / SYNCBRIDGE_PAUSED, when set, win over the persisted flag.
        let paused = match config.sync.paused {
            Some(p) => {
                queue.set_paused_flag(p).await?;
                p
            }
            None => queue.paused_flag().await?.unwrap_or(false),
        };
        let pause = pause::PauseSwitch::new(paused, !paused && counts.held > 0);
        Ok(Engine {
            config,
            instance_id,
            local,
            cloud,
            state,
            stats: Arc::new(Stats::default()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            last_sweep: std::sync::Mutex::new(None),
            queue,
            conflicts,
            queue_in_use: AtomicBool::new(queue_in_use),
            changes: tokio::sync::broadcast::channel(1024).0,
            ranks: std::sync::RwLock::default(),
            pause,
        })
    }

    /// Opens both stores named by `config` and the state in its data directory.
    pub async fn open(config: Config) -> Result<Engine> {
        let instance_id = instance_id(&config.data_dir)?;
        let options = crate::stores::StoreOptions {
            consumer_retention: std::time::Duration::from_secs(
                config.sync.consumer_retention_days.saturating_mul(86_400),
            ),
        };
        let local = crate::stores::open_with(&config.local.uri, &instance_id, &options).await?;
        let cloud = crate::stores::open_with(&config.cloud.uri, &instance_id, &options).await?;
        Engine::new(config, instance_id, local, cloud).await
    }

    /// The store playing `side`.
    pub fn store(&self, side: Side) -> &Arc<dyn Store> {
        match side {
            Side::Local => &self.local,
            Side::Cloud => &self.cloud,
        }
    }

    /// Creates tables, triggers and notification settings on both stores, maps collections
    /// onto typed tables where the config names one, orders collections by their
    /// dependencies and refuses key allocations that could collide.
    pub async fn prepare(&self) -> Result<()> {
        let mut facts = Vec::new();
        for side in [Side::Local, Side::Cloud] {
            let store = self.store(side);
            let specs = self.table_specs(side, store.as_ref());
            let generic: Vec<String> = self
                .config
                .sync
                .collections
                .iter()
                .filter(|c| !specs.iter().any(|s| &s.collection == *c))
                .cloned()
                .collect();
            store.prepare(&generic).await?;
            facts.push((side, store.prepare_tables(&specs).await?));
        }
        order::check_key_allocation(&self.config, &facts)?;
        *self.ranks.write().expect("ranks lock") = order::ranks(&self.config, &facts);
        Ok(())
    }

    /// The typed tables `store` holds as `side`, from the config: none for a store without
    /// tables (a `table` setting applies to the SQL sides only). Other handles on the same
    /// store (the API's) map them too, with [`Store::prepare_tables`].
    pub fn table_specs(&self, side: Side, store: &dyn Store) -> Vec<crate::stores::TableSpec> {
        if !store.capabilities().typed_tables {
            return Vec::new();
        }
        self.config
            .collections
            .iter()
            .filter_map(|c| c.table_spec(side))
            .collect()
    }

    /// `collection`'s dependency rank: parents (referenced rows) have smaller ranks.
    pub fn rank(&self, collection: &str) -> usize {
        self.ranks
            .read()
            .expect("ranks lock")
            .get(collection)
            .copied()
            .unwrap_or(0)
    }

    /// Brings these records of `collection` into agreement under `mode`.
    ///
    /// `deleted_at` carries, per (side, id), the deletion time a listener learned from its
    /// store. A record that cannot be synced now goes into the durable [`queue`] with the
    /// reason; the agreed version changes only when every write of a record succeeded.
    /// `Summary::unfinished` counts records that could not even be queued: only then must the
    /// caller keep its change unsettled.
    pub async fn reconcile(
        &self,
        collection: &str,
        ids: &[String],
        mode: Mode,
        deleted_at: &DeleteHints,
    ) -> Summary {
        let mut summary = Summary::default();
        let started_ms = now_ms();
        let mut pending: Vec<String> = ids
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut failed: Vec<(String, String, FailureKind)> = Vec::new();
        for round in 0..MAX_ROUNDS {
            if pending.is_empty() {
                break;
            }
            let _guard = self.reconcile_lock.lock().await;
            match self
                .round(
                    collection,
                    &pending,
                    mode,
                    deleted_at,
                    &mut summary,
                    round == 0,
                )
                .await
            {
                Ok(out) => {
                    pending = out.retry;
                    failed.extend(out.failed);
                }
                Err(e) => {
                    Stats::bump(&self.stats.errors, 1);
                    let msg = format!("{collection}: {e:#}");
                    warn!(error = %msg, count = pending.len(), "reconcile failed; the records are queued for retry");
                    summary.errors.push(msg.clone());
                    failed.extend(
                        pending
                            .drain(..)
                            .map(|id| (id, msg.clone(), FailureKind::Store)),
                    );
                }
            }
            if !pending.is_empty() {
                Stats::bump(&self.stats.retries, pending.len() as u64);
            }
        }
        // Still contended after every round: another writer keeps changing it. Try again later.
        failed.extend(pending.into_iter().map(|id| {
            (
                id,
                "the record kept changing during the apply".to_string(),
                FailureKind::Store,
            )
        }));
        self.settle_queue(collection, ids, failed, &mut summary, started_ms)
            .await;
        self.stats.count_synced(collection, summary.writes());
        summary
    }

    /// Queues what failed and forgets queue entries for what synced.
    async fn settle_queue(
        &self,
        collection: &str,
        ids: &[String],
        failed: Vec<(String, String, FailureKind)>,
        summary: &mut Summary,
        started_ms: i64,
    ) {
        if !failed.is_empty() {
            self.queue_in_use.store(true, Ordering::Relaxed);
            match self.queue.fail(collection, &failed).await {
                Ok(()) => summary.queued += failed.len() as u64,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "could not queue failed records; their changes stay unsettled");
                    summary.unfinished += failed.len() as u64;
                }
            }
        }
        if self.queue_in_use.load(Ordering::Relaxed) {
            let failed_ids: BTreeSet<&String> = failed.iter().map(|(id, _, _)| id).collect();
            let synced: Vec<String> = ids
                .iter()
                .filter(|id| !failed_ids.contains(id))
                .cloned()
                .collect();
            // A change that joined an entry after this reconcile began keeps it queued.
            if let Err(e) = self
                .queue
                .remove_settled(collection, &synced, started_ms)
                .await
            {
                warn!(error = %format!("{e:#}"), "could not clear synced records from the retry queue");
            }
        }
    }

    /// Reconciles the queued records that are due: keys held while paused first, in the order
    /// they were first seen, then failed records. Returns how many were attempted; none while
    /// paused.
    pub async fn drain_queue(&self, mode: Mode) -> Result<usize> {
        if !self.queue_in_use.load(Ordering::Relaxed) || self.is_paused() {
            return Ok(0);
        }
        if let Some(n) = self.drain_held(mode).await? {
            return Ok(n);
        }
        let due = self.queue.due(self.config.sync.batch_size as i64).await?;
        if due.is_empty() {
            let counts = self.queue.counts().await?;
            if counts.pending + counts.failed + counts.held == 0 {
                self.queue_in_use.store(false, Ordering::Relaxed);
            }
            return Ok(0);
        }
        let mut by_collection: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (collection, id) in &due {
            by_collection
                .entry(collection.clone())
                .or_default()
                .push(id.clone());
        }
        for (collection, ids) in by_collection {
            self.reconcile(&collection, &ids, mode, &DeleteHints::new())
                .await;
        }
        Ok(due.len())
    }

    /// Of these ids, those whose every version as the listeners read it equals the agreed
    /// version (deletes: the agreed version is a delete too): echoes of the bridge's own writes.
    pub async fn echoes(
        &self,
        collection: &str,
        ids: &[String],
        seen: &HashMap<(String, String), Vec<Option<Version>>>,
    ) -> Result<BTreeSet<String>> {
        let key = |id: &String| (collection.to_string(), id.clone());
        let candidates: Vec<String> = ids
            .iter()
            .filter(|id| {
                seen.get(&key(id))
                    .is_some_and(|vs| vs.iter().all(Option::is_some))
            })
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Ok(BTreeSet::new());
        }
        let agreed = self.state.agreed(collection, &candidates).await?;
        Ok(candidates
            .into_iter()
            .filter(|id| {
                let Some(a) = agreed.get(id) else {
                    return false;
                };
                seen[&key(id)].iter().flatten().all(|v| {
                    if v.deleted {
                        a.deleted
                    } else {
                        !a.deleted && a.hash == v.hash
                    }
                })
            })
            .collect())
    }

    /// Notes that the queue has entries (an operator put one back), so the pipeline looks.
    pub fn note_queued(&self) {
        self.queue_in_use.store(true, Ordering::Relaxed);
    }

    /// Of these ids, the ones waiting in the retry queue (their changes must queue behind them).
    pub async fn queued(&self, collection: &str, ids: &[String]) -> Result<Vec<String>> {
        if !self.queue_in_use.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        self.queue.queued(collection, ids).await
    }

    /// Everything status shows: counters, store health, the queue, the last sweep.
    pub async fn status(&self) -> Result<Status> {
        Ok(Status {
            instance_id: self.instance_id.clone(),
            mode: self.config.sync.mode,
            paused: self.is_paused(),
            local: self.local.describe(),
            cloud: self.cloud.describe(),
            counters: self.stats.snapshot(),
            queue: self.queue.counts().await?,
            last_sweep: self.last_sweep.lock().expect("last sweep lock").clone(),
        })
    }

    /// One read-decide-write-record round.
    async fn round(
        &self,
        collection: &str,
        ids: &[String],
        mode: Mode,
        deleted_at: &DeleteHints,
        summary: &mut Summary,
        first: bool,
    ) -> Result<RoundOutcome> {
        let rules = self.config.rules(collection);
        // The round's clock is read before the stores are: it stamps deletes nobody knows the
        // time of (a key found missing in Redis), and such a delete was seen no later than the
        // read. Taken after the reads, it could sort after an edit that landed just behind
        // them, and the edit would be put back as stale.
        let now = now_ms();
        let (agreed, pending, local, cloud) = tokio::try_join!(
            self.state.agreed(collection, ids),
            self.state.pending(collection, ids),
            self.local.read(collection, ids),
            self.cloud.read(collection, ids),
        )?;
        let bases = match rules.conflict {
            ConflictPolicy::Merge => self.state.agreed_docs(collection, ids).await?,
            _ => HashMap::new(),
        };
        // Deletes a listener has not reported yet: ask the stores when they happened, so a sweep
        // weighs them by their real time (a store without a change log cannot say).
        let mut deleted_at = deleted_at.clone();
        for (side, slots) in [(Side::Local, &local), (Side::Cloud, &cloud)] {
            let unknown: Vec<String> = ids
                .iter()
                .zip(slots.iter())
                .filter(|(id, slot)| {
                    matches!(slot, Slot::Absent) && !deleted_at.contains_key(&(side, (*id).clone()))
                })
                .filter(|(id, _)| agreed.get(*id).is_some_and(|v| !v.deleted))
                .map(|(id, _)| id.clone())
                .collect();
            if !unknown.is_empty() {
                for (id, at) in self
                    .store(side)
                    .deletion_times(collection, &unknown)
                    .await?
                {
                    deleted_at.insert((side, id), at);
                }
            }
        }
        let parked = match rules.conflict {
            ConflictPolicy::Manual => self.conflicts.parked_among(collection, ids).await?,
            _ => HashMap::new(),
        };
        let max_future = now + (self.config.sync.max_future_secs as i64) * 1000;
        let mut out = RoundOutcome::default();
        let mut plans: Vec<(usize, Decision, [Option<Value>; 2])> = Vec::new();
        let mut writes: [Vec<(usize, Write)>; 2] = [Vec::new(), Vec::new()];
        if first {
            summary.examined += ids.len() as u64;
        }
        let mut refuse = |summary: &mut Summary, id: &str, msg: String| {
            warn!("{msg}");
            summary.errors.push(msg.clone());
            out.failed.push((id.to_string(), msg, FailureKind::Record));
        };
        'ids: for (i, id) in ids.iter().enumerate() {
            let mut states = Vec::with_capacity(2);
            for (side, slot) in [(Side::Local, &local[i]), (Side::Cloud, &cloud[i])] {
                let st = match slot {
                    Slot::Present(r) => {
                        if r.updated_at_ms.is_some_and(|t| t > max_future) {
                            self.stats.future_rejected.add(side, 1);
                            let secs = self.config.sync.max_future_secs;
                            refuse(
                                summary,
                                id,
                                format!(
                                    "{side} {collection}/{id}: updatedAt lies more than {secs}s in the future; not synced"
                                ),
                            );
                            continue 'ids;
                        }
                        SideState::present(r.doc.clone(), r.updated_at_ms, now)
                    }
                    Slot::Absent => SideState::Absent {
                        deleted_at: deleted_at.get(&(side, id.clone())).copied(),
                    },
                    Slot::Invalid(reason) => {
                        self.stats.invalid.add(side, 1);
                        refuse(
                            summary,
                            id,
                            format!("{side} {collection}/{id}: {reason}; not synced"),
                        );
                        continue 'ids;
                    }
                };
                states.push(st);
            }
            let docs = [doc_of(&states[0]), doc_of(&states[1])];
            if let Some(entry) = parked.get(id) {
                // A parked record stays parked until resolved: later changes refresh the parked
                // versions instead of syncing around it, unless both sides now agree anyway.
                if docs[0] == docs[1] {
                    self.conflicts
                        .mark_resolved(entry.id, "converged", None)
                        .await?;
                } else {
                    let base = entry.base.clone();
                    self.conflicts
                        .park(
                            collection,
                            id,
                            docs[0].as_ref(),
                            docs[1].as_ref(),
                            base.as_ref(),
                        )
                        .await?;
                    continue 'ids;
                }
            }
            let (base, from_pending) =
                policy::base_version(agreed.get(id), pending.get(id), &states[0], &states[1]);
            let mut decision = decide(
                mode,
                rules,
                base,
                bases.get(id),
                &states[0],
                &states[1],
                now,
            );
            if from_pending && decision.agree.is_none() && decision.reason == Reason::InSync {
                // Both stores hold what the interrupted write was putting in place: it is agreed.
                decision.agree = base.cloned();
            }
            if let Some(Target::Live { doc, .. }) = &decision.target {
                let size = crate::record::canonical_json(doc).len();
                if size > self.config.sync.max_doc_bytes {
                    for &side in &decision.write_to {
                        self.stats.rejected.add(side, 1);
                    }
                    let max = self.config.sync.max_doc_bytes;
                    refuse(
                        summary,
                        id,
                        format!(
                            "{collection}/{id}: document is {size} bytes, over max_doc_bytes ({max})"
                        ),
                    );
                    continue 'ids;
                }
            }
            for &side in &decision.write_to {
                let slot = if side == Side::Local {
                    &local[i]
                } else {
                    &cloud[i]
                };
                let expected = match slot {
                    Slot::Present(r) => Some(r.etag.clone()),
                    _ => None,
                };
                let target = decision.target.as_ref().expect("writes come with a target");
                writes[side_idx(side)].push((
                    plans.len(),
                    Write {
                        record: record_for(side, collection, id, target, &self.instance_id),
                        expected,
                    },
                ));
            }
            plans.push((i, decision, docs));
        }

        // What the writes put in place is written down first, so a bridge killed before
        // `set_agreed` below still knows its own writes when it starts again.
        let intents: Vec<(String, state::Pending)> = plans
            .iter()
            .filter(|(_, d, _)| !d.write_to.is_empty())
            .filter_map(|(i, d, _)| {
                let pending = state::Pending {
                    version: d.target.as_ref()?.version().clone(),
                    targets: d.write_to.clone(),
                };
                Some((ids[*i].clone(), pending))
            })
            .collect();
        self.state.set_pending(collection, &intents).await?;

        // Both sides are written concurrently; each is one batch.
        let apply = |side: Side| {
            let ws: Vec<Write> = writes[side_idx(side)]
                .iter()
                .map(|(_, w)| w.clone())
                .collect();
            async move { self.store(side).apply(collection, &ws).await }
        };
        let (l_out, c_out) = tokio::join!(apply(Side::Local), apply(Side::Cloud));
        let mut failed_plans = BTreeSet::new();
        for (side, outcome) in [(Side::Local, l_out), (Side::Cloud, c_out)] {
            let entries = &writes[side_idx(side)];
            match outcome {
                Ok(outcomes) => {
                    for ((plan, w), result) in entries.iter().zip(outcomes) {
                        let id = &w.record.id;
                        match result {
                            ApplyOutcome::Applied => {
                                self.stats.applied.add(side, 1);
                                count_write(summary, side, w.record.op);
                            }
                            ApplyOutcome::Unchanged => {}
                            ApplyOutcome::Conflict => {
                                failed_plans.insert(*plan);
                                out.retry.push(id.clone());
                            }
                            ApplyOutcome::Deferred(reason) => {
                                // A parent row still on its way: the queue retries it with
                                // backoff, as long as it takes, and never dead-letters it.
                                failed_plans.insert(*plan);
                                self.stats.deferred.add(side, 1);
                                let msg =
                                    format!("{side} cannot take {collection}/{id} yet: {reason}");
                                debug!("{msg}");
                                out.failed.push((id.clone(), msg, FailureKind::Store));
                            }
                            ApplyOutcome::Rejected(reason) => {
                                failed_plans.insert(*plan);
                                self.stats.rejected.add(side, 1);
                                let msg = format!("{side} refused {collection}/{id}: {reason}");
                                warn!("{msg}");
                                summary.errors.push(msg.clone());
                                out.failed.push((id.clone(), msg, FailureKind::Record));
                            }
                        }
                    }
                }
                Err(e) => {
                    Stats::bump(&self.stats.errors, 1);
                    let msg = format!(
                        "applying to {side} ({}): {e:#}",
                        self.store(side).describe()
                    );
                    warn!(error = %msg, "store write failed; the records are queued for retry");
                    summary.errors.push(msg.clone());
                    for (plan, w) in entries {
                        failed_plans.insert(*plan);
                        out.failed
                            .push((w.record.id.clone(), msg.clone(), FailureKind::Store));
                    }
                }
            }
        }
        // A record with a failed write on one side and a refused write on the other is queued once.
        out.retry
            .retain(|id| !out.failed.iter().any(|(f, _, _)| f == id));
        out.failed.sort_by(|a, b| a.0.cmp(&b.0));
        out.failed.dedup_by(|a, b| a.0 == b.0);

        crash_point(collection, &writes);

        let mut agreed_now: Vec<(String, Version)> = Vec::new();
        let mut agreed_docs: Vec<(String, Option<String>)> = Vec::new();
        for (n, (i, d, docs)) in plans.iter().enumerate() {
            let id = &ids[*i];
            if failed_plans.contains(&n) {
                continue;
            }
            if let Some(v) = &d.agree {
                agreed_now.push((id.clone(), v.clone()));
                if rules.conflict == ConflictPolicy::Merge {
                    let doc = match &d.target {
                        Some(Target::Live { doc, .. }) => Some(doc.to_string()),
                        Some(Target::Deleted(_)) => None,
                        None => docs[0].as_ref().map(|doc| doc.to_string()),
                    };
                    agreed_docs.push((id.clone(), doc));
                }
            }
            let base = bases.get(id);
            match d.reason {
                Reason::InSync => summary.in_sync += 1,
                Reason::Conflict { winner, tie_break } => {
                    self.stats.conflicts.add(winner, 1);
                    self.stats
                        .conflict_outcome(rules.conflict.as_str(), winner.as_str());
                    if tie_break {
                        Stats::bump(&self.stats.tie_breaks, 1);
                    }
                    let loser = docs[side_idx(winner.other())].as_ref();
                    self.conflicts
                        .record_decided(
                            collection,
                            id,
                            rules.conflict.as_str(),
                            winner.as_str(),
                            docs[0].as_ref(),
                            docs[1].as_ref(),
                            base,
                            loser,
                        )
                        .await?;
                    summary.conflicts.push(ConflictNote {
                        collection: collection.to_string(),
                        id: id.clone(),
                        winner: winner.as_str().to_string(),
                        tie_break,
                    });
                }
                Reason::Merged => {
                    self.stats.conflict_outcome("merge", "merged");
                    self.conflicts
                        .record_decided(
                            collection,
                            id,
                            "merge",
                            "merged",
                            docs[0].as_ref(),
                            docs[1].as_ref(),
                            base,
                            None,
                        )
                        .await?;
                    summary.conflicts.push(ConflictNote {
                        collection: collection.to_string(),
                        id: id.clone(),
                        winner: "merged".into(),
                        tie_break: false,
                    });
                }
                Reason::Parked => {
                    self.stats.conflict_outcome("manual", "parked");
                    self.conflicts
                        .park(collection, id, docs[0].as_ref(), docs[1].as_ref(), base)
                        .await?;
                    summary.parked += 1;
                }
                Reason::Stale(_) => Stats::bump(&self.stats.stale_reverted, 1),
                Reason::NotThisWay => summary.skipped_by_mode += 1,
                Reason::Changed(_) | Reason::Overwrite(_) => {}
            }
        }
        self.state.set_agreed(collection, &agreed_now).await?;
        self.state.set_agreed_docs(collection, &agreed_docs).await?;
        Ok(out)
    }
}

/// Fault injection for the crash tests (`tests/crashes.rs`): with
/// `SYNCBRIDGE_CRASH_AFTER_APPLY=<collection>/<id>` in its environment, the process aborts as soon
/// as a round has written that record to a store and before it records the agreed version: the
/// window where a crash is most dangerous. Unset (always, outside those tests) it costs one
/// cached look-up.
fn crash_point(collection: &str, writes: &[Vec<(usize, Write)>; 2]) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(target) = TARGET.get_or_init(|| std::env::var("SYNCBRIDGE_CRASH_AFTER_APPLY").ok())
    else {
        return;
    };
    let hit = writes
        .iter()
        .flatten()
        .any(|(_, w)| format!("{collection}/{}", w.record.id) == *target);
    if hit {
        error!(%target, "SYNCBRIDGE_CRASH_AFTER_APPLY: aborting between the apply and the agreement");
        std::process::abort();
    }
}

/// What one reconcile round leaves to do.
#[derive(Default)]
struct RoundOutcome {
    /// Ids whose conditional write found the target changed: decide again from fresh reads.
    retry: Vec<String>,
    /// Ids that could not be synced now, with the reason: they go to the retry queue.
    failed: Vec<(String, String, FailureKind)>,
}

/// What `GET /api/sync/status` and `syncbridge status` show.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This bridge's instance id.
    pub instance_id: String,
    /// The configured mode.
    pub mode: Mode,
    /// Paused by the offline switch.
    pub paused: bool,
    /// The local store, redacted.
    pub local: String,
    /// The cloud store, redacted.
    pub cloud: String,
    /// Counters and store health since start.
    pub counters: stats::StatsSnapshot,
    /// The retry queue: pending, dead-lettered, oldest age.
    pub queue: QueueCounts,
    /// The last sweep.
    pub last_sweep: Option<sweep::SweepReport>,
}

/// This bridge's id, made once and kept in the data directory so a restart keeps its identity.
fn instance_id(data_dir: &std::path::Path) -> Result<String> {
    use anyhow::Context;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// The document a side holds, `None` if it holds none.
fn doc_of(state: &SideState) -> Option<Value> {
    match state {
        SideState::Present { doc, .. } => Some(doc.clone()),
        SideState::Absent { .. } => None,
    }
}

pub(crate) fn side_idx(side: Side) -> usize {
    match side {
        Side::Local => 0,
        Side::Cloud => 1,
    }
}

fn count_write(summary: &mut Summary, side: Side, op: Op) {
    match (side, op) {
        (Side::Local, Op::Upsert) => summary.copied_to_local += 1,
        (Side::Cloud, Op::Upsert) => summary.copied_to_cloud += 1,
        (Side::Local, Op::Delete) => summary.deleted_local += 1,
        (Side::Cloud, Op::Delete) => summary.deleted_cloud += 1,
    }
}

/// The change record that puts `target` on `side`.
pub(crate) fn record_for(
    side: Side,
    collection: &str,
    id: &str,
    target: &Target,
    instance: &str,
) -> ChangeRecord {
    let (op, doc) = match target {
        Target::Live { doc, .. } => (Op::Upsert, Some(doc.clone())),
        Target::Deleted(_) => (Op::Delete, None),
    };
    ChangeRecord {
        side,
        collection: collection.to_string(),
        id: id.to_string(),
        op,
        doc,
        updated_at_ms: target.version().updated_at_ms,
        origin: Origin::Bridge(instance.to_string()),
    }
}
