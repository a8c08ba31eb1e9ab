//! Reservations: one request's estimate held on its key in one guarded
//! update, or the typed reason it was not.

use bridge_protocol::ReserveRequest;
use mongodb::bson::doc;

use super::keys::access_refusal;
use super::{grant_projection, hold_path, policy_clauses, released_path, Decision, LedgerError, Refusal, Store};

/// Why a guarded reservation or lease found nothing to change.
pub(super) enum Why {
    Refused(Refusal),
    /// The id is already in use under this key.
    Taken,
    /// The filter gave up on this id and released it.
    Released,
    /// Active and not taken, but the balance is below what was asked.
    Broke(i64),
}

impl Why {
    /// The answer for a caller that asked for `needed`; an id in use or
    /// released is no answer for a client (nobody waits for it).
    pub(super) fn decision(self, id: &str, needed: i64) -> Result<Decision, LedgerError> {
        match self {
            Why::Refused(r) => Ok(Decision::Refused(r)),
            Why::Broke(balance) => Ok(Decision::Refused(Refusal::Insufficient { needed, balance })),
            Why::Taken => Err(LedgerError::Internal(format!("id {id} reserved twice"))),
            // Nobody waits for this answer: the filter gave up and released it.
            Why::Released => {
                Err(LedgerError::Conflict { message: "reservation already released".into(), code: "released" })
            }
        }
    }
}

impl Store {
    /// Takes `estimate` tokens from the balance and records the hold, in one update.
    pub async fn reserve(&self, req: &ReserveRequest) -> Result<Decision, LedgerError> {
        let hold = hold_path(&req.request_id);
        let mut filter = doc! {
            "_id": &req.key_hash,
            "status": "active",
            "balance_tokens": {"$gte": req.estimate},
            "holds_n": {"$not": {"$gte": self.limits.holds as i64}},
            &hold: {"$exists": false},
            // Released before it got here: the client has its 503 already.
            released_path(&req.request_id): {"$exists": false},
        };
        filter.extend(policy_clauses(&req.model, self.local_now()));
        let update = doc! {
            "$inc": {"balance_tokens": -req.estimate, "holds_n": 1_i64},
            "$set": {format!("{hold}.tokens"): req.estimate, format!("{hold}.model"): &req.model},
            // The database's clock, as every time the expiry compares: sidecars' clocks may differ.
            "$currentDate": {format!("{hold}.at"): true},
        };
        let admitted = self.update_then_read(&req.key_hash, filter, update, grant_projection()).await?;
        if let Some(d) = admitted {
            return Ok(Decision::Granted {
                tokens: req.estimate,
                balance_tokens: d.balance_tokens,
                policy: d.policy(),
            });
        }
        match self.why_refused(&req.key_hash, "holds", &req.request_id, self.limits.holds, &req.model).await? {
            Why::Broke(balance) => self.recall_or_refuse(&req.key_hash, req.estimate, balance, None).await,
            other => other.decision(&req.request_id, req.estimate),
        }
    }

    /// Reads the key only to say why a guarded update found nothing to change.
    pub(super) async fn why_refused(
        &self,
        key_hash: &str,
        map: &str,
        id: &str,
        limit: usize,
        model: &str,
    ) -> Result<Why, LedgerError> {
        let taken = format!("{map}.{id}");
        let count = format!("{map}_n");
        let current = self
            .key_docs
            .find_one(doc! {"_id": key_hash})
            .projection(doc! {"status": 1, "balance_tokens": 1, "key_prefix": 1, "key_last4": 1, &taken: 1,
            released_path(id): 1, &count: 1, "allowed_models": 1, "expires_at": 1})
            .await?;
        let Some(d) = current else { return Ok(Why::Refused(Refusal::UnknownKey)) };
        let (taken, in_flight) = match map {
            "holds" => (d.holds.contains_key(id), d.holds_n),
            _ => (d.leases.contains_key(id), d.leases_n),
        };
        let now = self.local_now();
        Ok(if let Some(refusal) = access_refusal(&d, now) {
            Why::Refused(refusal)
        } else if d.allowed_models.as_ref().is_some_and(|m| !m.iter().any(|a| a == model)) {
            Why::Refused(Refusal::ModelNotAllowed {
                model: model.to_owned(),
                allowed: d.allowed_models.clone().unwrap_or_default(),
            })
        } else if taken {
            Why::Taken
        } else if d.released.contains_key(id) {
            Why::Released
        } else if in_flight >= limit as i64 {
            Why::Refused(Refusal::Busy)
        } else {
            Why::Broke(d.balance_tokens)
        })
    }
}
