//! The engine: store-agnostic reconciliation of records between the `local` and `cloud` stores.
//!
//! Every path that moves data (a listener's batch, a sweep page, an on-demand sync) ends in
//! [`Engine::reconcile`]: read the record on both sides, decide with the [`policy`] against the
//! agreed version from [`state`], write conditionally, and record the new agreed version only
//! once the writes are done. A listener event is only a hint that a record may have changed:
//! the decision is always made from fresh reads, so a late or replayed event cannot do harm.

pub mod echo;
pub mod pipeline;
pub mod policy;
pub mod scheduler;
pub mod state;
pub mod stats;
pub mod sweep;

use crate::config::Config;
use crate::record::{ChangeRecord, Op, Origin, Side, Version, now_ms};
use crate::stores::{ApplyOutcome, Slot, Store, Write};
use anyhow::Result;
use policy::{Decision, Mode, Reason, SideState, Target, decide};
use serde::Serialize;
use state::StateDb;
use stats::Stats;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tracing::{debug, warn};

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
    /// Records whose reconcile failed on a store error, retried by the pipeline with backoff.
    pub retry_later: std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>,
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
    /// Records that could not be synced, with the reason.
    pub errors: Vec<String>,
    /// Ids whose writes did not all complete (to retry, keep the source's change unsettled).
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
    /// The side whose version won.
    pub winner: Side,
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
        self.errors.extend(other.errors);
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
        Ok(Engine {
            config,
            instance_id,
            local,
            cloud,
            state,
            stats: Arc::new(Stats::default()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            last_sweep: std::sync::Mutex::new(None),
            retry_later: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Opens both stores named by `config` and the state in its data directory.
    pub async fn open(config: Config) -> Result<Engine> {
        let instance_id = instance_id(&config.data_dir)?;
        let local = crate::stores::open(&config.local.uri, &instance_id).await?;
        let cloud = crate::stores::open(&config.cloud.uri, &instance_id).await?;
        Engine::new(config, instance_id, local, cloud).await
    }

    /// The store playing `side`.
    pub fn store(&self, side: Side) -> &Arc<dyn Store> {
        match side {
            Side::Local => &self.local,
            Side::Cloud => &self.cloud,
        }
    }

    /// Creates tables, triggers and notification settings on both stores.
    pub async fn prepare(&self) -> Result<()> {
        let collections = &self.config.sync.collections;
        self.local.prepare(collections).await?;
        self.cloud.prepare(collections).await?;
        Ok(())
    }

    /// Brings these records of `collection` into agreement under `mode`.
    ///
    /// `deleted_at` carries, per (side, id), the deletion time a listener learned from its
    /// store. Store errors are counted and reported in the summary (`unfinished`), never
    /// half-recorded: the agreed version changes only when every write of a record succeeded.
    pub async fn reconcile(
        &self,
        collection: &str,
        ids: &[String],
        mode: Mode,
        deleted_at: &DeleteHints,
    ) -> Summary {
        let mut summary = Summary::default();
        let mut pending: Vec<String> = ids
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
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
                Ok(retry) => pending = retry,
                Err(e) => {
                    Stats::bump(&self.stats.errors, 1);
                    let msg = format!("{collection}: {e:#}");
                    warn!(error = %msg, "reconcile failed; the records will be retried");
                    summary.errors.push(msg);
                    summary.unfinished += pending.len() as u64;
                    self.retry_later_add(collection, pending);
                    return summary;
                }
            }
            if !pending.is_empty() {
                Stats::bump(&self.stats.retries, pending.len() as u64);
            }
        }
        if !pending.is_empty() {
            summary.unfinished += pending.len() as u64;
            debug!(
                count = pending.len(),
                "records still contended after retries; retried later"
            );
            self.retry_later_add(collection, pending);
        }
        summary
    }

    fn retry_later_add(&self, collection: &str, ids: Vec<String>) {
        self.retry_later
            .lock()
            .expect("retry lock")
            .entry(collection.to_string())
            .or_default()
            .extend(ids);
    }

    /// Reconciles again every record whose last attempt failed. Returns how many are still
    /// failing.
    pub async fn retry_failed(&self, mode: Mode) -> usize {
        let work = std::mem::take(&mut *self.retry_later.lock().expect("retry lock"));
        for (collection, ids) in work {
            let ids: Vec<String> = ids.into_iter().collect();
            for chunk in ids.chunks(self.config.sync.batch_size) {
                self.reconcile(&collection, chunk, mode, &HashMap::new())
                    .await;
            }
        }
        self.retry_later
            .lock()
            .expect("retry lock")
            .values()
            .map(BTreeSet::len)
            .sum()
    }

    /// One read-decide-write-record round. Returns the ids to decide again.
    async fn round(
        &self,
        collection: &str,
        ids: &[String],
        mode: Mode,
        deleted_at: &DeleteHints,
        summary: &mut Summary,
        first: bool,
    ) -> Result<Vec<String>> {
        let (agreed, local, cloud) = tokio::try_join!(
            self.state.agreed(collection, ids),
            self.local.read(collection, ids),
            self.cloud.read(collection, ids),
        )?;
        let now = now_ms();
        let max_future = now + (self.config.sync.max_future_secs as i64) * 1000;
        let mut plans: Vec<(usize, Decision)> = Vec::new();
        let mut writes: [Vec<(usize, Write)>; 2] = [Vec::new(), Vec::new()];
        if first {
            summary.examined += ids.len() as u64;
        }
        'ids: for (i, id) in ids.iter().enumerate() {
            let mut states = Vec::with_capacity(2);
            for (side, slot) in [(Side::Local, &local[i]), (Side::Cloud, &cloud[i])] {
                let st = match slot {
                    Slot::Present(r) => {
                        if r.updated_at_ms.is_some_and(|t| t > max_future) {
                            self.stats.future_rejected.add(side, 1);
                            let msg = format!(
                                "{side} {collection}/{id}: updatedAt lies more than {}s in the future; not synced",
                                self.config.sync.max_future_secs
                            );
                            warn!("{msg}");
                            summary.errors.push(msg);
                            continue 'ids;
                        }
                        SideState::present(r.doc.clone(), r.updated_at_ms, now)
                    }
                    Slot::Absent => SideState::Absent {
                        deleted_at: deleted_at.get(&(side, id.clone())).copied(),
                    },
                    Slot::Invalid(reason) => {
                        self.stats.invalid.add(side, 1);
                        let msg = format!("{side} {collection}/{id}: {reason}; skipped");
                        warn!("{msg}");
                        summary.errors.push(msg);
                        continue 'ids;
                    }
                };
                states.push(st);
            }
            let decision = decide(mode, agreed.get(id), &states[0], &states[1], now);
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
            plans.push((i, decision));
        }

        // Both sides are written concurrently; each is one batch.
        let collect = |side: Side| {
            let ws: Vec<Write> = writes[side_idx(side)]
                .iter()
                .map(|(_, w)| w.clone())
                .collect();
            async move { self.store(side).apply(collection, &ws).await }
        };
        let (l_out, c_out) = tokio::join!(collect(Side::Local), collect(Side::Cloud));
        let mut failed_plans = BTreeSet::new();
        let mut retry = Vec::new();
        let mut store_error = None;
        for (side, outcome) in [(Side::Local, l_out), (Side::Cloud, c_out)] {
            let entries = &writes[side_idx(side)];
            match outcome {
                Ok(outcomes) => {
                    for ((plan, w), out) in entries.iter().zip(outcomes) {
                        let id = &w.record.id;
                        match out {
                            ApplyOutcome::Applied => {
                                self.stats.applied.add(side, 1);
                                count_write(summary, side, w.record.op);
                            }
                            ApplyOutcome::Unchanged => {}
                            ApplyOutcome::Conflict => {
                                failed_plans.insert(*plan);
                                retry.push(id.clone());
                            }
                            ApplyOutcome::Rejected(reason) => {
                                failed_plans.insert(*plan);
                                self.stats.rejected.add(side, 1);
                                let msg = format!("{side} refused {collection}/{id}: {reason}");
                                warn!("{msg}");
                                summary.errors.push(msg);
                            }
                        }
                    }
                }
                Err(e) => {
                    failed_plans.extend(entries.iter().map(|(p, _)| *p));
                    store_error = Some(e.context(format!(
                        "applying to {side} ({})",
                        self.store(side).describe()
                    )));
                }
            }
        }

        let mut agreed_now: Vec<(String, Version)> = Vec::new();
        for (n, (i, d)) in plans.iter().enumerate() {
            let id = &ids[*i];
            if failed_plans.contains(&n) {
                continue;
            }
            if let Some(v) = &d.agree {
                agreed_now.push((id.clone(), v.clone()));
            }
            match d.reason {
                Reason::InSync => summary.in_sync += 1,
                Reason::Conflict { winner, tie_break } => {
                    self.stats.conflicts.add(winner, 1);
                    if tie_break {
                        Stats::bump(&self.stats.tie_breaks, 1);
                    }
                    summary.conflicts.push(ConflictNote {
                        collection: collection.to_string(),
                        id: id.clone(),
                        winner,
                        tie_break,
                    });
                }
                Reason::Stale(_) => Stats::bump(&self.stats.stale_reverted, 1),
                Reason::NotThisWay => summary.skipped_by_mode += 1,
                Reason::Changed(_) | Reason::Overwrite(_) => {}
            }
        }
        self.state.set_agreed(collection, &agreed_now).await?;
        if let Some(e) = store_error {
            return Err(e);
        }
        Ok(retry)
    }
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

fn side_idx(side: Side) -> usize {
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
fn record_for(
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
