//! The filter's API: reservations and batched settlements. Not routed by the
//! public listener; optionally guarded by a shared secret header as well.

use axum::extract::State;
use bridge_protocol::{ReserveReply, ReserveRequest, SettleBatch, SettleOutcome, SettleReply, MAX_SETTLE_BATCH};

use crate::error::{AppError, Json};
use crate::AppState;

#[tracing::instrument(skip_all, fields(request_id = %req.request_id))]
pub async fn reserve(
    State(state): State<AppState>,
    Json(req): Json<ReserveRequest>,
) -> Result<Json<ReserveReply>, AppError> {
    if !bridge_protocol::valid_request_id(&req.request_id) {
        return Err(AppError::bad_request("request_id must match [A-Za-z0-9_-]{1,128}", Some("request_id")));
    }
    if !bridge_protocol::valid_key_hash(&req.key_hash) {
        return Err(AppError::bad_request("key_hash must be a SHA-256 hex digest", Some("key_hash")));
    }
    if req.estimate < 1 {
        return Err(AppError::bad_request("estimate must be >= 1", Some("estimate")));
    }
    let reply = state.store.reserve(&req).await?;
    match &reply {
        ReserveReply::Admit { balance_tokens } => {
            tracing::debug!(estimate = req.estimate, balance_tokens, "reserved")
        }
        ReserveReply::Refuse { status, error } => {
            tracing::info!(status, code = ?error.code, estimate = req.estimate, "reservation refused")
        }
    }
    Ok(Json(reply))
}

#[tracing::instrument(skip_all, fields(records = batch.records.len()))]
pub async fn settle(
    State(state): State<AppState>,
    Json(batch): Json<SettleBatch>,
) -> Result<Json<SettleReply>, AppError> {
    if batch.records.len() > MAX_SETTLE_BATCH {
        return Err(AppError::bad_request(
            format!("at most {MAX_SETTLE_BATCH} records per batch"),
            Some("records"),
        ));
    }
    let results = state.store.settle(&batch.records).await?;
    let count = |o: SettleOutcome| results.iter().filter(|r| r.outcome == o).count();
    let tokens: i64 = batch.records.iter().map(|r| r.input_tokens.saturating_add(r.output_tokens)).sum();
    tracing::info!(
        settled = count(SettleOutcome::Settled),
        already_settled = count(SettleOutcome::AlreadySettled),
        expired = count(SettleOutcome::Expired),
        unknown = count(SettleOutcome::Unknown),
        invalid = count(SettleOutcome::Invalid),
        tokens,
        "settlement batch"
    );
    for r in results.iter().filter(|r| matches!(r.outcome, SettleOutcome::Unknown | SettleOutcome::Invalid)) {
        tracing::warn!(request_id = %r.request_id, outcome = ?r.outcome, message = ?r.message, "settlement not applied");
    }
    Ok(Json(SettleReply { results }))
}
