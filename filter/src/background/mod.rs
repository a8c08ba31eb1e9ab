//! The root context's work, over the `Host` trait: sending the VM's
//! settlement queue in batches and retrying with backoff, asking for the
//! leases requests queued in the background and installing the grants, and
//! closing the leases this VM installed once they expire.
//!
//! A call made from a request's `on_log` would get no reply (Envoy delivers
//! none after the stream is gone), so finished requests only queue records;
//! the root sends them on its tick.

use std::collections::HashMap;
use std::rc::Rc;

use bridge_protocol::{
    LeaseClose, LeaseProgress, LeaseReply, LeaseRequest, SettleOutcome, SettleReply, LEASE_PATH, MAX_PROGRESS,
    SETTLE_PATH,
};
use log::{debug, error, info, warn};

use crate::config::PluginConfig;
use crate::host::{call_sidecar, sidecar_reply, BadReply, Host};
use crate::lease::{self, Renew, Slot};
use crate::metrics::Metric;
use crate::settle::{batch_of, Item};
use crate::slot::{self, Step};

mod vm;
pub use vm::{CallPermit, Vm, Waits};

/// The root context's state.
pub struct Background {
    pub context_id: u32,
    pub config: Rc<PluginConfig>,
    pub vm: Vm,
    /// Token of the settlement call in flight.
    in_flight: Option<u32>,
    /// Lease calls in flight, by callout token, with when they were sent.
    lease_calls: HashMap<u32, (LeaseRequest, u64)>,
    /// What this VM last added to the pending gauge (a sum over all VMs, which
    /// operators wait to reach 0 before stopping Envoy).
    reported: i64,
    /// The live leases of this VM as last reported: lease id -> (slot, drawn, when).
    progress: HashMap<String, Reported>,
}

/// A lease's last progress report.
#[derive(Debug, Clone)]
struct Reported {
    slot: String,
    drawn_tokens: i64,
    at_ms: u64,
}

/// A live lease with no new draws is reported this often anyway, so that the
/// sidecar never takes it for lost (`LEASE_LOST_SECS`, 30 s by default, must
/// be several times this).
pub const PROGRESS_HEARTBEAT_MS: u64 = 5_000;

/// How a sweep left one slot.
enum Swept {
    Closed(LeaseClose),
    StillLive,
    NotOurs,
}

impl Background {
    pub fn new(context_id: u32, config: Rc<PluginConfig>) -> Self {
        let vm = Vm::new(config.settle_batch_max);
        Self {
            context_id,
            config,
            vm,
            in_flight: None,
            lease_calls: HashMap::new(),
            reported: 0,
            progress: HashMap::new(),
        }
    }

    fn keep(&self, item: Item) {
        self.vm.keep(item, self.context_id);
    }

    pub fn on_tick(&mut self, host: &impl Host) {
        // A lease another VM installed wakes nobody here; waits run out.
        self.vm.waits.borrow_mut().wake_all();
        self.ask_for_leases(host);
        self.sweep_leases(host, false);
        self.send_due_batch(host);
        self.report_pending(host);
    }

    pub fn report_pending(&mut self, host: &impl Host) {
        let now = self.vm.pending() as i64;
        if now != self.reported && host.add_to_gauge(now - self.reported) {
            self.reported = now;
        }
    }

    /// Closes the leases this VM installed once they expire (all of them when
    /// `force`), and forgets slots that are no longer live.
    pub fn sweep_leases(&mut self, host: &impl Host, force: bool) {
        let keys: Vec<String> = self.vm.leases.borrow().iter().cloned().collect();
        for key in keys {
            let swept = slot::update(host, &key, |slot, now| match lease::expire(slot, now, force) {
                Some(close) => Step::Write(None, Swept::Closed(close)),
                None if matches!(slot, Some(Slot::Live(_))) => Step::Keep(Swept::StillLive),
                // Empty, or another worker is fetching: nothing of ours left.
                None => Step::Keep(Swept::NotOurs),
            });
            match swept {
                Some(Swept::Closed(close)) => {
                    self.vm.wake(&key);
                    debug!(
                        "[root {}] lease {} closed: {} of {:?} drawn",
                        self.context_id, close.lease_id, close.drawn_tokens, close.tokens
                    );
                    self.keep(Item::Close(close));
                }
                Some(Swept::NotOurs) => {}
                // Live, or every try lost: looked at again on the next tick.
                Some(Swept::StillLive) | None => continue,
            }
            self.vm.leases.borrow_mut().remove(&key);
        }
    }

    /// Sends the background lease requests waiting on the queue.
    pub fn ask_for_leases(&mut self, host: &impl Host) {
        while let Some(bytes) = host.dequeue_lease_ask() {
            let Ok(ask) = serde_json::from_slice::<LeaseRequest>(&bytes) else { continue };
            match call_sidecar(host, &self.config, LEASE_PATH, &bytes, self.config.sidecar_timeout_ms) {
                Ok(token) => {
                    host.metric(Metric::LeaseRenewals, 1);
                    self.lease_calls.insert(token, (ask, host.now_ms()));
                }
                // Nothing reached the sidecar; the marker goes stale and a later draw asks again.
                Err(e) => warn!("[root {}] cannot ask for lease {}: {e}", self.context_id, ask.lease_id),
            }
        }
    }

    /// A reply to one of the root's calls.
    pub fn on_call_response(&mut self, host: &impl Host, token: u32, body_size: usize) {
        if let Some((ask, sent_ms)) = self.lease_calls.remove(&token) {
            let reply = sidecar_reply(host, body_size);
            if let Ok(LeaseReply::Grant { tokens, .. }) = &reply {
                crate::metrics::granted(host, *tokens, host.now_ms().saturating_sub(sent_ms));
            }
            self.lease_answered(host, ask, reply);
            self.report_pending(host);
            return;
        }
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        match sidecar_reply::<SettleReply>(host, body_size) {
            Ok(reply) => {
                self.vm.settler.borrow_mut().sent();
                for lease_id in &reply.recalled {
                    self.recall(host, lease_id);
                }
                let results = reply.results.iter().chain(&reply.closes);
                for r in
                    results.filter(|r| !matches!(r.outcome, SettleOutcome::Settled | SettleOutcome::AlreadySettled))
                {
                    warn!(
                        "[root {}] settlement {} {:?}: {}",
                        self.context_id,
                        r.request_id,
                        r.outcome,
                        r.message.as_deref().unwrap_or("")
                    );
                }
                // More may be waiting: send the next batch now rather than on the next tick.
                self.send_due_batch(host);
                self.report_pending(host);
            }
            Err(BadReply::Status(Some(status))) if matches!(status.as_str(), "400" | "413" | "422") => {
                let dropped = self.vm.settler.borrow_mut().rejected();
                match dropped {
                    Some(item) => error!(
                        "[root {}] the sidecar refused settlement {} ({status}); given up, its hold will be charged at expiry",
                        self.context_id,
                        item.id()
                    ),
                    None => warn!("[root {}] the sidecar refused a settlement batch ({status}); sending it in halves", self.context_id),
                }
                self.send_due_batch(host);
                self.report_pending(host);
            }
            Err(why) => {
                warn!(
                    "[root {}] sidecar did not take a settlement batch ({why}); {} records kept for retry",
                    self.context_id,
                    self.vm.settler.borrow().pending()
                );
                self.vm.settler.borrow_mut().failed(host.now_ms());
            }
        }
    }

    /// The reply to a background lease request.
    fn lease_answered(
        &mut self,
        host: &impl Host,
        ask: LeaseRequest,
        reply: Result<LeaseReply, crate::host::BadReply>,
    ) {
        match reply {
            Ok(LeaseReply::Grant { tokens, policy, .. }) => {
                let key = lease::slot_key(&ask.key_hash, self.config.lease_slots);
                let lease_ms = self.config.lease_ms;
                let renewed = slot::update(host, &key, |slot, now| {
                    match lease::renew(slot, &ask.lease_id, &ask.key_hash, (tokens, &policy), now, lease_ms) {
                        Renew::Live { slot, close } => Step::Write(Some(slot), Ok(close)),
                        Renew::Orphan(close) => Step::Keep(Err(close)),
                    }
                });
                self.vm.wake(&key);
                match renewed {
                    Some(Ok(replaced)) => {
                        debug!("[root {}] lease {} of {tokens} live", self.context_id, ask.lease_id);
                        if let Some(close) = replaced {
                            self.keep(Item::Close(close));
                        }
                        self.vm.leases.borrow_mut().insert(key);
                    }
                    Some(Err(orphan)) => self.keep(Item::Close(orphan)),
                    // Never installed: nothing was drawn from it.
                    None => self.keep(Item::Close(LeaseClose {
                        key_hash: ask.key_hash,
                        lease_id: ask.lease_id,
                        tokens: Some(tokens),
                        drawn_tokens: 0,
                        drawn_n: 0,
                    })),
                }
            }
            // Refused (frozen, no balance) or not now: the current lease runs
            // out, and the request that then fetches gets the answer itself.
            // The marker stays until stale, so a refused key is not asked for
            // on every draw, but nobody waits for it any more.
            Ok(LeaseReply::Refuse { .. } | LeaseReply::Retry) => {
                debug!("[root {}] lease {} not granted", self.context_id, ask.lease_id);
                self.unanswered(host, &ask);
            }
            // It may have been granted unseen: give it back.
            Err(why) => {
                warn!("[root {}] lease {} {why}; releasing it", self.context_id, ask.lease_id);
                self.unanswered(host, &ask);
                self.keep(Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
            }
        }
    }

    /// Marks the renewal `ask` answered without a grant, and wakes its waiters.
    fn unanswered(&self, host: &impl Host, ask: &LeaseRequest) {
        let key = lease::slot_key(&ask.key_hash, self.config.lease_slots);
        slot::update(host, &key, |slot, _| match lease::unanswered(slot, &ask.lease_id) {
            Some(next) => Step::Write(Some(next), ()),
            None => Step::Keep(()),
        });
        self.vm.wake(&key);
    }

    pub fn send_due_batch(&mut self, host: &impl Host) {
        if self.in_flight.is_some() {
            return;
        }
        let now = host.now_ms();
        let progress = self.progress_due(host, now);
        let encoded = {
            let mut settler = self.vm.settler.borrow_mut();
            let backing_off = settler.backing_off(now);
            let items = settler.next_batch(now);
            if items.is_none() && (progress.is_empty() || backing_off) {
                return;
            }
            let items = items.unwrap_or_default();
            let mut batch = batch_of(items);
            batch.progress = progress;
            (serde_json::to_vec(&batch), items.len())
        };
        let (body, n) = match encoded {
            (Ok(b), n) => (b, n),
            (Err(e), _) => {
                error!("[root {}] cannot encode a settlement batch: {e}", self.context_id);
                self.vm.settler.borrow_mut().failed(now);
                return;
            }
        };
        match call_sidecar(host, &self.config, SETTLE_PATH, &body, self.config.settle_timeout_ms) {
            Ok(token) => {
                debug!("[root {}] settling {n} records (call {token})", self.context_id);
                self.in_flight = Some(token);
            }
            Err(e) => {
                warn!("[root {}] cannot reach the sidecar to settle {n} records: {e}; will retry", self.context_id);
                self.vm.settler.borrow_mut().failed(now);
            }
        }
    }

    /// Progress reports of this VM's live leases whose draws moved since
    /// their last report, or whose last report is a heartbeat old; and a
    /// heartbeat for each lease no longer live that requests drawn from it
    /// still wait on (closed, its rows to come), so that the sidecar takes
    /// neither for lost while this gateway lives.
    fn progress_due(&mut self, host: &impl Host, now: u64) -> Vec<LeaseProgress> {
        let mut due = Vec::new();
        let mut seen = HashMap::new();
        let mut report = |id: &str, key_hash: &str, slot: &str, drawn: (i64, i64), due: &mut Vec<LeaseProgress>| {
            let last = self.progress.remove(id);
            let moved = last
                .as_ref()
                .is_none_or(|r| r.drawn_tokens != drawn.0 || now.saturating_sub(r.at_ms) >= PROGRESS_HEARTBEAT_MS);
            let reported = match last {
                Some(r) if !moved || due.len() >= MAX_PROGRESS => r,
                _ => {
                    due.push(LeaseProgress {
                        key_hash: key_hash.to_owned(),
                        lease_id: id.to_owned(),
                        drawn_tokens: drawn.0,
                        drawn_n: drawn.1,
                    });
                    Reported { slot: slot.to_owned(), drawn_tokens: drawn.0, at_ms: now }
                }
            };
            seen.insert(id.to_owned(), reported);
        };
        let mut live = std::collections::HashSet::new();
        for key in self.vm.leases.borrow().iter() {
            let (bytes, _) = host.shared_get(key);
            let Some(Slot::Live(lease)) = bytes.as_deref().and_then(Slot::decode) else { continue };
            live.insert(lease.id.clone());
            report(&lease.id, &lease.key_hash, key, (lease.drawn_tokens, lease.drawn_n), &mut due);
        }
        for (id, key_hash) in self.vm.drawn_leases() {
            if !live.contains(&id) {
                // Closed (its counts went with the close): a heartbeat only.
                report(&id, &key_hash, "", (0, 0), &mut due);
            }
        }
        self.progress = seen;
        due
    }

    /// The sidecar recalled lease `lease_id` (another gateway needs the
    /// balance it holds) or no longer has it: it leaves its slot and is
    /// closed now with what was drawn.
    fn recall(&mut self, host: &impl Host, lease_id: &str) {
        let Some(key) = self.progress.get(lease_id).map(|r| r.slot.clone()).filter(|k| !k.is_empty()) else { return };
        let closed = slot::update(host, &key, |slot, _| match slot {
            Some(Slot::Live(lease)) if lease.id == lease_id => Step::Write(None, Some(lease.close())),
            _ => Step::Keep(None),
        });
        if let Some(Some(close)) = closed {
            info!("[root {}] lease {lease_id} recalled: {} drawn", self.context_id, close.drawn_tokens);
            host.metric(Metric::LeaseRecalls, 1);
            self.keep(Item::Close(close));
            self.vm.leases.borrow_mut().remove(&key);
            self.vm.wake(&key);
        }
    }

    /// The VM is going away (Envoy shutting down or reloading): send what is
    /// still queued. Replies to calls made now never arrive, but the calls reach
    /// the sidecar, and settlement is idempotent; what still fails to arrive is
    /// charged at its hold when the hold expires.
    pub fn on_done(&mut self, host: &impl Host) {
        self.sweep_leases(host, true);
        // Lease calls whose replies will not come now: release what they may have got.
        for (_, (ask, _)) in std::mem::take(&mut self.lease_calls) {
            self.keep(Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
        }
        let records = self.vm.settler.borrow_mut().take_all();
        if records.is_empty() {
            return;
        }
        for chunk in records.chunks(self.config.settle_batch_max) {
            let Ok(body) = serde_json::to_vec(&batch_of(chunk)) else { continue };
            if let Err(e) = call_sidecar(host, &self.config, SETTLE_PATH, &body, self.config.settle_timeout_ms) {
                error!(
                    "[root {}] shutting down: {} settlements not sent ({e}); their holds will expire",
                    self.context_id,
                    chunk.len()
                );
            }
        }
        info!("[root {}] shutting down: sent {} queued settlements", self.context_id, records.len());
    }
}

#[cfg(test)]
mod tests;
