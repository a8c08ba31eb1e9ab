//! Who owns a response stored upstream: the Responses API stores every
//! key's responses under the operator's one upstream key, so the gateway
//! lets a stored response be read, cancelled or deleted only by the key
//! that made it. The filter reports each response's id with its settlement.

use bridge_protocol::{SettleOutcome, SettleRecord, SettleResult};
use mongodb::bson::doc;

use super::{is_duplicate_key, LedgerError, Store};

impl Store {
    /// Records the owner of each settled record's response (once: a record
    /// sent again finds it there), in one unordered insert for the batch.
    /// Outside the money path: a failure here is logged, and those responses
    /// are then readable by nobody.
    pub async fn record_owners(&self, records: &[SettleRecord], results: &[SettleResult]) {
        let now = self.local_now();
        let owners: Vec<_> = records
            .iter()
            .filter_map(|r| {
                let id = r.detail.response_id.as_ref()?;
                let settled = results.iter().any(|x| {
                    x.request_id == r.request_id
                        && matches!(x.outcome, SettleOutcome::Settled | SettleOutcome::AlreadySettled)
                });
                settled.then(|| {
                    doc! {"_id": id, "key_id": &r.key_hash, "model": &r.model, "request_id": &r.request_id,
                    "created_at": now}
                })
            })
            .collect();
        if owners.is_empty() {
            return;
        }
        match self.responses.insert_many(owners).ordered(false).await {
            Ok(_) => {}
            // Each one there already was recorded by a record sent before.
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => tracing::warn!(error = %e, "could not record whose responses these are"),
        }
    }

    /// The model of response `id` if key `key_hash` made it; `None` for
    /// anyone else's, or one never seen.
    pub async fn response_owner(&self, key_hash: &str, id: &str) -> Result<Option<String>, LedgerError> {
        let found = self.responses.find_one(doc! {"_id": id, "key_id": key_hash}).await?;
        Ok(found.and_then(|d| d.get_str("model").ok().map(str::to_owned)))
    }
}
