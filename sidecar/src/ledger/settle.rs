//! Settlement: each request's hold replaced by what it used, once; the
//! requests drawn from a lease settle by their audit rows alone.

use bridge_protocol::{SettleOutcome, SettleRecord, SettleResult};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::error::ErrorKind;

use super::docs::KeyDoc;

use super::outbox::OutboxRow;
use super::{
    charged_path, hold_path, lapsed_path, lease_path, outbox_path, LedgerError, Mark, Settled, Store, DUPLICATE_KEY,
    MARKS_FULL,
};

/// The field of a late record's audit row that names the row which charged
/// its estimate: its own expired row (which it replaces) or its lease's
/// (which gives back the late row's `reserved_tokens`).
pub(super) const ESTIMATE_ROW: &str = "estimate_row";

/// Keys one read of key documents names at most (see [`Store::keys_with_leases`]).
pub(super) const KEY_READ_CHUNK: usize = 32;

/// The audit row of one settlement, without the key owner's fields (added on
/// flush). `charged` is what left the balance (`charged_tokens`); the seed's
/// `total_tokens` stays input plus output (an expired hold: what it charged).
pub(super) fn audit_entry(r: &SettleRecord, charged: i64, expired: bool, now: DateTime) -> Document {
    let total = if expired { charged } else { r.input_tokens.saturating_add(r.output_tokens) };
    let mut row = doc! {
        "timestamp": now,
        "request_id": &r.request_id,
        "key_id": &r.key_hash,
        "model": &r.model,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "total_tokens": total,
        "cached_tokens": r.detail.cached_tokens,
        "reasoning_tokens": r.detail.reasoning_tokens,
        "charged_tokens": charged,
        "duration_ms": r.duration_ms,
        "status_code": i32::from(r.status_code),
        "stream": r.stream,
        "usage_source": r.usage_source.as_str(),
        "expired_hold": expired,
        "reserved_tokens": r.reserved,
    };
    if let Some(lease) = &r.lease_id {
        row.insert("lease_id", lease);
    }
    if let Some(endpoint) = &r.detail.endpoint {
        row.insert("endpoint", endpoint);
    }
    if let Some(deployment) = &r.detail.deployment {
        row.insert("deployment", deployment);
    }
    if let Some(upstream) = &r.detail.upstream {
        row.insert("upstream", upstream);
    }
    row
}

impl Store {
    /// Settles a batch: each record replaces its hold by the actual usage once;
    /// the records of one lease settle together.
    pub async fn settle(&self, records: &[SettleRecord]) -> Result<Vec<SettleResult>, LedgerError> {
        let now = self.local_now();
        let mut singles = Vec::new();
        let mut groups: Vec<(&str, &str, Vec<usize>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let Some(lease) = r.lease_id.as_deref().filter(|_| r.validate().is_ok()) else {
                singles.push(i);
                continue;
            };
            match groups.iter_mut().find(|(k, l, _)| *k == r.key_hash && *l == lease) {
                // The same id twice in one batch cannot go in one update.
                Some((_, _, ids)) if ids.iter().any(|&j| records[j].request_id == r.request_id) => singles.push(i),
                Some((_, _, ids)) => ids.push(i),
                None => groups.push((&r.key_hash, lease, vec![i])),
            }
        }
        let (single_outcomes, group_outcomes) = futures::future::try_join(
            futures::future::try_join_all(singles.iter().map(|&i| self.settle_one(&records[i], now))),
            async {
                let groups: Vec<Vec<&SettleRecord>> =
                    groups.iter().map(|(_, _, ids)| ids.iter().map(|&i| &records[i]).collect()).collect();
                self.settle_leases(&groups, now).await
            },
        )
        .await?;
        let mut outcomes: Vec<Option<Settled>> = records.iter().map(|_| None).collect();
        for (i, o) in singles.iter().zip(single_outcomes) {
            outcomes[*i] = Some(o);
        }
        for ((_, _, ids), group) in groups.iter().zip(group_outcomes) {
            for (i, o) in ids.iter().zip(group) {
                outcomes[*i] = Some(o);
            }
        }
        let mut results = Vec::with_capacity(records.len());
        let mut rows = Vec::new();
        for (record, outcome) in records.iter().zip(outcomes) {
            let (outcome, message, row) =
                outcome.unwrap_or((SettleOutcome::Invalid, Some("not processed".into()), None));
            if let Some(row) = row {
                rows.push(row);
            }
            results.push(SettleResult { request_id: record.request_id.clone(), outcome, message });
        }
        self.write_audit_rows(rows).await?;
        Ok(results)
    }

    /// Records drawn from one lease of one key.
    pub(super) async fn settle_leased(
        &self,
        group: &[&SettleRecord],
        now: DateTime,
    ) -> Result<Vec<Settled>, LedgerError> {
        let mut out = self.settle_leases(&[group.to_vec()], now).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Records drawn from leases, grouped by lease (one key and lease a
    /// group). Their audit rows are the leases' ledger: written once each
    /// (unique `request_id`), with no update of the keys at all; a key's
    /// balance moves once for a whole lease when it is finalised (see
    /// [`Store::finalize_lease`]). However many leases and keys: one read of
    /// the keys, one insert of every row, one read again for the leases
    /// that closed meanwhile.
    pub(super) async fn settle_leases(
        &self,
        groups: &[Vec<&SettleRecord>],
        now: DateTime,
    ) -> Result<Vec<Vec<Settled>>, LedgerError> {
        let lease_of_group =
            |g: &[&SettleRecord]| g.first().and_then(|r| Some((r.key_hash.clone(), r.lease_id.clone()?)));
        let ids: Vec<Option<(String, String)>> = groups.iter().map(|g| lease_of_group(g)).collect();
        let keys = self.keys_with_leases(ids.iter().flatten(), true).await?;
        let mut out: Vec<Vec<Settled>> = groups.iter().map(|_| Vec::new()).collect();
        // Rows to insert, with the group and the place in it of each.
        let mut rows: Vec<Document> = Vec::new();
        let mut places: Vec<(usize, usize)> = Vec::new();
        for (g, (group, id)) in groups.iter().zip(&ids).enumerate() {
            let Some((key_hash, lease_id)) = id else { continue };
            let Some(owner) = keys.get(key_hash) else {
                out[g] = group.iter().map(|_| (SettleOutcome::Unknown, Some("no such key".to_owned()), None)).collect();
                continue;
            };
            match owner.leases.get(lease_id) {
                // Its rows are being summed: a row now might be counted twice or
                // not at all. Sent again once the expiry is done, it settles late.
                Some(lease) if lease.expiring.is_some() => {
                    let later = || (SettleOutcome::Later, Some("its lease is being expired".to_owned()), None);
                    out[g] = group.iter().map(|_| later()).collect();
                }
                Some(_) => {
                    out[g] = group.iter().map(|_| (SettleOutcome::Settled, None, None)).collect();
                    for (i, r) in group.iter().enumerate() {
                        let row =
                            OutboxRow::new(&r.key_hash, &r.request_id, owner, audit_entry(r, r.charge(), false, now));
                        rows.push(row.row);
                        places.push((g, i));
                    }
                }
                // Finalised, expired, or never seen here: each settles late.
                None => {
                    for r in group {
                        out[g].push(self.settle_late(r, now).await?);
                    }
                }
            }
        }
        if rows.is_empty() {
            return Ok(out);
        }
        match self.audit.insert_many(&rows).ordered(false).await {
            Ok(_) => {}
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(m)
                    if m.write_errors.as_ref().is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY)) =>
                {
                    for w in m.write_errors.iter().flatten() {
                        if let Some(&(g, i)) = places.get(w.index) {
                            out[g][i] = (SettleOutcome::AlreadySettled, None, None);
                        }
                    }
                }
                _ => return Err(e.into()),
            },
        }
        // Read afresh: a close may have come between our read and our insert,
        // and found rows missing that are there now.
        let inserted: Vec<(String, String)> = {
            let mut seen = std::collections::BTreeSet::new();
            places.iter().filter_map(|(g, _)| ids[*g].clone()).filter(|id| seen.insert(id.clone())).collect()
        };
        let now_keys = self.keys_with_leases(inserted.iter(), false).await?;
        for (key_hash, lease_id) in &inserted {
            let closed = now_keys
                .get(key_hash)
                .and_then(|k| k.leases.get(lease_id))
                .is_some_and(|l| l.closed && l.expiring.is_none());
            if closed {
                self.finalize_lease(key_hash, lease_id).await?;
            }
        }
        Ok(out)
    }

    /// The key documents of `leases` (key hash, lease id), with those leases
    /// (and, with `owner`, the fields an audit row names): one read per
    /// [`KEY_READ_CHUNK`] keys, each projecting only its own keys' leases.
    /// (One `$in` of a thousand ids, projecting a thousand leases, costs
    /// the embedded server over a second, quadratic in the ids; in chunks the
    /// reads cost what the keys do.)
    pub(super) async fn keys_with_leases<'a>(
        &self,
        leases: impl Iterator<Item = &'a (String, String)>,
        owner: bool,
    ) -> Result<std::collections::HashMap<String, KeyDoc>, LedgerError> {
        let mut by_key: Vec<(String, Vec<&str>)> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (hash, lease_id) in leases {
            let at = *index.entry(hash.as_str()).or_insert_with(|| {
                by_key.push((hash.clone(), Vec::new()));
                by_key.len() - 1
            });
            by_key[at].1.push(lease_id);
        }
        // The chunks at once: each waits on the database, not on the others.
        let reads = by_key.chunks(KEY_READ_CHUNK).map(|chunk| {
            let mut projection = if owner {
                doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1}
            } else {
                Document::new()
            };
            for (_, ids) in chunk {
                for id in ids {
                    projection.insert(lease_path(id), 1);
                }
            }
            let hashes: Vec<&str> = chunk.iter().map(|(h, _)| h.as_str()).collect();
            async move {
                let found = self.key_docs.find(doc! {"_id": {"$in": &hashes}}).projection(projection).await?;
                found.try_collect::<Vec<KeyDoc>>().await
            }
        });
        let chunks = futures::future::try_join_all(reads).await?;
        Ok(chunks.into_iter().flatten().map(|k| (k.hash.clone(), k)).collect())
    }

    /// One record: returns its outcome and, when it settled now, the owner and the
    /// audit row to write (key hash, request id, row).
    pub(super) async fn settle_one(&self, r: &SettleRecord, now: DateTime) -> Result<Settled, LedgerError> {
        if let Err(why) = r.validate() {
            return Ok((SettleOutcome::Invalid, Some(why.message), None));
        }
        if r.lease_id.is_some() {
            let mut one = self.settle_leased(&[r], now).await?;
            return Ok(one.pop().unwrap_or((SettleOutcome::Invalid, None, None)));
        }
        let total = r.charge();
        let entry = audit_entry(r, total, false, now);
        let outbox = outbox_path(&r.request_id);
        let projection = doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1};
        let hold = hold_path(&r.request_id);
        // The hold, if there is one: replaced by the actual usage.
        let mut attempt = 0;
        let owner = loop {
            attempt += 1;
            let owner = self
                .update_then_read(
                    &r.key_hash,
                    doc! {"_id": &r.key_hash, format!("{hold}.tokens"): r.reserved},
                    doc! {
                        "$inc": {"balance_tokens": r.reserved - total, "holds_n": -1_i64, "outbox_n": 1_i64},
                        "$unset": {&hold: ""},
                        "$set": {&outbox: &entry},
                    },
                    projection.clone(),
                )
                .await?;
            if owner.is_some() || !r.release {
                break owner;
            }
            // A release that found no hold: the reservation failed, or it is still
            // on its way. Mark the id so that it is refused when it comes, but only
            // while there is still no hold: one landing just now is released above.
            match self.mark_released(&r.key_hash, &hold, &r.request_id).await? {
                Mark::Set => {
                    return Ok((SettleOutcome::Unknown, Some("released before any hold was made".into()), None))
                }
                Mark::Full => return Ok((SettleOutcome::Unknown, Some(MARKS_FULL.into()), None)),
                Mark::Again => {}
            }
            if attempt >= 3 {
                return Ok((SettleOutcome::Unknown, Some("already released".into()), None));
            }
        };
        let owner = match owner {
            Some(owner) => Some(owner),
            // Admitted without a hold (failure mode `allow`, the reservation lost):
            // charge what was used, once.
            None if r.unreserved => {
                if self.audit.find_one(doc! {"request_id": &r.request_id}).await?.is_some() {
                    return Ok((SettleOutcome::AlreadySettled, None, None));
                }
                // One guarded write: the `charged` mark goes in with the debit, so
                // an attempt that read before another wrote its row still finds
                // the mark. Marks stand for the mark TTL, long after any retry
                // of the batch could still be racing its first attempt. With the
                // key's marks at their limit the charge goes ahead guarded by the
                // outbox entry alone: never lost, at worst doubled by such a race.
                let charged = charged_path(&r.request_id);
                let debit = doc! {"balance_tokens": -total, "outbox_n": 1_i64};
                let mut debit_and_mark = debit.clone();
                debit_and_mark.insert("charged_n", 1_i64);
                let marked = self
                    .key_docs
                    .find_one_and_update(
                        doc! {"_id": &r.key_hash, &outbox: {"$exists": false}, &charged: {"$exists": false},
                        "charged_n": {"$not": {"$gte": self.limits.marks as i64}}},
                        doc! {
                            "$inc": debit_and_mark,
                            "$set": {&outbox: &entry},
                            "$currentDate": {&charged: true},
                        },
                    )
                    .projection(projection.clone())
                    .await?;
                match marked {
                    Some(owner) => Some(owner),
                    None => {
                        self.key_docs
                            .find_one_and_update(
                                doc! {"_id": &r.key_hash, &outbox: {"$exists": false}, &charged: {"$exists": false},
                                "charged_n": {"$gte": self.limits.marks as i64}},
                                doc! {"$inc": debit, "$set": {&outbox: &entry}},
                            )
                            .projection(projection)
                            .await?
                    }
                }
            }
            None => None,
        };
        match owner {
            Some(owner) => {
                Ok((SettleOutcome::Settled, None, Some(OutboxRow::new(&r.key_hash, &r.request_id, &owner, entry))))
            }
            None if r.release => {
                let (outcome, message) = self.classify_unsettled(r).await?;
                Ok((outcome, message, None))
            }
            None => self.settle_late(r, now).await,
        }
    }

    /// A record whose hold or lease is gone: charged at its estimate by the
    /// expiry, finalised, or never seen here. It is applied all the same,
    /// once, in one guarded update of its key (with a charge mark, as an
    /// unreserved record): the key pays what it used and gets back the
    /// estimate the expiry charged for it, if one did. A request's own
    /// expired row is replaced by this one; an expired lease's row, which
    /// charged many requests' estimates at once, gives back this request's
    /// (`lapsed` says how many and how much it may still give back). A
    /// lease's record nothing charged an estimate for pays what it used; a
    /// request reserved alone that has neither hold nor row was never
    /// reserved here (`Unknown`).
    pub(super) async fn settle_late(&self, r: &SettleRecord, now: DateTime) -> Result<Settled, LedgerError> {
        let done = || Ok((SettleOutcome::AlreadySettled, None, None));
        let later = |why: &str| Ok((SettleOutcome::Later, Some(why.to_owned()), None));
        // The request's own row: written already, or its hold's estimate row.
        let own = self.audit.find_one(doc! {"request_id": &r.request_id}).await?;
        let expired_own = match own {
            Some(row) if r.lease_id.is_none() && row.get_bool("expired_hold").unwrap_or(false) => {
                Some(super::usage::int(row.get("charged_tokens").or_else(|| row.get("total_tokens"))))
            }
            Some(_) => return done(),
            None => None,
        };
        let outbox = outbox_path(&r.request_id);
        let charged = charged_path(&r.request_id);
        let occupied = match &r.lease_id {
            Some(lease) => lease_path(lease),
            None => hold_path(&r.request_id),
        };
        let mut projection = doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1, "charged_n": 1, &occupied: 1, &outbox: 1, &charged: 1};
        if let Some(lease) = &r.lease_id {
            projection.insert(outbox_path(lease), 1);
            projection.insert(lapsed_path(lease), 1);
        }
        let limit = self.limits.marks as i64;
        for _ in 0..3 {
            let Some(key) = self.key_docs.find_one(doc! {"_id": &r.key_hash}).projection(projection.clone()).await?
            else {
                return Ok((SettleOutcome::Unknown, Some("no such key".into()), None));
            };
            match &r.lease_id {
                Some(lease) if key.leases.contains_key(lease) => return later("its lease is being expired"),
                None if key.holds.contains_key(&r.request_id) => {
                    return Ok((SettleOutcome::Invalid, Some("reserved does not match the hold".into()), None))
                }
                _ => {}
            }
            if let Some(entry) = key.outbox.get(&r.request_id) {
                if entry.get_bool("expired_hold").unwrap_or(false) {
                    return later("its hold's estimate row is not written yet");
                }
                return done();
            }
            if key.charged.contains_key(&r.request_id) {
                return done();
            }
            // A hold is never lost without its expired row: with none, the
            // request was never reserved here.
            if r.lease_id.is_none() && expired_own.is_none() {
                return Ok((SettleOutcome::Unknown, Some("no hold for this request id under this key".into()), None));
            }
            if r.lease_id.as_ref().is_some_and(|lease| key.outbox.contains_key(lease)) {
                return later("its lease's estimate row is not written yet");
            }
            if key.charged_n >= limit {
                return later(MARKS_FULL);
            }
            let mut filter = doc! {
                "_id": &r.key_hash,
                &occupied: {"$exists": false},
                &outbox: {"$exists": false},
                &charged: {"$exists": false},
                "charged_n": {"$not": {"$gte": limit}},
            };
            let mut inc = doc! {"outbox_n": 1_i64, "charged_n": 1_i64};
            // The estimate this request was charged, taken back now, and the row that charged it.
            let mut back = (0, None);
            if let Some(lease) = &r.lease_id {
                filter.insert(outbox_path(lease), doc! {"$exists": false});
                let lapsed = lapsed_path(lease);
                if key.lapsed.get(lease).is_some_and(|l| l.n >= 1 && l.tokens >= r.reserved) {
                    filter.insert(format!("{lapsed}.n"), doc! {"$gte": 1_i64});
                    filter.insert(format!("{lapsed}.tokens"), doc! {"$gte": r.reserved});
                    inc.insert(format!("{lapsed}.n"), -1_i64);
                    inc.insert(format!("{lapsed}.tokens"), -r.reserved);
                    back = (r.reserved, Some(lease.as_str()));
                }
            } else if let Some(estimate) = expired_own {
                back = (estimate, Some(r.request_id.as_str()));
            }
            let charge = r.charge();
            inc.insert("balance_tokens", back.0 - charge);
            let mut entry = audit_entry(r, charge, false, now);
            entry.insert("settled_late", true);
            if let Some(row) = back.1 {
                entry.insert(ESTIMATE_ROW, row);
            }
            let update = doc! {"$inc": inc, "$set": {&outbox: &entry}, "$currentDate": {&charged: true}};
            if self.keys.update_one(filter, update).await?.matched_count == 1 {
                tracing::info!(request_id = %r.request_id, charge, back = back.0, "settled late");
                return Ok((
                    SettleOutcome::Settled,
                    None,
                    Some(OutboxRow::new(&r.key_hash, &r.request_id, &key, entry)),
                ));
            }
        }
        later("its key moved under every try")
    }

    /// Why a settlement found no hold to replace.
    pub(super) async fn classify_unsettled(
        &self,
        r: &SettleRecord,
    ) -> Result<(SettleOutcome, Option<String>), LedgerError> {
        let hold = hold_path(&r.request_id);
        let outbox = outbox_path(&r.request_id);
        let key = self.key_docs.find_one(doc! {"_id": &r.key_hash}).projection(doc! {&hold: 1, &outbox: 1}).await?;
        let pending = key.as_ref().and_then(|k| k.outbox.get(&r.request_id)).cloned();
        let row = match pending {
            Some(p) => Some(p),
            None => self.audit.find_one(doc! {"request_id": &r.request_id}).await?,
        };
        if let Some(row) = row {
            return Ok(if row.get_bool("expired_hold").unwrap_or(false) {
                (SettleOutcome::Expired, Some("the hold expired and was charged in full".into()))
            } else {
                (SettleOutcome::AlreadySettled, None)
            });
        }
        if key.as_ref().is_some_and(|k| k.holds.contains_key(&r.request_id)) {
            return Ok((SettleOutcome::Invalid, Some("reserved does not match the hold".into())));
        }
        Ok(match &r.lease_id {
            Some(_) => (SettleOutcome::Unknown, Some("no open lease of this id under this key".into())),
            None => (SettleOutcome::Unknown, Some("no hold for this request id under this key".into())),
        })
    }
}
