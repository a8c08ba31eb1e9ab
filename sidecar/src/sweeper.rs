//! Background upkeep of the ledger: charge holds nobody settled (an Envoy
//! restart, a lost queue) and write audit rows a crash left in an outbox.

use tokio_util::sync::CancellationToken;

use crate::AppState;

/// One pass; returns (holds expired, outbox rows flushed).
pub async fn sweep_once(state: &AppState) -> Result<(usize, usize), crate::error::AppError> {
    let expired = state.store.expire_holds().await?;
    state.metrics.expired(expired);
    let flushed = state.store.flush_outboxes().await?;
    Ok((expired, flushed))
}

/// Runs until `stop` is cancelled; a pass in progress finishes first.
pub async fn run(state: AppState, interval: std::time::Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match sweep_once(&state).await {
            Ok((0, 0)) => {}
            Ok((expired, flushed)) => tracing::info!(expired, flushed, "sweeper finalised ledger entries"),
            Err(e) => tracing::warn!(error = %e, "sweeper pass failed; will retry"),
        }
    }
}
