//! Leases: many requests' estimates taken from a key in one guarded update,
//! closed with what was drawn, and finalised once every drawn request has its
//! audit row.

use bridge_protocol::{LeaseClose, LeaseProgress, LeaseRequest, SettleOutcome, SettleResult};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};

use super::docs::{KeyDoc, LeaseDoc, LeaseUsage};
use super::reserve::Why;
use super::{
    grant_projection, lease_path, policy_clauses, released_path, Decision, LedgerError, Mark, Refusal, Store,
    MARKS_FULL,
};

/// How long after a lease closed its finished requests' refunds are taken
/// as on their way (their rows come with their gateway's next settlement
/// tick): a request short of balance meanwhile is asked to retry, not refused.
pub const REFUNDS_DUE: std::time::Duration = std::time::Duration::from_secs(1);

/// Lease `lease_id` in a key's document, as read.
pub(super) fn lease_of(key: KeyDoc, lease_id: &str) -> Option<LeaseDoc> {
    key.leases.into_iter().find_map(|(id, lease)| (id == lease_id).then_some(lease))
}

impl Store {
    /// Takes up to `want` (at least `min`) tokens from the balance into a lease,
    /// in one guarded update, and at most the lease share of the balance
    /// unless that is below `min`: a balance below `want` is leased as far
    /// as the share allows, one below `min` not at all.
    pub async fn lease(&self, req: &LeaseRequest) -> Result<Decision, LedgerError> {
        let at = lease_path(&req.lease_id);
        let share = i64::from(self.leases.share_percent.clamp(1, 100));
        // The balance a lease of `want` needs so that it is within the share.
        let needs = |want: i64| {
            if want <= req.min {
                want
            } else {
                (want.saturating_mul(100).saturating_add(share - 1) / share).max(want)
            }
        };
        let mut want = req.want.max(req.min);
        for _ in 0..4 {
            let mut filter = doc! {
                "_id": &req.key_hash,
                "status": "active",
                "balance_tokens": {"$gte": needs(want)},
                "leases_n": {"$not": {"$gte": self.limits.leases as i64}},
                &at: {"$exists": false},
                released_path(&req.lease_id): {"$exists": false},
            };
            filter.extend(policy_clauses(&req.model, self.local_now()));
            let update = doc! {
                "$inc": {"balance_tokens": -want, "leases_n": 1_i64},
                "$set": {format!("{at}.tokens"): want, format!("{at}.model"): &req.model},
                "$currentDate": {format!("{at}.at"): true},
            };
            let granted = self.update_then_read(&req.key_hash, filter, update, grant_projection()).await?;
            if let Some(d) = granted {
                return Ok(Decision::Granted { tokens: want, balance_tokens: d.balance_tokens, policy: d.policy() });
            }
            match self.why_refused(&req.key_hash, "leases", &req.lease_id, self.limits.leases, &req.model).await? {
                Why::Broke(balance) if balance < req.min => {
                    return self.recall_or_refuse(&req.key_hash, req.min, balance, Some(&req.lease_id)).await;
                }
                // Less than asked fits the share of what there is: lease that.
                Why::Broke(balance) => want = req.want.min(balance.saturating_mul(share) / 100).max(req.min),
                other => return other.decision(&req.lease_id, req.min),
            }
        }
        // Other requests of the key kept moving the balance: ask again shortly.
        Ok(Decision::Retry)
    }

    /// The balance is below what a request needs. If other leases of the key
    /// hold enough undrawn (by their gateways' last reports), they are
    /// recalled (each gateway closes its lease on its next settlement tick,
    /// which returns the undrawn part) and the request is asked to retry. So
    /// it is too while open leases and those closed in the last
    /// [`REFUNDS_DUE`] may still give back what their finished requests did
    /// not use (their rows come with the gateway's next tick). Only a key that
    /// cannot afford the request even then is refused `insufficient_quota`:
    /// within about a lease window and `REFUNDS_DUE` of the shortfall.
    pub(super) async fn recall_or_refuse(
        &self,
        key_hash: &str,
        needed: i64,
        balance: i64,
        asking: Option<&str>,
    ) -> Result<Decision, LedgerError> {
        // One fresh read for all of it: the balance the caller saw may be from
        // before a lease closed (its undrawn part back in the balance, the
        // lease gone from the map), which would look like a shortfall.
        let key = self
            .key_docs
            .find_one(doc! {"_id": key_hash})
            .projection(doc! {"leases": 1, "holds": 1, "balance_tokens": 1})
            .await?;
        let (leases, holds, balance) = key.map(|k| (k.leases, k.holds, k.balance_tokens)).unwrap_or((
            Default::default(),
            Default::default(),
            balance,
        ));
        // Open leases of other gateways (or windows): recalled if it comes to that.
        let others: Vec<(&String, &LeaseDoc)> =
            leases.iter().filter(|(id, l)| Some(id.as_str()) != asking && !l.closed && l.expiring.is_none()).collect();
        let undrawn: i64 = others.iter().map(|(_, l)| l.undrawn()).sum();
        // Refunds on their way: what open leases' requests drew (they are
        // recalled now and close within a tick), and what leases closed in the
        // last REFUNDS_DUE drew; part of it comes back once their rows arrive.
        let mut due: i64 = others.iter().filter(|(_, l)| !l.closed).map(|(_, l)| l.reported_tokens.max(0)).sum();
        // And the holds of requests still in flight (or whose settlements are
        // queued in a gateway): each gives back what its request did not use.
        due += holds.values().map(|h| h.tokens.max(0)).sum::<i64>();
        if leases.values().any(|l| l.closed) {
            let since = self.server_now().await?.timestamp_millis() - REFUNDS_DUE.as_millis() as i64;
            due += leases
                .values()
                .filter(|l| l.closed && l.closed_at.is_some_and(|at| at.timestamp_millis() >= since))
                .map(|l| l.drawn_tokens)
                .sum::<i64>();
        }
        if balance.saturating_add(undrawn).saturating_add(due) < needed {
            tracing::debug!(needed, balance, undrawn, due, leases = ?leases, holds = holds.len(), "short of balance");
            return Ok(Decision::Refused(Refusal::Insufficient { needed, balance }));
        }
        let mut recall = doc! {};
        for (id, lease) in &others {
            if lease.recall.is_none() {
                recall.insert(format!("{}.recall", lease_path(id)), true);
            }
        }
        if !recall.is_empty() {
            self.keys.update_one(doc! {"_id": key_hash}, doc! {"$currentDate": recall}).await?;
            tracing::info!(needed, balance, undrawn, leases = others.len(), "balance in other leases: recalled");
        }
        Ok(Decision::Retry)
    }

    /// Progress reports of leases: their draws so far (`$max`; counted only
    /// while the lease is open) and the time of the report, which for a closed
    /// lease is its gateway's heartbeat while requests drawn from it are in
    /// flight. Returns the leases to stop drawing from: recalled, or gone
    /// (expired as lost, or never granted).
    ///
    /// However many leases: one `update` command of one guarded statement a
    /// lease (one round trip), then one read of their keys for what to stop.
    pub async fn report_progress(&self, reports: &[LeaseProgress]) -> Result<Vec<String>, LedgerError> {
        let valid: Vec<&LeaseProgress> = reports.iter().filter(|p| p.validate().is_ok()).collect();
        if valid.is_empty() {
            return Ok(Vec::new());
        }
        let updates: Vec<Document> = valid
            .iter()
            .map(|p| {
                let at = lease_path(&p.lease_id);
                doc! {
                    "q": {"_id": &p.key_hash, format!("{at}.tokens"): {"$gte": p.drawn_tokens},
                        format!("{at}.expiring"): {"$exists": false}},
                    "u": {
                        "$max": {format!("{at}.reported_tokens"): p.drawn_tokens, format!("{at}.reported_n"): p.drawn_n},
                        "$currentDate": {format!("{at}.seen"): true},
                    },
                }
            })
            .collect();
        self.update_each(updates).await?;
        // Stop drawing from a lease recalled, expiring, gone, or smaller than
        // what was drawn from it (the guard above).
        let named: Vec<(String, String)> = valid.iter().map(|p| (p.key_hash.clone(), p.lease_id.clone())).collect();
        let keys = self.keys_with_leases(named.iter(), false).await?;
        Ok(valid
            .iter()
            .filter(|p| {
                let lease = keys.get(&p.key_hash).and_then(|k| k.leases.get(&p.lease_id));
                lease.is_none_or(|l| l.recall.is_some() || l.expiring.is_some() || l.tokens < p.drawn_tokens)
            })
            .map(|p| p.lease_id.clone())
            .collect())
    }

    /// A closed lease whose drawn requests have all settled: the balance gets
    /// back what was drawn less what its rows used, and the lease goes away,
    /// in one update. Does nothing while rows are missing.
    pub(super) async fn finalize_lease(&self, key_hash: &str, lease_id: &str) -> Result<bool, LedgerError> {
        let path = lease_path(lease_id);
        let key = self.key_docs.find_one(doc! {"_id": key_hash}).projection(doc! {&path: 1}).await?;
        let Some(lease) = key.and_then(|k| lease_of(k, lease_id)) else { return Ok(false) };
        if !lease.closed || lease.expiring.is_some() {
            return Ok(false);
        }
        let used = self.lease_usage(lease_id).await?;
        let (drawn_n, drawn) = (lease.drawn_n, lease.drawn_tokens);
        if used.rows < drawn_n {
            return Ok(false);
        }
        let done = self
            .keys
            .update_one(
                doc! {"_id": key_hash, format!("{path}.closed"): true, format!("{path}.expiring"): {"$exists": false}},
                doc! {"$inc": {"balance_tokens": drawn - used.total, "leases_n": -1_i64}, "$unset": {&path: ""}},
            )
            .await?;
        Ok(done.modified_count == 1)
    }

    /// What the audit rows of a lease add up to.
    pub(super) async fn lease_usage(&self, lease_id: &str) -> Result<LeaseUsage, LedgerError> {
        let mut cursor = self
            .audit
            .aggregate([
                doc! {"$match": {"lease_id": lease_id, "expired_hold": false}},
                doc! {"$group": {"_id": Bson::Null, "rows": {"$sum": 1_i64}, "total": {"$sum": super::usage::charged()},
                "reserved": {"$sum": "$reserved_tokens"}}},
            ])
            .await?;
        Ok(match cursor.try_next().await? {
            Some(d) => mongodb::bson::from_document(d).map_err(|e| LedgerError::Internal(e.to_string()))?,
            None => LeaseUsage::default(),
        })
    }

    /// Closes leases: what was not drawn returns to the balance. However many
    /// leases and keys: one read of their keys, one `update` command of one
    /// guarded statement a close, one read again, and the closed leases
    /// whose rows are all in finalised together ([`Store::finalize_leases`]).
    /// A release (no `tokens`: a lease not granted yet leaves a mark that
    /// refuses it later), or a close whose guard found its lease moved
    /// meanwhile, goes on its own ([`Store::close_lease`]).
    pub async fn close_leases(&self, closes: &[LeaseClose]) -> Result<Vec<SettleResult>, LedgerError> {
        type Outcome = (SettleOutcome, Option<String>);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; closes.len()];
        let ids = |which: &mut dyn Iterator<Item = usize>| -> Vec<(String, String)> {
            which.map(|i| (closes[i].key_hash.clone(), closes[i].lease_id.clone())).collect()
        };
        let batched: Vec<usize> =
            (0..closes.len()).filter(|&i| closes[i].validate().is_ok() && closes[i].tokens.is_some()).collect();
        let before = self.keys_with_leases(ids(&mut batched.iter().copied()).iter(), false).await?;
        let mut statements = Vec::new();
        let mut sent = Vec::new();
        for (i, c) in closes.iter().enumerate() {
            if let Err(why) = c.validate() {
                outcomes[i] = Some((SettleOutcome::Invalid, Some(why.message)));
                continue;
            }
            let Some(claimed) = c.tokens else { continue };
            match before.get(&c.key_hash).and_then(|k| k.leases.get(&c.lease_id)) {
                None => outcomes[i] = Some((SettleOutcome::Unknown, Some("no such lease under this key".into()))),
                Some(lease) if lease.closed => outcomes[i] = Some((SettleOutcome::AlreadySettled, None)),
                Some(lease) if claimed != lease.tokens || c.drawn_tokens > lease.tokens => {
                    let why = format!("the lease holds {} tokens", lease.tokens);
                    outcomes[i] = Some((SettleOutcome::Invalid, Some(why)));
                }
                Some(lease) => {
                    let (q, u) = close_statement(c, lease.tokens);
                    statements.push(doc! {"q": q, "u": u});
                    sent.push(i);
                }
            }
        }
        self.update_each(statements).await?;
        // Which closed, by the leases as they are now: ours carry our counts.
        let after = self.keys_with_leases(ids(&mut sent.iter().copied()).iter(), false).await?;
        let mut finalize = Vec::new();
        for &i in &sent {
            let c = &closes[i];
            match after.get(&c.key_hash).and_then(|k| k.leases.get(&c.lease_id)) {
                Some(l) if l.closed && (l.drawn_n, l.drawn_tokens) == (c.drawn_n, c.drawn_tokens) => {
                    outcomes[i] = Some((SettleOutcome::Settled, None));
                    if l.expiring.is_none() {
                        finalize.push((c.key_hash.clone(), c.lease_id.clone(), l.clone()));
                    }
                }
                // Gone: closed and finalised, or expired, since our read.
                None => outcomes[i] = Some((SettleOutcome::AlreadySettled, Some("closed or expired meanwhile".into()))),
                Some(_) => {}
            }
        }
        self.finalize_leases(&finalize).await?;
        let rest: Vec<usize> = (0..closes.len()).filter(|&i| outcomes[i].is_none()).collect();
        let one_by_one = futures::future::try_join_all(rest.iter().map(|&i| self.close_lease(&closes[i]))).await?;
        for (i, outcome) in rest.into_iter().zip(one_by_one) {
            outcomes[i] = Some(outcome);
        }
        Ok(closes
            .iter()
            .zip(outcomes)
            .map(|(c, outcome)| {
                let (outcome, message) = outcome.unwrap_or((SettleOutcome::AlreadySettled, None));
                SettleResult { request_id: c.lease_id.clone(), outcome, message }
            })
            .collect())
    }

    /// Guarded updates of key documents (`{q, u}` statements) in one
    /// `update` command: one round trip however many, each applied or not by
    /// its own guard (the caller reads back which).
    async fn update_each(&self, statements: Vec<Document>) -> Result<(), LedgerError> {
        if statements.is_empty() {
            return Ok(());
        }
        let ns = self.keys.namespace();
        self.keys
            .client()
            .database(&ns.db)
            .run_command(doc! {"update": &ns.coll, "updates": statements, "ordered": false})
            .await?;
        Ok(())
    }

    /// Closed leases (as read, with their key) whose drawn requests all have
    /// their rows: each key's balance gets back what was drawn less what the
    /// rows used, and the lease goes away. One aggregation of their rows, one
    /// `update` command; one whose rows are missing waits for them (the
    /// records' settlement finalises it), as in [`Store::finalize_lease`].
    pub(super) async fn finalize_leases(&self, leases: &[(String, String, LeaseDoc)]) -> Result<(), LedgerError> {
        if leases.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = leases.iter().map(|(_, id, _)| id.as_str()).collect();
        // In chunks: one `$in` of many ids costs the embedded server quadratically.
        let mut used: std::collections::HashMap<String, LeaseUsage> = std::collections::HashMap::new();
        for chunk in ids.chunks(super::settle::KEY_READ_CHUNK) {
            let groups = self
                .audit
                .aggregate([
                    doc! {"$match": {"lease_id": {"$in": chunk}, "expired_hold": false}},
                    doc! {"$group": {"_id": "$lease_id", "rows": {"$sum": 1_i64}, "total": {"$sum": super::usage::charged()},
                    "reserved": {"$sum": "$reserved_tokens"}}},
                ])
                .await?
                .try_collect::<Vec<Document>>()
                .await?;
            used.extend(groups.into_iter().filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_owned();
                let usage = LeaseUsage {
                    rows: super::usage::int(d.get("rows")),
                    total: super::usage::int(d.get("total")),
                    reserved: super::usage::int(d.get("reserved")),
                };
                Some((id, usage))
            }));
        }
        let statements: Vec<Document> = leases
            .iter()
            .filter_map(|(key_hash, lease_id, lease)| {
                let used = used.get(lease_id).cloned().unwrap_or_default();
                (used.rows >= lease.drawn_n).then(|| {
                    let path = lease_path(lease_id);
                    doc! {
                        "q": {"_id": key_hash, format!("{path}.closed"): true, format!("{path}.expiring"): {"$exists": false}},
                        "u": {"$inc": {"balance_tokens": lease.drawn_tokens - used.total, "leases_n": -1_i64},
                            "$unset": {&path: ""}},
                    }
                })
            })
            .collect();
        self.update_each(statements).await?;
        Ok(())
    }

    pub(super) async fn close_lease(&self, c: &LeaseClose) -> Result<(SettleOutcome, Option<String>), LedgerError> {
        if let Err(why) = c.validate() {
            return Ok((SettleOutcome::Invalid, Some(why.message)));
        }
        let at = lease_path(&c.lease_id);
        for _ in 0..3 {
            let current = self.key_docs.find_one(doc! {"_id": &c.key_hash}).projection(doc! {&at: 1}).await?;
            let Some(lease) = current.and_then(|d| lease_of(d, &c.lease_id)) else {
                if c.tokens.is_some() {
                    return Ok((SettleOutcome::Unknown, Some("no such lease under this key".into())));
                }
                match self.mark_released(&c.key_hash, &at, &c.lease_id).await? {
                    Mark::Set => return Ok((SettleOutcome::Unknown, Some("released before it was granted".into()))),
                    Mark::Full => return Ok((SettleOutcome::Unknown, Some(MARKS_FULL.into()))),
                    Mark::Again => continue,
                }
            };
            if lease.closed {
                return Ok((SettleOutcome::AlreadySettled, None));
            }
            let tokens = lease.tokens;
            if c.tokens.is_some_and(|t| t != tokens) || c.drawn_tokens > tokens {
                return Ok((SettleOutcome::Invalid, Some(format!("the lease holds {tokens} tokens"))));
            }
            let (filter, update) = close_statement(c, tokens);
            let closed = self.keys.update_one(filter, update).await?;
            if closed.modified_count == 1 {
                self.finalize_lease(&c.key_hash, &c.lease_id).await?;
                return Ok((SettleOutcome::Settled, None));
            }
        }
        Ok((SettleOutcome::AlreadySettled, Some("closed or expiring meanwhile".into())))
    }
}

/// The guarded update that closes lease `c` of `tokens`: what was not drawn
/// returns to the balance, once (filter, update).
fn close_statement(c: &LeaseClose, tokens: i64) -> (Document, Document) {
    let at = lease_path(&c.lease_id);
    (
        doc! {"_id": &c.key_hash, format!("{at}.tokens"): tokens, format!("{at}.closed"): {"$exists": false},
        format!("{at}.expiring"): {"$exists": false}},
        doc! {
            "$inc": {"balance_tokens": tokens - c.drawn_tokens},
            "$set": {format!("{at}.closed"): true, format!("{at}.drawn_n"): c.drawn_n,
                format!("{at}.drawn_tokens"): c.drawn_tokens},
            "$currentDate": {format!("{at}.closed_at"): true},
        },
    )
}
