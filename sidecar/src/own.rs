//! `GET /v1/key`: a key's own view, with the user's key and no admin token —
//! its masked key, owner, true balance, what is held, status, and its usage
//! today and this month (UTC). `GET /v1/models` and `/v1/models/{id}`: the
//! models the gateway serves that the key may use. Envoy routes these to the
//! sidecar past the filter; for the models it names what it serves in
//! `x-bridge-served-models`.

use axum::extract::{Path, State};
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

/// The header in which Envoy names the models it serves (comma-separated;
/// set by its route, overwriting whatever a client sent).
pub const SERVED_MODELS_HEADER: &str = "x-bridge-served-models";

/// The served models the key may use, or the refusal of the key.
async fn usable_models(state: &AppState, headers: &HeaderMap) -> Result<Result<Vec<String>, Response>, AppError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(key) = bridge_protocol::client_key(header("authorization"), header("api-key")) else {
        return Ok(Err(refusal(&Refusal::UnknownKey)));
    };
    let allowed = match state.store.key_models(&bridge_protocol::key_hash(key)).await? {
        Ok(allowed) => allowed,
        Err(why) => return Ok(Err(refusal(&why))),
    };
    let served = header(SERVED_MODELS_HEADER).unwrap_or_default();
    Ok(Ok(served
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .filter(|m| allowed.as_ref().is_none_or(|a| a.iter().any(|x| x == m)))
        .map(str::to_owned)
        .collect()))
}

fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "openclaw-llm-bridge"})
}

/// `GET /v1/models`: what the gateway serves, less what the key's
/// `allowed_models` leaves out.
#[tracing::instrument(skip_all)]
pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, AppError> {
    Ok(match usable_models(&state, &headers).await? {
        Ok(models) => {
            let data: Vec<_> = models.iter().map(|m| model_object(m)).collect();
            (StatusCode::OK, Json(json!({"object": "list", "data": data}))).into_response()
        }
        Err(refused) => refused,
    })
}

/// `GET /v1/models/{id}`: one model, or `404 model_not_found` for a model
/// the gateway does not serve or the key may not use (as OpenAI answers both).
#[tracing::instrument(skip_all)]
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    Ok(match usable_models(&state, &headers).await? {
        Ok(models) if models.contains(&id) => (StatusCode::OK, Json(model_object(&id))).into_response(),
        Ok(_) => {
            let message = format!("The model '{id}' does not exist or you do not have access to it.");
            let error = bridge_protocol::ErrorEnvelope::new(
                message,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            );
            (StatusCode::NOT_FOUND, Json(error)).into_response()
        }
        Err(refused) => refused,
    })
}

fn refusal(why: &Refusal) -> Response {
    let (status, error) = crate::refusal::reply(why);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
    (status, Json(bridge_protocol::ErrorEnvelope { error })).into_response()
}
