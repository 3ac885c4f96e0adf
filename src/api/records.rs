//! Record APIs, one per store with the same shape: `/v1` is the `local` store, `/v2` the
//! `cloud` store.
//!
//! They write to the store the way any client of that store would, through the connector's
//! conditional [`Store::apply`] on handles opened under the API's own writer id (not the
//! bridge's, so the bridge's listeners see these writes as foreign changes and carry them to
//! the other store, exactly as they would an application's write). Every update reads first
//! and writes only if the record is still what it read (its etag), so a concurrent write is
//! never overwritten: the request re-reads and merges again, a few times, then answers 409.

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use crate::record::{ChangeRecord, Op, Origin, Side, UPDATED_AT_FIELD, now_ms, with_updated_at};
use crate::stores::{ApplyOutcome, Slot, StoredRecord, Write};
use axum::extract::{FromRequest, FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

/// Attempts at a read-merge-write before a contended update gives up with 409.
const WRITE_ROUNDS: usize = 5;
/// Longest record id accepted.
const MAX_ID_LEN: usize = 128;
/// Page size bounds for lists.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// The field that carries a record's id in documents the API creates.
pub const UID_FIELD: &str = "uid";
/// The collection `/customer` and `/customers` stand for.
pub const CUSTOMERS: &str = "customers";

/// Which store a request is for.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    /// The `local` store.
    V1,
    /// The `cloud` store.
    V2,
}

impl ApiVersion {
    /// The store this version serves.
    pub fn side(self) -> Side {
        match self {
            ApiVersion::V1 => Side::Local,
            ApiVersion::V2 => Side::Cloud,
        }
    }
}

/// A record's document: any JSON object. `uid` and `updatedAt` are set by the server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct Document(pub Map<String, Value>);

/// One record of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordItem {
    /// The record id.
    pub id: String,
    /// Its document.
    pub doc: Document,
}

/// One page of records.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordPage {
    /// Records on this page.
    pub records: Vec<RecordItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Paging of a list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Records per page, 1 to 1000 (default 100). Redis treats it as a hint: a page may hold
    /// a few more or fewer.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The `next` value of the previous page.
    pub cursor: Option<String>,
}

/// `Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `Query` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The configured collection a path names; `customer` stands for `customers`.
fn resolve(state: &ApiState, name: &str) -> Result<String, ApiError> {
    let configured = &state.engine.config.sync.collections;
    if configured.iter().any(|c| c == name) {
        return Ok(name.to_string());
    }
    if name == "customer" && configured.iter().any(|c| c == CUSTOMERS) {
        return Ok(CUSTOMERS.to_string());
    }
    Err(ApiError::not_found(format!(
        "unknown collection {name:?}: this bridge syncs {configured:?}"
    )))
}

/// Refuses ids that are not valid keys on every store: 1 to 128 of `A-Z a-z 0-9 . _ ~ : @ -`,
/// not `.` or `..`.
fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~:@-".contains(c))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad_id",
            format!(
                "record id {id:?} is not a valid key: use 1 to {MAX_ID_LEN} of A-Z a-z 0-9 . _ ~ : @ -"
            ),
        ))
    }
}

fn write(
    side: Side,
    collection: &str,
    id: &str,
    doc: Option<Value>,
    at_ms: i64,
    expected: Option<String>,
) -> Write {
    Write {
        record: ChangeRecord {
            side,
            collection: collection.to_string(),
            id: id.to_string(),
            op: if doc.is_some() {
                Op::Upsert
            } else {
                Op::Delete
            },
            doc,
            updated_at_ms: at_ms,
            origin: Origin::Unknown,
        },
        expected,
    }
}

/// A time for a change to `current`: now, but always after the version it replaces, so the
/// change wins over it even when the stored `updatedAt` came from a clock ahead of ours.
fn next_time(current: Option<&StoredRecord>) -> i64 {
    let now = now_ms();
    match current.and_then(|r| r.updated_at_ms) {
        Some(t) if t >= now => t + 1,
        _ => now,
    }
}

async fn read(state: &ApiState, side: Side, collection: &str, id: &str) -> Result<Slot, ApiError> {
    let mut slots = state
        .writer(side)
        .read(collection, &[id.to_string()])
        .await
        .map_err(ApiError::store)?;
    Ok(slots.pop().unwrap_or(Slot::Absent))
}

async fn apply(
    state: &ApiState,
    side: Side,
    collection: &str,
    w: Write,
) -> Result<ApplyOutcome, ApiError> {
    let mut out = state
        .writer(side)
        .apply(collection, std::slice::from_ref(&w))
        .await
        .map_err(ApiError::store)?;
    Ok(out.pop().unwrap_or(ApplyOutcome::Conflict))
}

fn present(slot: Slot, collection: &str, id: &str) -> Result<Option<StoredRecord>, ApiError> {
    match slot {
        Slot::Present(r) => Ok(Some(r)),
        Slot::Absent => Ok(None),
        Slot::Invalid(reason) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_record",
            format!("{collection}/{id} holds something that is not a record: {reason}"),
        )),
    }
}

fn not_found(side: Side, collection: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("no record {collection}/{id} in the {side} store"))
}

fn rejected(reason: String) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "rejected",
        format!("the store refused the record: {reason}"),
    )
}

fn contended(collection: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "concurrent_write",
        format!("{collection}/{id} kept changing under this request; try again"),
    )
}

fn document(doc: Value) -> Document {
    match doc {
        Value::Object(map) => Document(map),
        other => Document(Map::from_iter([("value".to_string(), other)])),
    }
}

/// Creates a record with a new UUID v4 `uid` and answers 201 with the stored document.
async fn create(
    state: &ApiState,
    api: ApiVersion,
    name: &str,
    body: Document,
) -> Result<Response, ApiError> {
    let collection = resolve(state, name)?;
    let side = api.side();
    let id = uuid::Uuid::new_v4().to_string();
    let mut doc = body.0;
    doc.insert(UID_FIELD.into(), Value::String(id.clone()));
    let at = now_ms();
    let doc = with_updated_at(Value::Object(doc), at);
    match apply(
        state,
        side,
        &collection,
        write(side, &collection, &id, Some(doc.clone()), at, None),
    )
    .await?
    {
        ApplyOutcome::Applied | ApplyOutcome::Unchanged => {}
        ApplyOutcome::Conflict => return Err(contended(&collection, &id)),
        ApplyOutcome::Rejected(reason) | ApplyOutcome::Deferred(reason) => {
            return Err(rejected(reason));
        }
    }
    let mut headers = HeaderMap::new();
    let prefix = if name == "customer" {
        "customer".to_string()
    } else {
        format!("records/{collection}")
    };
    let api_name = match api {
        ApiVersion::V1 => "v1",
        ApiVersion::V2 => "v2",
    };
    if let Ok(v) = HeaderValue::from_str(&format!("/{api_name}/{prefix}/{id}")) {
        headers.insert(header::LOCATION, v);
    }
    Ok((StatusCode::CREATED, headers, axum::Json(document(doc))).into_response())
}

async fn get_one(
    state: &ApiState,
    api: ApiVersion,
    name: &str,
    id: &str,
) -> Result<axum::Json<Document>, ApiError> {
    let collection = resolve(state, name)?;
    check_id(id)?;
    let side = api.side();
    match present(read(state, side, &collection, id).await?, &collection, id)? {
        Some(r) => Ok(axum::Json(document(r.doc))),
        None => Err(not_found(side, &collection, id)),
    }
}

/// Replaces the fields given (keeping the others), bumps `updatedAt`.
async fn update(
    state: &ApiState,
    api: ApiVersion,
    name: &str,
    id: &str,
    body: Document,
) -> Result<axum::Json<Document>, ApiError> {
    let collection = resolve(state, name)?;
    check_id(id)?;
    let side = api.side();
    for _ in 0..WRITE_ROUNDS {
        let Some(current) = present(read(state, side, &collection, id).await?, &collection, id)?
        else {
            return Err(not_found(side, &collection, id));
        };
        let mut doc = match current.doc.clone() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        for (k, v) in body.0.iter() {
            if k != UID_FIELD && k != UPDATED_AT_FIELD {
                doc.insert(k.clone(), v.clone());
            }
        }
        let at = next_time(Some(&current));
        let doc = with_updated_at(Value::Object(doc), at);
        let w = write(
            side,
            &collection,
            id,
            Some(doc.clone()),
            at,
            Some(current.etag.clone()),
        );
        match apply(state, side, &collection, w).await? {
            ApplyOutcome::Applied | ApplyOutcome::Unchanged => {
                return Ok(axum::Json(document(doc)));
            }
            ApplyOutcome::Conflict => continue,
            ApplyOutcome::Rejected(reason) | ApplyOutcome::Deferred(reason) => {
                return Err(rejected(reason));
            }
        }
    }
    Err(contended(&collection, id))
}

async fn remove(
    state: &ApiState,
    api: ApiVersion,
    name: &str,
    id: &str,
) -> Result<StatusCode, ApiError> {
    let collection = resolve(state, name)?;
    check_id(id)?;
    let side = api.side();
    for _ in 0..WRITE_ROUNDS {
        let Some(current) = present(read(state, side, &collection, id).await?, &collection, id)?
        else {
            return Err(not_found(side, &collection, id));
        };
        let at = next_time(Some(&current));
        let w = write(side, &collection, id, None, at, Some(current.etag.clone()));
        match apply(state, side, &collection, w).await? {
            ApplyOutcome::Applied | ApplyOutcome::Unchanged => return Ok(StatusCode::NO_CONTENT),
            ApplyOutcome::Conflict => continue,
            ApplyOutcome::Rejected(reason) | ApplyOutcome::Deferred(reason) => {
                return Err(rejected(reason));
            }
        }
    }
    Err(contended(&collection, id))
}

/// Scan pages a list may skip over when they come back empty (Redis SCAN does that).
const EMPTY_PAGES: usize = 64;

async fn list(
    state: &ApiState,
    api: ApiVersion,
    name: &str,
    q: ListQuery,
) -> Result<axum::Json<RecordPage>, ApiError> {
    let collection = resolve(state, name)?;
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(
                "bad_limit",
                format!("limit {n} is outside 1..={MAX_LIMIT}"),
            ));
        }
    };
    let mut cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::bad_request("bad_cursor", "cursor is not one this API handed out")
                })?,
        ),
    };
    let store = state.writer(api.side());
    for _ in 0..EMPTY_PAGES {
        let page = store
            .scan(&collection, None, cursor.clone(), limit)
            .await
            .map_err(ApiError::store)?;
        if page.records.is_empty() && page.next.is_some() {
            cursor = page.next;
            continue;
        }
        return Ok(axum::Json(RecordPage {
            records: page
                .records
                .into_iter()
                .map(|r| RecordItem {
                    id: r.id,
                    doc: document(r.doc),
                })
                .collect(),
            next: page.next.map(hex::encode),
        }));
    }
    Ok(axum::Json(RecordPage {
        records: Vec::new(),
        next: cursor.map(hex::encode),
    }))
}

type St = State<Arc<ApiState>>;

/// Creates a customer.
#[utoipa::path(post, path = "/{api}/customer", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store")),
    request_body = Document,
    responses(
        (status = 201, description = "Created; the stored document", body = Document),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown API or collection", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Not a JSON object, or refused by the store", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn create_customer(
    State(s): St,
    ApiPath(api): ApiPath<ApiVersion>,
    ApiJson(body): ApiJson<Document>,
) -> Result<Response, ApiError> {
    create(&s, api, "customer", body).await
}

/// Reads a customer.
#[utoipa::path(get, path = "/{api}/customer/{uid}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("uid" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    responses(
        (status = 200, description = "The stored document", body = Document),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 409, description = "The stored value is not a record", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn get_customer(
    State(s): St,
    ApiPath((api, uid)): ApiPath<(ApiVersion, String)>,
) -> Result<axum::Json<Document>, ApiError> {
    get_one(&s, api, "customer", &uid).await
}

/// Replaces the fields given on a customer.
#[utoipa::path(put, path = "/{api}/customer/{uid}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("uid" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    request_body = Document,
    responses(
        (status = 200, description = "The stored document", body = Document),
        (status = 400, description = "Bad id or malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 409, description = "Kept changing concurrently, or not a record", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Not a JSON object, or refused by the store", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn put_customer(
    State(s): St,
    ApiPath((api, uid)): ApiPath<(ApiVersion, String)>,
    ApiJson(body): ApiJson<Document>,
) -> Result<axum::Json<Document>, ApiError> {
    update(&s, api, "customer", &uid, body).await
}

/// Deletes a customer.
#[utoipa::path(delete, path = "/{api}/customer/{uid}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("uid" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
        (status = 409, description = "Kept changing concurrently, or not a record", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn delete_customer(
    State(s): St,
    ApiPath((api, uid)): ApiPath<(ApiVersion, String)>,
) -> Result<StatusCode, ApiError> {
    remove(&s, api, "customer", &uid).await
}

/// Lists customers a page at a time.
#[utoipa::path(get, path = "/{api}/customers", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"), ListQuery),
    responses(
        (status = 200, description = "One page", body = RecordPage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown API or collection", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn list_customers(
    State(s): St,
    ApiPath(api): ApiPath<ApiVersion>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<axum::Json<RecordPage>, ApiError> {
    list(&s, api, "customer", q).await
}

/// Creates a record in any configured collection.
#[utoipa::path(post, path = "/{api}/records/{collection}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("collection" = String, Path, description = "A configured collection; `customer` stands for `customers`")),
    request_body = Document,
    responses(
        (status = 201, description = "Created; the stored document", body = Document),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown API or collection", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Not a JSON object, or refused by the store", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn create_record(
    State(s): St,
    ApiPath((api, collection)): ApiPath<(ApiVersion, String)>,
    ApiJson(body): ApiJson<Document>,
) -> Result<Response, ApiError> {
    create(&s, api, &collection, body).await
}

/// Lists a collection a page at a time.
#[utoipa::path(get, path = "/{api}/records/{collection}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("collection" = String, Path, description = "A configured collection; `customer` stands for `customers`"),
           ListQuery),
    responses(
        (status = 200, description = "One page", body = RecordPage),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown API or collection", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn list_records(
    State(s): St,
    ApiPath((api, collection)): ApiPath<(ApiVersion, String)>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<axum::Json<RecordPage>, ApiError> {
    list(&s, api, &collection, q).await
}

/// Reads a record.
#[utoipa::path(get, path = "/{api}/records/{collection}/{id}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("collection" = String, Path, description = "A configured collection"),
           ("id" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    responses(
        (status = 200, description = "The stored document", body = Document),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record or collection", body = ErrorBody),
        (status = 409, description = "The stored value is not a record", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn get_record(
    State(s): St,
    ApiPath((api, collection, id)): ApiPath<(ApiVersion, String, String)>,
) -> Result<axum::Json<Document>, ApiError> {
    get_one(&s, api, &collection, &id).await
}

/// Replaces the fields given on a record.
#[utoipa::path(put, path = "/{api}/records/{collection}/{id}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("collection" = String, Path, description = "A configured collection"),
           ("id" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    request_body = Document,
    responses(
        (status = 200, description = "The stored document", body = Document),
        (status = 400, description = "Bad id or malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record or collection", body = ErrorBody),
        (status = 409, description = "Kept changing concurrently, or not a record", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Not a JSON object, or refused by the store", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn put_record(
    State(s): St,
    ApiPath((api, collection, id)): ApiPath<(ApiVersion, String, String)>,
    ApiJson(body): ApiJson<Document>,
) -> Result<axum::Json<Document>, ApiError> {
    update(&s, api, &collection, &id, body).await
}

/// Deletes a record.
#[utoipa::path(delete, path = "/{api}/records/{collection}/{id}", tag = "records",
    params(("api" = ApiVersion, Path, description = "v1: the local store; v2: the cloud store"),
           ("collection" = String, Path, description = "A configured collection"),
           ("id" = String, Path, description = "Record id", pattern = "^[A-Za-z0-9._~:@-]{1,128}$")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such record or collection", body = ErrorBody),
        (status = 409, description = "Kept changing concurrently, or not a record", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ))]
pub async fn delete_record(
    State(s): St,
    ApiPath((api, collection, id)): ApiPath<(ApiVersion, String, String)>,
) -> Result<StatusCode, ApiError> {
    remove(&s, api, &collection, &id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_plain_keys() {
        for ok in ["42", "0b1f-x", "a.b", "user@example.com", "x:y", "~"] {
            check_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a b", "a/b", "a*", "é", &"x".repeat(129)] {
            assert_eq!(
                check_id(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
    }
}
