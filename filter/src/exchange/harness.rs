//! The middle tier's harness: one Envoy with one VM over the fake host, and
//! the requests, replies and upstream answers a test drives through it.

use std::rc::Rc;

use serde_json::{json, Value};

use super::Exchange;
use crate::background::Background;
use crate::config::PluginConfig;
use crate::fake::{Stream, World};
use crate::host::Flow;
use crate::lease::{self, Slot};
use crate::settle::Item;
use bridge_protocol::SettleRecord;

pub const KEY: &str = "sk-user-0001";
pub const BODY: &[u8] =
    br#"{"model":"gpt-5-nano","messages":[{"role":"user","content":"hello world"}],"max_completion_tokens":64}"#;

/// One Envoy with one VM: its world, its root, and requests made on it.
pub struct Gateway {
    pub world: Rc<World>,
    pub root: Background,
    next_id: u32,
}

impl Gateway {
    pub fn new(extra: Value) -> Self {
        let mut cfg =
            json!({"sidecar_cluster": "sidecar", "upstream_key": "upstream-secret", "deployment": "gpt-5-nano"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            cfg[k] = v;
        }
        let cfg = PluginConfig::from_json(cfg.to_string().as_bytes()).unwrap();
        Self { world: World::new(), root: Background::new(1, Rc::new(cfg)), next_id: 10 }
    }

    pub fn exchange(&mut self) -> Exchange {
        self.next_id += 1;
        Exchange::new(self.next_id, self.root.config.clone(), self.root.vm.clone())
    }

    /// A chat request whose headers and whole body have arrived.
    pub fn send(&mut self, body: &[u8]) -> (Exchange, Stream, Flow) {
        let (mut ex, s) = self.headers(KEY);
        *s.request_body.borrow_mut() = body.to_vec();
        let flow = ex.on_request_body(&s, body.len(), true);
        (ex, s, flow)
    }

    /// A request to `path` with `headers` besides the key, its whole body arrived.
    pub fn post(&mut self, key: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (Exchange, Stream, Flow) {
        let mut ex = self.exchange();
        let auth = format!("Bearer {key}");
        let mut all = vec![(":method", "POST"), (":path", path), ("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let s = Stream::new(&self.world, &all);
        assert_eq!(ex.on_request_headers(&s, false), Flow::Pause);
        *s.request_body.borrow_mut() = body.to_vec();
        let flow = ex.on_request_body(&s, body.len(), true);
        (ex, s, flow)
    }

    pub fn headers(&mut self, key: &str) -> (Exchange, Stream) {
        let mut ex = self.exchange();
        let auth = format!("Bearer {key}");
        let s = Stream::new(
            &self.world,
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("authorization", &auth),
                ("content-length", "99"),
            ],
        );
        assert_eq!(ex.on_request_headers(&s, false), Flow::Pause);
        (ex, s)
    }

    /// Delivers a reply to the last call made.
    pub fn answer(&self, ex: &mut Exchange, s: &Stream, status: &str, body: Value) {
        let call = self.world.calls().pop().unwrap();
        let n = self.world.reply_with(status, &body);
        ex.on_call_response(s, call.token, n);
    }

    /// Runs the woken waiters among `waiting` (as the shell does after each
    /// callback); returns how many were woken.
    pub fn run_woken(&self, waiting: &mut [(&mut Exchange, &Stream)]) -> usize {
        let woken = self.root.vm.waits.borrow_mut().take_woken();
        for id in &woken {
            for (ex, s) in waiting.iter_mut() {
                if ex.context_id() == *id {
                    ex.on_woken(*s);
                }
            }
        }
        woken.len()
    }

    /// Everything the VM queued for the sidecar, taken out.
    pub fn queued(&self) -> Vec<Item> {
        self.root.vm.settler.borrow_mut().take_all()
    }

    pub fn records(&self) -> Vec<SettleRecord> {
        self.queued()
            .into_iter()
            .filter_map(|i| match i {
                Item::Settle(r) => Some(r),
                Item::Close(_) => None,
            })
            .collect()
    }

    /// The settlement calls so far on the records lane (`records`), or on
    /// the control lane (lease closes and progress reports).
    pub fn settle_calls(&self, records: bool) -> Vec<crate::fake::Call> {
        let carries = |c: &crate::fake::Call| c.body["records"].as_array().is_some_and(|r| !r.is_empty());
        self.world.calls_to(bridge_protocol::SETTLE_PATH).into_iter().filter(|c| carries(c) == records).collect()
    }

    /// The sidecar answers the root's call `token`.
    pub fn reply(&mut self, token: u32, status: &str, body: Value) {
        let n = self.world.reply_with(status, &body);
        self.world.mark_answered(token);
        self.root.on_call_response(&*self.world, token, n);
    }

    pub fn slot(&self) -> Option<Slot> {
        self.world.slot(&lease::slot_key(&bridge_protocol::key_hash(KEY), self.root.config.lease_slots))
    }
}

pub fn grant(tokens: i64) -> Value {
    json!({"verdict": "grant", "tokens": tokens, "balance_tokens": 0})
}

pub fn refuse(status: u16, code: &str) -> Value {
    json!({"verdict": "refuse", "status": status, "error": {"message": "no", "type": code, "param": null, "code": code}})
}

/// The upstream's answer: a plain JSON body with usage, then the end.
pub fn respond(ex: &mut Exchange, s: &Stream, status: &str, body: &[u8]) {
    *s.response_headers.borrow_mut() =
        vec![(":status".into(), status.into()), ("content-type".into(), "application/json".into())];
    ex.on_response_headers(s);
    *s.response_body.borrow_mut() = body.to_vec();
    ex.on_response_body(s, body.len(), true);
}

pub const USAGE: &[u8] = br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
