//! One request through the gateway, as a state machine whose states carry
//! their own data:
//!
//! ```text
//! Headers -> Body -> [Waiting] -> Admitting {callout, wait: reserve | lease} -> Forwarded {hold, meter} -> Settled
//!    |         |          |            |
//!    +---------+----------+------------+--> Answered (a local reply) / Passthrough (not ours)
//! ```
//!
//! `Waiting`: the key's lease is being fetched by another request (or renewed
//! by the root); this one is woken when the slot changes, or by the root's
//! tick, and draws then.
//!
//! A request reaches the upstream only from `Forwarded`, which only
//! admission enters (a draw from the key's lease, a granted lease or
//! reservation, or `failure_mode: allow`). Every admitted request leaves
//! exactly one settlement record when it ends; an admission abandoned while
//! the sidecar decided gives back what the sidecar may have granted
//! (`admit::give_back`), and nothing else queues anything.

mod admit;
#[cfg(test)]
pub(crate) mod harness;
mod stored;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use bridge_protocol::{SettleRecord, UsageSource};
use log::{debug, error, warn};

use crate::background::Vm;
use crate::config::PluginConfig;
use crate::host::{Flow, Host, HttpHost};
use crate::itemise::{time, Step};
use crate::reply::{models_list, LocalReply};
use crate::request::{client_key, Admission, Endpoint};
use crate::response::{Forward, ResponseMeter};
use crate::route::{route, Route};
use crate::settle::Item;

/// Who the request is, once its headers were accepted.
#[derive(Debug)]
struct Caller {
    key_hash: String,
    request_id: String,
    started_ms: u64,
    endpoint: Endpoint,
}

/// A request whose body was accepted, with what admission learned from it.
#[derive(Debug)]
struct Admitted {
    caller: Caller,
    /// The client's body, kept for the tiktoken fallback of the prompt.
    body: Vec<u8>,
    admission: Admission,
    /// When it first waited for its key's lease, if it did.
    waiting_since: Option<u64>,
    /// Counted in its key's minute (under a live lease's limits or those a
    /// reservation reply taught): however often it waits, looks again or
    /// asks again, it is not counted again, nor by its own reply.
    rate_counted: bool,
    /// The upstream host that answered, once the answer began.
    upstream: Option<String>,
    /// The answer's response id was noted as this key's (`owners`).
    owner_noted: bool,
}

/// What the sidecar is deciding while the request waits.
#[derive(Debug)]
enum Wait {
    /// A reservation of this request's estimate alone.
    Reserve,
    /// Lease `lease_id` (its fetch marker is in the key's slot), closing the
    /// lease it replaces in the same call.
    Lease { lease_id: String, replacing: Option<bridge_protocol::LeaseClose> },
}

/// What covers a forwarded request's estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    /// A reservation of its own on the key.
    Reserved,
    /// Drawn from this lease.
    Drawn(String),
    /// Nothing: the sidecar failed and `failure_mode: allow` let it through.
    Unreserved,
}

#[derive(Debug)]
enum State {
    Headers,
    /// Not ours (a path outside `/v1/`): passes untouched.
    Passthrough,
    /// Answered locally; nothing to settle.
    Answered,
    /// Buffering the body.
    Body(Caller),
    /// Waiting for the key's lease, fetched by someone else.
    Waiting {
        req: Admitted,
    },
    /// Waiting for the sidecar's reply to `callout`.
    Admitting {
        req: Admitted,
        callout: u32,
        wait: Wait,
        sent_ms: u64,
        _permit: crate::background::CallPermit,
    },
    /// Admitted and forwarded: settles exactly once.
    Forwarded {
        req: Admitted,
        hold: Hold,
        status: u32,
        meter: Option<ResponseMeter>,
    },
    /// Asking the sidecar whose stored response the request names.
    Looking(stored::Lookup),
    /// Asking the sidecar whose response `previous_response_id` names,
    /// before admission.
    Checking {
        req: Admitted,
        callout: u32,
        _permit: crate::background::CallPermit,
    },
    /// The settlement record is queued (or was never owed).
    Settled,
}

pub struct Exchange {
    id: u32,
    cfg: Rc<PluginConfig>,
    vm: Vm,
    state: State,
    /// Its body's bytes, counted in the VM's bound until it is admitted or answered.
    unadmitted: Option<crate::background::BodyBytes>,
}

impl Exchange {
    pub fn new(id: u32, cfg: Rc<PluginConfig>, vm: Vm) -> Self {
        Self { id, cfg, vm, state: State::Headers, unadmitted: None }
    }

    fn keep(&self, host: &impl Host, item: Item) {
        self.vm.keep(item, host.now_ms(), self.id);
    }

    fn answer(&mut self, host: &impl HttpHost, reply: LocalReply) -> Flow {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(reply.headers.iter().map(|(k, v)| (*k, v.as_str())));
        host.send_reply(reply.status, &headers, &reply.body);
        self.state = State::Answered;
        self.unadmitted = None;
        Flow::Pause
    }

    pub fn on_request_headers(&mut self, host: &impl HttpHost, end_of_stream: bool) -> Flow {
        let cfg = self.cfg.clone();
        // One host call for all of them; below, only headers that are there are removed.
        let headers = host.request_headers();
        let header = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        let remove = |name: &str| {
            if header(name).is_some() {
                host.set_request_header(name, None);
            }
        };
        // The route marker and the cluster header are ours alone: a client may not send them.
        remove(&cfg.route_header);
        remove(&cfg.cluster_header);
        let path = header(":path").unwrap_or_default().to_owned();
        let method = header(":method").unwrap_or_default();
        let target = route(method, &path);
        if target == Route::Passthrough {
            self.state = State::Passthrough;
            return Flow::Continue;
        }
        // They pick the organization and project of the operator's upstream
        // account whose state (files, stored objects, limits) a request uses.
        for name in crate::policy::ACCOUNT_HEADERS {
            remove(name);
        }
        let key = client_key(header("authorization"), header("api-key")).map(str::to_owned);
        match target {
            Route::Passthrough | Route::ChatCompletions | Route::Responses | Route::Embeddings => {}
            Route::Unknown(bare) => return self.answer(host, LocalReply::not_found(&bare)),
            Route::WrongMethod { method, path } => {
                return self.answer(host, LocalReply::method_not_allowed(&method, &path))
            }
            Route::StoredResponse { .. } | Route::Models if key.is_none() => {
                return self.answer(host, LocalReply::missing_key())
            }
            Route::StoredResponse { id, tail } => {
                let key = key.unwrap_or_default();
                return self.look_up_owner(host, &key, id, tail, &path);
            }
            Route::Models => {
                let body = models_list(cfg.catalog.iter().map(|m| m.name.as_str()));
                host.send_reply(200, &[("content-type", "application/json")], &body);
                self.state = State::Answered;
                return Flow::Pause;
            }
        }
        let Some(key) = key else {
            return self.answer(host, LocalReply::missing_key());
        };
        let Some(request_id) = crate::new_request_id() else {
            error!("[{}] no randomness for a request id", self.id);
            return self.answer(host, LocalReply::unavailable(cfg.retry_after_secs));
        };
        if end_of_stream {
            return self.answer(host, LocalReply::bad_request("The request has no body.", None));
        }
        // While the headers are held: the client's key is removed and the
        // length dropped because the body may be rewritten (setting it later
        // traps the VM). The upstream's path, key and cluster follow the
        // body's model (`on_request_body`).
        remove("authorization");
        remove("api-key");
        remove("content-length");
        // The meter reads the answer's usage and text: it must come uncompressed.
        remove("accept-encoding");
        let endpoint = match target {
            Route::Responses => Endpoint::Responses,
            Route::Embeddings => Endpoint::Embeddings,
            _ => Endpoint::Chat,
        };
        host.set_request_header(&cfg.route_header, Some("upstream"));
        self.unadmitted = Some(self.vm.body_bytes());
        self.state = State::Body(Caller {
            key_hash: bridge_protocol::key_hash(&key),
            request_id,
            started_ms: host.now_ms(),
            endpoint,
        });
        Flow::Pause
    }

    pub fn on_request_body(&mut self, host: &impl HttpHost, body_size: usize, end_of_stream: bool) -> Flow {
        if !matches!(self.state, State::Body(_)) {
            return Flow::Continue;
        }
        if body_size > self.cfg.max_body_bytes {
            return self.answer(host, LocalReply::too_large(self.cfg.max_body_bytes));
        }
        let max = self.cfg.unadmitted_bytes_max;
        if self.unadmitted.as_mut().is_some_and(|b| !b.grow_to(body_size, max)) {
            warn!("[{}] {} bytes of bodies wait for admission; answering 503", self.id, self.vm.unadmitted_bytes());
            host.metric(crate::metrics::Metric::Shed, 1);
            return self.answer(host, LocalReply::overloaded(self.cfg.retry_after_secs));
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let State::Body(caller) = std::mem::replace(&mut self.state, State::Settled) else { return Flow::Continue };
        // Shed before the body is copied out of Envoy and read: under a flood
        // of retries (a client that ignores Retry-After) each 503 costs the
        // CPU the ledger needs to catch up.
        if let Some(shed) = self.shed_if_behind(host, &caller.request_id) {
            return shed;
        }
        let body = time(Step::BodyCopy, || host.request_body(body_size));
        let admission = match time(Step::Admit, || crate::request::admit(&body, &self.cfg, caller.endpoint)) {
            Ok(a) => a,
            Err(reply) => return self.answer(host, reply),
        };
        time(Step::Upstream, || {
            if let Some(new_body) = &admission.rewritten {
                host.set_request_body(body_size, new_body);
            }
            // The model's upstream: its cluster, path and key (and host, from a catalog).
            let cfg = &self.cfg;
            if let Some(m) = cfg.catalog.get(admission.model_index) {
                let (auth_name, auth_value) = m.auth();
                host.set_request_header(auth_name, Some(&auth_value));
                host.set_request_header(":path", Some(&m.path(admission.endpoint, &cfg.api_version)));
                host.set_request_header(&cfg.cluster_header, Some(&m.cluster));
                if let Some(authority) = &m.authority {
                    host.set_request_header(":authority", Some(authority));
                }
            }
        });
        let previous = admission.previous_response.clone();
        let req = Admitted {
            caller,
            body,
            admission,
            waiting_since: None,
            rate_counted: false,
            upstream: None,
            owner_noted: false,
        };
        match previous {
            Some(id) => self.check_previous(host, req, id),
            None => self.admit(host, req),
        }
    }

    /// Trailers end a body that never said it ended: until admission has
    /// decided, they are held like the body (an HTTP/2 request with trailers
    /// would otherwise go on upstream when they arrive).
    pub fn on_request_trailers(&mut self, host: &impl HttpHost) -> Flow {
        match self.state {
            State::Body(_) => self.answer(
                host,
                LocalReply::bad_request("Request trailers are not accepted; send the body without trailers.", None),
            ),
            State::Admitting { .. } | State::Waiting { .. } | State::Checking { .. } => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    pub fn on_response_headers(&mut self, host: &impl HttpHost) -> Flow {
        let State::Forwarded { req, status, meter, .. } = &mut self.state else { return Flow::Continue };
        let headers = host.response_headers();
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        *status = header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        req.upstream = host.upstream_address();
        let is_sse = header("content-type").is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
        let hide_usage = req.admission.stream && !req.admission.client_wants_usage;
        let m = ResponseMeter::new(is_sse, hide_usage);
        if m.rewrites_body() && header("content-length").is_some() {
            host.set_response_header("content-length", None);
        }
        *meter = Some(m);
        host.add_response_header("x-bridge-request-id", &req.caller.request_id);
        Flow::Continue
    }

    pub fn on_response_body(&mut self, host: &impl HttpHost, body_size: usize, end_of_stream: bool) -> Flow {
        let State::Forwarded { req, status, meter: Some(meter), .. } = &mut self.state else { return Flow::Continue };
        let chunk = if body_size > 0 { host.response_body(body_size) } else { Vec::new() };
        let mut out = match meter.on_chunk(&chunk) {
            Forward::Unchanged => None,
            Forward::Replace(bytes) => Some(bytes),
        };
        if end_of_stream {
            let rest = meter.on_end();
            if !rest.is_empty() {
                let mut all = out.take().unwrap_or(chunk);
                all.extend(rest);
                out = Some(all);
            }
        }
        if !req.owner_noted && req.admission.endpoint == Endpoint::Responses && *status < 400 {
            // Before the client can have the id: it may continue or read the response at once.
            if let Some(id) = meter.response_id() {
                crate::owners::note(host, id, &req.caller.key_hash, &req.admission.model);
                req.owner_noted = true;
            }
        }
        if let Some(bytes) = out {
            host.set_response_body(body_size, &bytes);
        }
        Flow::Continue
    }

    /// The stream is over, however it ended: the one place a forwarded
    /// request settles.
    pub fn on_log(&mut self, host: &impl HttpHost) {
        self.unadmitted = None;
        match std::mem::replace(&mut self.state, State::Settled) {
            // The client left while the sidecar decided: whatever it decided is undone.
            State::Admitting { req, wait, .. } => self.give_back(host, &req, wait, 499),
            // Nothing was granted to it: it only leaves the wait list.
            State::Waiting { .. } => self.vm.waits.borrow_mut().forget(self.id),
            // A lookup the client left: nothing was granted, its call permit goes.
            State::Looking(_) | State::Checking { .. } => {}
            State::Forwarded { req, hold, status, mut meter } => {
                if let Some(m) = &mut meter {
                    // A client that left mid-answer never reached the end: finish the count here.
                    m.on_end();
                }
                let model = self.cfg.catalog.get(req.admission.model_index);
                let encoding = model.and_then(|m| m.tiktoken_encoding).unwrap_or(self.cfg.tiktoken_encoding);
                let reasons = model.map_or_else(|| self.cfg.reasons(), crate::catalog::Model::reasons);
                let (input, output, source) = crate::charge_without_usage(
                    meter.as_ref(),
                    status,
                    &req.body,
                    encoding,
                    // A plain answer cut without its usage pays its hold, as a reasoning model does.
                    (reasons || meter.as_ref().is_some_and(ResponseMeter::was_cut)).then_some(req.admission.estimate),
                );
                let mut record = record(host.now_ms(), &req, &hold, status, (input, output, source), false);
                let details = meter.as_ref().and_then(ResponseMeter::usage).filter(|_| source == UsageSource::Upstream);
                record.detail.deployment =
                    model.and_then(|m| m.deployment.clone().or_else(|| m.upstream_model.clone()));
                record.detail.upstream = req.upstream.clone();
                if req.admission.endpoint == Endpoint::Responses && status < 400 {
                    record.detail.response_id = meter.as_ref().and_then(ResponseMeter::response_id).map(str::to_owned);
                }
                record.detail.cached_tokens = details.map_or(0, |u| u.cached);
                record.detail.reasoning_tokens = details.map_or(0, |u| u.reasoning);
                let tier = req.admission.service_tier.as_deref();
                let prices = model.and_then(|m| m.prices_for(tier)).unwrap_or_default();
                if prices != crate::catalog::Prices::default() {
                    // A reasoning model without usage pays its hold, which is in charged tokens already.
                    record.detail.charged_tokens = Some(if source == UsageSource::Estimate {
                        req.admission.estimate
                    } else {
                        prices.charge(input, record.detail.cached_tokens, output)
                    });
                }
                debug!(
                    "[{}] {}: queued settlement {input}+{output} of {} ({source:?})",
                    self.id, record.request_id, record.reserved
                );
                self.keep(host, Item::Settle(record));
            }
            other => self.state = other,
        }
    }

    /// Whether this request waits for its key's lease.
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }

    /// Whether it waits for its lease or for a reply: the shell keeps it
    /// reachable from other contexts meanwhile ([`Exchange::on_woken`], and
    /// replies to calls it made while woken, which reach the root).
    pub fn is_pending(&self) -> bool {
        matches!(
            self.state,
            State::Waiting { .. } | State::Admitting { .. } | State::Looking(_) | State::Checking { .. }
        )
    }

    pub fn context_id(&self) -> u32 {
        self.id
    }

    /// Whether a settlement may still be owed (for tests and logs).
    pub fn is_settled(&self) -> bool {
        matches!(self.state, State::Settled | State::Answered | State::Passthrough)
    }
}

/// The settlement record of a request: what it used, or with `release` that
/// it was refused after a reservation that may have succeeded unseen (settled
/// with nothing used, which releases such a hold).
fn record(
    now_ms: u64,
    req: &Admitted,
    hold: &Hold,
    status: u32,
    usage: (i64, i64, UsageSource),
    release: bool,
) -> SettleRecord {
    let (input_tokens, output_tokens, usage_source) = usage;
    SettleRecord {
        request_id: req.caller.request_id.clone(),
        key_hash: req.caller.key_hash.clone(),
        model: req.admission.model.clone(),
        reserved: req.admission.estimate,
        input_tokens,
        output_tokens,
        usage_source,
        duration_ms: now_ms.saturating_sub(req.caller.started_ms) as i64,
        status_code: u16::try_from(status).unwrap_or(0),
        stream: req.admission.stream,
        unreserved: *hold == Hold::Unreserved,
        release,
        lease_id: match hold {
            Hold::Drawn(id) => Some(id.clone()),
            Hold::Reserved | Hold::Unreserved => None,
        },
        detail: bridge_protocol::RecordDetail {
            endpoint: Some(req.admission.endpoint.name().to_owned()),
            ..bridge_protocol::RecordDetail::default()
        },
    }
}
