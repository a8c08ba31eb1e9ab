//! The proxy-wasm shell: `Host` over Envoy's host calls, and each callback
//! forwarded to the logic (`exchange` per request, `background` per VM).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::background::{Background, Vm};
use crate::config::PluginConfig;
use crate::exchange::Exchange;
use crate::host::{Flow, Host, HttpHost};
use crate::itemise::{time, Step};
use crate::metrics::{Gauge, Metric};
use crate::LEASE_QUEUE;

/// This VM's queue for waking its root when a request's callback woke
/// requests waiting for a lease.
const WAKE_QUEUE_PREFIX: &str = "openclaw_bridge_wake_";

proxy_wasm::main! {{
    // set_log_level also installs proxy-wasm's panic hook, which logs the panic
    // at critical before the VM traps.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, envoy: Envoy::default(), background: None, pending: Pending::default() })
    });
}}

/// Envoy's host calls for the current context, with the handles this VM registered.
#[derive(Debug, Clone, Copy, Default)]
struct Envoy {
    lease_queue: Option<u32>,
    wake_queue: Option<u32>,
    gauges: [Option<u32>; Gauge::ALL.len()],
    metrics: [Option<u32>; Metric::ALL.len()],
    /// Per step: its nanoseconds' and its times' counters (feature `itemise`).
    #[cfg(feature = "itemise")]
    steps: [Option<(u32, u32)>; Step::ALL.len()],
}

#[cfg(feature = "itemise")]
impl Envoy {
    fn define_steps(&mut self) {
        for step in Step::ALL {
            let counter = |what: &str| {
                let name = format!("openclaw_bridge_step_{}_{what}", step.name());
                hostcalls::define_metric(MetricType::Counter, &name).ok()
            };
            self.steps[step as usize] = counter("ns").zip(counter("n"));
        }
    }

    /// Adds this VM's step sums since the last tick to Envoy's counters.
    fn report_steps(&self) {
        for (step, ns, n) in crate::itemise::take() {
            if let Some((ns_id, n_id)) = self.steps[step as usize] {
                let _ = hostcalls::increment_metric(ns_id, i64::try_from(ns).unwrap_or(i64::MAX));
                let _ = hostcalls::increment_metric(n_id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

fn flow(f: Flow) -> Action {
    match f {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Host for Envoy {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], Duration::from_millis(timeout_ms))
            .map_err(|e| format!("{e:?}"))
    }
    fn call_status(&self) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten()
    }
    fn call_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size).ok().flatten().unwrap_or_default()
    }
    fn enqueue_lease_ask(&self, bytes: &[u8]) -> bool {
        self.lease_queue.is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(bytes)).is_ok())
    }
    fn dequeue_lease_ask(&self) -> Option<Vec<u8>> {
        hostcalls::dequeue_shared_queue(self.lease_queue?).ok().flatten()
    }
    fn metric(&self, metric: Metric, value: u64) {
        let Some(id) = self.metrics[metric.index()] else { return };
        let _ = match metric.is_histogram() {
            true => hostcalls::record_metric(id, value),
            false => hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX)),
        };
    }
    fn add_to_gauge(&self, gauge: Gauge, delta: i64) -> bool {
        self.gauges[gauge.index()].is_some_and(|g| hostcalls::increment_metric(g, delta).is_ok())
    }
}

impl HttpHost for Envoy {
    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
    }
    fn request_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }
    fn request_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).ok().flatten().unwrap_or_default()
    }
    fn set_request_body(&self, size: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body);
    }
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body));
    }
    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }
    fn response_headers(&self) -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpResponseHeaders).unwrap_or_default()
    }
    fn upstream_address(&self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["upstream", "address"]).ok().flatten()?;
        String::from_utf8(bytes).ok()
    }
    fn set_response_header(&self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }
    fn add_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }
    fn response_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size).ok().flatten().unwrap_or_default()
    }
    fn set_response_body(&self, size: usize, body: &[u8]) {
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body);
    }
}

/// The requests of this VM that wait for a lease or for a reply, by context
/// id: reachable from the root, which wakes them and passes replies on.
type Pending = Rc<RefCell<HashMap<u32, Rc<RefCell<Exchange>>>>>;

/// Runs the woken waiters of this VM, each as the effective context (so its
/// host calls act on its own stream). Only the root does this: a call a
/// woken request makes is then the root's to the SDK, which hands its reply
/// to the root, which passes it on ([`forward_reply`]). Run from a request's
/// callback instead, the reply would be lost with that request's context.
fn run_woken(vm: &Vm, pending: &Pending, envoy: &Envoy) {
    loop {
        let woken = vm.waits.borrow_mut().take_woken();
        if woken.is_empty() {
            break;
        }
        for id in woken {
            let Some(exchange) = pending.borrow().get(&id).cloned() else { continue };
            if hostcalls::set_effective_context(id).is_err() {
                pending.borrow_mut().remove(&id);
                continue;
            }
            let Ok(mut ex) = exchange.try_borrow_mut() else { continue };
            ex.on_woken(envoy);
            if !ex.is_pending() {
                pending.borrow_mut().remove(&id);
            }
        }
    }
}

/// A reply to a call a request made while the root ran it: handed to that
/// request (as the effective context). `false` when the call was not such.
fn forward_reply(vm: &Vm, pending: &Pending, envoy: &Envoy, own: u32, token: u32, body_size: usize) -> bool {
    let Some(caller) = vm.caller_of(token) else { return false };
    if caller == own {
        return false;
    }
    let Some(exchange) = pending.borrow().get(&caller).cloned() else { return true };
    if hostcalls::set_effective_context(caller).is_ok() {
        if let Ok(mut ex) = exchange.try_borrow_mut() {
            ex.on_call_response(envoy, token, body_size);
            if !ex.is_pending() {
                pending.borrow_mut().remove(&caller);
            }
        }
    }
    true
}

struct Root {
    context_id: u32,
    envoy: Envoy,
    /// Set once configured.
    background: Option<Background>,
    pending: Pending,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if let Some(bg) = &mut self.background {
            time(Step::Root, || {
                if !forward_reply(&bg.vm, &self.pending, &self.envoy, self.context_id, token, body_size) {
                    bg.on_call_response(&self.envoy, token, body_size);
                }
                run_woken(&bg.vm, &self.pending, &self.envoy);
            });
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(bg) = &mut self.background {
            bg.on_done(&self.envoy);
        }
        true
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            error!("[root {}] no plugin configuration given", self.context_id);
            return false;
        };
        let cfg = match PluginConfig::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                error!("[root {}] {e}", self.context_id);
                return false;
            }
        };
        match hostcalls::register_shared_queue(LEASE_QUEUE) {
            Ok(q) => self.envoy.lease_queue = Some(q),
            Err(e) => {
                error!("[root {}] cannot register the lease queue: {e:?}", self.context_id);
                return false;
            }
        }
        for g in Gauge::ALL {
            // Shown by Envoy as `wasmcustom.<name>`.
            self.envoy.gauges[g.index()] = hostcalls::define_metric(MetricType::Gauge, g.name()).ok();
        }
        #[cfg(feature = "itemise")]
        self.envoy.define_steps();
        for m in Metric::ALL {
            let kind = if m.is_histogram() { MetricType::Histogram } else { MetricType::Counter };
            self.envoy.metrics[m.index()] = hostcalls::define_metric(kind, m.name()).ok();
        }
        // This VM's own: a queue is Envoy-wide by name, and its notices go to one root.
        let wake = format!("{WAKE_QUEUE_PREFIX}{}", crate::new_request_id().unwrap_or_default());
        match hostcalls::register_shared_queue(&wake) {
            Ok(q) => self.envoy.wake_queue = Some(q),
            Err(e) => {
                warn!("[root {}] no wake queue ({e:?}): waiting requests look again on the tick", self.context_id)
            }
        }
        // Now, not on a request's turn: building it stalls this thread for ~0.5 s.
        let mut encodings: Vec<_> = cfg.catalog.iter().filter_map(|m| m.tiktoken_encoding).collect();
        encodings.dedup();
        for encoding in encodings {
            if !crate::tokens::warm(encoding) {
                error!("[root {}] the tokenizer's tables did not load; the fallback will estimate", self.context_id);
            }
        }
        self.set_tick_period(Duration::from_millis(cfg.settle_interval_ms));
        info!(
            "[root {}] configured: {} model(s) ({}), sidecar cluster {}, failure mode {:?}",
            self.context_id,
            cfg.catalog.len(),
            cfg.catalog.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
            cfg.sidecar_cluster,
            cfg.failure_mode
        );
        self.background = Some(Background::new(self.context_id, Rc::new(cfg)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(bg) = &mut self.background {
            time(Step::Root, || {
                bg.on_tick(&self.envoy);
                run_woken(&bg.vm, &self.pending, &self.envoy);
            });
        }
        #[cfg(feature = "itemise")]
        self.envoy.report_steps();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(bg) = &mut self.background {
            if Some(queue_id) == self.envoy.lease_queue {
                bg.ask_for_leases(&self.envoy);
            }
            if Some(queue_id) == self.envoy.wake_queue {
                while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
                run_woken(&bg.vm, &self.pending, &self.envoy);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let bg = self.background.as_ref()?;
        let exchange = Rc::new(RefCell::new(Exchange::new(context_id, bg.config.clone(), bg.vm.clone())));
        Some(Box::new(Gateway {
            context_id,
            envoy: self.envoy,
            exchange,
            vm: bg.vm.clone(),
            pending: self.pending.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Gateway {
    context_id: u32,
    envoy: Envoy,
    exchange: Rc<RefCell<Exchange>>,
    vm: Vm,
    pending: Pending,
}

impl Gateway {
    /// Runs one callback of this request, keeps it reachable while it is
    /// pending, and has the root run the requests the callback woke.
    fn with<T>(&mut self, f: impl FnOnce(&mut Exchange, &Envoy) -> T) -> T {
        let (out, pending) = {
            let mut ex = self.exchange.borrow_mut();
            let out = f(&mut ex, &self.envoy);
            (out, ex.is_pending())
        };
        if pending {
            self.pending.borrow_mut().insert(self.context_id, self.exchange.clone());
        } else if !self.pending.borrow().is_empty() {
            self.pending.borrow_mut().remove(&self.context_id);
        }
        if self.vm.waits.borrow().has_woken() {
            let poked = self.envoy.wake_queue.is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(b"")).is_ok());
            if !poked {
                // The root's next tick wakes them all.
                self.vm.waits.borrow_mut().wake_all();
            }
        }
        out
    }
}

impl Context for Gateway {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        self.vm.caller_of(token);
        self.with(|ex, envoy| ex.on_call_response(envoy, token, body_size));
    }

    fn on_done(&mut self) -> bool {
        self.pending.borrow_mut().remove(&self.context_id);
        true
    }
}

impl HttpContext for Gateway {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        time(Step::RequestHeaders, || flow(self.exchange.borrow_mut().on_request_headers(&self.envoy, end_of_stream)))
    }
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        time(Step::RequestBody, || flow(self.with(|ex, envoy| ex.on_request_body(envoy, body_size, end_of_stream))))
    }
    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        flow(self.exchange.borrow_mut().on_request_trailers(&self.envoy))
    }
    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        time(Step::ResponseHeaders, || flow(self.exchange.borrow_mut().on_response_headers(&self.envoy)))
    }
    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        time(Step::ResponseBody, || {
            flow(self.exchange.borrow_mut().on_response_body(&self.envoy, body_size, end_of_stream))
        })
    }
    fn on_log(&mut self) {
        time(Step::Log, || self.with(|ex, envoy| ex.on_log(envoy)));
    }
}
