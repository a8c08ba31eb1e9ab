//! Responses stored upstream (`GET`/`DELETE /v1/responses/{id}`, `POST
//! .../cancel`, `GET .../input_items`): every key's responses are stored
//! under the operator's one upstream key, so before one goes through the
//! sidecar says whether the asking key made it, and on which model. Unbilled:
//! the upstream charges nothing for them. A request continuing a response
//! (`previous_response_id`) is checked the same way before its admission.
//! What this Envoy noted itself (`owners`, a response just made) is answered
//! without asking.

use bridge_protocol::{ErrorEnvelope, OwnerReply, OwnerRequest, OWNER_PATH};
use log::warn;

use super::{Admitted, Exchange, State};
use crate::config::UpstreamStyle;
use crate::host::{call_sidecar, sidecar_reply, Flow, HttpHost};
use crate::lease::{self, Slot};
use crate::owners::{self, Known};
use crate::reply::LocalReply;

/// What a stored-response request waits for.
#[derive(Debug)]
pub(super) struct Lookup {
    pub callout: u32,
    id: String,
    /// `""`, `/cancel` or `/input_items`, and the client's query string.
    tail: String,
    /// One of the VM's admission calls: made-up keys cannot flood the sidecar.
    _permit: crate::background::CallPermit,
}

fn not_found(id: &str) -> LocalReply {
    LocalReply::json(
        404,
        &ErrorEnvelope::new(format!("No response found with id '{id}'."), "invalid_request_error", None, None),
    )
}

/// A `previous_response_id` of no response of this key's.
fn previous_not_found(id: &str) -> LocalReply {
    LocalReply::json(
        404,
        &ErrorEnvelope::new(
            format!("Previous response with id '{id}' not found."),
            "invalid_request_error",
            Some("previous_response_id"),
            Some("previous_response_not_found"),
        ),
    )
}

impl Exchange {
    /// Asks the sidecar whose response `id` is; the request waits.
    pub(super) fn look_up_owner(
        &mut self,
        host: &impl HttpHost,
        key: &str,
        id: String,
        tail: &str,
        path: &str,
    ) -> Flow {
        // The client's key never goes upstream, whatever the sidecar says.
        host.set_request_header("authorization", None);
        host.set_request_header("api-key", None);
        let query = path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        let key_hash = bridge_protocol::key_hash(key);
        match owners::known(host, &id, &key_hash) {
            // Noted here, and the key's live lease vouches for the key (not
            // frozen, expired or kept off the model): no call. Without a
            // lease the sidecar says, as for any other key.
            Known::Own(model) => match self.lease_vouches(host, &key_hash, Some(&model)) {
                Some(Ok(())) => return self.go_to_stored(host, &id, &format!("{tail}{query}"), Some(&model)),
                Some(Err((status, error))) => return self.answer(host, LocalReply::refusal(status, error)),
                None => {}
            },
            // Another key's, to a key its live lease vouches for; a made-up key
            // is the sidecar's to answer (401).
            Known::Other if self.lease_vouches(host, &key_hash, None).is_some() => {
                return self.answer(host, not_found(&id))
            }
            Known::Other | Known::Unknown => {}
        }
        let Some((callout, permit)) = self.ask_owner(host, key_hash, &id) else { return Flow::Pause };
        self.state = State::Looking(Lookup { callout, id, tail: format!("{tail}{query}"), _permit: permit });
        Flow::Pause
    }

    /// What the key's live lease says of using it (on `model`, if named):
    /// `None` without one.
    fn lease_vouches(
        &self,
        host: &impl HttpHost,
        key_hash: &str,
        model: Option<&str>,
    ) -> Option<Result<(), (u16, bridge_protocol::ErrorBody)>> {
        let (bytes, _) = host.shared_get(&lease::slot_key(key_hash, self.cfg.lease_slots));
        let slot = bytes.as_deref().and_then(Slot::decode);
        let now = host.now_ms();
        match &slot {
            Some(Slot::Live(l)) if l.key_hash == key_hash && now < l.expires_ms => {
                let refused = model.and_then(|m| lease::controls_refuse(slot.as_ref(), key_hash, m, now));
                Some(refused.map_or(Ok(()), Err))
            }
            _ => None,
        }
    }

    /// Asks the sidecar whose response `id` is, as one of the VM's
    /// admission calls: the callout and its permit, or `None` once answered
    /// 503 (too many calls in flight, or the call could not be sent).
    fn ask_owner(
        &mut self,
        host: &impl HttpHost,
        key_hash: String,
        id: &str,
    ) -> Option<(u32, crate::background::CallPermit)> {
        let Some(permit) = self.vm.call_permit(self.cfg.admission_calls_max) else {
            warn!("[{}] too many admission calls in flight; answering 503", self.id);
            self.answer(host, LocalReply::overloaded(self.cfg.retry_after_secs));
            return None;
        };
        let ask = OwnerRequest { key_hash, response_id: id.to_owned() };
        let sent = serde_json::to_vec(&ask)
            .map_err(|e| e.to_string())
            .and_then(|body| call_sidecar(host, &self.cfg, OWNER_PATH, &body, self.cfg.sidecar_timeout_ms));
        match sent {
            Ok(callout) => {
                self.vm.called(callout, self.id);
                Some((callout, permit))
            }
            Err(why) => {
                warn!("[{}] cannot ask whose response {id} is: {why}", self.id);
                self.answer(host, LocalReply::unavailable(self.cfg.retry_after_secs));
                None
            }
        }
    }

    /// A request continuing response `id`: admitted only if the key made
    /// it; otherwise `404` and nothing reaches the upstream.
    pub(super) fn check_previous(&mut self, host: &impl HttpHost, req: Admitted, id: String) -> Flow {
        // The key's own goes on to admission, which applies the key's rules.
        match owners::known(host, &id, &req.caller.key_hash) {
            Known::Own(_) => return self.admit(host, req),
            Known::Other if self.lease_vouches(host, &req.caller.key_hash, None).is_some() => {
                return self.answer(host, previous_not_found(&id))
            }
            Known::Other | Known::Unknown => {}
        }
        let Some((callout, permit)) = self.ask_owner(host, req.caller.key_hash.clone(), &id) else {
            return Flow::Pause;
        };
        self.state = State::Checking { req, callout, _permit: permit };
        Flow::Pause
    }

    /// The sidecar's answer on the previous response: the key's own goes on
    /// to admission.
    pub(super) fn on_previous_reply(&mut self, host: &impl HttpHost, req: Admitted, body_size: usize) {
        let id = req.admission.previous_response.clone().unwrap_or_default();
        match sidecar_reply::<OwnerReply>(host, body_size) {
            Ok(OwnerReply { refused: Some(r), .. }) => {
                self.answer(host, LocalReply::refusal(r.status, r.error));
            }
            Ok(OwnerReply { model: Some(_), .. }) => {
                if self.admit(host, req) == Flow::Continue {
                    host.resume_request();
                }
            }
            Ok(OwnerReply { model: None, .. }) => {
                self.answer(host, previous_not_found(&id));
            }
            Err(why) => {
                warn!("[{}] whose response {id} is: no answer ({why})", self.id);
                self.answer(host, LocalReply::unavailable(self.cfg.retry_after_secs));
            }
        }
    }

    /// The sidecar's answer: the key's own response goes on to the model's
    /// upstream; anyone else's is a 404, as an unknown one is.
    pub(super) fn on_owner_reply(&mut self, host: &impl HttpHost, lookup: Lookup, body_size: usize) {
        match sidecar_reply::<OwnerReply>(host, body_size) {
            Ok(OwnerReply { refused: Some(r), .. }) => {
                self.answer(host, LocalReply::refusal(r.status, r.error));
            }
            Ok(OwnerReply { model, .. }) => {
                if self.go_to_stored(host, &lookup.id, &lookup.tail, model.as_deref()) == Flow::Continue {
                    host.resume_request();
                }
            }
            Err(why) => {
                warn!("[{}] whose response {} is: no answer ({why})", self.id, lookup.id);
                self.answer(host, LocalReply::unavailable(self.cfg.retry_after_secs));
            }
        }
    }

    /// The key's own response (made on `model`) goes on to that model's
    /// upstream; `None` (not the key's) is a 404.
    fn go_to_stored(&mut self, host: &impl HttpHost, id: &str, tail: &str, model: Option<&str>) -> Flow {
        let cfg = self.cfg.clone();
        let Some(m) = model.and_then(|m| cfg.model(Some(m)).or(cfg.catalog.first())) else {
            return self.answer(host, not_found(id));
        };
        let path = match m.upstream {
            UpstreamStyle::Openai => format!("/v1/responses/{id}{tail}"),
            UpstreamStyle::Azure | UpstreamStyle::AzureV1 => format!("/openai/v1/responses/{id}{tail}"),
        };
        let (auth_name, auth_value) = m.auth();
        host.set_request_header(auth_name, Some(&auth_value));
        host.set_request_header(":path", Some(&path));
        host.set_request_header(&cfg.cluster_header, Some(&m.cluster));
        if let Some(authority) = &m.authority {
            host.set_request_header(":authority", Some(authority));
        }
        host.set_request_header(&cfg.route_header, Some("upstream"));
        self.state = State::Passthrough;
        Flow::Continue
    }
}
