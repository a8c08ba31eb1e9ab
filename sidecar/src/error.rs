//! One error type for every handler, rendered as the OpenAI error object.
//! Server-side failures log their cause and show the client a generic message.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bridge_protocol::ErrorEnvelope;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict { message: String, code: &'static str },
    #[error("database error: {0}")]
    Database(#[from] mongodb::error::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The ledger's errors at the handler edge.
impl From<crate::ledger::LedgerError> for AppError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        use crate::ledger::LedgerError as L;
        match e {
            L::Database(e) => AppError::Database(e),
            L::Conflict { message, code } => AppError::Conflict { message, code },
            L::NotFound(m) => AppError::NotFound(m),
            L::Internal(m) => AppError::Internal(m),
        }
    }
}

/// An internal-API message that failed its `validate()`.
impl From<bridge_protocol::Invalid> for AppError {
    fn from(e: bridge_protocol::Invalid) -> Self {
        AppError::bad_request(e.message, Some(e.param))
    }
}

impl AppError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        AppError::BadRequest { message: message.into(), param: param.map(str::to_owned) }
    }

    fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            // The database being away is a temporary condition a client should retry.
            AppError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn envelope(&self) -> ErrorEnvelope {
        match self {
            AppError::BadRequest { message, param } => {
                ErrorEnvelope::new(message.clone(), "invalid_request_error", param.as_deref(), None)
            }
            AppError::Unauthorized => ErrorEnvelope::new(
                "Missing or invalid admin token in the Authorization header (Bearer <ADMIN_TOKEN>).",
                "invalid_request_error",
                None,
                Some("invalid_admin_token"),
            ),
            AppError::NotFound(message) => {
                ErrorEnvelope::new(message.clone(), "invalid_request_error", None, Some("not_found"))
            }
            AppError::Conflict { message, code } => {
                ErrorEnvelope::new(message.clone(), "invalid_request_error", None, Some(code))
            }
            AppError::Database(_) => ErrorEnvelope::new(
                "The billing database is unavailable; retry shortly.",
                "server_error",
                None,
                Some("service_unavailable"),
            ),
            AppError::Internal(_) => ErrorEnvelope::new("Internal server error.", "server_error", None, None),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.envelope())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `axum::Json` whose rejection is our OpenAI-shaped 400 instead of axum's plain text.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "Expected a JSON body with Content-Type: application/json.".to_owned()
            }
            JsonRejection::JsonSyntaxError(_) => {
                format!("The body is not valid JSON: {}", rejection.body_text())
            }
            _ => format!("Invalid JSON body: {}", rejection.body_text()),
        };
        AppError::bad_request(message, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_hide_their_cause() {
        let e = AppError::Internal("mongo password is hunter2".into());
        assert!(!e.envelope().error.message.contains("hunter2"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn bad_request_names_the_field() {
        let e = AppError::bad_request("balance_tokens must be >= 0", Some("balance_tokens"));
        let env = e.envelope();
        assert_eq!(env.error.param.as_deref(), Some("balance_tokens"));
        assert_eq!(env.error.kind, "invalid_request_error");
    }
}
