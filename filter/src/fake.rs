//! An in-memory host for the middle test tier: shared data with real
//! compare-and-swap versions, a clock the test moves, a log of the calls made
//! and a way to deliver their replies, and one fake stream per request. It
//! drives `exchange` and `background` natively and under WASI, so a late or
//! lost reply, a lost compare-and-swap or a client gone at a chosen moment is
//! a deterministic test instead of a timing.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::host::{Host, HttpHost};

/// A call one of the contexts dispatched.
#[derive(Debug, Clone)]
pub struct Call {
    pub token: u32,
    pub path: String,
    pub body: serde_json::Value,
}

/// What every context of one Envoy shares.
#[derive(Default)]
pub struct World {
    pub now: Cell<u64>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// This many of the next compare-and-swap writes lose their race.
    pub lose_cas: Cell<usize>,
    /// Dispatches fail (no such cluster, or Envoy out of resources).
    pub dispatch_fails: Cell<bool>,
    calls: RefCell<Vec<Call>>,
    next_token: Cell<u32>,
    /// The reply being delivered: status and body.
    reply: RefCell<(Option<String>, Vec<u8>)>,
    pub lease_queue: RefCell<VecDeque<Vec<u8>>>,
    gauges: RefCell<HashMap<crate::metrics::Gauge, i64>>,
    /// Counter sums and histogram records, by metric.
    pub metrics: RefCell<HashMap<crate::metrics::Metric, Vec<u64>>>,
    /// Calls a test already delivered a reply to.
    answered: RefCell<Vec<u32>>,
}

impl World {
    pub fn new() -> Rc<Self> {
        let w = Self::default();
        w.now.set(1_000_000);
        Rc::new(w)
    }

    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }

    /// Every call dispatched so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Calls dispatched to `path`.
    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls.borrow().iter().filter(|c| c.path == path).cloned().collect()
    }

    /// Sets the reply the next `on_call_response` reads; returns its size.
    pub fn reply_with(&self, status: &str, body: &serde_json::Value) -> usize {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let n = bytes.len();
        *self.reply.borrow_mut() = (Some(status.to_owned()), bytes);
        n
    }

    /// A gauge's value.
    pub fn gauge(&self, gauge: crate::metrics::Gauge) -> i64 {
        self.gauges.borrow().get(&gauge).copied().unwrap_or(0)
    }

    pub fn mark_answered(&self, token: u32) {
        self.answered.borrow_mut().push(token);
    }

    pub fn answered(&self, token: u32) -> bool {
        self.answered.borrow().contains(&token)
    }

    /// A counter's sum (or a histogram's count of records and their sum).
    pub fn counted(&self, metric: crate::metrics::Metric) -> u64 {
        self.metrics.borrow().get(&metric).map_or(0, |v| v.iter().sum())
    }

    /// Entries in shared data.
    pub fn shared_len(&self) -> usize {
        self.shared.borrow().len()
    }

    /// The decoded slot under `key`, if any.
    pub fn slot(&self, key: &str) -> Option<crate::lease::Slot> {
        self.shared.borrow().get(key).and_then(|(v, _)| crate::lease::Slot::decode(v))
    }
}

impl Host for World {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if self.lose_cas.get() > 0 {
            self.lose_cas.set(self.lose_cas.get() - 1);
            return false;
        }
        let mut shared = self.shared.borrow_mut();
        let current = shared.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return false;
        }
        shared.insert(key.to_owned(), (value.to_vec(), current.unwrap_or(0) + 1));
        true
    }
    fn dispatch(&self, _cluster: &str, headers: &[(&str, &str)], body: &[u8], _timeout_ms: u64) -> Result<u32, String> {
        if self.dispatch_fails.get() {
            return Err("BadArgument".into());
        }
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        let path = headers.iter().find(|(k, _)| *k == ":path").map(|(_, v)| (*v).to_owned()).unwrap_or_default();
        let body = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        self.calls.borrow_mut().push(Call { token, path, body });
        Ok(token)
    }
    fn call_status(&self) -> Option<String> {
        self.reply.borrow().0.clone()
    }
    fn call_body(&self, size: usize) -> Vec<u8> {
        let body = &self.reply.borrow().1;
        body[..size.min(body.len())].to_vec()
    }
    fn enqueue_lease_ask(&self, bytes: &[u8]) -> bool {
        self.lease_queue.borrow_mut().push_back(bytes.to_vec());
        true
    }
    fn dequeue_lease_ask(&self) -> Option<Vec<u8>> {
        self.lease_queue.borrow_mut().pop_front()
    }
    fn metric(&self, metric: crate::metrics::Metric, value: u64) {
        self.metrics.borrow_mut().entry(metric).or_default().push(value);
    }
    fn add_to_gauge(&self, gauge: crate::metrics::Gauge, delta: i64) -> bool {
        *self.gauges.borrow_mut().entry(gauge).or_default() += delta;
        true
    }
}

/// One request's stream, as the filter sees and changes it.
pub struct Stream {
    pub world: Rc<World>,
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub response_body: RefCell<Vec<u8>>,
    /// Local replies sent: status and body.
    pub replies: RefCell<Vec<(u32, Vec<u8>)>>,
    /// Headers of the last local reply.
    last_reply_headers: RefCell<Vec<(String, String)>>,
    pub resumed: Cell<usize>,
    /// What `upstream_address` answers (the upstream that served it).
    pub upstream: RefCell<Option<String>>,
}

impl Stream {
    pub fn new(world: &Rc<World>, headers: &[(&str, &str)]) -> Self {
        Self {
            world: world.clone(),
            request_headers: RefCell::new(headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            request_body: RefCell::default(),
            response_headers: RefCell::default(),
            response_body: RefCell::default(),
            replies: RefCell::default(),
            last_reply_headers: RefCell::default(),
            resumed: Cell::new(0),
            upstream: RefCell::default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        get(&self.request_headers.borrow(), name)
    }

    /// The status of the one local reply, if there was one.
    pub fn replied(&self) -> Option<u32> {
        self.replies.borrow().last().map(|(s, _)| *s)
    }

    pub fn reply_headers(&self) -> Vec<(String, String)> {
        self.last_reply_headers.borrow().clone()
    }
}

fn get(headers: &[(String, String)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn set(headers: &RefCell<Vec<(String, String)>>, name: &str, value: Option<&str>) {
    let mut h = headers.borrow_mut();
    h.retain(|(k, _)| k != name);
    if let Some(v) = value {
        h.push((name.to_owned(), v.to_owned()));
    }
}

impl Host for Stream {
    fn now_ms(&self) -> u64 {
        self.world.now_ms()
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.world.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.world.shared_set(key, value, cas)
    }
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        self.world.dispatch(cluster, headers, body, timeout_ms)
    }
    fn call_status(&self) -> Option<String> {
        self.world.call_status()
    }
    fn call_body(&self, size: usize) -> Vec<u8> {
        self.world.call_body(size)
    }
    fn enqueue_lease_ask(&self, bytes: &[u8]) -> bool {
        self.world.enqueue_lease_ask(bytes)
    }
    fn dequeue_lease_ask(&self) -> Option<Vec<u8>> {
        self.world.dequeue_lease_ask()
    }
    fn metric(&self, metric: crate::metrics::Metric, value: u64) {
        self.world.metric(metric, value)
    }
    fn add_to_gauge(&self, gauge: crate::metrics::Gauge, delta: i64) -> bool {
        self.world.add_to_gauge(gauge, delta)
    }
}

impl HttpHost for Stream {
    fn request_header(&self, name: &str) -> Option<String> {
        self.header(name)
    }
    fn request_headers(&self) -> Vec<(String, String)> {
        self.request_headers.borrow().iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        set(&self.request_headers, name, value);
    }
    fn request_body(&self, size: usize) -> Vec<u8> {
        let b = self.request_body.borrow();
        b[..size.min(b.len())].to_vec()
    }
    fn set_request_body(&self, _size: usize, body: &[u8]) {
        *self.request_body.borrow_mut() = body.to_vec();
    }
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.replies.borrow_mut().push((status, body.to_vec()));
        *self.last_reply_headers.borrow_mut() =
            headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    }
    fn resume_request(&self) {
        self.resumed.set(self.resumed.get() + 1);
    }
    fn response_headers(&self) -> Vec<(String, String)> {
        self.response_headers.borrow().iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
    }
    fn upstream_address(&self) -> Option<String> {
        self.upstream.borrow().clone()
    }
    fn set_response_header(&self, name: &str, value: Option<&str>) {
        set(&self.response_headers, name, value);
    }
    fn add_response_header(&self, name: &str, value: &str) {
        self.response_headers.borrow_mut().push((name.to_owned(), value.to_owned()));
    }
    fn response_body(&self, size: usize) -> Vec<u8> {
        let b = self.response_body.borrow();
        b[..size.min(b.len())].to_vec()
    }
    fn set_response_body(&self, _size: usize, body: &[u8]) {
        *self.response_body.borrow_mut() = body.to_vec();
    }
}
