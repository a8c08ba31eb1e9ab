//! Admission: the estimate drawn from the key's lease without a callout, or
//! a lease fetched or a reservation made with one; the sidecar's replies; the
//! failure mode when it cannot answer; and the one path that gives back what
//! an abandoned admission may have been granted.

use bridge_protocol::{
    ErrorBody, KeyPolicy, LeaseClose, LeaseReply, LeaseRequest, ReserveReply, ReserveRequest, UsageSource, LEASE_PATH,
    RESERVE_PATH,
};
use log::{debug, info, warn};

use super::{record, Admitted, Exchange, Hold, State, Wait};
use crate::config::FailureMode;
use crate::host::{call_sidecar, sidecar_reply, Flow, HttpHost};
use crate::lease::{self, Draw, Install, Slot};
use crate::metrics::Metric;
use crate::rate;
use crate::reply::LocalReply;
use crate::settle::Item;
use crate::slot::{self, Step};

/// Where a request's estimate comes from.
enum Precheck {
    Drawn(String),
    /// Fetch lease `0` of `2` tokens, closing the lease `1` it replaces in the same call.
    Fetch(String, Option<LeaseClose>, i64),
    /// The key's next lease is on its way: wait for it.
    Wait,
    Reserve,
    /// Refused a moment ago: the same answer, without a call.
    Refused(u16, bridge_protocol::ErrorBody),
    /// Over the key's rate limit: retry after this many seconds.
    Limited(u64),
}

/// A decision on the key's slot: where the estimate comes from (and a lease
/// to ask for in the background), or, first, the rate limits (rpm, tpm) the
/// key's live lease carries, to count the request against.
type Decided = Result<(Precheck, Option<(String, i64)>), (Option<i64>, Option<i64>)>;

impl Exchange {
    /// The body is in (or the request was woken from its wait): draw, fetch,
    /// wait or reserve.
    pub(super) fn admit(&mut self, host: &impl HttpHost, mut req: Admitted) -> Flow {
        if let Some(shed) = self.shed_if_behind(host, &req.caller.request_id) {
            return shed;
        }
        if self.cfg.lease_tokens == 0 {
            return self.reserve(host, req);
        }
        match crate::itemise::time(crate::itemise::Step::Draw, || self.precheck(host, &mut req)) {
            // Headers were held for this body: continuing the body releases both.
            Precheck::Drawn(lease_id) => {
                self.forwarded(req, Hold::Drawn(lease_id));
                Flow::Continue
            }
            Precheck::Fetch(lease_id, replaces, want) => {
                // Another key's expired lease, left in a slot they share, closes on its own.
                let (replaces, other) = match replaces {
                    Some(c) if c.key_hash != req.caller.key_hash => (None, Some(c)),
                    same => (same, None),
                };
                if let Some(close) = other {
                    self.keep(host, Item::Close(close));
                }
                host.metric(Metric::LeaseFetches, 1);
                let ask = LeaseRequest {
                    key_hash: req.caller.key_hash.clone(),
                    lease_id: lease_id.clone(),
                    model: req.admission.model.clone(),
                    want,
                    min: req.admission.estimate,
                    replaces: replaces.clone(),
                };
                // Kept until the call is answered: if it is not, the close
                // goes with the settlements instead (it is idempotent).
                let wait = Wait::Lease { lease_id, replacing: replaces };
                self.call(host, req, wait, LEASE_PATH, serde_json::to_vec(&ask))
            }
            Precheck::Wait => self.wait(host, req),
            Precheck::Reserve => self.reserve(host, req),
            Precheck::Refused(status, error) => {
                self.refuse(host, &req, status, error);
                Flow::Pause
            }
            Precheck::Limited(secs) => {
                info!("[{}] {}: over the key's rate limit", self.id, req.caller.request_id);
                self.answer(host, LocalReply::rate_limited(secs))
            }
        }
    }

    /// This request counted in the key's minute under its rate limits, or
    /// refused: the seconds to retry after.
    fn over_limit(&self, host: &impl HttpHost, req: &Admitted, rpm: Option<i64>, tpm: Option<i64>) -> Option<u64> {
        let rate_key = rate::window_key(&req.caller.key_hash);
        let (key_hash, estimate) = (req.caller.key_hash.as_str(), req.admission.estimate);
        slot::update(host, &rate_key, |current: Option<&rate::Rate>, now| {
            match rate::count(current, key_hash, now, estimate, rpm, tpm) {
                Some(rate::Count::Counted(r)) => Step::Write(Some(r), None),
                Some(rate::Count::Over(secs)) => Step::Keep(Some(secs)),
                None => Step::Keep(None),
            }
        })
        .flatten()
    }

    /// Without leases: this request counted under the limits the key's last
    /// reservation reply taught (`Ok`), refused with the seconds to retry
    /// after (`Err`), or `None` where none were taught (or every try lost).
    fn over_taught_limit(&self, host: &impl HttpHost, req: &Admitted) -> Option<Result<(), u64>> {
        let rate_key = rate::window_key(&req.caller.key_hash);
        let (key_hash, estimate) = (req.caller.key_hash.as_str(), req.admission.estimate);
        slot::update(host, &rate_key, |current: Option<&rate::Rate>, now| {
            let Some((rpm, tpm)) = rate::learned_limits(current, key_hash, now) else { return Step::Keep(None) };
            match rate::count(current, key_hash, now, estimate, rpm, tpm) {
                Some(rate::Count::Counted(r)) => Step::Write(Some(r), Some(Ok(()))),
                Some(rate::Count::Over(secs)) => Step::Keep(Some(Err(secs))),
                None => Step::Keep(None),
            }
        })
        .flatten()
    }

    /// Without leases: keeps the limits a reservation reply gave for the
    /// key's next requests, counting this admitted one if it was not yet.
    fn learn_limits(&self, host: &impl HttpHost, req: &Admitted, policy: &KeyPolicy) {
        let rate_key = rate::window_key(&req.caller.key_hash);
        let (key_hash, estimate) = (req.caller.key_hash.as_str(), req.admission.estimate);
        let limits = (policy.rpm_limit, policy.tpm_limit);
        slot::update(host, &rate_key, |current: Option<&rate::Rate>, now| {
            match rate::learn(current, key_hash, now, estimate, limits, req.rate_counted) {
                Some(r) => Step::Write(Some(r), ()),
                None => Step::Keep(()),
            }
        });
    }

    /// Waits for the key's lease (woken when its slot changes or on the
    /// root's tick), at most `lease_wait_ms` from its first wait, and as one
    /// of at most `lease_waiters_max`: past either, 503 with Retry-After.
    fn wait(&mut self, host: &impl HttpHost, mut req: Admitted) -> Flow {
        let now = host.now_ms();
        let first = req.waiting_since.is_none();
        let since = *req.waiting_since.get_or_insert(now);
        if now.saturating_sub(since) >= self.cfg.lease_wait_ms {
            return self.shed(host, &req, "waited too long for its key's lease");
        }
        let full = first && self.vm.waits.borrow().len() >= self.cfg.lease_waiters_max;
        if full {
            return self.shed(host, &req, "too many requests wait for leases");
        }
        if first {
            host.metric(Metric::LeaseWaits, 1);
        }
        self.vm.waits.borrow_mut().add(self.id, self.slot_of(&req));
        self.state = State::Waiting { req };
        Flow::Pause
    }

    /// Woken from a wait: looks at the key's slot again, and goes upstream if
    /// the lease is there.
    pub fn on_woken(&mut self, host: &impl HttpHost) {
        if !self.is_waiting() {
            return;
        }
        let State::Waiting { req } = std::mem::replace(&mut self.state, State::Settled) else { return };
        if self.admit(host, req) == Flow::Continue {
            host.resume_request();
        }
    }

    /// Why this VM admits nothing now, if it does not: its settlement is
    /// behind by more than `settle_backlog_max` records, or its oldest
    /// record has waited longer than `settle_backlog_age_ms` (not with
    /// `failure_mode: allow`, which forwards while the sidecar is down).
    /// Admitting more would outrun what the ledger can write.
    /// Answered 503 with Retry-After if this VM's settlement is behind
    /// ([`Self::settlement_behind`]); logged once a change by the root
    /// (`Background::report_pending`), not per request.
    pub(super) fn shed_if_behind(&mut self, host: &impl HttpHost, request_id: &str) -> Option<Flow> {
        let why = self.settlement_behind(host)?;
        debug!("[{}] {request_id}: {why}; answering 503", self.id);
        host.metric(Metric::Shed, 1);
        Some(self.answer(host, LocalReply::overloaded(self.cfg.retry_after_secs)))
    }

    fn settlement_behind(&self, host: &impl HttpHost) -> Option<String> {
        let backlog = self.vm.settler.borrow().backlog(host.now_ms());
        if backlog.records >= self.cfg.settle_backlog_max {
            return Some(format!("{} records wait for settlement", backlog.records));
        }
        if self.cfg.failure_mode == FailureMode::Allow {
            return None;
        }
        if backlog.oldest_ms >= self.cfg.settle_backlog_age_ms {
            return Some(format!("the oldest record has waited {} ms for settlement", backlog.oldest_ms));
        }
        // Ahead of the age: a backlog the sidecar would take longer than the
        // age bound to settle, at the rate it has been settling, is refused
        // now, not once its oldest record has aged (by then as many again
        // would be queued behind it). A few batches always pass.
        let drain = backlog.drain_ms.unwrap_or(0);
        let few = 2 * self.cfg.settle_batch_max;
        (drain >= self.cfg.settle_backlog_age_ms && backlog.records > few)
            .then(|| format!("{} records would take {drain} ms to settle", backlog.records))
    }

    /// Load shed: answered 503 with Retry-After (in either failure mode: it is
    /// this gateway that is full, not the sidecar that failed).
    fn shed(&mut self, host: &impl HttpHost, req: &Admitted, why: &str) -> Flow {
        warn!("[{}] {}: {why}; answering 503", self.id, req.caller.request_id);
        host.metric(Metric::Shed, 1);
        self.answer(host, LocalReply::overloaded(self.cfg.retry_after_secs))
    }

    /// Draws this request's estimate from the key's lease, or takes the job of
    /// fetching the next one; waits while another request fetches it.
    fn precheck(&self, host: &impl HttpHost, req: &mut Admitted) -> Precheck {
        let Some(new_id) = crate::new_request_id() else { return Precheck::Reserve };
        let estimate = req.admission.estimate;
        let policy = self.cfg.lease_policy();
        let key = self.slot_of(req);
        let key_hash = req.caller.key_hash.as_str();
        let model = req.admission.model.as_str();
        // Twice at most: a key with rate limits is counted between the two
        // (once in the request's life: not again after a wait).
        let mut counted = req.rate_counted;
        let decided = loop {
            let decided = slot::update(host, &key, |slot, now| -> Step<Decided> {
                // The key's controls, as its live lease carries them: no call.
                if let Some((status, error)) = lease::controls_refuse(slot, key_hash, model, now) {
                    return Step::Keep(Ok((Precheck::Refused(status, error), None)));
                }
                if let Some(limits) = lease::rate_limits(slot, key_hash, now).filter(|_| !counted) {
                    return Step::Keep(Err(limits));
                }
                decide_draw(lease::draw(slot, key_hash, now, estimate, &new_id, &policy), &new_id)
            });
            match decided {
                Some(Err((rpm, tpm))) => match self.over_limit(host, req, rpm, tpm) {
                    Some(secs) => return Precheck::Limited(secs),
                    None => (counted, req.rate_counted) = (true, true),
                },
                Some(Ok(decided)) => break decided,
                None => return Precheck::Reserve,
            }
        };
        let (precheck, refresh) = decided;
        if let Some((id, want)) = refresh {
            self.ask_in_background(host, req, id, want);
        }
        precheck
    }
}

/// What a draw decision writes to the key's slot and leads to.
fn decide_draw(draw: Draw, new_id: &str) -> Step<Decided> {
    let keep = |p: Precheck| Step::Keep(Ok((p, None)));
    match draw {
        Draw::Drawn { slot, lease_id, refresh } => Step::Write(Some(slot), Ok((Precheck::Drawn(lease_id), refresh))),
        Draw::Fetch { slot, close, want } => {
            Step::Write(Some(slot), Ok((Precheck::Fetch(new_id.to_owned(), close, want), None)))
        }
        Draw::Wait => keep(Precheck::Wait),
        Draw::Reserve => keep(Precheck::Reserve),
        Draw::Refused { status, error } => keep(Precheck::Refused(status, error)),
    }
}

impl Exchange {
    /// The next lease, asked for by a root context: this request does not wait.
    fn ask_in_background(&self, host: &impl HttpHost, req: &Admitted, lease_id: String, want: i64) {
        let estimate = req.admission.estimate;
        let ask = LeaseRequest {
            key_hash: req.caller.key_hash.clone(),
            lease_id,
            model: req.admission.model.clone(),
            want,
            min: estimate,
            replaces: None,
        };
        let queued = serde_json::to_vec(&ask).is_ok_and(|bytes| host.enqueue_lease_ask(&bytes));
        if !queued {
            // The marker goes stale; the lease is fetched when this one runs out.
            warn!("[{}] could not queue a lease request", self.id);
        }
    }

    /// Asks the sidecar to hold this request's estimate on its own, once it
    /// counted under the limits the key's reservation replies taught (every
    /// way of reserving alone: without leases, beside another key's lease in
    /// its slot, after a lost race).
    fn reserve(&mut self, host: &impl HttpHost, mut req: Admitted) -> Flow {
        let counted = if req.rate_counted { None } else { self.over_taught_limit(host, &req) };
        match counted {
            Some(Err(secs)) => {
                info!("[{}] {}: over the key's rate limit", self.id, req.caller.request_id);
                return self.answer(host, LocalReply::rate_limited(secs));
            }
            Some(Ok(())) => req.rate_counted = true,
            None => {}
        }
        host.metric(Metric::Reservations, 1);
        let reserve = ReserveRequest {
            key_hash: req.caller.key_hash.clone(),
            request_id: req.caller.request_id.clone(),
            model: req.admission.model.clone(),
            estimate: req.admission.estimate,
        };
        self.call(host, req, Wait::Reserve, RESERVE_PATH, serde_json::to_vec(&reserve))
    }

    /// Sends the admission call and waits for it; if it cannot be sent, the
    /// sidecar never saw it.
    fn call(
        &mut self,
        host: &impl HttpHost,
        req: Admitted,
        wait: Wait,
        path: &str,
        payload: serde_json::Result<Vec<u8>>,
    ) -> Flow {
        let Some(permit) = self.vm.call_permit(self.cfg.admission_calls_max) else {
            if let Wait::Lease { lease_id, replacing } = wait {
                self.end_fetch(host, &req, &lease_id, replacing);
            }
            return self.shed(host, &req, "too many admission calls in flight");
        };
        let sent = payload.map_err(|e| format!("cannot encode the call: {e}")).and_then(|p| {
            call_sidecar(host, &self.cfg, path, &p, self.cfg.sidecar_timeout_ms)
                .map_err(|e| format!("dispatch failed: {e}"))
        });
        match sent {
            Ok(callout) => {
                self.vm.called(callout, self.id);
                self.state = State::Admitting { req, callout, wait, sent_ms: host.now_ms(), _permit: permit };
                Flow::Pause
            }
            Err(why) => self.sidecar_failed(host, req, wait, &why, false),
        }
    }

    /// The reply to this request's admission call. Replies to other calls,
    /// or arriving after the request moved on (a client gone), are ignored.
    pub fn on_call_response(&mut self, host: &impl HttpHost, token: u32, body_size: usize) {
        if matches!(&self.state, State::Looking(l) if l.callout == token) {
            if let State::Looking(lookup) = std::mem::replace(&mut self.state, State::Settled) {
                self.on_owner_reply(host, lookup, body_size);
            }
            return;
        }
        if matches!(&self.state, State::Checking { callout, .. } if *callout == token) {
            // Its call permit goes before admission may ask for another.
            let State::Checking { req, .. } = std::mem::replace(&mut self.state, State::Settled) else { return };
            self.on_previous_reply(host, req, body_size);
            return;
        }
        if !matches!(&self.state, State::Admitting { callout, .. } if *callout == token) {
            return;
        }
        let State::Admitting { req, wait, sent_ms, .. } = std::mem::replace(&mut self.state, State::Settled) else {
            return;
        };
        match wait {
            Wait::Reserve => match sidecar_reply::<ReserveReply>(host, body_size) {
                Ok(ReserveReply::Admit { policy, .. }) => {
                    // Kept for the key's next requests that reserve alone (all of them without leases).
                    self.learn_limits(host, &req, &policy);
                    self.forward(host, req, Hold::Reserved)
                }
                Ok(ReserveReply::Refuse { status: 429, error }) => match self.draw_only(host, &req) {
                    // The balance was in the key's lease, fetched while this
                    // request reserved alone: drawn from it after all.
                    Some(lease_id) => self.forward(host, req, Hold::Drawn(lease_id)),
                    None => self.refuse(host, &req, 429, error),
                },
                Ok(ReserveReply::Refuse { status, error }) => self.refuse(host, &req, status, error),
                // The balance is in other gateways' leases, which the sidecar
                // recalled: look again on the root's next tick.
                Ok(ReserveReply::Retry) => {
                    self.wait(host, req);
                }
                Err(why) => {
                    self.sidecar_failed(host, req, Wait::Reserve, &why.to_string(), true);
                }
            },
            Wait::Lease { lease_id, replacing } => match sidecar_reply::<LeaseReply>(host, body_size) {
                // Answered: the sidecar closed the replaced lease before deciding.
                Ok(LeaseReply::Grant { tokens, policy, .. }) => {
                    debug!("[{}] {}: lease {lease_id} of {tokens} granted", self.id, req.caller.request_id);
                    crate::metrics::granted(host, tokens, host.now_ms().saturating_sub(sent_ms));
                    self.install_lease(host, &req, &lease_id, (tokens, &policy));
                    self.forward(host, req, Hold::Drawn(lease_id));
                }
                // A model the key may not use says nothing of its other
                // requests: not cached for the key, the marker just goes.
                Ok(LeaseReply::Refuse { status, error }) if error.code.as_deref() == Some("model_not_allowed") => {
                    self.clear_marker(host, &req, &lease_id);
                    self.refuse(host, &req, status, error);
                }
                Ok(LeaseReply::Refuse { status, error }) => {
                    self.cache_refusal(host, &req, &lease_id, status, &error);
                    self.refuse(host, &req, status, error);
                }
                // Not now (the balance is in other gateways' leases, recalled, or
                // moved under every try): the marker goes, and this request
                // looks again on the root's next tick, as one waiting.
                Ok(LeaseReply::Retry) => {
                    self.clear_marker(host, &req, &lease_id);
                    self.wait(host, req);
                }
                Err(why) => {
                    self.sidecar_failed(host, req, Wait::Lease { lease_id, replacing }, &why.to_string(), true);
                }
            },
        }
    }

    fn forward(&mut self, host: &impl HttpHost, req: Admitted, hold: Hold) {
        self.forwarded(req, hold);
        host.resume_request();
    }

    /// Admitted: from here it settles exactly once. A request drawn from a
    /// lease is counted on it until then (the root keeps reporting the lease
    /// while any is in flight, so the sidecar never takes it for lost).
    fn forwarded(&mut self, req: Admitted, hold: Hold) {
        self.unadmitted = None;
        if let Hold::Drawn(lease_id) = &hold {
            self.vm.drawn_in_flight(lease_id, &req.caller.key_hash, 1);
        }
        self.state = State::Forwarded { req, hold, status: 0, meter: None };
    }

    fn refuse(&mut self, host: &impl HttpHost, req: &Admitted, status: u16, error: bridge_protocol::ErrorBody) {
        info!("[{}] {}: refused {status} {:?}", self.id, req.caller.request_id, error.code);
        self.answer(host, LocalReply::refusal(status, error));
    }

    /// Draws this request's estimate from the key's live lease, if there is one
    /// with enough left; nothing else (no fetch).
    fn draw_only(&self, host: &impl HttpHost, req: &Admitted) -> Option<String> {
        if self.cfg.lease_tokens == 0 {
            return None;
        }
        let estimate = req.admission.estimate;
        let key = self.slot_of(req);
        slot::update(host, &key, |slot, now| match lease::take(slot, &req.caller.key_hash, now, estimate) {
            Some(lease) => {
                let id = lease.id.clone();
                Step::Write(Some(Slot::Live(lease)), Some(id))
            }
            None => Step::Keep(None),
        })
        .flatten()
    }

    /// The granted lease goes live in the key's slot with this request drawn
    /// from it, or, if our marker was replaced meanwhile (or every try lost),
    /// serves this request alone and is closed at once.
    fn install_lease(&self, host: &impl HttpHost, req: &Admitted, id: &str, granted: (i64, &KeyPolicy)) {
        let (key_hash, estimate) = (&req.caller.key_hash, req.admission.estimate);
        let key = self.slot_of(req);
        let installed = slot::update(host, &key, |slot, now| {
            match lease::install(slot, id, key_hash, granted, estimate, now, self.cfg.lease_ms) {
                Install::Live(slot) => Step::Write(Some(slot), None),
                Install::Orphan(close) => Step::Keep(Some(close)),
            }
        });
        self.vm.wake(&key);
        match installed {
            Some(None) => {
                self.vm.leases.borrow_mut().insert(key);
            }
            Some(Some(orphan)) => self.keep(host, Item::Close(orphan)),
            None => {
                let lease = lease::Lease::granted(id, key_hash, granted, (estimate, 1), 0);
                self.keep(host, Item::Close(lease.close()));
            }
        }
    }

    fn slot_of(&self, req: &Admitted) -> String {
        lease::slot_key(&req.caller.key_hash, self.cfg.lease_slots)
    }

    /// The fetch was refused: the refusal takes our marker's place for one
    /// lease window, so the key's next requests (a made-up key sent again, a
    /// frozen key's agent retrying) are answered without a call.
    fn cache_refusal(&self, host: &impl HttpHost, req: &Admitted, lease_id: &str, status: u16, error: &ErrorBody) {
        let key = self.slot_of(req);
        let until = host.now_ms().saturating_add(self.cfg.refusal_ms());
        slot::update(host, &key, |slot, _| {
            match lease::refuse(slot, lease_id, &req.caller.key_hash, status, error, until) {
                Some(refused) => Step::Write(Some(refused), ()),
                None => Step::Keep(()),
            }
        });
        self.vm.wake(&key);
    }

    /// The fetch ended without a lease: take our marker out of the slot so
    /// the next request fetches again.
    fn clear_marker(&self, host: &impl HttpHost, req: &Admitted, lease_id: &str) {
        let key = self.slot_of(req);
        slot::update(host, &key, |slot, _| match lease::is_our_marker(slot, lease_id) {
            true => Step::Write(None, ()),
            false => Step::Keep(()),
        });
        self.vm.wake(&key);
    }

    /// A lease fetch that ended without its grant: our marker leaves the slot
    /// and the close of the lease it replaced goes with the settlements (the
    /// call may not have carried it; closes are idempotent).
    fn end_fetch(&self, host: &impl HttpHost, req: &Admitted, lease_id: &str, replacing: Option<LeaseClose>) {
        self.clear_marker(host, req, lease_id);
        if let Some(close) = replacing {
            self.keep(host, Item::Close(close));
        }
    }

    /// The one release path: an admission abandoned while the sidecar
    /// decided (a failure, a client gone) undoes whatever it may have been
    /// granted unseen. A lease fetch clears its marker, hands the close of
    /// the lease it replaced to the settlements (the call may not have carried
    /// it) and releases the lease; a reservation settles with nothing used,
    /// naming the hold by its size.
    pub(super) fn give_back(&self, host: &impl HttpHost, req: &Admitted, wait: Wait, status: u32) {
        match wait {
            Wait::Lease { lease_id, replacing } => {
                self.end_fetch(host, req, &lease_id, replacing);
                self.keep(host, Item::Close(LeaseClose::release(req.caller.key_hash.clone(), lease_id)));
            }
            Wait::Reserve => {
                let record = record(host.now_ms(), req, &Hold::Reserved, status, (0, 0, UsageSource::Upstream), true);
                self.keep(host, Item::Settle(record));
            }
        }
    }

    /// The sidecar could not answer: the configured failure mode decides.
    /// `maybe_granted`: the call may have reached it, so what it may have
    /// granted is given back either way.
    fn sidecar_failed(
        &mut self,
        host: &impl HttpHost,
        req: Admitted,
        wait: Wait,
        why: &str,
        maybe_granted: bool,
    ) -> Flow {
        // What a call that never left could not have granted is still ours to tidy.
        let wait = match (maybe_granted, wait) {
            (true, wait) => Some(wait),
            (false, Wait::Lease { lease_id, replacing }) => {
                self.end_fetch(host, &req, &lease_id, replacing);
                None
            }
            (false, Wait::Reserve) => None,
        };
        match self.cfg.failure_mode {
            FailureMode::Deny => {
                warn!("[{}] {}: sidecar unavailable ({why}); answering 503", self.id, req.caller.request_id);
                if let Some(wait) = wait {
                    self.give_back(host, &req, wait, 503);
                }
                self.answer(host, LocalReply::unavailable(self.cfg.retry_after_secs))
            }
            FailureMode::Allow => {
                warn!(
                    "[{}] {}: sidecar unavailable ({why}); forwarding without a hold",
                    self.id, req.caller.request_id
                );
                match wait {
                    // Whatever the lost reply granted goes back.
                    Some(lease @ Wait::Lease { .. }) => self.give_back(host, &req, lease, 503),
                    // A hold it may have made is settled by the unreserved record.
                    Some(Wait::Reserve) | None => {}
                }
                self.forward(host, req, Hold::Unreserved);
                Flow::Pause
            }
        }
    }
}
