//! The HTTP API served beside the bridge by `syncbridge run`: record APIs per store (`/v1` =
//! local, `/v2` = cloud), sync on demand, status, Prometheus metrics, health, and the OpenAPI
//! document at `/openapi.json`.
//!
//! It is how the people who run the bridge see and steer it, and how a demo shows a change
//! written to one store appearing in the other. It stops on the same cancellation token as the
//! pipeline, finishing the requests in flight.

pub mod conflicts;
pub mod error;
pub mod records;
pub mod replicate;
pub mod sync;

use crate::config::ApiConfig;
use crate::engine::Engine;
use crate::engine::scheduler::{Passes, Schedule};
use crate::record::Side;
use crate::stores::Store;
use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use error::ApiError;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Everything a request handler needs.
pub struct ApiState {
    /// The bridge's engine: config, stats, sweeps.
    pub engine: Arc<Engine>,
    /// The one-pass-at-a-time guard, shared with the scheduler.
    pub passes: Arc<Passes>,
    /// The cron schedule, if one is configured.
    pub schedule: Option<Arc<Schedule>>,
    /// Store handles the record APIs write through, under their own writer id (see
    /// [`records`]).
    writers: [Arc<dyn Store>; 2],
    metrics: sync::Metrics,
    /// The replication feed behind `/api/replicate` (see [`replicate`]).
    replica: Arc<replicate::Replica>,
    token: Option<String>,
    body_limit: usize,
}

impl ApiState {
    /// Opens the API's own store handles. Their writer id differs from the bridge's instance
    /// id, so on stores that tag writers (PostgreSQL) the bridge does not mistake an API write
    /// for its own echo and carries it to the other store.
    pub async fn open(
        engine: Arc<Engine>,
        passes: Arc<Passes>,
        schedule: Option<Arc<Schedule>>,
        api: &ApiConfig,
    ) -> Result<Arc<ApiState>> {
        let writer_id = format!("{}-api", engine.instance_id);
        let local = crate::stores::open(&engine.config.local.uri, &writer_id).await?;
        let cloud = crate::stores::open(&engine.config.cloud.uri, &writer_id).await?;
        // Collections in typed tables are read and written column by column by these handles
        // too.
        local
            .prepare_tables(&engine.table_specs(Side::Local, local.as_ref()))
            .await?;
        cloud
            .prepare_tables(&engine.table_specs(Side::Cloud, cloud.as_ref()))
            .await?;
        let replica = replicate::Replica::open(engine.clone(), cloud.clone()).await?;
        Ok(Arc::new(ApiState {
            engine,
            passes,
            schedule,
            writers: [local, cloud],
            metrics: sync::Metrics::new().context("cannot register the metrics")?,
            replica,
            token: api.token.clone(),
            body_limit: api.body_limit,
        }))
    }

    fn writer(&self, side: Side) -> &Arc<dyn Store> {
        match side {
            Side::Local => &self.writers[0],
            Side::Cloud => &self.writers[1],
        }
    }
}

/// The OpenAPI document, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "syncbridge", description = "Keeps two data stores in step, both ways. /v1 is the local store, /v2 the cloud store."),
    paths(
        records::create_customer, records::get_customer, records::put_customer,
        records::delete_customer, records::list_customers, records::create_record,
        records::list_records, records::get_record, records::put_record, records::delete_record,
        sync::post_sync, sync::get_sync, sync::pause, sync::resume, sync::status, sync::healthz, sync::metrics, openapi_json,
        conflicts::list_failed, conflicts::retry_failed, conflicts::discard_failed,
        conflicts::list_conflicts, conflicts::get_conflict, conflicts::resolve_conflict,
        replicate::pull, replicate::push, replicate::stream, replicate::clients,
        replicate::client_js, replicate::demo,
    ),
    components(schemas(records::ApiVersion, sync::SyncModeName, replicate::WireVersion)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong token", body = error::ErrorBody),
    ))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

/// Refuses requests without the configured bearer token (compared in constant time).
async fn require_token(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs `Authorization: Bearer <token>` with the configured api.token",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    }
    next.run(req).await
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    use records::*;
    let guarded = Router::new()
        .route("/{api}/customer", post(create_customer))
        .route(
            "/{api}/customer/{uid}",
            get(get_customer).put(put_customer).delete(delete_customer),
        )
        .route("/{api}/customers", get(list_customers))
        .route(
            "/{api}/records/{collection}",
            post(create_record).get(list_records),
        )
        .route(
            "/{api}/records/{collection}/{id}",
            get(get_record).put(put_record).delete(delete_record),
        )
        .route("/api/sync", post(sync::post_sync))
        .route("/api/sync/status", get(sync::status))
        .route("/api/sync/pause", post(sync::pause))
        .route("/api/sync/resume", post(sync::resume))
        .route("/api/sync/{mode}", get(sync::get_sync))
        .route("/api/sync/failed", get(conflicts::list_failed))
        .route(
            "/api/sync/failed/{collection}/{id}",
            delete(conflicts::discard_failed),
        )
        .route(
            "/api/sync/failed/{collection}/{id}/retry",
            post(conflicts::retry_failed),
        )
        .route("/api/conflicts", get(conflicts::list_conflicts))
        .route("/api/conflicts/{id}", get(conflicts::get_conflict))
        .route(
            "/api/conflicts/{id}/resolve",
            post(conflicts::resolve_conflict),
        )
        .route("/metrics", get(sync::metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/api/replicate/clients", get(replicate::clients))
        .route("/api/replicate/{collection}/pull", get(replicate::pull))
        .route("/api/replicate/{collection}/push", post(replicate::push))
        .route("/api/replicate/{collection}/stream", get(replicate::stream))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(sync::healthz))
        // Pages a browser opens by address, so without a token; the data they show comes from
        // the guarded routes.
        .route("/client/syncbridge.js", get(replicate::client_js))
        .route("/demo", get(replicate::demo))
        .merge(guarded)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .with_state(state)
}

/// How long requests in flight may finish after shutdown before open connections are dropped.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds the API's address, saying which when it cannot.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the HTTP API (api.bind)"))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then finishes the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "HTTP API listening");
    let server =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    // Replication streams never end by themselves: after shutdown, requests in flight get a
    // short grace, then the open streams are dropped (their clients reconnect elsewhere).
    tokio::select! {
        r = server => r.context("the HTTP API stopped")?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            info!("HTTP API closing the connections still open (event streams)");
        }
    }
    info!("HTTP API stopped");
    Ok(())
}
