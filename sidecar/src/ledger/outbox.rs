//! The audit outbox: a settlement's row waits in its key's document (written
//! in the same update as the balance) until it is in `audit_logs`, so a crash
//! between the two writes it later instead of losing it.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

use super::docs::KeyDoc;
use super::keys::masked_key;
use super::settle::ESTIMATE_ROW;
use super::{is_duplicate_key, outbox_path, LedgerError, Store};

/// An audit row waiting in a key's outbox, with the owner's fields filled in.
pub(super) struct OutboxRow {
    pub(super) key_hash: String,
    pub(super) request_id: String,
    pub(super) row: Document,
}

impl OutboxRow {
    pub(super) fn new(key_hash: &str, request_id: &str, owner: &KeyDoc, mut row: Document) -> Self {
        row.insert("user_id", &owner.user_name);
        row.insert("api_key", masked_key(owner));
        Self { key_hash: key_hash.to_owned(), request_id: request_id.to_owned(), row }
    }
}

impl Store {
    /// Inserts audit rows (a row already there counts as written) and then removes
    /// their outbox entries.
    pub(super) async fn write_audit_rows(&self, rows: Vec<OutboxRow>) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        // A late record's row names the row that charged its estimate: its
        // own expired row, which it replaces, or its lease's.
        let estimate_row = |r: &OutboxRow| r.row.get_str(ESTIMATE_ROW).ok().map(str::to_owned);
        let replaces = |r: &OutboxRow| estimate_row(r).is_some_and(|id| id == r.request_id);
        let docs: Vec<&Document> = rows.iter().filter(|r| !replaces(r)).map(|r| &r.row).collect();
        if !docs.is_empty() {
            match self.audit.insert_many(docs).ordered(false).await {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for row in &rows {
            match estimate_row(row) {
                // Replaced once: a second flush finds no expired row.
                Some(id) if id == row.request_id => {
                    self.audit.replace_one(doc! {"request_id": &id, "expired_hold": true}, &row.row).await?;
                }
                // The lease's row gives back this request's estimate, once.
                Some(id) => {
                    let estimate = super::usage::int(row.row.get("reserved_tokens"));
                    self.audit
                        .update_one(
                            doc! {"request_id": &id, "covered": {"$ne": &row.request_id}},
                            doc! {"$inc": {"charged_tokens": -estimate, "total_tokens": -estimate},
                            "$push": {"covered": &row.request_id}},
                        )
                        .await?;
                }
                None => {}
            }
        }
        // One update per key clears all its entries when none was flushed by
        // someone else meanwhile (the usual case); otherwise entry by entry, so
        // `outbox_n` only ever counts entries actually removed.
        let mut by_key: Vec<(&str, Vec<&str>)> = Vec::new();
        for row in &rows {
            match by_key.iter_mut().find(|(k, _)| *k == row.key_hash) {
                Some((_, ids)) => ids.push(&row.request_id),
                None => by_key.push((&row.key_hash, vec![&row.request_id])),
            }
        }
        for (key_hash, ids) in by_key {
            let mut filter = doc! {"_id": key_hash};
            let mut unset = Document::new();
            for id in &ids {
                filter.insert(outbox_path(id), doc! {"$exists": true});
                unset.insert(outbox_path(id), "");
            }
            let n = ids.len() as i64;
            let all = self.keys.update_one(filter, doc! {"$unset": unset, "$inc": {"outbox_n": -n}}).await?;
            if all.matched_count == 1 {
                continue;
            }
            for id in ids {
                let outbox = outbox_path(id);
                self.keys
                    .update_one(
                        doc! {"_id": key_hash, &outbox: {"$exists": true}},
                        doc! {"$unset": {&outbox: ""}, "$inc": {"outbox_n": -1_i64}},
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes the audit rows of settlements whose writer stopped after the ledger
    /// update (a crash, a restart). Returns how many rows it wrote.
    pub async fn flush_outboxes(&self) -> Result<usize, LedgerError> {
        let docs: Vec<KeyDoc> = self
            .key_docs
            .find(doc! {"outbox_n": {"$gt": 0_i64}})
            .projection(doc! {"outbox": 1, "user_name": 1, "key_prefix": 1, "key_last4": 1})
            .await?
            .try_collect()
            .await?;
        let mut rows = Vec::new();
        for owner in &docs {
            for (request_id, entry) in &owner.outbox {
                rows.push(OutboxRow::new(&owner.hash, request_id, owner, entry.clone()));
            }
        }
        let n = rows.len();
        self.write_audit_rows(rows).await?;
        Ok(n)
    }
}
