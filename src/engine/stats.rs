//! Counters and per-store health, shared by the pipeline, the sweep and (later) the status API.
//!
//! Counters are plain atomics so the hot path never takes a lock to count.

use crate::record::{Side, now_ms};
use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A pair of counters, one per side.
#[derive(Debug, Default)]
pub struct PerSide {
    local: AtomicU64,
    cloud: AtomicU64,
}

impl PerSide {
    /// Adds `n` to `side`'s counter.
    pub fn add(&self, side: Side, n: u64) {
        match side {
            Side::Local => self.local.fetch_add(n, Ordering::Relaxed),
            Side::Cloud => self.cloud.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// `side`'s counter.
    pub fn get(&self, side: Side) -> u64 {
        match side {
            Side::Local => self.local.load(Ordering::Relaxed),
            Side::Cloud => self.cloud.load(Ordering::Relaxed),
        }
    }

    fn snapshot(&self) -> SidePair {
        SidePair {
            local: self.get(Side::Local),
            cloud: self.get(Side::Cloud),
        }
    }
}

/// Serializable form of [`PerSide`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct SidePair {
    /// The local store's count.
    pub local: u64,
    /// The cloud store's count.
    pub cloud: u64,
}

/// Health of one store's listener.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StoreHealth {
    /// The listener is connected and following changes.
    pub listening: bool,
    /// Since when (ms) the store has been unreachable, if it is.
    pub down_since_ms: Option<i64>,
    /// The last error seen, already redacted.
    pub last_error: Option<String>,
    /// When (ms) the newest change from this store was seen.
    pub last_event_ms: Option<i64>,
}

/// Everything the bridge counts since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Changes delivered by each side's listener.
    pub seen: PerSide,
    /// Writes that changed each side.
    pub applied: PerSide,
    /// Changes that turned out to be the bridge's own writes coming back.
    pub echoes_suppressed: AtomicU64,
    /// Records changed on both sides, by winner.
    pub conflicts: PerSide,
    /// Conflicts whose `updatedAt`s were equal and were decided by the hash.
    pub tie_breaks: AtomicU64,
    /// One-sided writes older than the agreed version, put back.
    pub stale_reverted: AtomicU64,
    /// Conditional writes refused because the target moved on; the record was re-read.
    pub retries: AtomicU64,
    /// Values that are not records (wrong type, not JSON), per side.
    pub invalid: PerSide,
    /// Records whose `updatedAt` lies too far in the future, per side.
    pub future_rejected: PerSide,
    /// Writes a store refused (too large, bad value), per target side.
    pub rejected: PerSide,
    /// Writes a store could not take yet (a child whose parent row has not arrived), per
    /// target side: queued and retried, never dead-lettered.
    pub deferred: PerSide,
    /// Store errors (connection lost, timeouts).
    pub errors: AtomicU64,
    health: Mutex<[StoreHealth; 2]>,
    /// Conflicts by `policy:outcome` (`lww:cloud`, `merge:merged`, `manual:parked`, ...).
    conflict_outcomes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Writes that changed a store, per collection (the per-collection status's `synced`).
    synced: Mutex<std::collections::BTreeMap<String, u64>>,
}

fn idx(side: Side) -> usize {
    match side {
        Side::Local => 0,
        Side::Cloud => 1,
    }
}

impl Stats {
    /// Increments a plain counter.
    pub fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks `side`'s listener as up.
    pub fn listener_up(&self, side: Side) {
        let mut h = self.health.lock().expect("health lock");
        h[idx(side)].listening = true;
        h[idx(side)].down_since_ms = None;
    }

    /// Marks `side`'s listener as down with `error` (already redacted).
    pub fn listener_down(&self, side: Side, error: String) {
        let mut h = self.health.lock().expect("health lock");
        let s = &mut h[idx(side)];
        s.listening = false;
        s.down_since_ms.get_or_insert_with(now_ms);
        s.last_error = Some(error);
    }

    /// Notes that a change arrived from `side` now.
    pub fn event_seen(&self, side: Side, n: u64) {
        self.seen.add(side, n);
        self.health.lock().expect("health lock")[idx(side)].last_event_ms = Some(now_ms());
    }

    /// Counts a conflict decided by `policy` with `outcome`.
    pub fn conflict_outcome(&self, policy: &str, outcome: &str) {
        *self
            .conflict_outcomes
            .lock()
            .expect("conflict outcome lock")
            .entry(format!("{policy}:{outcome}"))
            .or_default() += 1;
    }

    /// Counts `n` writes that changed a store for `collection` (one lock per reconcile, not per
    /// record).
    pub fn count_synced(&self, collection: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut synced = self.synced.lock().expect("synced lock");
        match synced.get_mut(collection) {
            Some(c) => *c += n,
            None => {
                synced.insert(collection.to_string(), n);
            }
        }
    }

    /// A serializable copy of everything.
    pub fn snapshot(&self) -> StatsSnapshot {
        let h = self.health.lock().expect("health lock").clone();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            seen: self.seen.snapshot(),
            applied: self.applied.snapshot(),
            echoes_suppressed: load(&self.echoes_suppressed),
            conflicts: self.conflicts.snapshot(),
            tie_breaks: load(&self.tie_breaks),
            stale_reverted: load(&self.stale_reverted),
            retries: load(&self.retries),
            invalid: self.invalid.snapshot(),
            future_rejected: self.future_rejected.snapshot(),
            rejected: self.rejected.snapshot(),
            deferred: self.deferred.snapshot(),
            errors: load(&self.errors),
            conflict_outcomes: self
                .conflict_outcomes
                .lock()
                .expect("conflict outcome lock")
                .clone(),
            synced: self.synced.lock().expect("synced lock").clone(),
            local: h[0].clone(),
            cloud: h[1].clone(),
        }
    }
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub seen: SidePair,
    pub applied: SidePair,
    pub echoes_suppressed: u64,
    pub conflicts: SidePair,
    pub tie_breaks: u64,
    pub stale_reverted: u64,
    pub retries: u64,
    pub invalid: SidePair,
    pub future_rejected: SidePair,
    pub rejected: SidePair,
    pub deferred: SidePair,
    pub errors: u64,
    pub conflict_outcomes: std::collections::BTreeMap<String, u64>,
    pub synced: std::collections::BTreeMap<String, u64>,
    pub local: StoreHealth,
    pub cloud: StoreHealth,
}
