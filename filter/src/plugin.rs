//! The proxy-wasm shell: Envoy host calls only. Decisions are made by the pure
//! modules of this crate.
//!
//! Per request: headers (key check, upstream path and key, route marker) ->
//! body (validate, estimate) -> draw the estimate from the key's lease in shared
//! data (no callout), or fetch a lease / reserve with a callout -> resume or local reply ->
//! response chunks metered as they pass -> `on_log` puts one settlement record
//! in its VM's queue. The VM's root context sends the queue in batches on a
//! tick, retrying with backoff (a call made from `on_log` would get no reply);
//! on the tick it also closes the expired leases its VM installed.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use bridge_protocol::{
    LeaseClose, LeaseReply, LeaseRequest, ReserveReply, ReserveRequest, SettleOutcome, SettleRecord, SettleReply,
    INTERNAL_TOKEN_HEADER, LEASE_PATH, RESERVE_PATH, SETTLE_PATH,
};
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

use crate::config::{FailureMode, PluginConfig};
use crate::reply::{models_list, LocalReply};
use crate::request::{admit, client_key};
use crate::response::{Forward, ResponseMeter};
use crate::lease::{self, Draw, Install, Renew, Slot};
use crate::settle::{batch_of, Item, Settler};
use crate::LEASE_QUEUE;

/// Shown by Envoy as `wasmcustom.openclaw_bridge_pending_settlements`.
const PENDING_GAUGE: &str = "openclaw_bridge_pending_settlements";

proxy_wasm::main! {{
    // set_log_level also installs proxy-wasm's panic hook, which logs the panic
    // at critical before the VM traps.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            config: None,
            settler: Rc::new(RefCell::new(Settler::new(1))),
            in_flight: None,
            pending_gauge: None,
            reported: 0,
            leases: Rc::default(),
            lease_queue: None,
            lease_calls: HashMap::new(),
        })
    });
}}

fn now_ms(ctx: &dyn Context) -> u64 {
    ctx.get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// POSTs JSON to the sidecar's internal API; the reply comes to the caller's
/// `on_http_call_response` under the returned token.
fn call_sidecar(ctx: &dyn Context, cfg: &PluginConfig, path: &str, body: &[u8], timeout_ms: u64) -> Result<u32, Status> {
    ctx.dispatch_http_call(
        &cfg.sidecar_cluster,
        sidecar_headers(cfg, path),
        Some(body),
        vec![],
        Duration::from_millis(timeout_ms),
    )
}

/// Envoy shared data: the slot as read and its compare-and-swap token.
fn read_slot(key: &str) -> (Option<Slot>, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((bytes, cas)) => (bytes.as_deref().and_then(Slot::decode), cas),
        Err(_) => (None, None),
    }
}

/// Writes the slot (`None` empties it) if nobody wrote since it was read.
/// A key seen for the first time has no token to check: two first writers
/// can both succeed, which costs one lease fetched too many (closed by its
/// fetcher), never a draw beyond a grant.
fn write_slot(key: &str, slot: Option<&Slot>, cas: Option<u32>) -> bool {
    let bytes = slot.map(Slot::encode).unwrap_or_default();
    hostcalls::set_shared_data(key, Some(&bytes), cas).is_ok()
}

/// Compare-and-swap attempts on a slot before giving up on it.
const CAS_TRIES: usize = 8;

/// The settlement queue of one VM: its requests put records in, its root
/// context sends them. A plain shared value, not an Envoy shared queue: the
/// root and the requests of a VM run on one thread, and an Envoy queue would
/// cost a copy, a serialization and a cross-thread wake-up per request.
type SettleQueue = Rc<RefCell<Settler>>;

/// Queues an item; logs the oldest if it had to make room for it.
fn keep(queue: &SettleQueue, item: Item, context_id: u32) {
    if let Some(old) = queue.borrow_mut().push(item) {
        error!("[{context_id}] settlement queue full: {} dropped; its hold will be charged at expiry", old.id());
    }
}

/// Slots of the leases this VM installed, for its root's sweep. Shared by the
/// root and the requests of one VM (one thread).
type LeaseKeys = Rc<RefCell<BTreeSet<String>>>;

fn sidecar_headers<'a>(cfg: &'a PluginConfig, path: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", cfg.sidecar_authority.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(t) = &cfg.internal_token {
        h.push((INTERNAL_TOKEN_HEADER, t.as_str()));
    }
    h
}

struct Root {
    context_id: u32,
    config: Option<Rc<PluginConfig>>,
    settler: SettleQueue,
    /// Token of the settlement call in flight.
    in_flight: Option<u32>,
    /// Envoy gauge `wasmcustom.openclaw_bridge_pending_settlements`: the sum over
    /// all VMs of records not yet settled. Operators wait for 0 before stopping Envoy.
    pending_gauge: Option<u32>,
    /// What this VM last added to the gauge.
    reported: i64,
    leases: LeaseKeys,
    /// Background lease requests from this Envoy's requests.
    lease_queue: Option<u32>,
    /// Lease calls in flight, by callout token.
    lease_calls: HashMap<u32, LeaseRequest>,
}

impl Root {
    fn report_pending(&mut self) {
        let Some(gauge) = self.pending_gauge else { return };
        // A live lease is a close still to send: drained Envoy reaches 0 once
        // its leases expired and their closes were taken.
        let now = (self.settler.borrow().pending() + self.leases.borrow().len()) as i64;
        if now != self.reported && hostcalls::increment_metric(gauge, now - self.reported).is_ok() {
            self.reported = now;
        }
    }

    fn keep(&mut self, item: Item) {
        keep(&self.settler, item, self.context_id);
    }

    /// Closes the leases this VM installed once they expire (all of them when
    /// `force`), and forgets slots that are no longer live.
    fn sweep_leases(&mut self, force: bool) {
        let now = now_ms(self);
        let keys: Vec<String> = self.leases.borrow().iter().cloned().collect();
        for key in keys {
            let mut done = false;
            for _ in 0..CAS_TRIES {
                let (slot, cas) = read_slot(&key);
                match (&slot, lease::expire(slot.as_ref(), now, force)) {
                    (_, Some(close)) => {
                        if write_slot(&key, None, cas) {
                            debug!("[root {}] lease {} closed: {} of {:?} drawn", self.context_id, close.lease_id, close.drawn_tokens, close.tokens);
                            self.keep(Item::Close(close));
                            done = true;
                            break;
                        }
                    }
                    (Some(Slot::Live(_)), None) => break,
                    // Empty, or another worker is fetching: nothing of ours left.
                    (_, None) => {
                        done = true;
                        break;
                    }
                }
            }
            if done {
                self.leases.borrow_mut().remove(&key);
            }
        }
    }

    /// Sends the background lease requests waiting on the queue.
    fn ask_for_leases(&mut self) {
        let (Some(queue), Some(cfg)) = (self.lease_queue, self.config.clone()) else { return };
        while let Ok(Some(bytes)) = hostcalls::dequeue_shared_queue(queue) {
            let Ok(ask) = serde_json::from_slice::<LeaseRequest>(&bytes) else { continue };
            let Ok(body) = serde_json::to_vec(&ask) else { continue };
            match call_sidecar(self, &cfg, LEASE_PATH, &body, cfg.sidecar_timeout_ms) {
                Ok(token) => {
                    self.lease_calls.insert(token, ask);
                }
                // Nothing reached the sidecar; the marker goes stale and a later draw asks again.
                Err(e) => warn!("[root {}] cannot ask for lease {}: {e:?}", self.context_id, ask.lease_id),
            }
        }
    }

    /// The reply to a background lease request.
    fn lease_answered(&mut self, ask: LeaseRequest, status: Option<&str>, body: &[u8]) {
        let Some(cfg) = self.config.clone() else { return };
        let reply = match status {
            Some("200") => serde_json::from_slice::<LeaseReply>(body).ok(),
            _ => None,
        };
        match reply {
            Some(LeaseReply::Grant { tokens, .. }) => {
                let key = lease::slot_key(&ask.key_hash);
                for _ in 0..CAS_TRIES {
                    let (slot, cas) = read_slot(&key);
                    let now = now_ms(self);
                    match lease::renew(slot.as_ref(), &ask.lease_id, &ask.key_hash, tokens, now, cfg.lease_ms) {
                        Renew::Live { slot, close } => {
                            if write_slot(&key, Some(&slot), cas) {
                                debug!("[root {}] lease {} of {tokens} live", self.context_id, ask.lease_id);
                                if let Some(close) = close {
                                    self.keep(Item::Close(close));
                                }
                                self.leases.borrow_mut().insert(key);
                                return;
                            }
                        }
                        Renew::Orphan(close) => return self.keep(Item::Close(close)),
                    }
                }
                self.keep(Item::Close(LeaseClose {
                    key_hash: ask.key_hash,
                    lease_id: ask.lease_id,
                    tokens: Some(tokens),
                    drawn_tokens: 0,
                    drawn_n: 0,
                }));
            }
            // Refused (frozen, no balance): the current lease runs out, and the
            // request that then fetches gets the refusal. The marker stays
            // until stale, so a refused key is not asked for on every draw.
            Some(LeaseReply::Refuse { status, .. }) => {
                debug!("[root {}] lease {} refused ({status})", self.context_id, ask.lease_id)
            }
            Some(LeaseReply::Retry) => debug!("[root {}] lease {} not granted now", self.context_id, ask.lease_id),
            // It may have been granted unseen: give it back.
            None => {
                warn!("[root {}] lease {} answered {status:?}; releasing it", self.context_id, ask.lease_id);
                self.keep(Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
            }
        }
    }

    fn send_due_batch(&mut self) {
        let Some(cfg) = self.config.clone() else { return };
        if self.in_flight.is_some() {
            return;
        }
        let now = now_ms(self);
        let encoded = {
            let mut settler = self.settler.borrow_mut();
            let Some(batch) = settler.next_batch(now) else { return };
            (serde_json::to_vec(&batch_of(batch)), batch.len())
        };
        let (body, n) = match encoded {
            (Ok(b), n) => (b, n),
            (Err(e), _) => {
                error!("[root {}] cannot encode a settlement batch: {e}", self.context_id);
                self.settler.borrow_mut().failed(now);
                return;
            }
        };
        match call_sidecar(self, &cfg, SETTLE_PATH, &body, cfg.settle_timeout_ms) {
            Ok(token) => {
                debug!("[root {}] settling {n} records (call {token})", self.context_id);
                self.in_flight = Some(token);
            }
            Err(e) => {
                warn!("[root {}] cannot reach the sidecar to settle {n} records: {e:?}; will retry", self.context_id);
                self.settler.borrow_mut().failed(now);
            }
        }
    }
}

impl Context for Root {
    /// The VM is going away (Envoy shutting down or reloading): send what is
    /// still queued. Replies to calls made now never arrive, but the calls reach
    /// the sidecar, and settlement is idempotent; what still fails to arrive is
    /// charged at its hold when the hold expires.
    fn on_done(&mut self) -> bool {
        let Some(cfg) = self.config.clone() else { return true };
        self.sweep_leases(true);
        // Lease calls whose replies will not come now: release what they may have got.
        for (_, ask) in std::mem::take(&mut self.lease_calls) {
            self.keep(Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
        }
        let records = self.settler.borrow_mut().take_all();
        if records.is_empty() {
            return true;
        }
        for chunk in records.chunks(cfg.settle_batch_max) {
            let Ok(body) = serde_json::to_vec(&batch_of(chunk)) else { continue };
            let sent = call_sidecar(self, &cfg, SETTLE_PATH, &body, cfg.settle_timeout_ms);
            if let Err(e) = sent {
                error!("[root {}] shutting down: {} settlements not sent ({e:?}); their holds will expire", self.context_id, chunk.len());
            }
        }
        info!("[root {}] shutting down: sent {} queued settlements", self.context_id, records.len());
        true
    }

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if let Some(ask) = self.lease_calls.remove(&token) {
            let status = self.get_http_call_response_header(":status");
            let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
            self.lease_answered(ask, status.as_deref(), &body);
            self.report_pending();
            return;
        }
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let now = now_ms(self);
        let status = self.get_http_call_response_header(":status");
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        let reply = match status.as_deref() {
            Some("200") => serde_json::from_slice::<SettleReply>(&body).ok(),
            _ => None,
        };
        match reply {
            Some(reply) => {
                self.settler.borrow_mut().sent();
                let results = reply.results.iter().chain(&reply.closes);
                for r in results.filter(|r| !matches!(r.outcome, SettleOutcome::Settled | SettleOutcome::AlreadySettled)) {
                    warn!("[root {}] settlement {} {:?}: {}", self.context_id, r.request_id, r.outcome, r.message.as_deref().unwrap_or(""));
                }
                // More may be waiting: send the next batch now rather than on the next tick.
                self.send_due_batch();
                self.report_pending();
            }
            None => {
                warn!(
                    "[root {}] sidecar did not take a settlement batch (status {:?}); {} records kept for retry",
                    self.context_id,
                    status,
                    self.settler.borrow().pending()
                );
                self.settler.borrow_mut().failed(now);
            }
        }
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
            Ok(q) => self.lease_queue = Some(q),
            Err(e) => {
                error!("[root {}] cannot register the lease queue: {e:?}", self.context_id);
                return false;
            }
        }
        *self.settler.borrow_mut() = Settler::new(cfg.settle_batch_max);
        self.pending_gauge = hostcalls::define_metric(MetricType::Gauge, PENDING_GAUGE).ok();
        self.set_tick_period(Duration::from_millis(cfg.settle_interval_ms));
        info!(
            "[root {}] configured: upstream {:?}, model {}, sidecar cluster {}, failure mode {:?}",
            self.context_id,
            cfg.upstream,
            cfg.served_model(),
            cfg.sidecar_cluster,
            cfg.failure_mode
        );
        self.config = Some(Rc::new(cfg));
        true
    }

    fn on_tick(&mut self) {
        self.ask_for_leases();
        self.sweep_leases(false);
        self.send_due_batch();
        self.report_pending();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if Some(queue_id) == self.lease_queue {
            self.ask_for_leases();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(Gateway {
            id: context_id,
            config,
            settler: self.settler.clone(),
            phase: Phase::Headers,
            key_hash: String::new(),
            request_id: String::new(),
            started_ms: 0,
            body: Vec::new(),
            admission: None,
            reserved: 0,
            unreserved: false,
            callout: None,
            status: 0,
            meter: None,
            lease_keys: self.leases.clone(),
            lease_queue: self.lease_queue,
            lease_id: None,
            fetching: None,
            replacing: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Where a request stands. Every path ends in a resume or a local reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet looked at.
    Headers,
    /// Not ours (a path outside `/v1/`): passes untouched.
    Passthrough,
    /// Answered locally; nothing to settle.
    Answered,
    /// Buffering the body.
    Body,
    /// Waiting for the sidecar's reservation.
    Reserving,
    /// Waiting for the lease this request asked for.
    Leasing,
    /// Admitted and forwarded: must settle exactly once.
    Forwarded,
    /// Refused after a reservation attempt that may have succeeded unseen:
    /// settled with nothing used, which releases such a hold.
    Released,
    /// The settlement record is queued.
    Settled,
}

struct Gateway {
    id: u32,
    config: Rc<PluginConfig>,
    settler: SettleQueue,
    phase: Phase,
    key_hash: String,
    request_id: String,
    started_ms: u64,
    /// The client's body, kept for the tiktoken fallback of the prompt.
    body: Vec<u8>,
    admission: Option<crate::request::Admission>,
    reserved: i64,
    unreserved: bool,
    callout: Option<u32>,
    status: u32,
    meter: Option<ResponseMeter>,
    lease_keys: LeaseKeys,
    lease_queue: Option<u32>,
    /// The lease the estimate was drawn from.
    lease_id: Option<String>,
    /// The lease this request is fetching (its marker is in the key's slot).
    fetching: Option<String>,
    /// The lease the fetch replaces, closed by the same call.
    replacing: Option<LeaseClose>,
}

/// Where a request's estimate comes from.
enum Precheck {
    Drawn(String),
    /// Fetch lease `0`, closing the lease `1` it replaces in the same call.
    Fetch(String, Option<LeaseClose>),
    Reserve,
}

impl Gateway {
    /// Draws this request's estimate from the key's lease, or takes the job of
    /// fetching the next one; reserves alone while another worker fetches.
    fn precheck(&mut self, estimate: i64, model: &str) -> Precheck {
        let Some(new_id) = crate::new_request_id() else { return Precheck::Reserve };
        let key = lease::slot_key(&self.key_hash);
        let stale_ms = self.config.sidecar_timeout_ms + 1_000;
        for _ in 0..CAS_TRIES {
            let now = now_ms(self);
            let (slot, cas) = read_slot(&key);
            match lease::draw(slot.as_ref(), now, estimate, &new_id, stale_ms, self.config.lease_ms) {
                Draw::Drawn { slot, lease_id, refresh } => {
                    if write_slot(&key, Some(&slot), cas) {
                        if let Some((id, want)) = refresh {
                            self.ask_in_background(id, want, estimate, model);
                        }
                        return Precheck::Drawn(lease_id);
                    }
                }
                Draw::Fetch { slot, close } => {
                    if write_slot(&key, Some(&slot), cas) {
                        return Precheck::Fetch(new_id, close);
                    }
                }
                Draw::Reserve => return Precheck::Reserve,
            }
        }
        Precheck::Reserve
    }

    /// Draws this request's estimate from the key's live lease, if there is one
    /// with enough left; nothing else (no fetch).
    fn draw_only(&mut self) -> bool {
        if self.config.lease_tokens == 0 {
            return false;
        }
        let estimate = self.admission.as_ref().map_or(0, |a| a.estimate);
        let key = lease::slot_key(&self.key_hash);
        for _ in 0..CAS_TRIES {
            let (slot, cas) = read_slot(&key);
            let now = now_ms(self);
            let Some(lease) = lease::take(slot.as_ref(), now, estimate) else { return false };
            let lease_id = lease.id.clone();
            if write_slot(&key, Some(&Slot::Live(lease)), cas) {
                self.reserved = estimate;
                self.lease_id = Some(lease_id);
                return true;
            }
        }
        false
    }

    /// The next lease, asked for by a root context: this request does not wait.
    fn ask_in_background(&self, lease_id: String, want: i64, estimate: i64, model: &str) {
        let ask = LeaseRequest {
            key_hash: self.key_hash.clone(),
            lease_id,
            model: model.to_owned(),
            want: self.config.lease_tokens.max(estimate).max(want),
            min: estimate,
            replaces: None,
        };
        let queued = match (self.lease_queue, serde_json::to_vec(&ask)) {
            (Some(q), Ok(bytes)) => hostcalls::enqueue_shared_queue(q, Some(&bytes)).is_ok(),
            _ => false,
        };
        if !queued {
            // The marker goes stale; the lease is fetched when this one runs out.
            warn!("[{}] could not queue a lease request", self.id);
        }
    }

    /// The lease call that carried the close of the replaced lease got no
    /// answer: close it through the settlement queue.
    fn close_replaced(&mut self) {
        if let Some(close) = self.replacing.take() {
            self.close_lease(close);
        }
    }

    fn close_lease(&self, close: LeaseClose) {
        keep(&self.settler, Item::Close(close), self.id);
    }

    /// The granted lease goes live in the key's slot with this request drawn
    /// from it, or, if our marker was replaced meanwhile, serves this request
    /// alone and is closed at once.
    fn install_lease(&mut self, id: &str, granted: i64, estimate: i64) {
        let key = lease::slot_key(&self.key_hash);
        for _ in 0..CAS_TRIES {
            let (slot, cas) = read_slot(&key);
            let now = now_ms(self);
            match lease::install(slot.as_ref(), id, &self.key_hash, granted, estimate, now, self.config.lease_ms) {
                Install::Live(slot) => {
                    if write_slot(&key, Some(&slot), cas) {
                        self.lease_keys.borrow_mut().insert(key);
                        return;
                    }
                }
                Install::Orphan(close) => return self.close_lease(close),
            }
        }
        let lease = lease::Lease {
            id: id.to_owned(),
            key_hash: self.key_hash.clone(),
            tokens: granted,
            drawn_tokens: estimate,
            drawn_n: 1,
            expires_ms: 0,
            refresh: None,
        };
        self.close_lease(lease.close());
    }

    /// The fetch ended without a lease: take our marker out of the slot so
    /// the next request fetches again.
    fn clear_marker(&mut self) {
        let Some(id) = self.fetching.clone() else { return };
        let key = lease::slot_key(&self.key_hash);
        for _ in 0..CAS_TRIES {
            let (slot, cas) = read_slot(&key);
            if !lease::is_our_marker(slot.as_ref(), &id) || write_slot(&key, None, cas) {
                return;
            }
        }
    }

    fn answer(&mut self, reply: LocalReply) -> Action {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(reply.headers.iter().map(|(k, v)| (*k, v.as_str())));
        self.send_http_response(reply.status, headers, Some(&reply.body));
        self.phase = Phase::Answered;
        Action::Pause
    }

    /// The sidecar could not answer: the configured failure mode decides. The
    /// reservation may still have been made (a reply lost or too late), so the
    /// request is settled either way: with nothing used when it is refused here
    /// (the hold, if any, is released), or unreserved when it goes ahead.
    fn sidecar_failed(&mut self, why: &str, maybe_reserved: bool) {
        self.reserved = self.admission.as_ref().map_or(0, |a| a.estimate);
        match self.config.failure_mode {
            FailureMode::Deny => {
                warn!("[{}] {}: sidecar unavailable ({why}); answering 503", self.id, self.request_id);
                self.answer(LocalReply::unavailable(self.config.retry_after_secs));
                if maybe_reserved {
                    self.status = 503;
                    self.phase = Phase::Released;
                    self.settle();
                }
            }
            FailureMode::Allow => {
                warn!("[{}] {}: sidecar unavailable ({why}); forwarding without a hold", self.id, self.request_id);
                if let Some(lease_id) = self.fetching.take() {
                    // Whatever the lost reply granted goes back.
                    self.close_lease(LeaseClose::release(self.key_hash.clone(), lease_id));
                }
                self.unreserved = true;
                self.phase = Phase::Forwarded;
                self.resume_http_request();
            }
        }
    }

    fn settle(&mut self) {
        let released = self.phase == Phase::Released;
        if released {
            if let Some(lease_id) = self.fetching.take() {
                // The lease may have been granted unseen: release it.
                self.phase = Phase::Settled;
                let key_hash = std::mem::take(&mut self.key_hash);
                self.close_lease(LeaseClose::release(key_hash, lease_id));
                return;
            }
        }
        let (input, output, source) = match self.phase {
            Phase::Forwarded => {
                if let Some(m) = &mut self.meter {
                    // A client that left mid-answer never reached the end: finish the count here.
                    m.on_end();
                }
                crate::charge(self.meter.as_ref(), self.status, &self.body, self.config.tiktoken_encoding)
            }
            Phase::Released => (0, 0, bridge_protocol::UsageSource::Upstream),
            _ => return,
        };
        self.phase = Phase::Settled;
        let admission = self.admission.take();
        let record = SettleRecord {
            request_id: std::mem::take(&mut self.request_id),
            key_hash: std::mem::take(&mut self.key_hash),
            model: admission.as_ref().map(|a| a.model.clone()).unwrap_or_default(),
            reserved: self.reserved,
            input_tokens: input,
            output_tokens: output,
            usage_source: source,
            duration_ms: now_ms(self).saturating_sub(self.started_ms) as i64,
            status_code: u16::try_from(self.status).unwrap_or(0),
            stream: admission.is_some_and(|a| a.stream),
            unreserved: self.unreserved,
            release: released,
            lease_id: self.lease_id.take(),
        };
        debug!("[{}] {}: queued settlement {input}+{output} of {} ({source:?})", self.id, record.request_id, record.reserved);
        keep(&self.settler, Item::Settle(record), self.id);
    }
}

impl Context for Gateway {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.callout != Some(token) || !matches!(self.phase, Phase::Reserving | Phase::Leasing) {
            return;
        }
        self.callout = None;
        let status = self.get_http_call_response_header(":status");
        if status.as_deref() != Some("200") {
            // The call may have reached the sidecar whatever the status (a timeout
            // shows as 504, a reset after sending as 503): release to be sure.
            self.clear_marker();
            self.close_replaced();
            self.sidecar_failed(&format!("{:?} answered {status:?}", self.phase), true);
            return;
        }
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        if self.phase == Phase::Leasing {
            return self.lease_reply(&body);
        }
        match serde_json::from_slice::<ReserveReply>(&body) {
            Ok(ReserveReply::Admit { .. }) => {
                self.reserved = self.admission.as_ref().map_or(0, |a| a.estimate);
                self.phase = Phase::Forwarded;
                self.resume_http_request();
            }
            Ok(ReserveReply::Refuse { status: 429, .. }) if self.draw_only() => {
                // The balance was in the key's lease, fetched while this request
                // reserved alone: drawn from it after all.
                self.phase = Phase::Forwarded;
                self.resume_http_request();
            }
            Ok(ReserveReply::Refuse { status, error }) => {
                info!("[{}] {}: refused {status} {:?}", self.id, self.request_id, error.code);
                self.answer(LocalReply::refusal(status, error));
            }
            Err(e) => self.sidecar_failed(&format!("unreadable reserve reply: {e}"), true),
        }
    }
}

impl Gateway {
    /// Asks the sidecar to hold this request's estimate on its own.
    fn reserve(&mut self) {
        let cfg = self.config.clone();
        let Some(admission) = self.admission.as_ref() else { return };
        let reserve = ReserveRequest {
            key_hash: self.key_hash.clone(),
            request_id: self.request_id.clone(),
            model: admission.model.clone(),
            estimate: admission.estimate,
        };
        self.phase = Phase::Reserving;
        let payload = match serde_json::to_vec(&reserve) {
            Ok(p) => p,
            Err(e) => return self.sidecar_failed(&format!("cannot encode the reservation: {e}"), false),
        };
        match call_sidecar(self, &cfg, RESERVE_PATH, &payload, cfg.sidecar_timeout_ms) {
            Ok(token) => self.callout = Some(token),
            Err(e) => self.sidecar_failed(&format!("dispatch failed: {e:?}"), false),
        }
    }

    fn lease_reply(&mut self, body: &[u8]) {
        let reply = serde_json::from_slice::<LeaseReply>(body);
        if reply.is_ok() {
            // Answered: the sidecar closed the replaced lease before deciding.
            self.replacing = None;
        }
        match reply {
            Ok(LeaseReply::Grant { tokens, .. }) => {
                let estimate = self.admission.as_ref().map_or(0, |a| a.estimate);
                if let Some(id) = self.fetching.take() {
                    debug!("[{}] {}: lease {id} of {tokens} granted", self.id, self.request_id);
                    self.install_lease(&id, tokens, estimate);
                    self.lease_id = Some(id);
                }
                self.reserved = estimate;
                self.phase = Phase::Forwarded;
                self.resume_http_request();
            }
            Ok(LeaseReply::Refuse { status, error }) => {
                self.clear_marker();
                self.fetching = None;
                info!("[{}] {}: refused {status} {:?}", self.id, self.request_id, error.code);
                self.answer(LocalReply::refusal(status, error));
            }
            Ok(LeaseReply::Retry) => {
                self.clear_marker();
                self.fetching = None;
                self.reserve();
            }
            Err(e) => {
                self.clear_marker();
                self.close_replaced();
                self.sidecar_failed(&format!("unreadable lease reply: {e}"), true);
            }
        }
    }
}

impl HttpContext for Gateway {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let cfg = self.config.clone();
        // The route marker is ours alone: a client may not send it.
        self.set_http_request_header(&cfg.route_header, None);
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let bare = path.split('?').next().unwrap_or_default().to_owned();
        if !bare.starts_with("/v1/") && bare != "/v1" {
            self.phase = Phase::Passthrough;
            return Action::Continue;
        }
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let authorization = self.get_http_request_header("authorization");
        let api_key = self.get_http_request_header("api-key");
        let key = client_key(authorization.as_deref(), api_key.as_deref()).map(str::to_owned);
        if bare == "/v1/models" || bare.starts_with("/v1/models/") {
            if method != "GET" {
                return self.answer(LocalReply::method_not_allowed(&method, &bare));
            }
            if key.is_none() {
                return self.answer(LocalReply::missing_key());
            }
            let body = models_list(cfg.served_model());
            self.send_http_response(200, vec![("content-type", "application/json")], Some(&body));
            self.phase = Phase::Answered;
            return Action::Pause;
        }
        if bare != "/v1/chat/completions" {
            return self.answer(LocalReply::not_found(&bare));
        }
        if method != "POST" {
            return self.answer(LocalReply::method_not_allowed(&method, &bare));
        }
        let Some(key) = key else {
            return self.answer(LocalReply::missing_key());
        };
        let Some(request_id) = crate::new_request_id() else {
            error!("[{}] no randomness for a request id", self.id);
            return self.answer(LocalReply::unavailable(cfg.retry_after_secs));
        };
        if end_of_stream {
            return self.answer(LocalReply::bad_request("The request has no body.", None));
        }
        self.key_hash = bridge_protocol::key_hash(&key);
        self.request_id = request_id;
        self.started_ms = now_ms(self);
        // All header work happens here, while the headers are held: the client's
        // key is removed, the upstream's set, and the length dropped because the
        // body may be rewritten (setting it later traps the VM).
        self.set_http_request_header("authorization", None);
        self.set_http_request_header("api-key", None);
        self.set_http_request_header("content-length", None);
        // The meter reads the answer's usage and text: it must come uncompressed.
        self.set_http_request_header("accept-encoding", None);
        let (auth_name, auth_value) = cfg.upstream_auth();
        self.set_http_request_header(auth_name, Some(&auth_value));
        self.set_http_request_header(":path", Some(&cfg.upstream_path()));
        self.set_http_request_header(&cfg.route_header, Some("upstream"));
        self.phase = Phase::Body;
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.phase != Phase::Body {
            return Action::Continue;
        }
        let cfg = self.config.clone();
        if body_size > cfg.max_body_bytes {
            return self.answer(LocalReply::too_large(cfg.max_body_bytes));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let admission = match admit(&body, &cfg) {
            Ok(a) => a,
            Err(reply) => return self.answer(reply),
        };
        if let Some(new_body) = &admission.rewritten {
            self.set_http_request_body(0, body_size, new_body);
        }
        let estimate = admission.estimate;
        let model = admission.model.clone();
        self.body = body;
        self.admission = Some(admission);
        if cfg.lease_tokens > 0 {
            match self.precheck(estimate, &model) {
                Precheck::Drawn(lease_id) => {
                    // Headers were held for this body: continuing the body releases both.
                    self.reserved = estimate;
                    self.lease_id = Some(lease_id);
                    self.phase = Phase::Forwarded;
                    return Action::Continue;
                }
                Precheck::Fetch(lease_id, replaces) => {
                    let ask = LeaseRequest {
                        key_hash: self.key_hash.clone(),
                        lease_id: lease_id.clone(),
                        model,
                        want: cfg.lease_tokens.max(estimate),
                        min: estimate,
                        replaces: replaces.clone(),
                    };
                    // Kept until the call is answered: if it is not, the close
                    // goes with the settlements instead (it is idempotent).
                    self.replacing = replaces;
                    self.fetching = Some(lease_id);
                    self.phase = Phase::Leasing;
                    let sent = serde_json::to_vec(&ask)
                        .map_err(|e| format!("cannot encode the lease: {e}"))
                        .and_then(|p| {
                            call_sidecar(self, &cfg, LEASE_PATH, &p, cfg.sidecar_timeout_ms)
                                .map_err(|e| format!("dispatch failed: {e:?}"))
                        });
                    match sent {
                        Ok(token) => self.callout = Some(token),
                        Err(why) => {
                            self.clear_marker();
                            self.fetching = None;
                            self.close_replaced();
                            self.sidecar_failed(&why, false);
                        }
                    }
                    return Action::Pause;
                }
                Precheck::Reserve => {}
            }
        }
        self.reserve();
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.phase != Phase::Forwarded {
            return Action::Continue;
        }
        self.status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let is_sse = self
            .get_http_response_header("content-type")
            .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
        let hide_usage = self.admission.as_ref().is_some_and(|a| a.stream && !a.client_wants_usage);
        let meter = ResponseMeter::new(is_sse, hide_usage);
        if meter.rewrites_body() {
            self.set_http_response_header("content-length", None);
        }
        self.meter = Some(meter);
        self.add_http_response_header("x-bridge-request-id", &self.request_id.clone());
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.phase != Phase::Forwarded {
            return Action::Continue;
        }
        let chunk = if body_size > 0 {
            self.get_http_response_body(0, body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let Some(meter) = self.meter.as_mut() else { return Action::Continue };
        let mut out = match meter.on_chunk(&chunk) {
            Forward::Unchanged => None,
            Forward::Replace(bytes) => Some(bytes),
        };
        if end_of_stream {
            let rest = meter.on_end();
            if !rest.is_empty() {
                let mut all = out.take().unwrap_or_else(|| chunk.clone());
                all.extend(rest);
                out = Some(all);
            }
        }
        if let Some(bytes) = out {
            self.set_http_response_body(0, body_size, &bytes);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if matches!(self.phase, Phase::Reserving | Phase::Leasing) {
            // The client left while the sidecar decided: whatever it decided is
            // undone (a release names the hold by its size).
            self.clear_marker();
            self.close_replaced();
            self.reserved = self.admission.as_ref().map_or(0, |a| a.estimate);
            self.status = 499;
            self.phase = Phase::Released;
        }
        self.settle();
    }
}
