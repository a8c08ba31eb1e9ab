//! `GET /v1/key`: a key's own view, with the user's key and no admin token —
//! its masked key, owner, true balance, what is held, status, and its usage
//! today and this month (UTC). Envoy routes it to the sidecar past the filter.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{AppError, Json};
use crate::ledger::Refusal;
use crate::AppState;

#[tracing::instrument(skip_all)]
pub async fn key_info(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, AppError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(key) = bridge_protocol::client_key(header("authorization"), header("api-key")) else {
        return Ok(refusal(&Refusal::UnknownKey));
    };
    let hash = bridge_protocol::key_hash(key);
    let Some((view, today, month)) = state.store.own_view(&hash).await? else {
        return Ok(refusal(&Refusal::UnknownKey));
    };
    let body = json!({
        "object": "api_key",
        "api_key": view.api_key,
        "key_id": view.key_id,
        "user_name": view.user_name,
        "balance_tokens": view.balance_tokens,
        "held_tokens": view.held_tokens,
        "status": view.status,
        "allowed_models": view.allowed_models,
        "expires_at": view.expires_at,
        "rpm_limit": view.rpm_limit,
        "tpm_limit": view.tpm_limit,
        "created_at": view.created_at,
        "usage": {"today": today, "month": month},
    });
    Ok((StatusCode::OK, Json(body)).into_response())
}

fn refusal(why: &Refusal) -> Response {
    let (status, error) = crate::refusal::reply(why);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
    (status, Json(bridge_protocol::ErrorEnvelope { error })).into_response()
}
