//! The offline switch: pause and resume the bridge without stopping it.
//!
//! While paused, the listeners keep running and every change they capture is recorded, by key,
//! as a *held* entry of the durable [`queue`](super::queue) (with the time first seen and the
//! deletion times the listener learned) before the listener's position advances, the same rule
//! as for failures. Nothing is written to either store: listener batches are held instead of
//! reconciled, the sweeps, the scheduled passes and the retries wait, and an on-demand pass is
//! refused. `pause` returns once the reconcile round in flight (if any) has finished.
//!
//! Resume drains the held keys oldest first, a batch (`sync.batch_size`) at a time; each key
//! is reconciled from the current state on both sides, so the order of changes per key is kept
//! by construction, and across keys batches go in first-seen order. Until the backlog is empty
//! ("draining"), new listener changes join the end of the line instead of overtaking it, and the
//! sweeps wait; then normal operation continues.
//!
//! The paused flag is persisted in the state database: a paused bridge that restarts stays
//! paused. `[sync] paused` / `SYNCBRIDGE_PAUSED`, when set, win at start-up (and are persisted).

use super::Engine;
use super::policy::Mode;
use super::queue::HeldKey;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;
use tracing::info;

/// The switch's state, one per engine.
#[derive(Debug, Default)]
pub struct PauseSwitch {
    paused: AtomicBool,
    /// Resumed, and held keys may still wait: listener changes queue behind them.
    draining: AtomicBool,
    /// Wakes the drainer (the pipeline's sweeper) on resume and on new held keys.
    wake: Notify,
}

impl PauseSwitch {
    /// A switch starting in the given state.
    pub fn new(paused: bool, draining: bool) -> PauseSwitch {
        PauseSwitch {
            paused: AtomicBool::new(paused),
            draining: AtomicBool::new(draining),
            wake: Notify::new(),
        }
    }

    /// Waits until a resume or a new held key asks the drainer to look.
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// The error a sweep or pass stops with when the bridge is paused under it.
#[derive(Debug, Clone, Copy)]
pub struct Paused;

impl std::fmt::Display for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the bridge is paused: nothing is applied until it is resumed (`syncbridge resume`, POST /api/sync/resume, or a start with SYNCBRIDGE_PAUSED=false)",
        )
    }
}

impl std::error::Error for Paused {}

impl Engine {
    /// Whether the bridge is paused (changes are held, nothing is applied).
    pub fn is_paused(&self) -> bool {
        self.pause.paused.load(Ordering::SeqCst)
    }

    /// Whether the bridge was resumed and is still applying what it held.
    pub fn is_draining(&self) -> bool {
        self.pause.draining.load(Ordering::SeqCst)
    }

    /// Whether listener changes must be held instead of applied: paused, or resumed with
    /// older held changes still waiting (they go first).
    pub fn holding(&self) -> bool {
        self.is_paused() || self.is_draining()
    }

    /// Pauses the bridge. Returns whether it was running. The flag is persisted first, so an
    /// error leaves the bridge as it was; once this returns, the round in flight has finished
    /// and nothing more is applied.
    pub async fn pause(&self) -> Result<bool> {
        self.queue.set_paused_flag(true).await?;
        let was = self.pause.paused.swap(true, Ordering::SeqCst);
        // Wait for the round being applied, if any.
        drop(self.reconcile_lock.lock().await);
        if !was {
            info!("paused: changes are captured and held, nothing is applied until resume");
        }
        Ok(!was)
    }

    /// Resumes the bridge. Returns whether it was paused. The held keys are drained (oldest
    /// first) by the pipeline before anything else.
    pub async fn resume(&self) -> Result<bool> {
        self.queue.set_paused_flag(false).await?;
        self.note_queued();
        self.pause.draining.store(true, Ordering::SeqCst);
        let was = self.pause.paused.swap(false, Ordering::SeqCst);
        self.pause.wake.notify_one();
        if was {
            info!("resumed: applying the held changes, oldest first");
        }
        Ok(was)
    }

    /// Records keys a listener captured while holding, in arrival order.
    pub async fn hold(&self, keys: &[HeldKey]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.note_queued();
        self.queue.hold(keys).await?;
        if !self.is_paused() {
            self.pause.wake.notify_one();
        }
        Ok(())
    }

    /// Reconciles the next batch of held keys, in first-seen order. `None` when none are held
    /// (the drain is over: listener changes are applied directly again).
    pub(crate) async fn drain_held(&self, mode: Mode) -> Result<Option<usize>> {
        let batch = self.queue.held(self.config.sync.batch_size as i64).await?;
        if batch.is_empty() {
            if self.pause.draining.swap(false, Ordering::SeqCst) {
                info!("held changes applied; back to normal operation");
            }
            return Ok(None);
        }
        // Consecutive keys of one collection go together; across collections the first-seen
        // order is kept run by run.
        let mut i = 0;
        while i < batch.len() {
            if self.is_paused() {
                return Ok(Some(i));
            }
            let collection = &batch[i].0;
            let run = batch[i..]
                .iter()
                .take_while(|(c, _, _)| c == collection)
                .count();
            let mut hints = super::DeleteHints::new();
            let ids: Vec<String> = batch[i..i + run]
                .iter()
                .map(|(_, id, deleted)| {
                    for (side, at) in [super::Side::Local, super::Side::Cloud]
                        .into_iter()
                        .zip(deleted)
                    {
                        if let Some(at) = at {
                            hints.insert((side, id.clone()), *at);
                        }
                    }
                    id.clone()
                })
                .collect();
            self.reconcile(collection, &ids, mode, &hints).await;
            i += run;
        }
        Ok(Some(batch.len()))
    }
}
