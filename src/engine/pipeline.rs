//! The always-on pipeline: two supervised listeners feed one bounded channel; each batch is
//! reconciled, then settled with its listener (the checkpoint advances only after the apply);
//! a sweeper runs the start-up sweep, the periodic sweeps and the retries.
//!
//! Shutdown is explicit: cancelling the token stops the listeners and the sweeper; the batch
//! being applied is finished first. Batches still queued are not settled, so SQL change-log
//! rows stay in the log for the next start; Redis changes are found by the start-up sweep.

use super::echo::is_own_write;
use super::{DeleteHints, Engine};
use crate::config::Config;
use crate::record::{Op, Side, Version};
use crate::stores::{Ack, ChangeBatch, ListenContext, PositionLost, is_fatal};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Batches in flight between listeners and the engine: a slow target slows the listeners
/// instead of growing memory.
const CHANNEL_BATCHES: usize = 16;
/// At most this many records are taken from the channel into one reconcile round.
const MAX_RECORDS_PER_ROUND: usize = 4000;
/// Listener restart backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the retry queue is checked, and how soon a failed sweep runs again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Asks the sweeper for a sweep out of schedule.
#[derive(Debug, Clone, Copy)]
pub enum SweepRequest {
    /// A full sweep (a listener without a durable change log reconnected).
    Full,
}

/// Opens both stores and prepares them, waiting (with backoff) for a store that is not up yet:
/// a bridge started before its database must not exit. Errors no wait can fix ([`is_fatal`]:
/// a refused server setting, an unsupported URI) are returned at once. `None` on shutdown.
pub async fn open_when_ready(
    config: Config,
    shutdown: &CancellationToken,
) -> Result<Option<Engine>> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let engine = Engine::open(config.clone()).await?;
            engine.prepare().await?;
            anyhow::Ok(engine)
        };
        match attempt.await {
            Ok(engine) => return Ok(Some(engine)),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                warn!(error = %format!("{e:#}"), retry_in = ?backoff, "stores not ready; waiting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Runs a prepared bridge (see [`open_when_ready`]) until `shutdown` is cancelled.
pub async fn run(engine: Arc<Engine>, shutdown: CancellationToken) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<ChangeBatch>(CHANNEL_BATCHES);
    let (sweep_tx, sweep_rx) = mpsc::channel::<SweepRequest>(4);
    let mut tasks = JoinSet::new();
    for side in [Side::Local, Side::Cloud] {
        tasks.spawn(supervise_listener(
            engine.clone(),
            side,
            tx.clone(),
            sweep_tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    tasks.spawn(sweeper(engine.clone(), sweep_rx, shutdown.clone()));
    info!(
        local = %engine.store(Side::Local).describe(),
        cloud = %engine.store(Side::Cloud).describe(),
        mode = %engine.config.sync.mode,
        collections = ?engine.config.sync.collections,
        "syncbridge running"
    );
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = rx.recv() => b,
        };
        let Some(batch) = batch else { break };
        // Everything else already waiting goes into the same reconcile.
        let mut batches = vec![batch];
        let mut records = batches[0].records.len();
        while records < MAX_RECORDS_PER_ROUND {
            match rx.try_recv() {
                Ok(more) => {
                    records += more.records.len();
                    batches.push(more);
                }
                Err(_) => break,
            }
        }
        process_batches(&engine, batches).await;
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    let counters = serde_json::to_string(&engine.stats.snapshot()).unwrap_or_default();
    info!(%counters, "syncbridge stopped");
    Ok(())
}

/// Records a listener batch touched, announced on [`Engine::changes`] once the batch is
/// reconciled, so followers (the replication feed) learn of changes from the listeners
/// instead of polling the stores.
#[derive(Debug, Clone)]
pub struct Changed {
    /// The collection.
    pub collection: String,
    /// The ids the batch carried (own writes and echoes included).
    pub ids: Vec<String>,
}

/// Reconciles listener batches together (from either side), then settles each of them.
///
/// Taking every batch that is waiting, not one at a time, is what keeps latency low under a
/// steady stream: a reconcile costs a few round trips whatever its size, so a backlog is
/// cleared in one pass instead of growing.
pub async fn process_batches(engine: &Engine, batches: Vec<ChangeBatch>) {
    let clock = std::time::Instant::now();
    let batch_count = batches.len();
    let record_count: usize = batches.iter().map(|b| b.records.len()).sum();
    // What the batches touched, for followers of Engine::changes (only if one listens).
    let mut touched: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let announce = engine.changes.receiver_count() > 0;
    // Keyed so iteration is the apply order: upserts parents first, then deletes children
    // first (see `order`); the op is the listener's, and only orders (reconcile re-reads).
    let mut by_collection: BTreeMap<(bool, isize, String), (Vec<String>, DeleteHints)> =
        BTreeMap::new();
    let mut own = 0;
    // The versions each record was read at, to recognize echoes without reading the stores;
    // `None` where a record was read without a document (not a valid record).
    let mut records_seen: HashMap<(String, String), Vec<Option<Version>>> = HashMap::new();
    let mut acks = Vec::with_capacity(batches.len());
    // Paused (or draining what was held): the keys are held in arrival order, not applied.
    let holding = engine.holding();
    let mut arrival: Vec<(String, String)> = Vec::new();
    let delete_times =
        [Side::Local, Side::Cloud].map(|side| engine.store(side).capabilities().delete_times);
    for batch in batches {
        let side = batch.side;
        engine.stats.event_seen(side, batch.records.len() as u64);
        for r in batch.records {
            if announce {
                touched
                    .entry(r.collection.clone())
                    .or_default()
                    .push(r.id.clone());
            }
            if is_own_write(&r, &engine.instance_id) {
                own += 1;
                continue;
            }
            let version = (r.doc.is_some() || r.op == Op::Delete).then(|| r.version());
            records_seen
                .entry((r.collection.clone(), r.id.clone()))
                .or_default()
                .push(version);
            if holding {
                arrival.push((r.collection.clone(), r.id.clone()));
            }
            let rank = engine.rank(&r.collection) as isize;
            let key = match r.op {
                Op::Delete => (true, -rank, r.collection),
                Op::Upsert => (false, rank, r.collection),
            };
            let entry = by_collection.entry(key).or_default();
            if r.op == Op::Delete && delete_times[super::side_idx(side)] {
                entry.1.insert((side, r.id.clone()), r.updated_at_ms);
            }
            entry.0.push(r.id);
        }
        acks.push((side, batch.ack));
    }
    let mut applied = true;
    let mut echoes = own;
    if holding {
        let (held, echoed) = hold_in_order(engine, arrival, &by_collection, &records_seen).await;
        applied = held;
        echoes += echoed;
        by_collection.clear();
    }
    // Keys left unapplied because the bridge was paused while this batch was being applied.
    let mut late: Vec<super::queue::HeldKey> = Vec::new();
    for ((_, _, collection), (mut ids, deleted_at)) in by_collection {
        ids.sort();
        ids.dedup();
        // A change that reads back exactly as the agreed version is our own write coming back
        // (or a write of the same content): nothing can have changed on this side since both
        // agreed, so it needs no reconcile. A change on the other side has its own event.
        match engine.echoes(&collection, &ids, &records_seen).await {
            Ok(echo_ids) if !echo_ids.is_empty() => {
                echoes += echo_ids.len() as u64;
                ids.retain(|id| !echo_ids.contains(id));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "could not read agreed versions; reconciling everything")
            }
        }
        // Records waiting in the retry queue keep their place: the new change joins the queue
        // entry (made due now) instead of being applied around it.
        match engine.queued(&collection, &ids).await {
            Ok(queued) if !queued.is_empty() => {
                if let Err(e) = engine.queue.touch(&collection, &queued).await {
                    warn!(error = %format!("{e:#}"), "could not update the retry queue");
                    applied = false;
                }
                ids.retain(|id| !queued.contains(id));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "could not read the retry queue; the batch will be replayed");
                applied = false;
                continue;
            }
        }
        for chunk in ids.chunks(engine.config.sync.batch_size) {
            if engine.is_paused() {
                late.extend(
                    chunk
                        .iter()
                        .map(|id| (collection.clone(), id.clone(), hints(&deleted_at, id))),
                );
                continue;
            }
            let summary = engine
                .reconcile(&collection, chunk, engine.config.sync.mode, &deleted_at)
                .await;
            // A change that finds both sides already agreeing is our own write coming back.
            echoes += summary.in_sync;
            applied &= summary.unfinished == 0;
        }
    }
    let reconciled_ms = clock.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = engine.hold(&late).await {
        warn!(error = %format!("{e:#}"), "could not record the held changes; the batch will be replayed");
        applied = false;
    }
    super::stats::Stats::bump(&engine.stats.echoes_suppressed, echoes);
    for (collection, ids) in touched {
        let _ = engine.changes.send(Changed { collection, ids });
    }
    for (side, ack) in merge_acks(acks) {
        match engine.store(side).settle(ack, applied).await {
            Ok(Some(position)) => {
                if let Err(e) = engine.state.set_checkpoint(side, &position).await {
                    error!(%side, error = %e, "could not persist the listener checkpoint; changes will be replayed");
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(%side, error = %format!("{e:#}"), "could not settle a batch; it will be replayed")
            }
        }
    }
    tracing::debug!(
        batches = batch_count,
        records = record_count,
        echoes,
        reconciled_ms,
        total_ms = clock.elapsed().as_secs_f64() * 1000.0,
        "listener batches processed"
    );
}

/// One settle per side for all the batches a pass took: change-log rows are removed with one
/// statement instead of one per batch (a PostgreSQL listener woken by every NOTIFY delivers
/// many small batches), and of a side's positions only the last needs persisting, since
/// everything before it is applied too.
fn merge_acks(acks: Vec<(Side, Ack)>) -> Vec<(Side, Ack)> {
    let mut merged: Vec<(Side, Ack)> = Vec::new();
    for (side, ack) in acks {
        let slot = merged.iter_mut().find(|(s, _)| *s == side);
        match (slot, ack) {
            (_, Ack::None) => {}
            (None, ack) => merged.push((side, ack)),
            (Some((_, Ack::Seqs(all))), Ack::Seqs(more)) => all.extend(more),
            (Some((_, last)), ack) => *last = ack,
        }
    }
    merged
}

/// The deletion times a listener learned for `id`, per side.
fn hints(deleted_at: &DeleteHints, id: &str) -> [Option<i64>; 2] {
    [Side::Local, Side::Cloud].map(|side| deleted_at.get(&(side, id.to_string())).copied())
}

/// Holds a batch's keys (paused, or draining): echoes of the bridge's own writes are dropped as
/// usual, the rest is recorded in the order it arrived, each key once, with the deletion times
/// the listeners learned. Returns whether the keys are durable (the batch may be settled) and
/// how many echoes were dropped.
async fn hold_in_order(
    engine: &Engine,
    arrival: Vec<(String, String)>,
    by_collection: &BTreeMap<(bool, isize, String), (Vec<String>, DeleteHints)>,
    records_seen: &HashMap<(String, String), Vec<Option<Version>>>,
) -> (bool, u64) {
    let mut skip: std::collections::HashSet<(String, String)> = Default::default();
    let mut all_hints: HashMap<&str, DeleteHints> = HashMap::new();
    for ((_, _, collection), (ids, deleted_at)) in by_collection {
        all_hints
            .entry(collection.as_str())
            .or_default()
            .extend(deleted_at.iter().map(|(k, v)| (k.clone(), *v)));
        let mut ids = ids.clone();
        ids.sort();
        ids.dedup();
        match engine.echoes(collection, &ids, records_seen).await {
            Ok(echo_ids) => skip.extend(echo_ids.into_iter().map(|id| (collection.clone(), id))),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "could not read agreed versions; holding everything")
            }
        }
    }
    let echoes = skip.len() as u64;
    let keys: Vec<super::queue::HeldKey> = arrival
        .into_iter()
        .filter_map(|key| {
            if !skip.insert(key.clone()) {
                return None; // an echo, or a key already taken from this batch
            }
            let deleted = hints(&all_hints[key.0.as_str()], &key.1);
            Some((key.0, key.1, deleted))
        })
        .collect();
    match engine.hold(&keys).await {
        Ok(()) => (true, echoes),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "could not record the held changes; the batch will be replayed");
            (false, echoes)
        }
    }
}

/// Keeps one side's listener running, restarting it with backoff when its store goes away.
async fn supervise_listener(
    engine: Arc<Engine>,
    side: Side,
    sink: mpsc::Sender<ChangeBatch>,
    sweeps: mpsc::Sender<SweepRequest>,
    shutdown: CancellationToken,
) {
    let store = engine.store(side).clone();
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 0u64;
    // Set when the listener reported its position lost: start from the present, sweep in full.
    let mut position_lost = false;
    loop {
        let missed_changes = attempt > 0;
        attempt += 1;
        let checkpoint = if position_lost {
            None
        } else {
            engine.state.checkpoint(side).await.ok().flatten()
        };
        let ctx = ListenContext {
            side,
            collections: engine.config.sync.collections.clone(),
            checkpoint,
            sink: sink.clone(),
            shutdown: shutdown.clone(),
        };
        if missed_changes {
            // The store may be back: whatever waits in the retry queue can try again now.
            if let Err(e) = engine.queue.kick().await {
                warn!(error = %format!("{e:#}"), "could not reschedule the retry queue");
            }
        }
        if position_lost || (missed_changes && !store.capabilities().durable_changes) {
            // Notifications sent while we were away are gone: a full sweep finds their effects.
            let _ = sweeps.try_send(SweepRequest::Full);
        }
        position_lost = false;
        engine.stats.listener_up(side);
        let started = Instant::now();
        match store.listen(ctx).await {
            Ok(()) => return,
            Err(e) if e.chain().any(|c| c.is::<PositionLost>()) => {
                let msg = format!("{e:#}");
                warn!(%side, store = %store.describe(), error = %msg, "listener position lost; reopening from now and running a full sweep");
                engine.stats.listener_down(side, msg);
                super::stats::Stats::bump(&engine.stats.errors, 1);
                position_lost = true;
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                warn!(%side, store = %store.describe(), error = %msg, retry_in = ?backoff, "listener stopped; reconnecting");
                engine.stats.listener_down(side, msg);
                super::stats::Stats::bump(&engine.stats.errors, 1);
            }
        }
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Runs the start-up sweep, then incremental sweeps, full sweeps where a store needs them,
/// and retries of records that failed.
async fn sweeper(
    engine: Arc<Engine>,
    mut requests: mpsc::Receiver<SweepRequest>,
    shutdown: CancellationToken,
) {
    let cfg = &engine.config.sync;
    let needs_full = [Side::Local, Side::Cloud]
        .iter()
        .any(|s| !engine.store(*s).capabilities().durable_changes);
    let every = Duration::from_secs(cfg.sweep_interval_secs);
    let full_every = Duration::from_secs(cfg.full_sweep_interval_secs);
    let now = tokio::time::Instant::now();
    let mut next_incremental = now;
    let mut next_full = if needs_full {
        now
    } else {
        now + Duration::from_secs(365 * 86_400)
    };
    loop {
        let soon = tokio::time::Instant::now() + RETRY_EVERY;
        // While changes are held, due sweeps wait (a resume or a held key wakes this early).
        let wake = if engine.holding() {
            soon
        } else {
            next_incremental.min(next_full).min(soon)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            req = requests.recv() => match req {
                Some(SweepRequest::Full) => next_full = tokio::time::Instant::now(),
                None => return,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = engine.pause.woken() => {}
        }
        // Paused: nothing is applied, not even retries; due sweeps run after the resume.
        if engine.is_paused() {
            continue;
        }
        // Drain what is due in the retry queue, a batch at a time, yielding to shutdown; after
        // a resume, the held keys first, until none are left.
        loop {
            match engine.drain_queue(cfg.mode).await {
                Ok(n)
                    if (n >= cfg.batch_size || (n > 0 && engine.is_draining()))
                        && !shutdown.is_cancelled() =>
                {
                    continue;
                }
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "could not read the retry queue");
                    break;
                }
            }
        }
        // Sweeps wait until the held backlog is applied, so they cannot overtake it.
        if engine.holding() {
            continue;
        }
        let now = tokio::time::Instant::now();
        let full = now >= next_full;
        if !full && now < next_incremental {
            continue;
        }
        match engine.sweep(cfg.mode, full, None).await {
            Ok(report) if report.summary.unfinished == 0 => {
                next_incremental = now + every;
                if full {
                    next_full = if needs_full {
                        now + full_every
                    } else {
                        now + Duration::from_secs(365 * 86_400)
                    };
                }
            }
            Ok(_) => next_incremental = now + RETRY_EVERY,
            // Paused under the sweep: it runs again after the resume.
            Err(e) if e.is::<super::pause::Paused>() => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), full, "sweep failed; trying again shortly");
                super::stats::Stats::bump(&engine.stats.errors, 1);
                next_incremental = now + RETRY_EVERY;
                if full {
                    next_full = now + RETRY_EVERY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_merged_into_one_settle_per_side() {
        let merged = merge_acks(vec![
            (Side::Cloud, Ack::Seqs(vec![1, 2])),
            (Side::Local, Ack::None),
            (Side::Local, Ack::Token("a".into())),
            (Side::Cloud, Ack::Seqs(vec![3])),
            (Side::Local, Ack::Token("b".into())),
        ]);
        assert_eq!(merged.len(), 2);
        assert!(matches!(&merged[0], (Side::Cloud, Ack::Seqs(s)) if s == &[1, 2, 3]));
        assert!(matches!(&merged[1], (Side::Local, Ack::Token(t)) if t == "b"));
    }
}
