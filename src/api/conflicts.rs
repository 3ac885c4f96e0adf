//! Routes for what needs a person: parked conflicts (`/api/conflicts`) and records the bridge
//! could not sync (`/api/sync/failed`, the retry queue's dead letters).

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::records::{ApiJson, ApiPath, ApiQuery};
use crate::engine::conflicts::{ConflictEntry, Resolution, ResolveError};
use crate::engine::queue::QueueEntry;
use crate::record::Side;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

type St = State<Arc<ApiState>>;

/// Which conflicts to list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ConflictQuery {
    /// `true`: decided conflicts with their losing versions (the audit); default: parked ones.
    #[serde(default)]
    pub resolved: bool,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<i64>,
}

/// A conflict, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictView {
    /// Its id.
    pub id: i64,
    /// Collection.
    pub collection: String,
    /// Record id.
    pub record_id: String,
    /// The policy that handled it.
    pub policy: String,
    /// `parked` or `resolved`.
    pub status: String,
    /// How it ended: `local`, `cloud`, `merged`, `doc` or `converged`.
    pub winner: Option<String>,
    /// The local version (`null`: deleted).
    #[schema(value_type = Object)]
    pub local: Option<Value>,
    /// The cloud version (`null`: deleted).
    #[schema(value_type = Object)]
    pub cloud: Option<Value>,
    /// The last agreed version, where kept.
    #[schema(value_type = Object)]
    pub base: Option<Value>,
    /// The version that lost.
    #[schema(value_type = Object)]
    pub loser: Option<Value>,
    /// When it was first seen (ms since the epoch).
    pub created_ms: i64,
    /// When it was resolved.
    pub resolved_ms: Option<i64>,
}

impl From<ConflictEntry> for ConflictView {
    fn from(e: ConflictEntry) -> Self {
        ConflictView {
            id: e.id,
            collection: e.collection,
            record_id: e.record_id,
            policy: e.policy,
            status: e.status,
            winner: e.winner,
            local: e.local,
            cloud: e.cloud,
            base: e.base,
            loser: e.loser,
            created_ms: e.created_ms,
            resolved_ms: e.resolved_ms,
        }
    }
}

/// How to resolve: `{"take": "local" | "cloud"}` or `{"doc": {...}}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// Keep this side's version.
    pub take: Option<String>,
    /// Or write this document to both sides.
    #[schema(value_type = Object)]
    pub doc: Option<Value>,
}

/// Lists parked conflicts, or decided ones with `resolved=true`.
#[utoipa::path(get, path = "/api/conflicts", tag = "conflicts", params(ConflictQuery),
    responses(
        (status = 200, description = "Conflicts", body = [ConflictView]),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "State unavailable", body = ErrorBody),
    ))]
pub async fn list_conflicts(
    State(s): St,
    ApiQuery(q): ApiQuery<ConflictQuery>,
) -> Result<axum::Json<Vec<ConflictView>>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = s
        .engine
        .conflicts
        .list(q.resolved, limit)
        .await
        .map_err(ApiError::store)?;
    Ok(axum::Json(
        entries.into_iter().map(ConflictView::from).collect(),
    ))
}

/// One conflict.
#[utoipa::path(get, path = "/api/conflicts/{id}", tag = "conflicts",
    params(("id" = i64, Path, description = "Conflict id")),
    responses(
        (status = 200, description = "The conflict", body = ConflictView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such conflict", body = ErrorBody),
        (status = 503, description = "State unavailable", body = ErrorBody),
    ))]
pub async fn get_conflict(
    State(s): St,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<ConflictView>, ApiError> {
    match s.engine.conflicts.get(id).await.map_err(ApiError::store)? {
        Some(e) => Ok(axum::Json(e.into())),
        None => Err(ApiError::not_found(format!("no conflict {id}"))),
    }
}

/// Resolves a parked conflict: the chosen version is written to both stores.
#[utoipa::path(post, path = "/api/conflicts/{id}/resolve", tag = "conflicts",
    params(("id" = i64, Path, description = "Conflict id")),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "Resolved", body = ConflictView),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such conflict", body = ErrorBody),
        (status = 409, description = "Already resolved, or the record changed meanwhile", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Neither take nor doc, or doc not an object", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn resolve_conflict(
    State(s): St,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<axum::Json<ConflictView>, ApiError> {
    let how = match (body.take.as_deref(), body.doc) {
        (Some("local"), None) => Resolution::Take(Side::Local),
        (Some("cloud"), None) => Resolution::Take(Side::Cloud),
        (None, Some(doc)) => Resolution::Doc(doc),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_resolution",
                "give either {\"take\": \"local\" | \"cloud\"} or {\"doc\": {...}}",
            ));
        }
    };
    match s.engine.resolve_conflict(id, how).await {
        Ok(e) => Ok(axum::Json(e.into())),
        Err(ResolveError::NotFound(_)) => Err(ApiError::not_found(format!("no conflict {id}"))),
        Err(e @ (ResolveError::AlreadyResolved(_) | ResolveError::Changed)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict_not_resolved",
            e.to_string(),
        )),
        Err(e @ ResolveError::NotAnObject) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_an_object",
            e.to_string(),
        )),
        Err(ResolveError::Store(e)) => Err(ApiError::store(e)),
    }
}

/// Which queued records to list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct FailedQuery {
    /// `true`: also records still being retried; default: dead letters only.
    #[serde(default)]
    pub all: bool,
}

/// A record the bridge could not sync.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailedView {
    /// `collection/id`.
    pub key: String,
    /// Collection.
    pub collection: String,
    /// Record id.
    pub id: String,
    /// Attempts so far.
    pub attempts: i64,
    /// The last error.
    pub last_error: String,
    /// Dead-lettered (no more automatic attempts).
    pub dead: bool,
    /// When it first failed (ms).
    pub first_failed_ms: i64,
    /// When the next attempt is due (ms).
    pub next_attempt_ms: i64,
}

impl From<QueueEntry> for FailedView {
    fn from(e: QueueEntry) -> Self {
        FailedView {
            key: e.key,
            collection: e.collection,
            id: e.id,
            attempts: e.attempts,
            last_error: e.last_error,
            dead: e.dead,
            first_failed_ms: e.first_failed_ms,
            next_attempt_ms: e.next_attempt_ms,
        }
    }
}

/// Lists dead-lettered records (or every queued one with `all=true`).
#[utoipa::path(get, path = "/api/sync/failed", tag = "sync", params(FailedQuery),
    responses(
        (status = 200, description = "Queued records", body = [FailedView]),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "State unavailable", body = ErrorBody),
    ))]
pub async fn list_failed(
    State(s): St,
    ApiQuery(q): ApiQuery<FailedQuery>,
) -> Result<axum::Json<Vec<FailedView>>, ApiError> {
    let entries = s
        .engine
        .queue
        .list(!q.all, 1000)
        .await
        .map_err(ApiError::store)?;
    Ok(axum::Json(
        entries.into_iter().map(FailedView::from).collect(),
    ))
}

/// Puts a queued record back in line for an attempt now.
#[utoipa::path(post, path = "/api/sync/failed/{collection}/{id}/retry", tag = "sync",
    params(("collection" = String, Path, description = "Collection"), ("id" = String, Path, description = "Record id")),
    responses(
        (status = 204, description = "Queued for an attempt now"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Not in the queue", body = ErrorBody),
        (status = 503, description = "State unavailable", body = ErrorBody),
    ))]
pub async fn retry_failed(
    State(s): St,
    ApiPath((collection, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if s.engine
        .queue
        .retry(&format!("{collection}/{id}"))
        .await
        .map_err(ApiError::store)?
    {
        s.engine.note_queued();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "{collection}/{id} is not in the retry queue"
        )))
    }
}

/// Drops a queued record for good.
#[utoipa::path(delete, path = "/api/sync/failed/{collection}/{id}", tag = "sync",
    params(("collection" = String, Path, description = "Collection"), ("id" = String, Path, description = "Record id")),
    responses(
        (status = 204, description = "Discarded"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Not in the queue", body = ErrorBody),
        (status = 503, description = "State unavailable", body = ErrorBody),
    ))]
pub async fn discard_failed(
    State(s): St,
    ApiPath((collection, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if s.engine
        .queue
        .discard(&format!("{collection}/{id}"))
        .await
        .map_err(ApiError::store)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "{collection}/{id} is not in the retry queue"
        )))
    }
}
