//! Responses stored upstream (`GET`/`DELETE /v1/responses/{id}`, `POST
//! .../cancel`, `GET .../input_items`): every key's responses are stored
//! under the operator's one upstream key, so before one goes through the
//! sidecar says whether the asking key made it, and on which model. Unbilled:
//! the upstream charges nothing for them.

use bridge_protocol::{ErrorEnvelope, OwnerReply, OwnerRequest, OWNER_PATH};
use log::warn;

use super::{Exchange, State};
use crate::config::UpstreamStyle;
use crate::host::{call_sidecar, sidecar_reply, Flow, HttpHost};
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
        let Some(permit) = self.vm.call_permit(self.cfg.admission_calls_max) else {
            warn!("[{}] too many admission calls in flight; answering 503", self.id);
            return self.answer(host, LocalReply::overloaded(self.cfg.retry_after_secs));
        };
        let ask = OwnerRequest { key_hash: bridge_protocol::key_hash(key), response_id: id.clone() };
        let sent = serde_json::to_vec(&ask)
            .map_err(|e| e.to_string())
            .and_then(|body| call_sidecar(host, &self.cfg, OWNER_PATH, &body, self.cfg.sidecar_timeout_ms));
        match sent {
            Ok(callout) => {
                self.vm.called(callout, self.id);
                let query = path.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
                self.state = State::Looking(Lookup { callout, id, tail: format!("{tail}{query}"), _permit: permit });
                Flow::Pause
            }
            Err(why) => {
                warn!("[{}] cannot ask whose response {id} is: {why}", self.id);
                self.answer(host, LocalReply::unavailable(self.cfg.retry_after_secs))
            }
        }
    }

    /// The sidecar's answer: the key's own response goes on to the model's
    /// upstream; anyone else's is a 404, as an unknown one is.
    pub(super) fn on_owner_reply(&mut self, host: &impl HttpHost, lookup: Lookup, body_size: usize) {
        let cfg = self.cfg.clone();
        let model = match sidecar_reply::<OwnerReply>(host, body_size) {
            Ok(OwnerReply { model: Some(m) }) => cfg.model(Some(&m)).or(cfg.catalog.first()),
            Ok(OwnerReply { model: None }) => None,
            Err(why) => {
                warn!("[{}] whose response {} is: no answer ({why})", self.id, lookup.id);
                self.answer(host, LocalReply::unavailable(cfg.retry_after_secs));
                return;
            }
        };
        let Some(m) = model else {
            self.answer(host, not_found(&lookup.id));
            return;
        };
        let path = match m.upstream {
            UpstreamStyle::Openai => format!("/v1/responses/{}{}", lookup.id, lookup.tail),
            UpstreamStyle::Azure | UpstreamStyle::AzureV1 => {
                format!("/openai/v1/responses/{}{}", lookup.id, lookup.tail)
            }
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
        host.resume_request();
    }
}
