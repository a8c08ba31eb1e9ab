//! Typed views of a key's document, the ledger's account: what reads get back
//! from MongoDB. Every field defaults, because each read projects only what
//! it needs; integers are read leniently (a document written by hand or by an
//! older version may hold an int32 or a double).

use std::collections::BTreeMap;

use mongodb::bson::{DateTime, Document};
use serde::{Deserialize, Deserializer};

/// A key's document in `api_keys`, `_id` the SHA-256 of the key.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct KeyDoc {
    #[serde(rename = "_id")]
    pub hash: String,
    pub status: String,
    #[serde(deserialize_with = "lenient")]
    pub balance_tokens: i64,
    pub user_name: String,
    pub key_prefix: String,
    pub key_last4: String,
    pub created_at: Option<DateTime>,
    pub updated_at: Option<DateTime>,
    /// Reservations of requests in flight, by request id.
    pub holds: BTreeMap<String, HoldDoc>,
    /// Open leases, by lease id.
    pub leases: BTreeMap<String, LeaseDoc>,
    /// Release marks: ids whose reservation must be refused if it comes.
    pub released: BTreeMap<String, DateTime>,
    /// Charge marks of unreserved requests already debited.
    pub charged: BTreeMap<String, DateTime>,
    /// Audit rows debited but not yet in `audit_logs`, by request id.
    pub outbox: BTreeMap<String, Document>,
    /// Leases expired with drawn requests charged at their estimates, by
    /// lease id: what a late record of one of them takes back.
    pub lapsed: BTreeMap<String, LapsedDoc>,
    #[serde(deserialize_with = "lenient")]
    pub holds_n: i64,
    #[serde(deserialize_with = "lenient")]
    pub leases_n: i64,
    #[serde(deserialize_with = "lenient")]
    pub released_n: i64,
    #[serde(deserialize_with = "lenient")]
    pub charged_n: i64,
    #[serde(deserialize_with = "lenient")]
    pub lapsed_n: i64,
    /// The models the key may use; absent or null: any.
    pub allowed_models: Option<Vec<String>>,
    /// After this the key is refused as expired; absent or null: never.
    pub expires_at: Option<DateTime>,
    /// Requests and tokens a minute, per gateway; absent or null: no limit.
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
}

impl KeyDoc {
    /// The controls a lease's draws must obey.
    pub fn policy(&self) -> bridge_protocol::KeyPolicy {
        bridge_protocol::KeyPolicy {
            allowed_models: self.allowed_models.clone(),
            expires_at_ms: self.expires_at.map(|d| d.timestamp_millis()),
            rpm_limit: self.rpm_limit,
            tpm_limit: self.tpm_limit,
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct HoldDoc {
    #[serde(deserialize_with = "lenient")]
    pub tokens: i64,
    pub model: String,
    pub at: Option<DateTime>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct LeaseDoc {
    /// What the lease took from the balance.
    #[serde(deserialize_with = "lenient")]
    pub tokens: i64,
    pub model: String,
    pub at: Option<DateTime>,
    /// Closed by the filter, with what was drawn.
    pub closed: bool,
    #[serde(deserialize_with = "lenient")]
    pub drawn_tokens: i64,
    #[serde(deserialize_with = "lenient")]
    pub drawn_n: i64,
    /// Set by the first expiry sweep; the next one sums the rows.
    pub expiring: Option<DateTime>,
    /// What its gateway last reported drawn while it was open, and when.
    #[serde(deserialize_with = "lenient")]
    pub reported_tokens: i64,
    #[serde(deserialize_with = "lenient")]
    pub reported_n: i64,
    pub seen: Option<DateTime>,
    /// Another gateway needs the balance it holds: its gateway closes it on its next tick.
    pub recall: Option<DateTime>,
    /// When it was closed (the database's clock).
    pub closed_at: Option<DateTime>,
}

impl LeaseDoc {
    /// Tokens the lease keeps from the balance until it is finalised: all it
    /// took until it is closed, then what was drawn.
    pub fn outstanding(&self) -> i64 {
        if self.closed {
            self.drawn_tokens
        } else {
            self.tokens
        }
    }

    /// What is known to have been drawn: the close's count, or while open the
    /// last report (the draws after it died with a gateway that never closed it).
    pub fn drawn_known(&self) -> i64 {
        if self.closed {
            self.drawn_tokens
        } else {
            self.reported_tokens.clamp(0, self.tokens)
        }
    }

    /// The last sign of life of its gateway: the grant, the close or the last report.
    pub fn last_seen_ms(&self) -> Option<i64> {
        let ms = |d: Option<DateTime>| d.map(|d| d.timestamp_millis());
        ms(self.at).max(ms(self.seen)).max(ms(self.closed_at))
    }

    /// Whether its gateway gave no sign of life since `cutoff_ms`: an open
    /// lease is reported every few seconds while it lives; a closed one is
    /// while requests drawn from it are in flight, which a closed lease
    /// still here has (it is finalised once every drawn request has its
    /// row): its gateway reported it after the close, or closed it in a call
    /// without a report (a renewal's `replaces`) and was killed before the
    /// next tick.
    pub fn lost_since(&self, cutoff_ms: i64) -> bool {
        let heartbeats = !self.closed || self.drawn_n > 0 || self.seen.zip(self.closed_at).is_some_and(|(s, c)| s >= c);
        heartbeats && self.last_seen_ms().unwrap_or(0) <= cutoff_ms
    }

    /// Tokens it holds that its gateway has not drawn (by its last report).
    pub fn undrawn(&self) -> i64 {
        if self.closed || self.expiring.is_some() {
            0
        } else {
            (self.tokens - self.reported_tokens).max(0)
        }
    }
}

/// What an expired lease charged at estimates and no late record has taken
/// back yet: `tokens` for `n` drawn requests without a row of their own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct LapsedDoc {
    #[serde(deserialize_with = "lenient")]
    pub tokens: i64,
    #[serde(deserialize_with = "lenient")]
    pub n: i64,
    pub at: Option<DateTime>,
}

/// What the audit rows of a lease add up to (an aggregation's one document).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct LeaseUsage {
    #[serde(deserialize_with = "lenient")]
    pub rows: i64,
    #[serde(deserialize_with = "lenient")]
    pub total: i64,
    #[serde(deserialize_with = "lenient")]
    pub reserved: i64,
}

fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(i64),
        Float(f64),
    }
    Ok(match Number::deserialize(d)? {
        Number::Int(n) => n,
        Number::Float(f) => f as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn partial_projections_and_loose_numbers_read_as_typed_documents() {
        let d = doc! {"_id": "h", "balance_tokens": 5_i32, "leases": {"L": {"tokens": 9.0, "closed": true, "drawn_tokens": 4_i64}}};
        let k: KeyDoc = mongodb::bson::from_document(d).unwrap_or_default();
        assert_eq!((k.hash.as_str(), k.balance_tokens, k.holds_n), ("h", 5, 0));
        assert_eq!(k.leases["L"].outstanding(), 4);
        assert_eq!(k.leases["L"].tokens, 9);
    }
}
