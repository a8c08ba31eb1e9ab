//! The mock upstream as a program: `mock-upstream [ADDR]` (default 127.0.0.1:0).
//! Prints `mock upstream listening addr=HOST:PORT`; `MOCK_UPSTREAM_KEY` is the key it expects;
//! it keeps the last `MOCK_KEEP_REQUESTS` (1,000) requests for `GET /mock/requests`
//! (a benchmark sends millions, each with its body).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let key = std::env::var("MOCK_UPSTREAM_KEY").unwrap_or_else(|_| "mock-upstream-key".into());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-upstream: cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("mock upstream listening addr={a}"),
        Err(e) => eprintln!("mock-upstream: {e}"),
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    let stop = async {
        tokio::select! { _ = shutdown => {}, _ = term => {} }
    };
    // Stream chunks leave at once, as from a real API, not after a Nagle delay.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let keep = std::env::var("MOCK_KEEP_REQUESTS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000);
    match axum::serve(listener, bridge_tests::mock::app_keeping(&key, keep)).with_graceful_shutdown(stop).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-upstream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
