//! The billing sidecar: an axum service over MongoDB that holds and settles
//! token balances for the Envoy filter and serves the seed's `/admin` API.
//!
//! `app(state)` builds the router so tests can serve it on port 0; `main.rs`
//! only reads settings, connects and serves.

pub mod admin;
pub mod audit_api;
pub mod auth;
pub mod config;
pub mod console;
pub mod error;
pub mod internal;
pub mod keys;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod own;
pub mod refusal;
pub mod sweeper;

use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use sha2::{Digest, Sha256};

use crate::config::{Secret, Settings};
use crate::error::{AppError, Json};
use crate::ledger::Store;

/// Shared state: cheap to clone, everything inside is an `Arc` or small.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    /// Ledger writes run as tracked tasks: a caller that disconnects cannot cut
    /// one short, and shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// SHA-256 of the admin token: comparing digests of equal length in constant
    /// time leaks neither the token's content nor its length.
    pub(crate) admin_digest: [u8; 32],
    pub(crate) internal_token: Option<Secret>,
    /// What `/admin/metrics` shows.
    pub metrics: std::sync::Arc<metrics::Metrics>,
}

impl AppState {
    pub fn new(store: Store, admin_token: &Secret, internal_token: Option<Secret>) -> Self {
        Self {
            store,
            tasks: tokio_util::task::TaskTracker::new(),
            admin_digest: Sha256::digest(admin_token.expose().as_bytes()).into(),
            internal_token,
            metrics: std::sync::Arc::default(),
        }
    }

    /// Connects to MongoDB and creates the indexes.
    pub async fn from_settings(settings: &Settings) -> Result<Self, AppError> {
        let store = Store::connect(settings.mongodb_uri.expose(), &settings.mongodb_db, settings.hold_ttl)
            .await?
            .with_mark_ttl(settings.mark_ttl)
            .with_lease_policy(settings.leases);
        store.ensure_indexes().await?;
        Ok(Self::new(store, &settings.admin_token, settings.internal_token.clone()))
    }
}

async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    state.store.ping().await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

async fn metrics_text(State(state): State<AppState>) -> Result<Response, AppError> {
    let (leases, holds) = state.store.open_counts().await?;
    let text = state.metrics.render(leases, holds);
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
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
        .route("/admin/keys/{key}", patch(admin::patch_key))
        .route("/admin/audit_logs", get(audit_api::list))
        .route("/admin/usage", get(audit_api::usage))
        .route("/admin/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let internal = Router::new()
        .route(bridge_protocol::RESERVE_PATH, post(internal::reserve))
        .route(bridge_protocol::LEASE_PATH, post(internal::lease))
        .route(bridge_protocol::SETTLE_PATH, post(internal::settle))
        .route(bridge_protocol::OWNER_PATH, post(internal::response_owner))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_internal));
    Router::new()
        .merge(admin)
        .merge(internal)
        .merge(console::routes())
        .route("/healthz", get(healthz))
        .route("/v1/key", get(own::key_info))
        .route("/v1/models", get(own::list_models))
        .route("/v1/models/{id}", get(own::get_model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}
