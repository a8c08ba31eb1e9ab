//! The admin API of the seed: create, list, top up and freeze keys.
//! Bodies are checked field by field so every 400 names the field at fault.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::error::{AppError, Json};
use crate::keys;
use crate::ledger::{Controls, KeyStatus, KeyView, NewKey};
use crate::AppState;

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

fn object(body: Value) -> Result<Map<String, Value>, AppError> {
    match body {
        Value::Object(map) => Ok(map),
        _ => Err(AppError::bad_request("The body must be a JSON object.", None)),
    }
}

fn reject_unknown(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), AppError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(field) => Err(AppError::bad_request(
            format!("Unknown field '{field}'; allowed: {}.", allowed.join(", ")),
            Some(field),
        )),
        None => Ok(()),
    }
}

fn integer(map: &Map<String, Value>, field: &str) -> Result<Option<i64>, AppError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| AppError::bad_request(format!("{field} must be a whole number of tokens."), Some(field))),
        Some(_) => Err(AppError::bad_request(format!("{field} must be an integer."), Some(field))),
    }
}

fn string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, AppError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AppError::bad_request(format!("{field} must be a string."), Some(field))),
    }
}

fn status(map: &Map<String, Value>) -> Result<Option<KeyStatus>, AppError> {
    string(map, "status")?
        .map(|s| {
            KeyStatus::parse(s).ok_or_else(|| {
                AppError::bad_request(format!("status must be 'active' or 'frozen', not '{s}'."), Some("status"))
            })
        })
        .transpose()
}

/// Most models a key's list may name, and the longest name.
const MAX_MODELS: usize = 100;
const MAX_MODEL_LEN: usize = 256;

/// `allowed_models` and `expires_at` as a body gives them: absent leaves
/// each as it is, `null` clears it.
fn controls(map: &Map<String, Value>) -> Result<Controls, AppError> {
    let allowed_models = match map.get("allowed_models") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::Array(items)) => {
            let bad = || {
                AppError::bad_request(
                    format!("allowed_models must be a list of up to {MAX_MODELS} model names (1 to {MAX_MODEL_LEN} characters) or null."),
                    Some("allowed_models"),
                )
            };
            if items.is_empty() || items.len() > MAX_MODELS {
                return Err(bad());
            }
            let mut models = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(m) if !m.is_empty() && m.len() <= MAX_MODEL_LEN => models.push(m.to_owned()),
                    _ => return Err(bad()),
                }
            }
            Some(Some(models))
        }
        Some(_) => {
            return Err(AppError::bad_request(
                "allowed_models must be a list of model names or null.",
                Some("allowed_models"),
            ))
        }
    };
    let expires_at = match map.get("expires_at") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(mongodb::bson::DateTime::parse_rfc3339_str(s).map_err(|_| {
            AppError::bad_request(
                "expires_at must be an RFC 3339 time, e.g. 2027-01-01T00:00:00Z, or null.",
                Some("expires_at"),
            )
        })?)),
        Some(_) => {
            return Err(AppError::bad_request("expires_at must be an RFC 3339 time or null.", Some("expires_at")))
        }
    };
    let limit = |field: &str| -> Result<Option<Option<i64>>, AppError> {
        match map.get(field) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(n) if n >= 1 => Ok(Some(Some(n))),
                _ => Err(AppError::bad_request(format!("{field} must be a whole number >= 1, or null."), Some(field))),
            },
            Some(_) => {
                Err(AppError::bad_request(format!("{field} must be a whole number >= 1, or null."), Some(field)))
            }
        }
    };
    Ok(Controls { allowed_models, expires_at, rpm_limit: limit("rpm_limit")?, tpm_limit: limit("tpm_limit")? })
}

/// A `limit` query parameter: `default` when absent, else 1 to `max`.
pub(crate) fn page_limit(value: Option<&str>, default: i64, max: i64) -> Result<i64, AppError> {
    match value {
        None => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| AppError::bad_request(format!("limit must be 1 to {max}."), Some("limit"))),
    }
}

/// `POST /admin/keys`: `{api_key?, user_name, balance_tokens, status?}`.
#[tracing::instrument(skip_all)]
pub async fn create_key(
    State(state): State<AppState>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<KeyView>), AppError> {
    let map = object(body)?;
    reject_unknown(
        &map,
        &["api_key", "user_name", "balance_tokens", "status", "allowed_models", "expires_at", "rpm_limit", "tpm_limit"],
    )?;
    let controls = controls(&map)?;
    let user_name = string(&map, "user_name")?
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AppError::bad_request("user_name is required and may not be empty.", Some("user_name")))?;
    if user_name.chars().count() > 256 {
        return Err(AppError::bad_request("user_name is longer than 256 characters.", Some("user_name")));
    }
    let balance_tokens = integer(&map, "balance_tokens")?.unwrap_or(0);
    if balance_tokens < 0 {
        return Err(AppError::bad_request("balance_tokens must be >= 0.", Some("balance_tokens")));
    }
    let status = status(&map)?.unwrap_or(KeyStatus::Active);
    let (api_key, generated) = match string(&map, "api_key")? {
        Some(k) => {
            keys::validate_key(k)?;
            (k.to_owned(), false)
        }
        None => (keys::generate_key()?, true),
    };
    let view = state
        .store
        .create_key(NewKey { api_key, user_name: user_name.to_owned(), balance_tokens, status, controls }, generated)
        .await?;
    tracing::info!(key = %view.key_id, user = %view.user_name, balance_tokens, generated, "admin created key");
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    limit: Option<String>,
    offset: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct KeyList {
    object: &'static str,
    data: Vec<KeyView>,
    total: u64,
    limit: i64,
    offset: u64,
    has_more: bool,
}

/// `GET /admin/keys?limit=&offset=`: one page, oldest key first.
#[tracing::instrument(skip_all)]
pub async fn list_keys(
    State(state): State<AppState>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<KeyList>, AppError> {
    let Query(page) = query.map_err(|e| AppError::bad_request(e.body_text(), None))?;
    let limit = page_limit(page.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
    let offset = match page.offset.as_deref() {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| AppError::bad_request("offset must be a whole number >= 0.", Some("offset")))?,
    };
    let (data, total) = state.store.list_keys(limit, offset).await?;
    let has_more = offset.saturating_add(data.len() as u64) < total;
    tracing::info!(count = data.len(), offset, "admin listed keys");
    Ok(Json(KeyList { object: "list", data, total, limit, offset, has_more }))
}

/// `PATCH /admin/keys/{api_key or key_id}`: `balance_tokens` is added (negative
/// deducts, never below zero), `status` sets `active` or `frozen`. The
/// `key_id` form keeps the key out of URLs (and so out of every log).
#[tracing::instrument(skip_all)]
pub async fn patch_key(
    State(state): State<AppState>,
    Path(key_or_id): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<KeyView>, AppError> {
    let map = object(body)?;
    reject_unknown(&map, &["balance_tokens", "status", "allowed_models", "expires_at", "rpm_limit", "tpm_limit"])?;
    let delta = integer(&map, "balance_tokens")?;
    let status = status(&map)?;
    let controls = controls(&map)?;
    if delta.is_none() && status.is_none() && controls.is_empty() {
        return Err(AppError::bad_request(
            "Give balance_tokens (added to the balance), status, allowed_models, expires_at, rpm_limit and/or tpm_limit.",
            None,
        ));
    }
    let hash = state.store.resolve(&key_or_id).await?;
    let view = state.store.patch_key(&hash, delta, status, &controls).await?;
    tracing::info!(key = %view.key_id, delta = ?delta, status = ?status, balance = view.balance_tokens, "admin updated key");
    Ok(Json(view))
}
