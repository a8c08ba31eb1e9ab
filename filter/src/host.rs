//! What the filter needs from its host, as two traits: `Host` for what every
//! context can do (clock, shared data, callouts, the lease queue, the gauge) and
//! `HttpHost` for what a request context adds (its headers, bodies and replies).
//!
//! `plugin` implements both over `proxy_wasm` host calls; the tests implement
//! them in memory (`fake`), so every state transition of a request and of the
//! root's background work runs natively and under WASI without Envoy.

use serde::de::DeserializeOwned;

use crate::config::PluginConfig;

/// Host calls shared by the root and the request contexts.
pub trait Host {
    /// Milliseconds since the epoch, from the host's clock.
    fn now_ms(&self) -> u64;
    /// The value under `key` in Envoy shared data and its compare-and-swap
    /// token; `(None, None)` when there is none.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` under `key` if nobody wrote since `cas` was read (any
    /// time when `cas` is `None`). `false` when the compare-and-swap lost.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Sends an HTTP call to an Envoy cluster; its reply comes back to the
    /// calling context under the returned token.
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String>;
    /// `:status` of the call reply being delivered.
    fn call_status(&self) -> Option<String>;
    /// Body of the call reply being delivered.
    fn call_body(&self, size: usize) -> Vec<u8>;
    /// Hands a background lease request to the root contexts.
    fn enqueue_lease_ask(&self, bytes: &[u8]) -> bool;
    /// The next background lease request, if one is waiting.
    fn dequeue_lease_ask(&self) -> Option<Vec<u8>>;
    /// Adds `delta` to a gauge.
    fn add_to_gauge(&self, gauge: crate::metrics::Gauge, delta: i64) -> bool;
    /// Adds `value` to a counter, or records it in a histogram.
    fn metric(&self, metric: crate::metrics::Metric, value: u64);
}

/// Host calls of one request.
pub trait HttpHost: Host {
    fn request_header(&self, name: &str) -> Option<String>;
    /// All request headers, names in lower case, in one host call.
    fn request_headers(&self) -> Vec<(String, String)>;
    /// Sets (or with `None` removes) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>);
    fn request_body(&self, size: usize) -> Vec<u8>;
    fn set_request_body(&self, size: usize, body: &[u8]);
    /// Answers the client locally; nothing goes upstream.
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Lets a request paused in a callout go on upstream.
    fn resume_request(&self);
    /// All response headers, names in lower case, in one host call.
    fn response_headers(&self) -> Vec<(String, String)>;
    fn set_response_header(&self, name: &str, value: Option<&str>);
    fn add_response_header(&self, name: &str, value: &str);
    fn response_body(&self, size: usize) -> Vec<u8>;
    fn set_response_body(&self, size: usize, body: &[u8]);
    /// The address of the upstream host that answered (Envoy's
    /// `upstream.address`): which deployment of a pool served the request.
    fn upstream_address(&self) -> Option<String>;
}

/// What a callback tells the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// POSTs JSON to the sidecar's internal API.
pub fn call_sidecar(
    host: &impl Host,
    cfg: &PluginConfig,
    path: &str,
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, String> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", cfg.sidecar_authority.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(t) = &cfg.internal_token {
        headers.push((bridge_protocol::INTERNAL_TOKEN_HEADER, t.expose()));
    }
    host.dispatch(&cfg.sidecar_cluster, &headers, body, timeout_ms)
}

/// Why a sidecar reply could not be used. Either way the call may have
/// reached the sidecar (a timeout shows as 504, a reset after sending as 503),
/// so whatever it may have granted is to be given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadReply {
    Status(Option<String>),
    Unreadable(String),
}

impl std::fmt::Display for BadReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadReply::Status(s) => write!(f, "answered {s:?}"),
            BadReply::Unreadable(e) => write!(f, "unreadable reply: {e}"),
        }
    }
}

/// The sidecar's reply being delivered, decoded: only a 200 carries one.
pub fn sidecar_reply<T: DeserializeOwned>(host: &impl Host, body_size: usize) -> Result<T, BadReply> {
    let status = host.call_status();
    if status.as_deref() != Some("200") {
        return Err(BadReply::Status(status));
    }
    serde_json::from_slice(&host.call_body(body_size)).map_err(|e| BadReply::Unreadable(e.to_string()))
}
