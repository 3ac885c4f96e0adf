//! Sync control and operations: on-demand passes, pause and resume, status, Prometheus
//! metrics, health.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::records::{ApiJson, ApiPath};
use crate::engine::policy::Mode;
use crate::engine::scheduler::{PassInfo, PassOutcome, Trigger};
use crate::engine::stats::StoreHealth;
use crate::record::{Side, format_ts, now_ms};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use utoipa::ToSchema;

/// How long a health or status probe waits for a store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Which way a pass moves changes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Both ways, last writer wins.
    #[serde(alias = "both-ways")]
    Both,
    /// Only local changes, to cloud.
    LocalToCloud,
    /// Only cloud changes, to local.
    CloudToLocal,
    /// Make local an exact copy of cloud.
    OverwriteLocal,
    /// Make cloud an exact copy of local.
    OverwriteCloud,
}

impl From<SyncMode> for Mode {
    fn from(m: SyncMode) -> Mode {
        match m {
            SyncMode::Both => Mode::Both,
            SyncMode::LocalToCloud => Mode::LocalToCloud,
            SyncMode::CloudToLocal => Mode::CloudToLocal,
            SyncMode::OverwriteLocal => Mode::OverwriteLocal,
            SyncMode::OverwriteCloud => Mode::OverwriteCloud,
        }
    }
}

/// The modes `GET /api/sync/{mode}` takes, for the OpenAPI document.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "kebab-case")]
pub enum SyncModeName {
    /// Both ways.
    Both,
    /// Same as `both`.
    BothWays,
    /// Local changes to cloud.
    LocalToCloud,
    /// Cloud changes to local.
    CloudToLocal,
    /// Local becomes a copy of cloud.
    OverwriteLocal,
    /// Cloud becomes a copy of local.
    OverwriteCloud,
}

/// Body of `POST /api/sync`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SyncRequest {
    /// The mode of the pass (`both-ways` is accepted for `both`).
    pub mode: SyncMode,
}

/// A pass, running or done.
#[derive(Debug, Serialize, ToSchema)]
pub struct PassView {
    /// Its id.
    pub id: String,
    /// Its mode.
    pub mode: String,
    /// `api` or `schedule`.
    pub trigger: String,
    /// When it started (RFC 3339).
    pub started_at: String,
}

impl From<&PassInfo> for PassView {
    fn from(p: &PassInfo) -> PassView {
        PassView {
            id: p.id.clone(),
            mode: p.mode.to_string(),
            trigger: match p.trigger {
                Trigger::Api => "api".into(),
                Trigger::Schedule => "schedule".into(),
            },
            started_at: format_ts(p.started_ms),
        }
    }
}

/// A conflict and its winner.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictView {
    /// Collection.
    pub collection: String,
    /// Record id.
    pub id: String,
    /// `local` or `cloud`.
    pub winner: String,
    /// Decided by the hash because both `updatedAt`s were equal.
    pub tie_break: bool,
}

/// What a pass (or sweep) did.
#[derive(Debug, Serialize, ToSchema)]
pub struct PassSummary {
    /// Full scan or only what changed since the last sweep.
    pub full: bool,
    /// Mode.
    pub mode: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Records looked at.
    pub examined: u64,
    /// Records already equal on both sides.
    pub in_sync: u64,
    /// Records copied to the local store.
    pub copied_to_local: u64,
    /// Records copied to the cloud store.
    pub copied_to_cloud: u64,
    /// Records deleted on the local store.
    pub deleted_local: u64,
    /// Records deleted on the cloud store.
    pub deleted_cloud: u64,
    /// Records left alone because the mode forbids the write.
    pub skipped_by_mode: u64,
    /// Conflicts, with their winners.
    pub conflicts: Vec<ConflictView>,
    /// Records that could not be synced, with the reason.
    pub errors: Vec<String>,
}

impl From<&crate::engine::sweep::SweepReport> for PassSummary {
    fn from(r: &crate::engine::sweep::SweepReport) -> PassSummary {
        let s = &r.summary;
        PassSummary {
            full: r.full,
            mode: r.mode.to_string(),
            started_at: format_ts(r.started_ms),
            duration_ms: r.duration_ms,
            examined: s.examined,
            in_sync: s.in_sync,
            copied_to_local: s.copied_to_local,
            copied_to_cloud: s.copied_to_cloud,
            deleted_local: s.deleted_local,
            deleted_cloud: s.deleted_cloud,
            skipped_by_mode: s.skipped_by_mode,
            conflicts: s
                .conflicts
                .iter()
                .map(|c| ConflictView {
                    collection: c.collection.clone(),
                    id: c.id.clone(),
                    winner: c.winner.to_string(),
                    tie_break: c.tie_break,
                })
                .collect(),
            errors: s.errors.clone(),
        }
    }
}

/// The reply to a sync request.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncResult {
    /// The pass.
    pub pass: PassView,
    /// What it did.
    pub summary: PassSummary,
}

/// How a pass ended, for status.
#[derive(Debug, Serialize, ToSchema)]
pub struct PassResultView {
    /// The pass.
    pub pass: PassView,
    /// What it did, when it ran to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<PassSummary>,
    /// Why it stopped, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&PassOutcome> for PassResultView {
    fn from(o: &PassOutcome) -> PassResultView {
        PassResultView {
            pass: (&o.pass).into(),
            summary: o.report.as_ref().map(Into::into),
            error: o.error.clone(),
        }
    }
}

/// The 409 an on-demand pass gets while the bridge is paused.
fn paused_error() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "paused",
        "the bridge is paused: nothing is applied until POST /api/sync/resume (or `syncbridge resume`)",
    )
}

async fn run_pass(state: &ApiState, mode: Mode) -> Result<axum::Json<SyncResult>, ApiError> {
    if state.engine.is_paused() {
        return Err(paused_error());
    }
    let guard = state
        .passes
        .try_begin(mode, Trigger::Api)
        .map_err(|running| {
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                "pass_running",
                format!(
                    "pass {} ({}, started by {:?}) is still running; ask again when it is done",
                    running.id, running.mode, running.trigger
                ),
            );
            e.body.pass_id = Some(running.id);
            e
        })?;
    // The pass runs on its own task: a client that hangs up does not cut it short.
    let passes = state.passes.clone();
    let engine = state.engine.clone();
    let outcome = tokio::spawn(async move { passes.run(&engine, guard).await })
        .await
        .map_err(|e| ApiError::store(anyhow::anyhow!("the pass stopped: {e}")))?;
    match (&outcome.report, &outcome.error) {
        (Some(report), _) => Ok(axum::Json(SyncResult {
            pass: (&outcome.pass).into(),
            summary: report.into(),
        })),
        // Paused while the pass ran: it stopped at its next page.
        (None, _) if state.engine.is_paused() => Err(paused_error()),
        (None, e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "pass_failed",
            format!(
                "pass {} failed: {}",
                outcome.pass.id,
                e.as_deref().unwrap_or("unknown error")
            ),
        )),
    }
}

type St = State<Arc<ApiState>>;

/// Runs one full reconciliation pass now and replies with its summary.
#[utoipa::path(post, path = "/api/sync", tag = "sync",
    request_body = SyncRequest,
    responses(
        (status = 200, description = "The pass ran; its summary", body = SyncResult),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "A pass is already running (its id in pass_id), or the bridge is paused (error `paused`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Unknown mode or not an object", body = ErrorBody),
        (status = 503, description = "The pass failed on a store", body = ErrorBody),
    ))]
pub async fn post_sync(
    State(s): St,
    ApiJson(req): ApiJson<SyncRequest>,
) -> Result<axum::Json<SyncResult>, ApiError> {
    run_pass(&s, req.mode.into()).await
}

/// Runs one full reconciliation pass now (`both-ways` means `both`).
#[utoipa::path(get, path = "/api/sync/{mode}", tag = "sync",
    params(("mode" = SyncModeName, Path, description = "both, both-ways, local-to-cloud, cloud-to-local, overwrite-local or overwrite-cloud")),
    responses(
        (status = 200, description = "The pass ran; its summary", body = SyncResult),
        (status = 400, description = "Unknown mode", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "A pass is already running (its id in pass_id), or the bridge is paused (error `paused`)", body = ErrorBody),
        (status = 503, description = "The pass failed on a store", body = ErrorBody),
    ))]
pub async fn get_sync(
    State(s): St,
    ApiPath(mode): ApiPath<String>,
) -> Result<axum::Json<SyncResult>, ApiError> {
    let mode: Mode = mode
        .parse()
        .map_err(|e: String| ApiError::bad_request("bad_mode", e))?;
    run_pass(&s, mode).await
}

/// The offline switch's state: the reply of `POST /api/sync/pause` and `/resume`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PauseState {
    /// Paused: changes are captured and held, nothing is applied.
    pub paused: bool,
    /// Whether this request changed it (false when it already was so).
    pub changed: bool,
    /// Resumed, still applying what was held (oldest first).
    pub draining: bool,
    /// Records waiting to be applied: held while paused plus failed ones waiting for a retry.
    pub pending: i64,
    /// Age of the oldest record waiting to be applied, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_secs: Option<i64>,
}

async fn pause_state(s: &ApiState, changed: bool) -> Result<PauseState, ApiError> {
    let q = s.engine.queue.counts().await.map_err(ApiError::store)?;
    Ok(PauseState {
        paused: s.engine.is_paused(),
        changed,
        draining: s.engine.is_draining(),
        pending: q.held + q.pending,
        oldest_pending_age_secs: q.oldest_waiting_age_ms.map(|ms| ms / 1000),
    })
}

/// Pauses the bridge (the offline switch): listeners keep capturing changes, which are held
/// durably in order; nothing is applied to either store until resume. Persisted: a restarted
/// bridge stays paused. Replies once the batch being applied, if any, has finished.
#[utoipa::path(post, path = "/api/sync/pause", tag = "sync",
    responses(
        (status = 200, description = "Paused (changed is false if it already was)", body = PauseState),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "The state database could not record it; nothing changed", body = ErrorBody),
    ))]
pub async fn pause(State(s): St) -> Result<axum::Json<PauseState>, ApiError> {
    let changed = s.engine.pause().await.map_err(ApiError::store)?;
    Ok(axum::Json(pause_state(&s, changed).await?))
}

/// Resumes a paused bridge: the held changes are applied oldest first, then normal operation
/// continues. `pending` in status counts down while they drain.
#[utoipa::path(post, path = "/api/sync/resume", tag = "sync",
    responses(
        (status = 200, description = "Resumed (changed is false if it was not paused)", body = PauseState),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "The state database could not record it; nothing changed", body = ErrorBody),
    ))]
pub async fn resume(State(s): St) -> Result<axum::Json<PauseState>, ApiError> {
    let changed = s.engine.resume().await.map_err(ApiError::store)?;
    Ok(axum::Json(pause_state(&s, changed).await?))
}

/// Per-side counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pair {
    /// The local store's count.
    pub local: u64,
    /// The cloud store's count.
    pub cloud: u64,
}

/// Counters since the bridge started.
#[derive(Debug, Serialize, ToSchema)]
pub struct Counters {
    /// Changes delivered by each side's listener.
    pub changes_seen: Pair,
    /// Writes that changed each side.
    pub applied: Pair,
    /// The bridge's own writes coming back, dropped.
    pub echoes_suppressed: u64,
    /// Conflicts, by the side that won.
    pub conflicts_won: Pair,
    /// Conflicts decided by the hash tie-break.
    pub tie_breaks: u64,
    /// Stale one-sided writes put back.
    pub stale_reverted: u64,
    /// Conditional writes retried because the target moved on.
    pub retries: u64,
    /// Values that are not records, per side.
    pub invalid: Pair,
    /// Records with `updatedAt` too far in the future, per side.
    pub future_rejected: Pair,
    /// Writes a store refused, per target side.
    pub rejected: Pair,
    /// Writes a store could not take yet (parent row missing), per target side; retried.
    pub deferred: Pair,
    /// Store errors.
    pub failures: u64,
}

/// One store, as status sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreStatus {
    /// The store (URI without password).
    pub store: String,
    /// It answered a probe just now.
    pub connected: bool,
    /// Why it did not, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its listener is following changes.
    pub listening: bool,
    /// Since when it has been unreachable (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since: Option<String>,
    /// The last listener error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the newest change from it was seen (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
    /// Now minus the newest change seen, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<i64>,
    /// The listener's persisted position, where the store uses one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// Both stores.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stores {
    /// The local store.
    pub local: StoreStatus,
    /// The cloud store.
    pub cloud: StoreStatus,
}

/// The reply of `GET /api/sync/status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SyncStatus {
    /// This bridge's instance id.
    pub instance_id: String,
    /// The configured mode.
    pub mode: String,
    /// The synced collections.
    pub collections: Vec<String>,
    /// Per store: connected, listener state, lag, checkpoint.
    pub stores: Stores,
    /// The last sweep (periodic, scheduled or on demand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sweep: Option<PassSummary>,
    /// The on-demand or scheduled pass running now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_pass: Option<PassView>,
    /// How the last on-demand or scheduled pass ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pass: Option<PassResultView>,
    /// The cron schedule, if one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// When the next scheduled pass starts (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    /// Counters since start.
    pub counters: Counters,
    /// The durable retry queue: records waiting for a retry, dead letters, oldest age.
    pub queue: QueueStatus,
    /// Conflicts: parked for a person, decided and kept for audit, counts by policy and outcome.
    pub conflicts: ConflictStatus,
    /// Paused by the offline switch (`POST /api/sync/pause`): changes are held, not applied.
    pub paused: bool,
    /// Resumed, still applying the held changes (oldest first).
    pub draining: bool,
    /// Records waiting to be applied: held while paused plus failed ones waiting for a retry.
    pub pending: i64,
    /// Age of the oldest record waiting to be applied, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_secs: Option<i64>,
    /// Per configured collection: pending, synced, failed, and the failures with their attempts
    /// and last error.
    pub by_collection: std::collections::BTreeMap<String, CollectionStatus>,
    /// Offline-first clients (`X-Client-Id` on the replication routes): how many there are, and
    /// the most recently seen of them with their last pull and push.
    pub replication_clients: ReplicationClients,
}

/// Replication clients, in status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicationClients {
    /// Clients that ever sent `X-Client-Id`.
    pub total: i64,
    /// The most recently seen (at most [`CLIENTS_SHOWN`]); `GET /api/replicate/clients` lists
    /// them all.
    pub recent: Vec<super::replicate::ClientStatus>,
}

/// Replication clients listed in status.
pub const CLIENTS_SHOWN: i64 = 20;

/// One collection, in status.
#[derive(Debug, Serialize, ToSchema)]
pub struct CollectionStatus {
    /// Records waiting to be applied (held + retrying).
    pub pending: i64,
    /// Of those, held while paused.
    pub held: i64,
    /// Of those, failed and waiting for a retry.
    pub retrying: i64,
    /// Writes that changed a store for this collection since the bridge started.
    pub synced: u64,
    /// Dead-lettered records (`GET /api/sync/failed`).
    pub failed: i64,
    /// Age of the oldest record waiting to be applied, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_secs: Option<i64>,
    /// Records that failed at least once (dead letters first, at most
    /// [`FAILURES_SHOWN`] of them), with their attempts and last error.
    pub failures: Vec<super::conflicts::FailedView>,
}

/// Failures listed per collection in status; `GET /api/sync/failed` has them all.
pub const FAILURES_SHOWN: i64 = 20;

/// The retry queue, in status.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueStatus {
    /// Records waiting for a retry.
    pub pending: i64,
    /// Dead-lettered records (`GET /api/sync/failed`).
    pub failed: i64,
    /// Age of the oldest failed record (retrying or dead), in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_ms: Option<i64>,
    /// Records held while paused, waiting for resume or for the drain after it.
    pub held: i64,
}

/// Conflicts, in status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictStatus {
    /// Parked conflicts waiting for a person (`GET /api/conflicts`).
    pub parked: i64,
    /// Decided conflicts kept with their losing version (`GET /api/conflicts?resolved=true`).
    pub logged: i64,
    /// Since start, by `policy:outcome` (`lww:cloud`, `merge:merged`, `manual:parked`, ...).
    pub by_outcome: std::collections::BTreeMap<String, u64>,
}

/// Probes a store with a one-record scan.
async fn probe(state: &ApiState, side: Side) -> Result<(), String> {
    let store = state.engine.store(side);
    let collection = state
        .engine
        .config
        .sync
        .collections
        .first()
        .cloned()
        .unwrap_or_default();
    match tokio::time::timeout(PROBE_TIMEOUT, store.scan(&collection, None, None, 1)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

/// The retry queue's counts; zeros if the state database cannot be read right now.
async fn queue_counts(state: &ApiState) -> crate::engine::queue::QueueCounts {
    state.engine.queue.counts().await.unwrap_or_default()
}

async fn store_status(state: &ApiState, side: Side, health: StoreHealth, now: i64) -> StoreStatus {
    let probe = probe(state, side).await;
    let checkpoint = state.engine.state.checkpoint(side).await.ok().flatten();
    StoreStatus {
        store: state.engine.store(side).describe(),
        connected: probe.is_ok(),
        error: probe.err(),
        listening: health.listening,
        down_since: health.down_since_ms.map(format_ts),
        last_error: health.last_error,
        last_event_at: health.last_event_ms.map(format_ts),
        lag_ms: health.last_event_ms.map(|t| (now - t).max(0)),
        checkpoint,
    }
}

/// What the bridge is doing and has done since it started.
#[utoipa::path(get, path = "/api/sync/status", tag = "sync",
    responses(
        (status = 200, description = "Status", body = SyncStatus),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ))]
pub async fn status(State(s): St) -> axum::Json<SyncStatus> {
    let snap = s.engine.stats.snapshot();
    let now = now_ms();
    let (local, cloud) = tokio::join!(
        store_status(&s, Side::Local, snap.local.clone(), now),
        store_status(&s, Side::Cloud, snap.cloud.clone(), now)
    );
    let last_sweep = s
        .engine
        .last_sweep
        .lock()
        .ok()
        .and_then(|l| l.as_ref().map(PassSummary::from));
    let q = queue_counts(&s).await;
    let pair = |p: crate::engine::stats::SidePair| Pair {
        local: p.local,
        cloud: p.cloud,
    };
    axum::Json(SyncStatus {
        instance_id: s.engine.instance_id.clone(),
        mode: s.engine.config.sync.mode.to_string(),
        collections: s.engine.config.sync.collections.clone(),
        stores: Stores { local, cloud },
        last_sweep,
        running_pass: s.passes.running().as_ref().map(PassView::from),
        last_pass: s.passes.last().as_ref().map(PassResultView::from),
        schedule: s.schedule.as_ref().map(|sc| sc.expr.clone()),
        next_run: s.schedule.as_ref().and_then(|sc| sc.next_run()),
        counters: Counters {
            changes_seen: pair(snap.seen),
            applied: pair(snap.applied),
            echoes_suppressed: snap.echoes_suppressed,
            conflicts_won: pair(snap.conflicts),
            tie_breaks: snap.tie_breaks,
            stale_reverted: snap.stale_reverted,
            retries: snap.retries,
            invalid: pair(snap.invalid),
            future_rejected: pair(snap.future_rejected),
            rejected: pair(snap.rejected),
            deferred: pair(snap.deferred),
            failures: snap.errors,
        },
        queue: QueueStatus {
            pending: q.pending,
            failed: q.failed,
            oldest_age_ms: q.oldest_age_ms,
            held: q.held,
        },
        conflicts: {
            let (parked, logged) = s.engine.conflicts.counts().await.unwrap_or_default();
            ConflictStatus {
                parked,
                logged,
                by_outcome: snap.conflict_outcomes.clone(),
            }
        },
        paused: s.engine.is_paused(),
        draining: s.engine.is_draining(),
        pending: q.held + q.pending,
        oldest_pending_age_secs: q.oldest_waiting_age_ms.map(|ms| ms / 1000),
        by_collection: collection_status(&s, &snap.synced, now).await,
        replication_clients: ReplicationClients {
            total: s.replica.client_count().await.unwrap_or_default(),
            recent: s
                .replica
                .client_statuses(super::replicate::ClientOrder::LastSeen, CLIENTS_SHOWN)
                .await
                .unwrap_or_default(),
        },
    })
}

/// The per-collection part of status; queue figures are zeros if the state database cannot be
/// read right now (as for the totals).
async fn collection_status(
    s: &ApiState,
    synced: &std::collections::BTreeMap<String, u64>,
    now: i64,
) -> std::collections::BTreeMap<String, CollectionStatus> {
    let queue = &s.engine.queue;
    let counts = queue.counts_by_collection().await.unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for c in &s.engine.config.sync.collections {
        let q = counts.get(c).copied().unwrap_or_default();
        let failures = if q.retrying + q.failed > 0 {
            queue
                .failures(c, FAILURES_SHOWN)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            Vec::new()
        };
        out.insert(
            c.clone(),
            CollectionStatus {
                pending: q.held + q.retrying,
                held: q.held,
                retrying: q.retrying,
                synced: synced.get(c).copied().unwrap_or(0),
                failed: q.failed,
                oldest_pending_age_secs: q.oldest_waiting_ms.map(|t| (now - t).max(0) / 1000),
                failures,
            },
        );
    }
    out
}

/// Health of one store.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreHealthView {
    /// It answered.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The reply of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    /// The local store.
    pub local: StoreHealthView,
    /// The cloud store.
    pub cloud: StoreHealthView,
}

/// 200 when both stores answer, 503 with the reason otherwise. Needs no token.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Both stores answer", body = Health),
        (status = 503, description = "A store does not answer", body = Health),
    ))]
pub async fn healthz(State(s): St) -> Response {
    let (l, c) = tokio::join!(probe(&s, Side::Local), probe(&s, Side::Cloud));
    let ok = l.is_ok() && c.is_ok();
    let view = |r: Result<(), String>| StoreHealthView {
        ok: r.is_ok(),
        error: r.err(),
    };
    let body = Health {
        status: if ok { "ok" } else { "unavailable" }.into(),
        local: view(l),
        cloud: view(c),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// The Prometheus metrics, refreshed from the engine's counters at each scrape.
pub struct Metrics {
    registry: Registry,
    lock: Mutex<()>,
    counters: Vec<(&'static str, IntCounterVec)>,
    echoes: IntCounterVec,
    listener_up: IntGaugeVec,
    lag_ms: IntGaugeVec,
    pending: IntGauge,
    held: IntGauge,
    paused: IntGauge,
    pass_running: IntGauge,
    last_sweep_ms: IntGauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let per_side = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["side"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counters = vec![
            (
                "seen",
                per_side(
                    "syncbridge_changes_seen_total",
                    "Changes delivered by each store's listener",
                )?,
            ),
            (
                "applied",
                per_side("syncbridge_applied_total", "Writes that changed each store")?,
            ),
            (
                "conflicts",
                per_side(
                    "syncbridge_conflicts_won_total",
                    "Conflicts, by the store whose version won",
                )?,
            ),
            (
                "invalid",
                per_side(
                    "syncbridge_invalid_records_total",
                    "Values that are not records",
                )?,
            ),
            (
                "future",
                per_side(
                    "syncbridge_future_rejected_total",
                    "Records with updatedAt too far in the future",
                )?,
            ),
            (
                "rejected",
                per_side("syncbridge_rejected_writes_total", "Writes a store refused")?,
            ),
            (
                "deferred",
                per_side(
                    "syncbridge_deferred_writes_total",
                    "Writes a store could not take yet (parent row missing)",
                )?,
            ),
        ];
        let echoes = IntCounterVec::new(
            Opts::new("syncbridge_events_total", "Other engine events, by kind"),
            &["kind"],
        )?;
        registry.register(Box::new(echoes.clone()))?;
        let listener_up = IntGaugeVec::new(
            Opts::new(
                "syncbridge_listener_up",
                "1 when the store's listener follows changes",
            ),
            &["side"],
        )?;
        registry.register(Box::new(listener_up.clone()))?;
        let lag_ms = IntGaugeVec::new(
            Opts::new(
                "syncbridge_listener_lag_ms",
                "Now minus the newest change seen from the store",
            ),
            &["side"],
        )?;
        registry.register(Box::new(lag_ms.clone()))?;
        let pending = IntGauge::new(
            "syncbridge_pending_retries",
            "Records waiting to be retried",
        )?;
        registry.register(Box::new(pending.clone()))?;
        let held = IntGauge::new(
            "syncbridge_held_records",
            "Records captured while paused, waiting to be applied",
        )?;
        registry.register(Box::new(held.clone()))?;
        let paused = IntGauge::new("syncbridge_paused", "1 while the bridge is paused")?;
        registry.register(Box::new(paused.clone()))?;
        let pass_running = IntGauge::new(
            "syncbridge_pass_running",
            "1 while an on-demand or scheduled pass runs",
        )?;
        registry.register(Box::new(pass_running.clone()))?;
        let last_sweep_ms = IntGauge::new(
            "syncbridge_last_sweep_duration_ms",
            "Duration of the last sweep",
        )?;
        registry.register(Box::new(last_sweep_ms.clone()))?;
        Ok(Metrics {
            registry,
            lock: Mutex::new(()),
            counters,
            echoes,
            listener_up,
            lag_ms,
            pending,
            held,
            paused,
            pass_running,
            last_sweep_ms,
        })
    }

    /// Copies the engine's counters into the metrics and encodes them.
    fn render(&self, state: &ApiState, queue: crate::engine::queue::QueueCounts) -> String {
        let _one_at_a_time = self.lock.lock().expect("metrics lock");
        let snap = state.engine.stats.snapshot();
        let now = now_ms();
        for (name, vec) in &self.counters {
            let pair = match *name {
                "seen" => snap.seen,
                "applied" => snap.applied,
                "conflicts" => snap.conflicts,
                "invalid" => snap.invalid,
                "future" => snap.future_rejected,
                "deferred" => snap.deferred,
                _ => snap.rejected,
            };
            vec.reset();
            vec.with_label_values(&["local"]).inc_by(pair.local);
            vec.with_label_values(&["cloud"]).inc_by(pair.cloud);
        }
        self.echoes.reset();
        for (kind, n) in [
            ("echo_suppressed", snap.echoes_suppressed),
            ("tie_break", snap.tie_breaks),
            ("stale_reverted", snap.stale_reverted),
            ("retry", snap.retries),
            ("failure", snap.errors),
        ] {
            self.echoes.with_label_values(&[kind]).inc_by(n);
        }
        for (side, h) in [("local", &snap.local), ("cloud", &snap.cloud)] {
            self.listener_up
                .with_label_values(&[side])
                .set(i64::from(h.listening));
            if let Some(t) = h.last_event_ms {
                self.lag_ms.with_label_values(&[side]).set((now - t).max(0));
            }
        }
        self.pending.set(queue.pending);
        self.held.set(queue.held);
        self.paused.set(i64::from(state.engine.is_paused()));
        self.pass_running
            .set(i64::from(state.passes.running().is_some()));
        if let Some(r) = state
            .engine
            .last_sweep
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|r| r.duration_ms))
        {
            self.last_sweep_ms.set(r as i64);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Counters, gauges and listener lag in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ))]
pub async fn metrics(State(s): St) -> Response {
    let queue = queue_counts(&s).await;
    let text = s.metrics.render(&s, queue);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
