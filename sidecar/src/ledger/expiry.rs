//! Expiry: holds and leases that outlived the TTL are charged at their
//! estimates, and release marks are forgotten once they can block nothing.

use std::time::Duration;

use bridge_protocol::{SettleRecord, UsageSource};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime};

use super::docs::KeyDoc;
use super::outbox::OutboxRow;
use super::settle::audit_entry;
use super::{hold_path, lapsed_path, lease_path, outbox_path, LedgerError, Store};

/// How long an `expiring` mark stands before the lease's rows are summed
/// (at most the hold TTL): far longer than a settlement takes from its check
/// of the mark to its insert.
pub(super) const EXPIRY_GRACE: Duration = Duration::from_secs(5);

/// The settlement the sweeper makes for a hold or lease that outlived its TTL:
/// `tokens` charged at the estimate, nothing counted.
pub(super) fn expired_record(
    id: &str,
    key_hash: &str,
    model: &str,
    tokens: i64,
    at: DateTime,
    now: DateTime,
    lease_id: Option<&str>,
) -> SettleRecord {
    SettleRecord {
        request_id: id.to_owned(),
        key_hash: key_hash.to_owned(),
        model: model.to_owned(),
        reserved: tokens,
        input_tokens: 0,
        output_tokens: 0,
        usage_source: UsageSource::Estimate,
        duration_ms: now.timestamp_millis().saturating_sub(at.timestamp_millis()),
        status_code: 0,
        stream: false,
        unreserved: false,
        release: false,
        lease_id: lease_id.map(str::to_owned),
        detail: bridge_protocol::RecordDetail::default(),
    }
}

impl Store {
    /// Charges holds older than the TTL in full and writes their audit rows.
    /// Returns how many holds it finalised.
    pub async fn expire_holds(&self) -> Result<usize, LedgerError> {
        let ttl_ms = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = self.server_now().await?;
        let cutoff = now.timestamp_millis().saturating_sub(ttl_ms);
        let docs: Vec<KeyDoc> = self
            .key_docs
            .find(doc! {"holds_n": {"$gt": 0_i64}})
            .projection(doc! {"holds": 1})
            .await?
            .try_collect()
            .await?;
        let mut expired = Vec::new();
        for key in docs {
            for (request_id, hold) in key.holds {
                let Some(at) = hold.at else { continue };
                if at.timestamp_millis() <= cutoff {
                    expired.push((key.hash.clone(), request_id, hold, at));
                }
            }
        }
        let mut rows = Vec::new();
        for (hash, request_id, hold, at) in expired {
            let tokens = hold.tokens;
            let record = expired_record(&request_id, &hash, &hold.model, tokens, at, now, None);
            let entry = audit_entry(&record, tokens, true, now);
            let hold_at = hold_path(&request_id);
            let outbox = outbox_path(&request_id);
            // Guarded by the hold's own timestamp: a settlement that won the race keeps its hold.
            let owner = self
                .key_docs
                .find_one_and_update(
                    doc! {"_id": &hash, format!("{hold_at}.at"): at, format!("{hold_at}.tokens"): tokens},
                    doc! {
                        "$inc": {"holds_n": -1_i64, "outbox_n": 1_i64},
                        "$unset": {&hold_at: ""},
                        "$set": {&outbox: &entry},
                    },
                )
                .projection(doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1})
                .await?;
            if let Some(owner) = owner {
                tracing::warn!(request_id = %request_id, tokens, "hold expired unsettled; charged in full");
                rows.push(OutboxRow::new(&hash, &request_id, &owner, entry));
            }
        }
        let n = rows.len();
        self.write_audit_rows(rows).await?;
        // A sidecar that just started cannot tell a gateway gone from one that
        // could not reach it while it was down: it waits `lost_after` first.
        let lost_cutoff = match self.started.elapsed() >= self.leases.lost_after {
            true => now.timestamp_millis().saturating_sub(self.leases.lost_after.as_millis() as i64),
            false => i64::MIN,
        };
        let leases = self.expire_leases(cutoff, lost_cutoff, now).await?;
        // A mark older than the hold TTL guards nothing the expiry does not.
        let mark_ttl_ms = i64::try_from(self.mark_ttl.min(self.hold_ttl).as_millis()).unwrap_or(i64::MAX);
        self.forget_marks(now.timestamp_millis().saturating_sub(mark_ttl_ms)).await?;
        // A record later than the hold TTL after its lease expired is charged
        // what it used with nothing taken back: the estimate row stands.
        self.forget_lapsed(cutoff).await?;
        Ok(n + leases)
    }

    /// Leases past the TTL (closed ones) or lost (open ones their gateway
    /// stopped reporting for `lost_after`), in two sweeps: the first marks the lease
    /// `expiring`, which settlements check before they write a row; the next,
    /// once no settlement that passed that check can still be writing, sums the
    /// rows that came. Their requests pay what they used; the drawn requests
    /// that never settled are charged at their estimates, with one audit row whose `request_id` is the lease
    /// id; a lease never closed pays its last reported draws, the rest goes
    /// back. Closed leases not yet finalised (a failure between two steps) are
    /// finalised here too.
    pub(super) async fn expire_leases(
        &self,
        cutoff: i64,
        lost_cutoff: i64,
        now: DateTime,
    ) -> Result<usize, LedgerError> {
        let docs: Vec<KeyDoc> = self
            .key_docs
            .find(doc! {"leases_n": {"$gt": 0_i64}})
            .projection(doc! {"leases": 1})
            .await?
            .try_collect()
            .await?;
        let grace_ms = i64::try_from(self.hold_ttl.min(EXPIRY_GRACE).as_millis()).unwrap_or(i64::MAX);
        let mut rows = Vec::new();
        for key in &docs {
            let hash = key.hash.as_str();
            for (lease_id, lease) in &key.leases {
                let Some(at) = lease.at else { continue };
                let path = lease_path(lease_id);
                // Its drawn requests have the hold TTL to settle; but a lease
                // whose gateway went silent for `lost_after` is its gateway gone.
                let due = at.timestamp_millis() <= cutoff || lease.lost_since(lost_cutoff);
                if !due {
                    if lease.closed {
                        self.finalize_lease(hash, lease_id).await?;
                    }
                    continue;
                }
                let Some(marked) = lease.expiring else {
                    self.keys
                        .update_one(
                            doc! {"_id": hash, format!("{path}.at"): at, format!("{path}.expiring"): {"$exists": false}},
                            doc! {"$currentDate": {format!("{path}.expiring"): true}},
                        )
                        .await?;
                    continue;
                };
                if now.timestamp_millis() - marked.timestamp_millis() < grace_ms {
                    continue;
                }
                let used = self.lease_usage(lease_id).await?;
                // Drawn: what the close said, or for a lease never closed what
                // was last reported (and at least what settled). The drawn
                // requests without a row pay their estimates; the undrawn rest
                // of a lease never closed goes back.
                let drawn = lease.drawn_known().max(used.reserved);
                let kept = drawn - used.reserved;
                let back = (lease.outstanding() - drawn).max(0) + used.reserved - used.total;
                let record = expired_record(lease_id, hash, &lease.model, kept, at, now, Some(lease_id));
                let entry = audit_entry(&record, kept, true, now);
                let mut update = doc! {
                    "$inc": {"balance_tokens": back, "leases_n": -1_i64},
                    "$unset": {&path: ""},
                };
                if kept > 0 {
                    // What a late record of one of those requests takes back
                    // (see `Store::settle_late`): `kept` for this many of them.
                    let drawn_n = if lease.closed { lease.drawn_n } else { lease.reported_n };
                    let n = drawn_n.saturating_sub(used.rows).max(1);
                    let lapsed = doc! {"tokens": kept, "n": n, "at": now};
                    update.insert("$set", doc! {outbox_path(lease_id): &entry, lapsed_path(lease_id): lapsed});
                    if let Ok(inc) = update.get_document_mut("$inc") {
                        inc.insert("outbox_n", 1_i64);
                        inc.insert("lapsed_n", 1_i64);
                    }
                }
                let owner = self
                    .key_docs
                    .find_one_and_update(doc! {"_id": hash, format!("{path}.expiring"): marked}, update)
                    .projection(doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1})
                    .await?;
                if let (Some(owner), true) = (owner, kept > 0) {
                    tracing::warn!(lease_id = %lease_id, tokens = kept, "lease expired with requests unsettled; charged at their estimates");
                    rows.push(OutboxRow::new(hash, lease_id, &owner, entry));
                }
            }
        }
        let n = rows.len();
        self.write_audit_rows(rows).await?;
        Ok(n)
    }

    /// Lapsed leases older than `cutoff_ms` are forgotten.
    pub(super) async fn forget_lapsed(&self, cutoff_ms: i64) -> Result<(), LedgerError> {
        let docs: Vec<KeyDoc> = self
            .key_docs
            .find(doc! {"lapsed_n": {"$gt": 0_i64}})
            .projection(doc! {"lapsed": 1})
            .await?
            .try_collect()
            .await?;
        for key in &docs {
            for (id, lapsed) in &key.lapsed {
                if lapsed.at.is_none_or(|at| at.timestamp_millis() <= cutoff_ms) {
                    let path = lapsed_path(id);
                    self.keys
                        .update_one(
                            doc! {"_id": &key.hash, &path: {"$exists": true}},
                            doc! {"$unset": {&path: ""}, "$inc": {"lapsed_n": -1_i64}},
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Release and charge marks only need to outlive the calls they guard
    /// (a reservation that may still arrive, a settlement retry that may still
    /// race its first attempt): drop those older than the mark TTL.
    pub(super) async fn forget_marks(&self, cutoff_ms: i64) -> Result<(), LedgerError> {
        for (map, counter) in [("released", "released_n"), ("charged", "charged_n")] {
            let docs: Vec<KeyDoc> = self
                .key_docs
                .find(doc! {counter: {"$gt": 0_i64}})
                .projection(doc! {map: 1})
                .await?
                .try_collect()
                .await?;
            for key in &docs {
                let hash = key.hash.as_str();
                let marks = if map == "released" { &key.released } else { &key.charged };
                for (id, at) in marks {
                    if at.timestamp_millis() <= cutoff_ms {
                        let path = format!("{map}.{id}");
                        self.keys
                            .update_one(
                                doc! {"_id": hash, &path: {"$exists": true}},
                                doc! {"$unset": {&path: ""}, "$inc": {counter: -1_i64}},
                            )
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }
}
