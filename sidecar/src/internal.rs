//! The filter's API: reservations and batched settlements. Not routed by the
//! public listener; optionally guarded by a shared secret header as well.

use axum::extract::State;
use bridge_protocol::{
    LeaseClose, LeaseProgress, LeaseReply, LeaseRequest, RawSettleBatch, ReserveReply, ReserveRequest, SettleOutcome,
    SettleRecord, SettleReply, SettleResult,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{AppError, Json};
use crate::ledger::Decision;
use crate::AppState;

#[tracing::instrument(skip_all, fields(request_id = %req.request_id))]
pub async fn reserve(
    State(state): State<AppState>,
    Json(req): Json<ReserveRequest>,
) -> Result<Json<ReserveReply>, AppError> {
    req.validate()?;
    let store = state.store.clone();
    let task_req = req.clone();
    let started = std::time::Instant::now();
    // A tracked task: a hold is either made and answered, or not made, never
    // cut halfway by a caller that hung up or by shutdown.
    let decision = state
        .tasks
        .spawn(async move { store.reserve(&task_req).await })
        .await
        .map_err(|e| AppError::Internal(format!("reservation task: {e}")))??;
    state.metrics.ledger("reserve", started.elapsed());
    count_refusal(&state, &decision);
    let reply = match decision {
        Decision::Granted { balance_tokens, policy, .. } => ReserveReply::Admit { balance_tokens, policy },
        Decision::Refused(why) => {
            let (status, error) = crate::refusal::reply(&why);
            ReserveReply::Refuse { status, error }
        }
        Decision::Retry => ReserveReply::Retry,
    };
    match &reply {
        ReserveReply::Admit { balance_tokens, .. } => {
            tracing::debug!(
                estimate = req.estimate,
                balance_tokens,
                ms = started.elapsed().as_millis() as u64,
                "reserved"
            )
        }
        ReserveReply::Refuse { status, error } => {
            tracing::info!(status, code = ?error.code, estimate = req.estimate, "reservation refused")
        }
        ReserveReply::Retry => tracing::debug!(estimate = req.estimate, "reservation waits for recalled leases"),
    }
    Ok(Json(reply))
}

#[tracing::instrument(skip_all, fields(lease_id = %req.lease_id))]
pub async fn lease(State(state): State<AppState>, Json(req): Json<LeaseRequest>) -> Result<Json<LeaseReply>, AppError> {
    req.validate()?;
    let store = state.store.clone();
    let task_req = req.clone();
    let started = std::time::Instant::now();
    // Tracked, as a reservation: granted and answered, or not granted.
    let decision = state
        .tasks
        .spawn(async move {
            if let Some(close) = &task_req.replaces {
                store.close_leases(std::slice::from_ref(close)).await?;
            }
            store.lease(&task_req).await
        })
        .await
        .map_err(|e| AppError::Internal(format!("lease task: {e}")))??;
    state.metrics.ledger("lease", started.elapsed());
    count_refusal(&state, &decision);
    let reply = match decision {
        Decision::Granted { tokens, balance_tokens, policy } => LeaseReply::Grant { tokens, balance_tokens, policy },
        Decision::Refused(why) => {
            let (status, error) = crate::refusal::reply(&why);
            LeaseReply::Refuse { status, error }
        }
        Decision::Retry => LeaseReply::Retry,
    };
    match &reply {
        LeaseReply::Grant { tokens, balance_tokens, .. } => {
            tracing::debug!(tokens, balance_tokens, ms = started.elapsed().as_millis() as u64, "lease granted")
        }
        LeaseReply::Refuse { status, error } => {
            tracing::info!(status, code = ?error.code, min = req.min, "lease refused")
        }
        LeaseReply::Retry => tracing::debug!(min = req.min, "lease not now; the request asks again"),
    }
    Ok(Json(reply))
}

#[tracing::instrument(skip_all, fields(records = batch.records.len(), closes = batch.closes.len()))]
pub async fn settle(
    State(state): State<AppState>,
    Json(batch): Json<RawSettleBatch>,
) -> Result<Json<SettleReply>, AppError> {
    batch.validate()?;
    let (records, unreadable_records) = decode_each::<SettleRecord>(batch.records, "request_id");
    let (closes, unreadable_closes) = decode_each::<LeaseClose>(batch.closes, "lease_id");
    // Unreadable progress reports are skipped: the next tick sends them again.
    let (progress, _) = decode_each::<LeaseProgress>(batch.progress, "lease_id");
    let changes_since = batch.changes_since;
    let store = state.store.clone();
    let metrics = state.metrics.clone();
    let span = tracing::Span::current();
    let started = std::time::Instant::now();
    // A tracked task: if Envoy hangs up mid-batch the batch still completes
    // (and is logged), and shutdown waits for it.
    let (results, closes, recalled, (changed, cursor)) = state
        .tasks
        .spawn(tracing::Instrument::instrument(
            async move {
                // Liveness before records (the filter sends them on lanes of
                // their own, so they never wait behind records anyway). A
                // close before its heartbeat: a closed lease reported after
                // its close is one whose gateway still has requests of it to
                // settle, and which is taken for lost if the gateway goes silent.
                // Each step timed on its own (`make bench` shows what each costs a request).
                let closes = merge(timed(&metrics, "close", store.close_leases(&closes)).await?, unreadable_closes);
                let recalled = timed(&metrics, "progress", store.report_progress(&progress)).await?;
                let changes = timed(&metrics, "changes", store.key_changes(changes_since)).await?;
                let results = merge(timed(&metrics, "records", store.settle(&records)).await?, unreadable_records);
                timed(&metrics, "owners", store.record_owners(&records, &results)).await;
                log_batch(&records, &results, &closes, started.elapsed());
                count_batch(&metrics, &records, &results);
                Ok::<_, AppError>((results, closes, recalled, changes))
            },
            span,
        ))
        .await
        .map_err(|e| AppError::Internal(format!("settlement task: {e}")))??;
    state.metrics.ledger("settle", started.elapsed());
    state.metrics.batch();
    Ok(Json(SettleReply { results, closes, recalled, changed, cursor: Some(cursor) }))
}

/// `step`, its latency added to the ledger histogram as `op`.
async fn timed<T>(
    metrics: &crate::metrics::Metrics,
    op: &'static str,
    step: impl std::future::Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    let out = step.await;
    metrics.ledger(op, started.elapsed());
    out
}

/// A refusal (or a retry) in the metrics, by reason.
fn count_refusal(state: &AppState, decision: &Decision) {
    use crate::ledger::Refusal;
    let reason = match decision {
        Decision::Granted { .. } => return,
        Decision::Retry => "retry",
        Decision::Refused(Refusal::UnknownKey) => "unknown_key",
        Decision::Refused(Refusal::Frozen { .. }) => "key_frozen",
        Decision::Refused(Refusal::Expired { .. }) => "key_expired",
        Decision::Refused(Refusal::ModelNotAllowed { .. }) => "model_not_allowed",
        Decision::Refused(Refusal::Busy) => "rate_limit_exceeded",
        Decision::Refused(Refusal::Insufficient { .. }) => "insufficient_quota",
    };
    state.metrics.refused(reason);
}

/// Decodes each item of a batch on its own. One it cannot read (a malformed
/// record, a field of the wrong type) is answered `invalid` alone, by the id
/// it carries if any, at its place in the batch.
fn decode_each<T: DeserializeOwned>(raw: Vec<Value>, id_field: &str) -> (Vec<T>, Vec<(usize, SettleResult)>) {
    let mut good = Vec::with_capacity(raw.len());
    let mut bad = Vec::new();
    for (i, item) in raw.into_iter().enumerate() {
        let id = item.get(id_field).and_then(Value::as_str).unwrap_or_default().to_owned();
        match serde_json::from_value(item) {
            Ok(t) => good.push(t),
            Err(e) => bad.push((
                i,
                SettleResult {
                    request_id: id,
                    outcome: SettleOutcome::Invalid,
                    message: Some(format!("unreadable: {e}")),
                },
            )),
        }
    }
    (good, bad)
}

/// The results of the readable items with the unreadable ones put back at their places.
fn merge(results: Vec<SettleResult>, unreadable: Vec<(usize, SettleResult)>) -> Vec<SettleResult> {
    let mut all = results;
    for (i, r) in unreadable {
        all.insert(i.min(all.len()), r);
    }
    all
}

/// A batch's outcomes and, for what settled now, its requests and tokens.
fn count_batch(metrics: &crate::metrics::Metrics, records: &[SettleRecord], results: &[SettleResult]) {
    for r in results {
        metrics.outcome(match r.outcome {
            SettleOutcome::Settled => "settled",
            SettleOutcome::AlreadySettled => "already_settled",
            SettleOutcome::Expired => "expired",
            SettleOutcome::Unknown => "unknown",
            SettleOutcome::Invalid => "invalid",
            SettleOutcome::Later => "later",
        });
    }
    for (record, result) in records.iter().zip(results) {
        if result.request_id == record.request_id && result.outcome == SettleOutcome::Settled {
            metrics.settled(&record.model, record.status_code, record.input_tokens, record.output_tokens);
        }
    }
}

fn log_batch(
    records: &[SettleRecord],
    results: &[bridge_protocol::SettleResult],
    closes: &[bridge_protocol::SettleResult],
    took: std::time::Duration,
) {
    let count = |o: SettleOutcome| results.iter().filter(|r| r.outcome == o).count();
    let tokens: i64 = records.iter().map(|r| r.input_tokens.saturating_add(r.output_tokens)).sum();
    // A tick with nothing to settle or close (progress reports, the change
    // read) comes five times a second from every gateway worker: not logged.
    if records.is_empty() && closes.is_empty() {
        tracing::debug!(ms = took.as_millis() as u64, "settlement tick");
        return;
    }
    tracing::info!(
        settled = count(SettleOutcome::Settled),
        already_settled = count(SettleOutcome::AlreadySettled),
        expired = count(SettleOutcome::Expired),
        unknown = count(SettleOutcome::Unknown),
        invalid = count(SettleOutcome::Invalid),
        later = count(SettleOutcome::Later),
        tokens,
        leases_closed = closes.iter().filter(|c| c.outcome == SettleOutcome::Settled).count(),
        ms = took.as_millis() as u64,
        "settlement batch"
    );
    for c in closes.iter().filter(|c| c.outcome != SettleOutcome::Settled) {
        tracing::info!(lease_id = %c.request_id, outcome = ?c.outcome, message = ?c.message, "lease close");
    }
    for r in results.iter().filter(|r| r.outcome == SettleOutcome::Invalid) {
        tracing::warn!(request_id = %r.request_id, message = ?r.message, "settlement record invalid");
    }
    for r in results.iter().filter(|r| r.outcome == SettleOutcome::Unknown) {
        tracing::info!(request_id = %r.request_id, message = ?r.message, "settlement found no hold");
    }
}

/// `POST /internal/response_owner`: the model of a stored response if the
/// asking key made it (`model: null` otherwise, or for one never seen).
#[tracing::instrument(skip_all)]
pub async fn response_owner(
    State(state): State<AppState>,
    Json(req): Json<bridge_protocol::OwnerRequest>,
) -> Result<Json<bridge_protocol::OwnerReply>, AppError> {
    if !bridge_protocol::valid_key_hash(&req.key_hash) || !bridge_protocol::valid_request_id(&req.response_id) {
        return Err(AppError::bad_request("key_hash or response_id is malformed.", Some("response_id")));
    }
    let refused = |why: &crate::ledger::Refusal| {
        let (status, error) = crate::refusal::reply(why);
        Json(bridge_protocol::OwnerReply {
            model: None,
            refused: Some(bridge_protocol::OwnerRefusal { status, error }),
        })
    };
    // The key's own rules first, as for a billed request: a made-up key is a
    // 401, a frozen or expired one refused, whoever's response it names.
    let allowed = match state.store.key_models(&req.key_hash).await? {
        Err(why) => return Ok(refused(&why)),
        Ok(allowed) => allowed,
    };
    let model = state.store.response_owner(&req.key_hash, &req.response_id).await?;
    if let (Some(m), Some(allowed)) = (&model, &allowed) {
        if !allowed.iter().any(|a| a == m) {
            return Ok(refused(&crate::ledger::Refusal::ModelNotAllowed {
                model: m.clone(),
                allowed: allowed.clone(),
            }));
        }
    }
    Ok(Json(bridge_protocol::OwnerReply { model, refused: None }))
}
