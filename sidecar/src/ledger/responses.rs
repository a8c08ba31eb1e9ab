//! Who owns a response stored upstream: the Responses API stores every
//! key's responses under the operator's one upstream key, so the gateway
//! lets a stored response be read, cancelled or deleted only by the key
//! that made it. The filter reports each response's id with its settlement.

use bridge_protocol::{SettleOutcome, SettleRecord, SettleResult};
use mongodb::bson::doc;

use super::{is_duplicate_key, LedgerError, Store};

impl Store {
    /// Records the owner of each settled record's response (once: a record
    /// sent again finds it there). Outside the money path: a failure here is
    /// logged, and that response is then readable by nobody.
    pub async fn record_owners(&self, records: &[SettleRecord], results: &[SettleResult]) {
        for r in records {
            let Some(id) = &r.detail.response_id else { continue };
            let settled = results.iter().any(|x| {
                x.request_id == r.request_id
                    && matches!(x.outcome, SettleOutcome::Settled | SettleOutcome::AlreadySettled)
            });
            if !settled {
                continue;
            }
            let owner = doc! {"_id": id, "key_id": &r.key_hash, "model": &r.model, "request_id": &r.request_id,
            "created_at": self.local_now()};
            match self.responses.insert_one(owner).await {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => tracing::warn!(error = %e, "could not record whose response this is"),
            }
        }
    }

    /// The model of response `id` if key `key_hash` made it; `None` for
    /// anyone else's, or one never seen.
    pub async fn response_owner(&self, key_hash: &str, id: &str) -> Result<Option<String>, LedgerError> {
        let found = self.responses.find_one(doc! {"_id": id, "key_id": key_hash}).await?;
        Ok(found.and_then(|d| d.get_str("model").ok().map(str::to_owned)))
    }
}
