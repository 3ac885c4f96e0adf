//! The reconciliation sweep: finds what the listeners missed and repairs it.
//!
//! An *incremental* sweep asks each store for records changed since the last clean sweep
//! started (minus a safety margin), so its cost follows what changed, not the table. A *full*
//! sweep scans everything and also walks the ids agreed as live: a record agreed live and now
//! missing on one side was deleted while nobody listened. Stores with a durable change log
//! (SQL triggers) never need the full walk for deletes; stores without one (Redis) get it at
//! start-up and at their own, longer interval. Every difference found goes through the same
//! [`Engine::reconcile`] as listener events. Scans go page by page; nothing holds the whole
//! store in memory.
//!
//! A paused bridge (see [`super::pause`]) does not sweep: a sweep stops with
//! [`Paused`](super::pause::Paused) at its next page when the bridge is paused under it, and the
//! pipeline runs the sweeps that fell due once the held changes are applied. (Recording what a
//! sweep finds as held instead would hold every record a full sweep scans; the listeners
//! already hold what changes while paused, and the first sweep after the resume finds anything
//! they missed.)

use super::policy::Mode;
use super::{Engine, Summary};
use crate::record::{Side, now_ms};
use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;
use tracing::{info, warn};

/// What one sweep did.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Incremental or full.
    pub full: bool,
    /// The mode it ran in.
    pub mode: Mode,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
    /// How long it took.
    pub duration_ms: u64,
    /// What it changed.
    pub summary: Summary,
}

impl Engine {
    /// Runs one sweep over every collection. `full` scans everything (and is what on-demand
    /// `sync` runs); otherwise only what changed since the last clean sweep.
    pub async fn sweep(
        &self,
        mode: Mode,
        full: bool,
        progress: Option<&ProgressBar>,
    ) -> Result<SweepReport> {
        let started_ms = now_ms();
        let clock = Instant::now();
        let mut summary = Summary::default();
        let batch = self.config.sync.batch_size;
        let margin = self.config.sync.sweep_margin_secs as i64 * 1000;
        let no_hints = HashMap::new();
        let paused = || {
            if self.is_paused() {
                Err(anyhow::Error::new(super::pause::Paused))
            } else {
                Ok(())
            }
        };
        paused()?;
        for collection in &self.config.sync.collections {
            let marks = self.state.sweep_marks(collection).await?;
            let since = if full {
                None
            } else {
                marks.last_started_ms.map(|t| t - margin)
            };
            let mut part = Summary::default();
            for side in [Side::Local, Side::Cloud] {
                let store = self.store(side);
                let mut cursor = None;
                loop {
                    paused()?;
                    let page = store.scan(collection, since, cursor, batch).await?;
                    // Invalid values go through reconcile too: it counts them and queues them
                    // (dead-lettered after their attempts), as it would a listener's.
                    let ids: Vec<String> = page
                        .records
                        .iter()
                        .map(|r| r.id.clone())
                        .chain(page.invalid.iter().map(|(id, _)| id.clone()))
                        .collect();
                    if !ids.is_empty() {
                        part.absorb(self.reconcile(collection, &ids, mode, &no_hints).await);
                    }
                    if let Some(p) = progress {
                        p.inc(ids.len() as u64);
                    }
                    match page.next {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
            }
            if since.is_none() {
                // Records agreed as live that a side no longer has: deleted while unobserved.
                let mut after = String::new();
                loop {
                    paused()?;
                    let ids = self
                        .state
                        .live_ids(collection, &after, batch as i64)
                        .await?;
                    let Some(last) = ids.last() else { break };
                    after = last.clone();
                    part.absorb(self.reconcile(collection, &ids, mode, &no_hints).await);
                }
            }
            if part.unfinished == 0 {
                self.state
                    .set_swept(collection, started_ms, since.is_none())
                    .await?;
            }
            summary.absorb(part);
        }
        if full {
            let keep_ms = self.config.sync.tombstone_retention_days as i64 * 86_400_000;
            let pruned = self.state.prune_tombstones(started_ms - keep_ms).await?;
            if pruned > 0 {
                info!(pruned, "forgot tombstones past their retention");
            }
        }
        let report = SweepReport {
            full,
            mode,
            started_ms,
            duration_ms: clock.elapsed().as_millis() as u64,
            summary,
        };
        if report.summary.writes() > 0 || !report.summary.errors.is_empty() {
            info!(
                full,
                %mode,
                duration_ms = report.duration_ms,
                to_local = report.summary.copied_to_local,
                to_cloud = report.summary.copied_to_cloud,
                deleted_local = report.summary.deleted_local,
                deleted_cloud = report.summary.deleted_cloud,
                conflicts = report.summary.conflicts.len(),
                errors = report.summary.errors.len(),
                "sweep repaired differences"
            );
        }
        if report.summary.unfinished > 0 {
            warn!(
                unfinished = report.summary.unfinished,
                "sweep left records unsynced; it will run again"
            );
        }
        *self.last_sweep.lock().expect("last sweep lock") = Some(report.clone());
        Ok(report)
    }
}
