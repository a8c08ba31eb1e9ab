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
    LeaseClose, LeaseProgress, LeaseReply, LeaseRequest, SettleBatch, SettleOutcome, SettleReply, LEASE_PATH,
    MAX_PROGRESS, SETTLE_PATH,
};
use log::{debug, error, info, warn};

use crate::config::PluginConfig;
use crate::host::{call_sidecar, sidecar_reply, BadReply, Host};
use crate::lease::{self, Renew, Slot};
use crate::metrics::{Gauge, Metric};
use crate::settle::{batch_of, Item, LaneKind};
use crate::slot::{self, Step};

mod vm;
pub use vm::{BodyBytes, CallPermit, Vm, Waits};

/// The root context's state.
pub struct Background {
    pub context_id: u32,
    pub config: Rc<PluginConfig>,
    pub vm: Vm,
    /// Token of the call in flight on the control lane (lease closes and
    /// progress reports), and on the records lane.
    control_call: Option<u32>,
    records_call: Option<u32>,
    /// Lease calls in flight, by callout token, with when they were sent.
    lease_calls: HashMap<u32, (LeaseRequest, u64)>,
    /// What this VM last added to each gauge (a sum over all VMs; operators
    /// wait for the pending one to reach 0 before stopping Envoy).
    reported: [i64; Gauge::ALL.len()],
    /// Whether the backlog was past a bound when last looked at (for one
    /// log line a change, not one a shed request).
    behind: bool,
    /// The live leases of this VM as last reported: lease id -> (slot, drawn, when).
    progress: HashMap<String, Reported>,
    /// When the last tick's control call went (progress, and the key changes on its reply): one a tick.
    control_sent_ms: Option<u64>,
    /// The sidecar's cursor of key changes, and the changes applied here
    /// (key hash -> its stamp, when seen), kept while the sidecar may name
    /// them again.
    change_cursor: Option<i64>,
    changes_seen: HashMap<String, (i64, u64)>,
    /// The leases of this VM's slots as its sweeps last saw them: slot ->
    /// (lease id, requests drawn, since when that count stands).
    draws_seen: HashMap<String, (String, i64, u64)>,
}

/// How long an applied key change is remembered: longer than the sidecar
/// names it again (`CHANGE_SLACK_MS`, 5 s, past its stamp).
const CHANGES_KEPT_MS: u64 = 30_000;

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

/// A lease whose draws moved is reported again after this long at the
/// soonest: its draws reach the sidecar within about a second (what a lease
/// lost with its gateway is charged), and a busy key costs the ledger one
/// guarded write a second, not one a tick.
pub const PROGRESS_MIN_MS: u64 = 1_000;

/// Progress reports one tick carries at least; with more live leases than
/// this many ticks of a heartbeat can carry, as many as keep every lease
/// reported within a heartbeat. The longest unreported first.
pub const PROGRESS_PER_TICK: usize = 64;

/// Background lease asks one VM has in flight at most; the rest wait in the
/// queue and go as answers come. Renewals are asked when half a lease is
/// left, so a wait of a few grants costs no request anything, and keys that
/// came to half their leases together no longer queue a thousand grants at
/// the ledger ahead of the records.
pub const LEASE_ASKS_IN_FLIGHT: usize = 16;

/// How a sweep left one slot.
enum Swept {
    Closed(LeaseClose),
    /// Live: its id and requests drawn.
    StillLive(String, i64),
    NotOurs,
}

impl Background {
    pub fn new(context_id: u32, config: Rc<PluginConfig>) -> Self {
        let vm = Vm::new(config.settle_batch_max);
        Self {
            context_id,
            config,
            vm,
            control_call: None,
            records_call: None,
            lease_calls: HashMap::new(),
            reported: [0; Gauge::ALL.len()],
            behind: false,
            progress: HashMap::new(),
            control_sent_ms: None,
            change_cursor: None,
            changes_seen: HashMap::new(),
            draws_seen: HashMap::new(),
        }
    }

    fn keep(&self, host: &impl Host, item: Item) {
        self.vm.keep(item, host.now_ms(), self.context_id);
    }

    pub fn on_tick(&mut self, host: &impl Host) {
        // A lease another VM installed wakes nobody here; waits run out.
        self.vm.waits.borrow_mut().wake_all();
        self.ask_for_leases(host);
        self.sweep_leases(host, false);
        self.send_due_batch(host);
        self.report_pending(host);
    }

    /// Brings this VM's part of each gauge up to date.
    pub fn report_pending(&mut self, host: &impl Host) {
        let backlog = self.vm.settler.borrow().backlog(host.now_ms());
        let oldest = i64::try_from(backlog.oldest_ms).unwrap_or(i64::MAX);
        let behind =
            backlog.records >= self.config.settle_backlog_max || backlog.oldest_ms >= self.config.settle_backlog_age_ms;
        if behind != self.behind {
            self.behind = behind;
            match behind {
                true => warn!(
                    "[root {}] settlement behind ({} records, oldest {} ms): answering new requests 503 until it catches up",
                    self.context_id, backlog.records, backlog.oldest_ms
                ),
                false => info!("[root {}] settlement caught up: admitting again", self.context_id),
            }
        }
        let values = [self.vm.pending() as i64, backlog.records as i64, oldest];
        for (gauge, now) in Gauge::ALL.into_iter().zip(values) {
            let last = &mut self.reported[gauge.index()];
            if now != *last && host.add_to_gauge(gauge, now - *last) {
                *last = now;
            }
        }
    }

    /// Closes the leases this VM installed once they expire (all of them when
    /// `force`), and forgets slots that are no longer live.
    pub fn sweep_leases(&mut self, host: &impl Host, force: bool) {
        let keys: Vec<String> = self.vm.leases.borrow().iter().cloned().collect();
        let idle_ms = self.config.lease_idle_ms;
        {
            let leases = self.vm.leases.borrow();
            self.draws_seen.retain(|k, _| leases.contains(k));
        }
        for key in keys {
            // Nothing drawn since a sweep `idle_ms` ago: the key went quiet.
            let seen = self.draws_seen.get(&key);
            let idle = |l: &lease::Lease, now: u64| {
                seen.is_some_and(|(id, n, since)| {
                    *id == l.id && *n == l.drawn_n && now.saturating_sub(*since) >= idle_ms
                })
            };
            let swept = slot::update(host, &key, |slot, now| match (lease::expire(slot, now, force), slot) {
                (Some(close), _) => Step::Write(None, Swept::Closed(close)),
                (None, Some(Slot::Live(l))) if idle(l, now) => Step::Write(None, Swept::Closed(l.close())),
                (None, Some(Slot::Live(l))) => Step::Keep(Swept::StillLive(l.id.clone(), l.drawn_n)),
                // Empty, or another worker is fetching: nothing of ours left.
                (None, _) => Step::Keep(Swept::NotOurs),
            });
            match swept {
                Some(Swept::Closed(close)) => {
                    self.vm.wake(&key);
                    debug!(
                        "[root {}] lease {} closed: {} of {:?} drawn",
                        self.context_id, close.lease_id, close.drawn_tokens, close.tokens
                    );
                    self.keep(host, Item::Close(close));
                }
                Some(Swept::NotOurs) => {}
                Some(Swept::StillLive(id, n)) => {
                    let now = host.now_ms();
                    let moved = self.draws_seen.get(&key).is_none_or(|(i, m, _)| *i != id || *m != n);
                    if moved {
                        self.draws_seen.insert(key, (id, n, now));
                    }
                    continue;
                }
                // Every try lost: looked at again on the next tick.
                None => continue,
            }
            self.draws_seen.remove(&key);
            self.vm.leases.borrow_mut().remove(&key);
        }
    }

    /// Sends the background lease requests waiting on the queue, up to
    /// [`LEASE_ASKS_IN_FLIGHT`] at a time.
    pub fn ask_for_leases(&mut self, host: &impl Host) {
        while self.lease_calls.len() < LEASE_ASKS_IN_FLIGHT {
            let Some(bytes) = host.dequeue_lease_ask() else { break };
            let Ok(ask) = serde_json::from_slice::<LeaseRequest>(&bytes) else { continue };
            // Waited so long that a later ask replaced it (a slow sidecar):
            // dropped here, so the queue cannot grow with asks nobody wants.
            let key = lease::slot_key(&ask.key_hash, self.config.lease_slots);
            let (current, _) = host.shared_get(&key);
            if !lease::still_asked(current.as_deref().and_then(Slot::decode).as_ref(), &ask.lease_id) {
                debug!("[root {}] lease ask {} replaced while it waited; not sent", self.context_id, ask.lease_id);
                continue;
            }
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
            // Its place goes to the next ask waiting, if any.
            self.ask_for_leases(host);
            self.report_pending(host);
            return;
        }
        if self.control_call == Some(token) {
            self.control_call = None;
            self.control_answered(host, body_size);
        } else if self.records_call == Some(token) {
            self.records_call = None;
            self.records_answered(host, body_size);
        } else {
            return;
        }
        // More may be waiting: send the next batch now rather than on the next tick.
        self.send_due_batch(host);
        self.report_pending(host);
    }

    /// The reply to a batch of lease closes and progress reports.
    fn control_answered(&mut self, host: &impl Host, body_size: usize) {
        match sidecar_reply::<SettleReply>(host, body_size) {
            Ok(reply) => {
                self.vm.settler.borrow_mut().closes_sent();
                self.answered(host, &reply);
                for change in &reply.changed {
                    self.key_changed(host, change);
                }
                if reply.cursor.is_some() {
                    self.change_cursor = reply.cursor;
                }
                let now = host.now_ms();
                self.changes_seen.retain(|_, (_, seen)| now.saturating_sub(*seen) < CHANGES_KEPT_MS);
            }
            Err(why) => self.lane_failed(host, LaneKind::Control, &why),
        }
    }

    /// The reply to a batch of records: each is settled, except those the
    /// sidecar cannot take yet (`Later`), which go again shortly.
    fn records_answered(&mut self, host: &impl Host, body_size: usize) {
        match sidecar_reply::<SettleReply>(host, body_size) {
            Ok(reply) => {
                let later: Vec<&str> = reply
                    .results
                    .iter()
                    .filter(|r| r.outcome == SettleOutcome::Later)
                    .map(|r| r.request_id.as_str())
                    .collect();
                let done = self.vm.settler.borrow_mut().records_sent(&later, host.now_ms());
                for record in &done {
                    self.vm.record_done(record);
                }
                if !later.is_empty() {
                    debug!("[root {}] {} records to settle again shortly", self.context_id, later.len());
                }
                self.answered(host, &reply);
            }
            Err(why) => self.lane_failed(host, LaneKind::Records, &why),
        }
    }

    /// What a settlement reply says beyond the outcomes: leases recalled,
    /// and the outcomes worth a line in the log.
    fn answered(&mut self, host: &impl Host, reply: &SettleReply) {
        for lease_id in &reply.recalled {
            self.recall(host, lease_id);
        }
        let results = reply.results.iter().chain(&reply.closes);
        let worth = |r: &&bridge_protocol::SettleResult| {
            !matches!(r.outcome, SettleOutcome::Settled | SettleOutcome::AlreadySettled | SettleOutcome::Later)
        };
        for r in results.filter(worth) {
            warn!(
                "[root {}] settlement {} {:?}: {}",
                self.context_id,
                r.request_id,
                r.outcome,
                r.message.as_deref().unwrap_or("")
            );
        }
    }

    /// A lane's call failed: a batch the sidecar refused as such is split
    /// (or its one item given up); any other failure is retried after a backoff.
    fn lane_failed(&mut self, host: &impl Host, lane: LaneKind, why: &BadReply) {
        match why {
            BadReply::Status(Some(status)) if matches!(status.as_str(), "400" | "413" | "422") => {
                let dropped = self.vm.settler.borrow_mut().rejected(lane);
                match dropped {
                    Some(item) => {
                        error!(
                            "[root {}] the sidecar refused settlement {} ({status}); given up, its hold will be charged at expiry",
                            self.context_id,
                            item.id()
                        );
                        if let Item::Settle(record) = &item {
                            self.vm.record_done(record);
                        }
                    }
                    None => warn!(
                        "[root {}] the sidecar refused a settlement batch ({status}); sending it in halves",
                        self.context_id
                    ),
                }
            }
            _ => {
                warn!(
                    "[root {}] sidecar did not take a {lane:?} batch ({why}); {} items kept for retry",
                    self.context_id,
                    self.vm.settler.borrow().pending()
                );
                self.vm.settler.borrow_mut().failed(lane, host.now_ms());
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
                            self.keep(host, Item::Close(close));
                        }
                        self.vm.leases.borrow_mut().insert(key);
                    }
                    Some(Err(orphan)) => self.keep(host, Item::Close(orphan)),
                    // Never installed: nothing was drawn from it.
                    None => self.keep(
                        host,
                        Item::Close(LeaseClose {
                            key_hash: ask.key_hash,
                            lease_id: ask.lease_id,
                            tokens: Some(tokens),
                            drawn_tokens: 0,
                            drawn_n: 0,
                        }),
                    ),
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
                self.keep(host, Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
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

    /// Sends what is due on each lane whose last call was answered: lease
    /// closes with the progress reports due (never behind records), and the
    /// next batch of records.
    pub fn send_due_batch(&mut self, host: &impl Host) {
        let now = host.now_ms();
        if self.control_call.is_none() && !self.vm.settler.borrow().backing_off(LaneKind::Control, now) {
            // A call a tick at least, even with nothing to say: its reply
            // carries the key changes. Progress goes once a tick, not with
            // every close: gathering it reads every live lease's slot, and
            // with many keys the lane would run back to back on reports
            // alone (a tick's budget a call, not a tick).
            let tick_due =
                self.control_sent_ms.is_none_or(|at| now.saturating_sub(at) >= self.config.settle_interval_ms);
            let progress = if tick_due { self.progress_due(host, now) } else { Vec::new() };
            let closes = self.vm.settler.borrow_mut().next_closes(now, tick_due);
            if let Some(closes) = closes {
                let n = closes.len();
                let batch = SettleBatch { records: Vec::new(), closes, progress, changes_since: self.change_cursor };
                self.control_call = self.send(host, LaneKind::Control, &batch, n);
                if tick_due {
                    self.control_sent_ms = Some(now);
                }
            }
        }
        if self.records_call.is_none() {
            let records = self.vm.settler.borrow_mut().next_records(now);
            if let Some(records) = records {
                let n = records.len();
                let batch = SettleBatch { records, closes: Vec::new(), progress: Vec::new(), changes_since: None };
                self.records_call = self.send(host, LaneKind::Records, &batch, n);
            }
        }
    }

    /// One lane's batch to the sidecar: the call's token, or `None` (the
    /// lane then backs off).
    fn send(&self, host: &impl Host, lane: LaneKind, batch: &SettleBatch, n: usize) -> Option<u32> {
        let now = host.now_ms();
        let body = match serde_json::to_vec(batch) {
            Ok(b) => b,
            Err(e) => {
                error!("[root {}] cannot encode a settlement batch: {e}", self.context_id);
                self.vm.settler.borrow_mut().failed(lane, now);
                return None;
            }
        };
        match call_sidecar(host, &self.config, SETTLE_PATH, &body, self.config.settle_timeout_ms) {
            Ok(token) => {
                debug!("[root {}] settling {n} {lane:?} items (call {token})", self.context_id);
                Some(token)
            }
            Err(e) => {
                warn!(
                    "[root {}] cannot reach the sidecar to settle {n} {lane:?} items: {e}; will retry",
                    self.context_id
                );
                self.vm.settler.borrow_mut().failed(lane, now);
                None
            }
        }
    }

    /// Progress reports of this VM's live leases whose draws moved since
    /// their last report, or whose last report is a heartbeat old; and a
    /// heartbeat for each lease no longer live that requests drawn from it
    /// still wait on (closed, its rows to come), so that the sidecar takes
    /// neither for lost while this gateway lives.
    fn progress_due(&mut self, host: &impl Host, now: u64) -> Vec<LeaseProgress> {
        // Every lease this VM answers for: (id, key hash, slot, drawn tokens and requests).
        let mut leases: Vec<(String, String, String, (i64, i64))> = Vec::new();
        let mut live = std::collections::HashSet::new();
        for key in self.vm.leases.borrow().iter() {
            let (bytes, _) = host.shared_get(key);
            let Some(Slot::Live(lease)) = bytes.as_deref().and_then(Slot::decode) else { continue };
            live.insert(lease.id.clone());
            leases.push((lease.id, lease.key_hash, key.clone(), (lease.drawn_tokens, lease.drawn_n)));
        }
        for (id, key_hash) in self.vm.drawn_leases() {
            if !live.contains(&id) {
                // Closed (its counts went with the close): a heartbeat only.
                leases.push((id, key_hash, String::new(), (0, 0)));
            }
        }
        let ticks_a_heartbeat = (PROGRESS_HEARTBEAT_MS / self.config.settle_interval_ms.max(1)).max(1) as usize;
        let budget = PROGRESS_PER_TICK.max(leases.len().div_ceil(ticks_a_heartbeat)).min(MAX_PROGRESS);
        // Due: never reported, moved and not reported for a second, or a heartbeat old.
        let mut due: Vec<(u64, usize)> = Vec::new();
        for (i, (id, _, _, drawn)) in leases.iter().enumerate() {
            let last = self.progress.get(id);
            let since = last.map_or(u64::MAX, |r| now.saturating_sub(r.at_ms));
            let moved = last.is_none_or(|r| r.drawn_tokens != drawn.0);
            if since >= PROGRESS_HEARTBEAT_MS || (moved && since >= PROGRESS_MIN_MS) {
                due.push((since, i));
            }
        }
        due.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        due.truncate(budget);
        let mut out = Vec::with_capacity(due.len());
        let mut seen = HashMap::with_capacity(leases.len());
        for &(_, i) in &due {
            let (id, key_hash, slot, drawn) = &leases[i];
            out.push(LeaseProgress {
                key_hash: key_hash.clone(),
                lease_id: id.clone(),
                drawn_tokens: drawn.0,
                drawn_n: drawn.1,
            });
            seen.insert(id.clone(), Reported { slot: slot.clone(), drawn_tokens: drawn.0, at_ms: now });
        }
        // The others keep their last report (or, never reported, wait first in line next tick).
        for (id, _, slot, _) in &leases {
            if !seen.contains_key(id) {
                let last = self.progress.remove(id);
                let r = last.unwrap_or(Reported { slot: String::new(), drawn_tokens: -1, at_ms: 0 });
                seen.insert(id.clone(), Reported { slot: slot.clone(), ..r });
            }
        }
        self.progress = seen;
        out
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
            self.keep(host, Item::Close(close));
            self.vm.leases.borrow_mut().remove(&key);
            self.vm.wake(&key);
        }
    }

    /// An admin changed a key (frozen, topped up, new controls): its lease
    /// leaves its slot and closes now, and a refusal cached for it goes, so
    /// that its next request is decided afresh. Within a tick of the change,
    /// however long the lease's window.
    fn key_changed(&mut self, host: &impl Host, change: &bridge_protocol::KeyChange) {
        let now = host.now_ms();
        if self.changes_seen.get(&change.key_hash).is_some_and(|(at, _)| *at >= change.at_ms) {
            return;
        }
        let key = lease::slot_key(&change.key_hash, self.config.lease_slots);
        let hash = change.key_hash.as_str();
        // A lease another VM installed is that VM's to close (it reads the change too).
        let ours = !change.created && self.vm.leases.borrow().contains(&key);
        // What was dropped: a lease (its close), a refusal, or nothing.
        enum Dropped {
            Lease(LeaseClose),
            Refusal,
            Nothing,
        }
        let dropped = slot::update(host, &key, |slot, _| match slot {
            Some(Slot::Live(lease)) if ours && lease.key_hash == hash => {
                Step::Write(None, Dropped::Lease(lease.close()))
            }
            Some(Slot::Refused { key_hash, .. }) if key_hash == hash => Step::Write(None, Dropped::Refusal),
            _ => Step::Keep(Dropped::Nothing),
        });
        match dropped {
            Some(Dropped::Lease(close)) => {
                info!(
                    "[root {}] key changed: lease {} closed, {} drawn",
                    self.context_id, close.lease_id, close.drawn_tokens
                );
                host.metric(Metric::LeaseRecalls, 1);
                self.keep(host, Item::Close(close));
                self.vm.leases.borrow_mut().remove(&key);
                self.vm.wake(&key);
            }
            Some(Dropped::Refusal) => self.vm.wake(&key),
            // Nothing of the key's here.
            Some(Dropped::Nothing) => {}
            // Every try lost: the sidecar names the change again while it
            // looks back, and it is applied then.
            None => return,
        }
        self.changes_seen.insert(change.key_hash.clone(), (change.at_ms, now));
    }

    /// The VM is going away (Envoy shutting down or reloading): send what is
    /// still queued. Replies to calls made now never arrive, but the calls reach
    /// the sidecar, and settlement is idempotent; what still fails to arrive is
    /// charged at its hold when the hold expires.
    pub fn on_done(&mut self, host: &impl Host) {
        self.sweep_leases(host, true);
        // Lease calls whose replies will not come now: release what they may have got.
        for (_, (ask, _)) in std::mem::take(&mut self.lease_calls) {
            self.keep(host, Item::Close(LeaseClose::release(ask.key_hash, ask.lease_id)));
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
