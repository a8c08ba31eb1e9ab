//! Entry point: settings, logging, MongoDB, serve until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use axum::serve::ListenerExt;
use openclaw_sidecar::config::Settings;
use openclaw_sidecar::{app, sweeper, AppState};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("openclaw-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let _log_guard = match openclaw_sidecar::logging::init(&settings.log_level, &settings.log_file) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("openclaw-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let state = AppState::from_settings(&settings)
        .await
        .map_err(|e| format!("cannot use MongoDB database {:?}: {e}", settings.mongodb_db))?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (SIDECAR_ADDR): {e}", settings.listen))?;
    let bound = listener.local_addr().map_err(|e| format!("cannot read the bound address: {e}"))?;
    tracing::info!(
        addr = %bound,
        db = %settings.mongodb_db,
        hold_ttl_secs = settings.hold_ttl.as_secs(),
        internal_token = settings.internal_token.is_some(),
        "sidecar listening"
    );
    let state_tasks = state.tasks.clone();
    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(sweeper::run(state.clone(), settings.sweep_interval, stop.clone()));
    // Replies are small and latency-bound: no Nagle delay on them.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal(stop.clone()))
        .await
        .map_err(|e| format!("server error: {e}"));
    // In-flight requests have finished; let the sweeper and every ledger write
    // still running (a caller may have left) finish too.
    stop.cancel();
    let _ = sweeper.await;
    state_tasks.close();
    state_tasks.wait().await;
    tracing::info!("sidecar stopped");
    result
}

async fn shutdown_signal(stop: CancellationToken) {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
    stop.cancel();
}
