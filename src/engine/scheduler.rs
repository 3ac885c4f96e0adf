//! On-demand and scheduled reconciliation passes.
//!
//! A *pass* is one full sweep ([`Engine::sweep`] with `full = true`) that a person asked for
//! (`POST /api/sync`) or the cron schedule (`[sync] schedule`) started. [`Passes`] lets only one
//! run at a time, whoever started it, and gives each an id, so a second request can be told
//! which pass is running instead of starting another. The pipeline's own periodic sweeps are
//! separate and safe to overlap: every reconcile round holds the engine's reconcile lock.
//! While the bridge is paused, scheduled passes are skipped and on-demand ones refused.

use super::Engine;
use super::policy::Mode;
use super::sweep::SweepReport;
use crate::record::{format_ts, now_ms};
use anyhow::{Result, anyhow};
use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Who started a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// An API request.
    Api,
    /// The cron schedule.
    Schedule,
}

/// A pass that is running or has run.
#[derive(Debug, Clone, Serialize)]
pub struct PassInfo {
    /// Unique id (UUID v4), so a client told "409, pass X is running" can recognize it.
    pub id: String,
    /// The mode it runs in.
    pub mode: Mode,
    /// Who started it.
    pub trigger: Trigger,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
}

/// How the last pass ended.
#[derive(Debug, Clone, Serialize)]
pub struct PassOutcome {
    /// The pass.
    pub pass: PassInfo,
    /// Its report, when the sweep ran to the end.
    pub report: Option<SweepReport>,
    /// Why it stopped, when it did not.
    pub error: Option<String>,
}

/// The one-pass-at-a-time guard, shared by the API and the scheduler.
#[derive(Debug, Default)]
pub struct Passes {
    running: Mutex<Option<PassInfo>>,
    last: Mutex<Option<PassOutcome>>,
}

/// Held while a pass runs; dropping it (even on a panic or cancellation) frees the slot.
#[derive(Debug)]
pub struct PassGuard {
    passes: Arc<Passes>,
    /// The pass this guard belongs to.
    pub info: PassInfo,
}

impl Drop for PassGuard {
    fn drop(&mut self) {
        let mut running = self.passes.running.lock().expect("passes lock");
        if running.as_ref().is_some_and(|p| p.id == self.info.id) {
            *running = None;
        }
    }
}

impl Passes {
    /// Claims the slot for a new pass, or returns the pass already running.
    pub fn try_begin(
        self: &Arc<Self>,
        mode: Mode,
        trigger: Trigger,
    ) -> Result<PassGuard, PassInfo> {
        let mut running = self.running.lock().expect("passes lock");
        if let Some(p) = running.as_ref() {
            return Err(p.clone());
        }
        let info = PassInfo {
            id: uuid::Uuid::new_v4().to_string(),
            mode,
            trigger,
            started_ms: now_ms(),
        };
        *running = Some(info.clone());
        Ok(PassGuard {
            passes: self.clone(),
            info,
        })
    }

    /// The pass running now, if any.
    pub fn running(&self) -> Option<PassInfo> {
        self.running.lock().expect("passes lock").clone()
    }

    /// How the last finished pass ended.
    pub fn last(&self) -> Option<PassOutcome> {
        self.last.lock().expect("passes lock").clone()
    }

    /// Runs the pass `guard` claimed to the end and records its outcome. The guard is released
    /// when this returns.
    pub async fn run(&self, engine: &Engine, guard: PassGuard) -> PassOutcome {
        let result = engine.sweep(guard.info.mode, true, None).await;
        let outcome = match result {
            Ok(report) => PassOutcome {
                pass: guard.info.clone(),
                report: Some(report),
                error: None,
            },
            Err(e) => PassOutcome {
                pass: guard.info.clone(),
                report: None,
                error: Some(format!("{e:#}")),
            },
        };
        *self.last.lock().expect("passes lock") = Some(outcome.clone());
        drop(guard);
        outcome
    }
}

/// Parses a cron expression: 5 fields (minute first) or 6 (seconds first); the error says why
/// an expression is refused.
pub fn parse(expr: &str) -> Result<Cron> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| anyhow!("sync.schedule {expr:?} is not a valid cron expression: {e}"))
}

/// The cron schedule of full passes, and when it fires next (for status).
#[derive(Debug)]
pub struct Schedule {
    cron: Cron,
    /// The expression as configured.
    pub expr: String,
    next: Mutex<Option<DateTime<Utc>>>,
}

impl Schedule {
    /// Builds the schedule from its expression.
    pub fn new(expr: &str) -> Result<Schedule> {
        let cron = parse(expr)?;
        let next = cron.find_next_occurrence(&Utc::now(), false).ok();
        Ok(Schedule {
            cron,
            expr: expr.to_string(),
            next: Mutex::new(next),
        })
    }

    /// When the next scheduled pass starts, RFC 3339.
    pub fn next_run(&self) -> Option<String> {
        self.next
            .lock()
            .expect("schedule lock")
            .map(|t| format_ts(t.timestamp_millis()))
    }

    /// Runs a full pass in the configured mode at every occurrence until `shutdown`. An
    /// occurrence that finds a pass already running is skipped (and logged), not queued.
    pub async fn run(
        self: Arc<Self>,
        engine: Arc<Engine>,
        passes: Arc<Passes>,
        shutdown: CancellationToken,
    ) {
        info!(schedule = %self.expr, next = ?self.next_run(), "scheduled passes enabled");
        loop {
            let next = match self.cron.find_next_occurrence(&Utc::now(), false) {
                Ok(t) => t,
                Err(e) => {
                    warn!(schedule = %self.expr, error = %e, "the schedule has no next occurrence; no more scheduled passes");
                    *self.next.lock().expect("schedule lock") = None;
                    return;
                }
            };
            *self.next.lock().expect("schedule lock") = Some(next);
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if engine.is_paused() {
                info!("the bridge is paused; skipping this scheduled pass");
                continue;
            }
            match passes.try_begin(engine.config.sync.mode, Trigger::Schedule) {
                Ok(guard) => {
                    let id = guard.info.id.clone();
                    let outcome = passes.run(&engine, guard).await;
                    match (&outcome.report, &outcome.error) {
                        (Some(r), _) => {
                            info!(pass = %id, duration_ms = r.duration_ms, writes = r.summary.writes(), "scheduled pass done")
                        }
                        (None, Some(e)) => warn!(pass = %id, error = %e, "scheduled pass failed"),
                        _ => {}
                    }
                }
                Err(running) => {
                    info!(running = %running.id, "a pass is already running; skipping this scheduled one")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_field_expressions_parse_and_bad_ones_say_why() {
        parse("*/5 * * * *").unwrap();
        parse("*/10 * * * * *").unwrap();
        let err = parse("61 * * * *").unwrap_err().to_string();
        assert!(err.contains("not a valid cron expression"), "{err}");
        assert!(parse("every day").is_err());
        let s = Schedule::new("0 0 * * *").unwrap();
        let next = s.next_run().unwrap();
        assert!(next.ends_with("T00:00:00.000Z"), "{next}");
    }

    #[test]
    fn only_one_pass_runs_at_a_time() {
        let passes = Arc::new(Passes::default());
        let first = passes.try_begin(Mode::Both, Trigger::Api).unwrap();
        let busy = passes.try_begin(Mode::Both, Trigger::Schedule).unwrap_err();
        assert_eq!(busy.id, first.info.id);
        assert_eq!(passes.running().unwrap().id, first.info.id);
        drop(first);
        assert!(passes.running().is_none());
        let second = passes
            .try_begin(Mode::LocalToCloud, Trigger::Schedule)
            .unwrap();
        assert_ne!(second.info.id, busy.id);
    }
}
