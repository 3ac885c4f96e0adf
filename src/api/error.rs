//! API errors: every failure is a JSON body `{"error": "...", "detail": "..."}` with a status
//! that says whose fault it is. Anything a client sent (malformed JSON, a non-object body, an
//! unknown collection, an oversized body, a bad id, a missing token) is a 4xx; 5xx is kept for
//! a store that does not answer.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`bad_json`, `not_found`, `pass_running`, ...).
    pub error: String,
    /// What went wrong, for people.
    pub detail: String,
    /// With `pass_running`: the id of the pass already running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_id: Option<String>,
}

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with this status, code and detail.
    pub fn new(status: StatusCode, error: &str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_string(),
                detail: detail.into(),
                pass_id: None,
            },
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(error: &str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, error, detail)
    }

    /// 404: no such record, collection or route.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 503: a store did not answer. The detail is already redacted (store errors carry
    /// `redact_uri`'d URIs).
    pub fn store(e: anyhow::Error) -> ApiError {
        tracing::warn!(error = %format!("{e:#}"), "API request failed on a store");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e:#}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = r.status();
        let code = match &r {
            JsonRejection::JsonSyntaxError(_) => "bad_json",
            JsonRejection::JsonDataError(_) => "bad_body",
            JsonRejection::MissingJsonContentType(_) => "not_json",
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            _ => "bad_body",
        };
        // Never a 5xx for what the client sent.
        let status = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::not_found(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request("bad_query", r.body_text())
    }
}
