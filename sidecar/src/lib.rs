//! The billing sidecar: an axum service over MongoDB that holds and settles
//! token balances for the Envoy filter and serves the seed's `/admin` API.
//!
//! `app(state)` builds the router so tests can serve it on port 0; `main.rs`
//! only reads settings, connects and serves.

pub mod admin;
pub mod config;
pub mod error;
pub mod internal;
pub mod keys;
pub mod logging;
pub mod store;
pub mod sweeper;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use sha2::{Digest, Sha256};

use crate::config::{Secret, Settings};
use crate::error::{AppError, Json};
use crate::store::Store;

/// Shared state: cheap to clone, everything inside is an `Arc` or small.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    /// Ledger writes run as tracked tasks: a caller that disconnects cannot cut
    /// one short, and shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// SHA-256 of the admin token: comparing digests of equal length in constant
    /// time leaks neither the token's content nor its length.
    admin_digest: [u8; 32],
    internal_token: Option<Secret>,
}

impl AppState {
    pub fn new(store: Store, admin_token: &Secret, internal_token: Option<Secret>) -> Self {
        Self {
            store,
            tasks: tokio_util::task::TaskTracker::new(),
            admin_digest: Sha256::digest(admin_token.expose().as_bytes()).into(),
            internal_token,
        }
    }

    /// Connects to MongoDB and creates the indexes.
    pub async fn from_settings(settings: &Settings) -> Result<Self, AppError> {
        let store = Store::connect(settings.mongodb_uri.expose(), &settings.mongodb_db, settings.hold_ttl).await?;
        store.ensure_indexes().await?;
        Ok(Self::new(store, &settings.admin_token, settings.internal_token.clone()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = bearer(request.headers()).map(|t| Sha256::digest(t.as_bytes()));
    match presented {
        Some(d) if constant_time_eq(&d, &state.admin_digest) => next.run(request).await,
        _ => {
            tracing::info!(path = %request.uri().path(), "admin call refused: bad token");
            AppError::Unauthorized.into_response()
        }
    }
}

async fn require_internal(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.internal_token {
        let presented = request
            .headers()
            .get(bridge_protocol::INTERNAL_TOKEN_HEADER)
            .map(|v| Sha256::digest(v.as_bytes()));
        let wanted = Sha256::digest(expected.expose().as_bytes());
        if !presented.is_some_and(|p| constant_time_eq(&p, &wanted)) {
            // 403, not 401: the caller is the filter, and a refusal here is a
            // deployment fault the filter turns into 503.
            return (
                axum::http::StatusCode::FORBIDDEN,
                Json(bridge_protocol::ErrorEnvelope::new(
                    "internal API: missing or wrong shared secret",
                    "permission_error",
                    None,
                    None,
                )),
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    state.store.ping().await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

async fn not_found() -> AppError {
    AppError::NotFound("Unknown path.".into())
}

async fn method_not_allowed() -> Response {
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        Json(bridge_protocol::ErrorEnvelope::new(
            "Method not allowed on this path.",
            "invalid_request_error",
            None,
            Some("method_not_allowed"),
        )),
    )
        .into_response()
}

/// The whole HTTP surface of the sidecar.
pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/keys", post(admin::create_key).get(admin::list_keys))
        .route("/admin/keys/{api_key}", patch(admin::patch_key))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let internal = Router::new()
        .route(bridge_protocol::RESERVE_PATH, post(internal::reserve))
        .route(bridge_protocol::LEASE_PATH, post(internal::lease))
        .route(bridge_protocol::SETTLE_PATH, post(internal::settle))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_internal));
    Router::new()
        .merge(admin)
        .merge(internal)
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn bearer_is_case_insensitive_on_the_scheme() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer tok".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, "Basic tok".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer(&h), None);
    }
}
