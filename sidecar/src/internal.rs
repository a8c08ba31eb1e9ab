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
    let store = state.store.clone();
    let task_req = req.clone();
    // A tracked task: a hold is either made and answered, or not made, never
    // cut halfway by a caller that hung up or by shutdown.
    let reply = state
        .tasks
        .spawn(async move { store.reserve(&task_req).await })
        .await
        .map_err(|e| AppError::Internal(format!("reservation task: {e}")))??;
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
    let store = state.store.clone();
    let span = tracing::Span::current();
    // A tracked task: if Envoy hangs up mid-batch the batch still completes
    // (and is logged), and shutdown waits for it.
    let results = state
        .tasks
        .spawn(tracing::Instrument::instrument(
            async move {
                let results = store.settle(&batch.records).await?;
                log_batch(&batch, &results);
                Ok::<_, AppError>(results)
            },
            span,
        ))
        .await
        .map_err(|e| AppError::Internal(format!("settlement task: {e}")))??;
    Ok(Json(SettleReply { results }))
}

fn log_batch(batch: &SettleBatch, results: &[bridge_protocol::SettleResult]) {
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
    for r in results.iter().filter(|r| r.outcome == SettleOutcome::Invalid) {
        tracing::warn!(request_id = %r.request_id, message = ?r.message, "settlement record invalid");
    }
    for r in results.iter().filter(|r| r.outcome == SettleOutcome::Unknown) {
        tracing::info!(request_id = %r.request_id, message = ?r.message, "settlement found no hold");
    }
}
