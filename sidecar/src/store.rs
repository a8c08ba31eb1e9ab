//! The ledger in MongoDB.
//!
//! One document per key in `api_keys`, `_id` = SHA-256 of the key. Every balance
//! change is one guarded update of that one document, never read-then-write:
//!
//! - reserve: `balance_tokens >= estimate` in the filter, `$inc` by `-estimate` and
//!   `$set holds.<request_id>` in the update.
//! - settle: `holds.<request_id>.tokens == reserved` in the filter; `$inc` by
//!   `reserved - actual`, `$unset` the hold and `$set outbox.<request_id>` to the
//!   audit row in the same update. Only one settlement can ever remove the hold.
//! - the audit row is then inserted into `audit_logs` (unique `request_id`) and the
//!   outbox entry removed. A crash between the two leaves the entry in the outbox,
//!   which the sweeper flushes: the row is written once, never lost.
//! - holds older than the TTL are charged in full by the sweeper through the same
//!   outbox path, with `expired_hold: true`.
//! - lease: like a reservation, but of up to `want` tokens under
//!   `leases.<lease_id>`, for many requests. Its close returns
//!   `tokens - drawn_tokens` to the balance at once. A request drawn from it
//!   settles by its audit row alone (one insert for a batch, unique
//!   `request_id`, no update of the key): the rows are the lease's ledger. Once
//!   the lease is closed and has a row for every drawn request, one update
//!   returns `drawn_tokens - sum(total_tokens)` and removes the lease.

use std::time::Duration;

use bridge_protocol::{
    ErrorEnvelope, LeaseClose, LeaseReply, LeaseRequest, ReserveReply, ReserveRequest, SettleOutcome, SettleRecord,
    SettleResult, UsageSource,
};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};

use crate::error::AppError;
use crate::keys;

const DUPLICATE_KEY: i32 = 11000;

/// Status of a key: only `active` keys can reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Frozen,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Frozen => "frozen",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyStatus::Active),
            "frozen" => Some(KeyStatus::Frozen),
            _ => None,
        }
    }
}

/// A key as admins see it: never the key itself, except once right after generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyView {
    pub object: &'static str,
    pub api_key: String,
    /// First 16 hex digits of the key's hash: a stable handle that reveals nothing.
    pub key_id: String,
    pub user_name: String,
    pub balance_tokens: i64,
    /// Tokens held by requests in flight, already taken out of `balance_tokens`.
    pub held_tokens: i64,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub api_key: String,
    pub user_name: String,
    pub balance_tokens: i64,
    pub status: KeyStatus,
}

/// Cheap to clone: the driver's handles are `Arc`s inside.
#[derive(Clone, Debug)]
pub struct Store {
    keys: Collection<Document>,
    audit: Collection<Document>,
    hold_ttl: Duration,
}

fn hold_path(request_id: &str) -> String {
    format!("holds.{request_id}")
}

fn outbox_path(request_id: &str) -> String {
    format!("outbox.{request_id}")
}

fn released_path(request_id: &str) -> String {
    format!("released.{request_id}")
}

fn lease_path(lease_id: &str) -> String {
    format!("leases.{lease_id}")
}

/// Tokens a lease keeps from the balance until it is finalised: all it took
/// until it is closed, then what was drawn.
fn lease_outstanding(lease: &Document) -> i64 {
    if lease.get_bool("closed").unwrap_or(false) {
        int(lease, "drawn_tokens")
    } else {
        int(lease, "tokens")
    }
}

fn lease_of(key: &Document, lease_id: &str) -> Option<Document> {
    key.get_document("leases").ok()?.get_document(lease_id).ok().cloned()
}

/// How long an `expiring` mark stands before the lease's rows are summed
/// (at most the hold TTL): far longer than a settlement takes from its check
/// of the mark to its insert.
const EXPIRY_GRACE: Duration = Duration::from_secs(5);

/// What the audit rows of a lease add up to.
#[derive(Debug, Default)]
struct LeaseUsage {
    rows: i64,
    total: i64,
    reserved: i64,
}

/// Why a guarded reservation or lease did not match.
enum Refusal {
    UnknownKey,
    Frozen(String),
    /// The id is already in use under this key.
    Taken,
    /// The filter gave up on this id and released it.
    Released,
    Broke(i64),
}

fn rfc3339(doc: &Document, field: &str) -> String {
    doc.get_datetime(field)
        .ok()
        .and_then(|d| d.try_to_rfc3339_string().ok())
        .unwrap_or_default()
}

fn int(doc: &Document, field: &str) -> i64 {
    match doc.get(field) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(f)) => *f as i64,
        _ => 0,
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

fn key_view(doc: &Document, full_key: Option<&str>) -> KeyView {
    let hash = doc.get_str("_id").unwrap_or_default();
    let sum = |field: &str, f: fn(&Document) -> i64| -> i64 {
        doc.get_document(field)
            .map(|m| m.values().filter_map(Bson::as_document).map(f).sum())
            .unwrap_or(0)
    };
    let held = sum("holds", |hold| int(hold, "tokens")) + sum("leases", lease_outstanding);
    KeyView {
        object: "api_key",
        api_key: full_key.map(str::to_owned).unwrap_or_else(|| masked_key(doc)),
        key_id: hash.chars().take(16).collect(),
        user_name: doc.get_str("user_name").unwrap_or_default().to_owned(),
        balance_tokens: int(doc, "balance_tokens"),
        held_tokens: held,
        status: doc.get_str("status").unwrap_or_default().to_owned(),
        created_at: rfc3339(doc, "created_at"),
        updated_at: rfc3339(doc, "updated_at"),
    }
}

fn masked_key(doc: &Document) -> String {
    keys::masked(
        doc.get_str("key_prefix").unwrap_or_default(),
        doc.get_str("key_last4").unwrap_or_default(),
    )
}

/// The audit row of one settlement, without the key owner's fields (added on flush).
fn audit_entry(r: &SettleRecord, total: i64, expired: bool, now: DateTime) -> Document {
    let mut row = doc! {
        "timestamp": now,
        "request_id": &r.request_id,
        "key_id": &r.key_hash,
        "model": &r.model,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "total_tokens": total,
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
    row
}

fn validate_record(r: &SettleRecord) -> Result<(), String> {
    if !bridge_protocol::valid_request_id(&r.request_id) {
        return Err("request_id has characters outside [A-Za-z0-9_-] or is too long".into());
    }
    if !bridge_protocol::valid_key_hash(&r.key_hash) {
        return Err("key_hash is not a SHA-256 hex digest".into());
    }
    if r.input_tokens < 0 || r.output_tokens < 0 || r.reserved < 0 || r.duration_ms < 0 {
        return Err("token counts and duration must not be negative".into());
    }
    if r.input_tokens.checked_add(r.output_tokens).is_none() {
        return Err("token counts overflow".into());
    }
    if r.lease_id.as_deref().is_some_and(|l| !bridge_protocol::valid_request_id(l)) {
        return Err("lease_id has characters outside [A-Za-z0-9_-] or is too long".into());
    }
    Ok(())
}

/// The settlement the sweeper makes for a hold or lease that outlived its TTL:
/// `tokens` charged at the estimate, nothing counted.
fn expired_record(
    id: &str,
    key_hash: &str,
    held: &Document,
    tokens: i64,
    at: DateTime,
    now: DateTime,
    lease_id: Option<&str>,
) -> SettleRecord {
    SettleRecord {
        request_id: id.to_owned(),
        key_hash: key_hash.to_owned(),
        model: held.get_str("model").unwrap_or_default().to_owned(),
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
    }
}

fn validate_close(c: &LeaseClose) -> Result<(), String> {
    if !bridge_protocol::valid_request_id(&c.lease_id) {
        return Err("lease_id has characters outside [A-Za-z0-9_-] or is too long".into());
    }
    if !bridge_protocol::valid_key_hash(&c.key_hash) {
        return Err("key_hash is not a SHA-256 hex digest".into());
    }
    if c.drawn_tokens < 0 || c.drawn_n < 0 || c.tokens.is_some_and(|t| t < c.drawn_tokens) {
        return Err("drawn_tokens and drawn_n must be between 0 and the lease's tokens".into());
    }
    if c.tokens.is_none() && (c.drawn_tokens != 0 || c.drawn_n != 0) {
        return Err("a release (no tokens) cannot have drawn anything".into());
    }
    Ok(())
}

fn quota_refusal(needed: i64, balance: i64) -> ErrorEnvelope {
    ErrorEnvelope::new(
        format!("You exceeded your current quota: this request needs up to {needed} tokens and the key has {balance} left."),
        "insufficient_quota",
        None,
        Some("insufficient_quota"),
    )
}

fn refusal_reply(status: u16, envelope: ErrorEnvelope) -> (u16, bridge_protocol::ErrorBody) {
    (status, envelope.error)
}

impl Store {
    pub async fn connect(uri: &str, db_name: &str, hold_ttl: Duration) -> Result<Self, AppError> {
        let client = Client::with_uri_str(uri).await?;
        let db = client.database(db_name);
        Ok(Self {
            keys: db.collection("api_keys"),
            audit: db.collection("audit_logs"),
            hold_ttl,
        })
    }

    /// Creates the indexes the ledger relies on; `request_id` uniqueness is what
    /// makes audit writes idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), AppError> {
        let unique = IndexOptions::builder().unique(true).build();
        self.audit
            .create_index(IndexModel::builder().keys(doc! {"request_id": 1}).options(unique).build())
            .await?;
        self.audit
            .create_index(IndexModel::builder().keys(doc! {"key_id": 1, "timestamp": -1}).build())
            .await?;
        self.audit
            .create_index(IndexModel::builder().keys(doc! {"timestamp": -1}).build())
            .await?;
        // A lease's rows are summed when it is finalised.
        self.audit
            .create_index(IndexModel::builder().keys(doc! {"lease_id": 1}).build())
            .await?;
        for field in ["holds_n", "outbox_n", "leases_n", "released_n"] {
            self.keys
                .create_index(IndexModel::builder().keys(doc! {field: 1}).build())
                .await?;
        }
        self.keys
            .create_index(IndexModel::builder().keys(doc! {"created_at": 1, "_id": 1}).build())
            .await?;
        Ok(())
    }

    pub async fn create_key(&self, new: NewKey, generated: bool) -> Result<KeyView, AppError> {
        let hash = bridge_protocol::key_hash(&new.api_key);
        let (prefix, last4) = keys::mask_parts(&new.api_key);
        let now = DateTime::now();
        let document = doc! {
            "_id": &hash,
            "key_prefix": prefix,
            "key_last4": last4,
            "user_name": &new.user_name,
            "balance_tokens": new.balance_tokens,
            "status": new.status.as_str(),
            "created_at": now,
            "updated_at": now,
            "holds": {},
            "holds_n": 0_i64,
            "outbox": {},
            "outbox_n": 0_i64,
        };
        match self.keys.insert_one(&document).await {
            Ok(_) => Ok(key_view(&document, generated.then_some(new.api_key.as_str()))),
            Err(e) if is_duplicate_key(&e) => Err(AppError::Conflict {
                message: "A key with this api_key already exists.".into(),
                code: "key_exists",
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// One page of keys, oldest first, and whether more follow.
    pub async fn list_keys(&self, limit: i64, offset: u64) -> Result<(Vec<KeyView>, u64), AppError> {
        let total = self.keys.count_documents(doc! {}).await?;
        let docs: Vec<Document> = self
            .keys
            .find(doc! {})
            .sort(doc! {"created_at": 1, "_id": 1})
            .skip(offset)
            .limit(limit)
            .projection(doc! {"outbox": 0})
            .await?
            .try_collect()
            .await?;
        Ok((docs.iter().map(|d| key_view(d, None)).collect(), total))
    }

    /// Top-up (or deduction) and status change in one atomic update. A deduction
    /// may not take the balance below zero.
    pub async fn patch_key(
        &self,
        hash: &str,
        delta: Option<i64>,
        status: Option<KeyStatus>,
    ) -> Result<KeyView, AppError> {
        let mut filter = doc! {"_id": hash};
        let mut set = doc! {"updated_at": DateTime::now()};
        let mut update = Document::new();
        if let Some(delta) = delta {
            if delta < 0 {
                filter.insert("balance_tokens", doc! {"$gte": -delta});
            }
            update.insert("$inc", doc! {"balance_tokens": delta});
        }
        if let Some(status) = status {
            set.insert("status", status.as_str());
        }
        update.insert("$set", set);
        let after = self
            .keys
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .projection(doc! {"outbox": 0})
            .await?;
        match after {
            Some(d) => Ok(key_view(&d, None)),
            None if self.keys.find_one(doc! {"_id": hash}).projection(doc! {"_id": 1}).await?.is_some() => {
                Err(AppError::Conflict {
                    message: "The deduction would take the balance below zero.".into(),
                    code: "balance_would_go_negative",
                })
            }
            None => Err(AppError::NotFound("No such api_key.".into())),
        }
    }

    /// Takes `estimate` tokens from the balance and records the hold, in one update.
    pub async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveReply, AppError> {
        let hold = hold_path(&req.request_id);
        let filter = doc! {
            "_id": &req.key_hash,
            "status": "active",
            "balance_tokens": {"$gte": req.estimate},
            &hold: {"$exists": false},
            // Released before it got here: the client has its 503 already.
            released_path(&req.request_id): {"$exists": false},
        };
        let update = doc! {
            "$inc": {"balance_tokens": -req.estimate, "holds_n": 1_i64},
            "$set": {&hold: {"tokens": req.estimate, "model": &req.model, "at": DateTime::now()}},
        };
        let admitted = self
            .keys
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .projection(doc! {"balance_tokens": 1})
            .await?;
        if let Some(d) = admitted {
            return Ok(ReserveReply::Admit { balance_tokens: int(&d, "balance_tokens") });
        }
        let (status, error) = match self.why_refused(&req.key_hash, "holds", &req.request_id).await? {
            Refusal::Broke(balance) => refusal_reply(429, quota_refusal(req.estimate, balance)),
            other => self.refusal(other, &req.request_id)?,
        };
        Ok(ReserveReply::Refuse { status, error })
    }

    /// Takes up to `want` (at least `min`) tokens from the balance into a lease,
    /// in one guarded update; a balance below `want` is leased whole.
    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseReply, AppError> {
        let at = lease_path(&req.lease_id);
        let mut want = req.want.max(req.min);
        for _ in 0..4 {
            let filter = doc! {
                "_id": &req.key_hash,
                "status": "active",
                "balance_tokens": {"$gte": want},
                &at: {"$exists": false},
                released_path(&req.lease_id): {"$exists": false},
            };
            let update = doc! {
                "$inc": {"balance_tokens": -want, "leases_n": 1_i64},
                "$set": {&at: {"tokens": want, "model": &req.model, "at": DateTime::now()}},
            };
            let granted = self
                .keys
                .find_one_and_update(filter, update)
                .return_document(ReturnDocument::After)
                .projection(doc! {"balance_tokens": 1})
                .await?;
            if let Some(d) = granted {
                return Ok(LeaseReply::Grant { tokens: want, balance_tokens: int(&d, "balance_tokens") });
            }
            match self.why_refused(&req.key_hash, "leases", &req.lease_id).await? {
                // Less than asked but enough for this request: lease what there is.
                Refusal::Broke(balance) if balance >= req.min && balance < want => want = balance,
                Refusal::Broke(balance) if balance < req.min => {
                    let (status, error) = refusal_reply(429, quota_refusal(req.min, balance));
                    return Ok(LeaseReply::Refuse { status, error });
                }
                // The balance moved between the two reads: try again.
                Refusal::Broke(_) => {}
                other => {
                    let (status, error) = self.refusal(other, &req.lease_id)?;
                    return Ok(LeaseReply::Refuse { status, error });
                }
            }
        }
        // Other requests of the key kept moving the balance (they reserve on
        // their own while this lease is fetched): this one does too.
        Ok(LeaseReply::Retry)
    }

    /// Reads the key only to say why a guarded update found nothing to change.
    async fn why_refused(&self, key_hash: &str, map: &str, id: &str) -> Result<Refusal, AppError> {
        let taken = format!("{map}.{id}");
        let current = self
            .keys
            .find_one(doc! {"_id": key_hash})
            .projection(doc! {"status": 1, "balance_tokens": 1, "key_prefix": 1, "key_last4": 1, &taken: 1,
                released_path(id): 1})
            .await?;
        let Some(d) = current else { return Ok(Refusal::UnknownKey) };
        Ok(if d.get_str("status") != Ok("active") {
            Refusal::Frozen(masked_key(&d))
        } else if d.get_document(map).is_ok_and(|h| h.contains_key(id)) {
            Refusal::Taken
        } else if d.get_document("released").is_ok_and(|h| h.contains_key(id)) {
            Refusal::Released
        } else {
            Refusal::Broke(int(&d, "balance_tokens"))
        })
    }

    /// The client-facing answer to a refusal other than a low balance; an id in
    /// use or released is no answer for a client (nobody waits for it).
    fn refusal(&self, why: Refusal, id: &str) -> Result<(u16, bridge_protocol::ErrorBody), AppError> {
        match why {
            Refusal::UnknownKey => Ok(refusal_reply(
                401,
                ErrorEnvelope::new("Incorrect API key provided.", "invalid_request_error", None, Some("invalid_api_key")),
            )),
            Refusal::Frozen(masked) => Ok(refusal_reply(
                403,
                ErrorEnvelope::new(
                    format!("The API key {masked} is frozen; ask an administrator to reactivate it."),
                    "permission_error",
                    None,
                    Some("key_frozen"),
                ),
            )),
            Refusal::Taken => Err(AppError::Internal(format!("id {id} reserved twice"))),
            // Nobody waits for this answer: the filter gave up and released it.
            Refusal::Released => Err(AppError::Conflict { message: "reservation already released".into(), code: "released" }),
            Refusal::Broke(balance) => Ok(refusal_reply(429, quota_refusal(1, balance))),
        }
    }

    /// Settles a batch: each record replaces its hold by the actual usage once;
    /// the records of one lease settle together.
    pub async fn settle(&self, records: &[SettleRecord]) -> Result<Vec<SettleResult>, AppError> {
        let now = DateTime::now();
        let mut singles = Vec::new();
        let mut groups: Vec<(&str, &str, Vec<usize>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let Some(lease) = r.lease_id.as_deref().filter(|_| validate_record(r).is_ok()) else {
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
            futures::future::try_join_all(groups.iter().map(|(_, _, ids)| {
                let group: Vec<&SettleRecord> = ids.iter().map(|&i| &records[i]).collect();
                async move { self.settle_leased(&group, now).await }
            })),
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

    /// Records drawn from one lease of one key. Their audit rows are the
    /// lease's ledger: written once each (unique `request_id`), in one insert,
    /// with no update of the key at all; the balance moves once for the whole
    /// lease when it is finalised (see [`Store::finalize_lease`]).
    async fn settle_leased(&self, group: &[&SettleRecord], now: DateTime) -> Result<Vec<Settled>, AppError> {
        let (Some(first), Some(lease_id)) = (group.first(), group.first().and_then(|r| r.lease_id.as_deref())) else {
            return Ok(Vec::new());
        };
        let path = lease_path(lease_id);
        let key = self
            .keys
            .find_one(doc! {"_id": &first.key_hash})
            .projection(doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1, &path: 1})
            .await?;
        let lease = key.as_ref().and_then(|k| lease_of(k, lease_id));
        let (Some(owner), Some(_)) = (key.as_ref(), lease.filter(|l| !l.contains_key("expiring"))) else {
            // Gone (finalised, expired) or never granted: a row now would be counted nowhere.
            let mut out = Vec::with_capacity(group.len());
            for r in group {
                let (outcome, message) = self.classify_unsettled(r).await?;
                out.push((outcome, message, None));
            }
            return Ok(out);
        };
        let rows: Vec<Document> = group
            .iter()
            .map(|r| OutboxRow::new(&r.key_hash, &r.request_id, owner, audit_entry(r, r.input_tokens + r.output_tokens, false, now)).row)
            .collect();
        let mut duplicates = std::collections::BTreeSet::new();
        match self.audit.insert_many(&rows).ordered(false).await {
            Ok(_) => {}
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(m)
                    if m.write_errors.as_ref().is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY)) =>
                {
                    duplicates.extend(m.write_errors.iter().flatten().map(|w| w.index));
                }
                _ => return Err(e.into()),
            },
        }
        // Read afresh: a close may have come between our read and our insert.
        self.finalize_lease(&first.key_hash, lease_id).await?;
        Ok((0..group.len())
            .map(|i| {
                if duplicates.contains(&i) {
                    (SettleOutcome::AlreadySettled, None, None)
                } else {
                    (SettleOutcome::Settled, None, None)
                }
            })
            .collect())
    }

    /// A closed lease whose drawn requests have all settled: the balance gets
    /// back what was drawn less what its rows used, and the lease goes away,
    /// in one update. Does nothing while rows are missing.
    async fn finalize_lease(&self, key_hash: &str, lease_id: &str) -> Result<bool, AppError> {
        let path = lease_path(lease_id);
        let key = self.keys.find_one(doc! {"_id": key_hash}).projection(doc! {&path: 1}).await?;
        let Some(lease) = key.as_ref().and_then(|k| lease_of(k, lease_id)) else { return Ok(false) };
        if !lease.get_bool("closed").unwrap_or(false) || lease.contains_key("expiring") {
            return Ok(false);
        }
        let used = self.lease_usage(lease_id).await?;
        let (drawn_n, drawn) = (int(&lease, "drawn_n"), int(&lease, "drawn_tokens"));
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
    async fn lease_usage(&self, lease_id: &str) -> Result<LeaseUsage, AppError> {
        let mut cursor = self
            .audit
            .aggregate([
                doc! {"$match": {"lease_id": lease_id, "expired_hold": false}},
                doc! {"$group": {"_id": Bson::Null, "rows": {"$sum": 1_i64}, "total": {"$sum": "$total_tokens"},
                    "reserved": {"$sum": "$reserved_tokens"}}},
            ])
            .await?;
        Ok(match cursor.try_next().await? {
            Some(d) => LeaseUsage { rows: int(&d, "rows"), total: int(&d, "total"), reserved: int(&d, "reserved") },
            None => LeaseUsage::default(),
        })
    }

    /// Marks `id` released so that a reservation or lease of it arriving later
    /// is refused, but only while `occupied` (its hold or lease) does not
    /// exist: one that landed meanwhile must be undone instead. Whether the
    /// mark was set.
    async fn mark_released(&self, key_hash: &str, occupied: &str, id: &str) -> Result<bool, AppError> {
        let mark = self
            .keys
            .update_one(
                doc! {"_id": key_hash, occupied: {"$exists": false}, released_path(id): {"$exists": false}},
                doc! {"$set": {released_path(id): DateTime::now()}, "$inc": {"released_n": 1_i64}},
            )
            .await?;
        Ok(mark.matched_count == 1)
    }

    /// Closes leases: what was not drawn returns to the balance. A release (no
    /// `tokens`) of a lease not granted yet leaves a mark that refuses it later.
    pub async fn close_leases(&self, closes: &[LeaseClose]) -> Result<Vec<SettleResult>, AppError> {
        let outcomes = futures::future::try_join_all(closes.iter().map(|c| self.close_lease(c))).await?;
        Ok(closes
            .iter()
            .zip(outcomes)
            .map(|(c, (outcome, message))| SettleResult { request_id: c.lease_id.clone(), outcome, message })
            .collect())
    }

    async fn close_lease(&self, c: &LeaseClose) -> Result<(SettleOutcome, Option<String>), AppError> {
        if let Err(why) = validate_close(c) {
            return Ok((SettleOutcome::Invalid, Some(why)));
        }
        let at = lease_path(&c.lease_id);
        for _ in 0..3 {
            let current = self.keys.find_one(doc! {"_id": &c.key_hash}).projection(doc! {&at: 1}).await?;
            let Some(lease) = current.as_ref().and_then(|d| lease_of(d, &c.lease_id)) else {
                if c.tokens.is_some() {
                    return Ok((SettleOutcome::Unknown, Some("no such lease under this key".into())));
                }
                if self.mark_released(&c.key_hash, &at, &c.lease_id).await? {
                    return Ok((SettleOutcome::Unknown, Some("released before it was granted".into())));
                }
                continue;
            };
            if lease.get_bool("closed").unwrap_or(false) {
                return Ok((SettleOutcome::AlreadySettled, None));
            }
            let tokens = int(&lease, "tokens");
            if c.tokens.is_some_and(|t| t != tokens) || c.drawn_tokens > tokens {
                return Ok((SettleOutcome::Invalid, Some(format!("the lease holds {tokens} tokens"))));
            }
            let closed = self
                .keys
                .update_one(
                    doc! {"_id": &c.key_hash, format!("{at}.tokens"): tokens, format!("{at}.closed"): {"$exists": false},
                        format!("{at}.expiring"): {"$exists": false}},
                    doc! {
                        "$inc": {"balance_tokens": tokens - c.drawn_tokens},
                        "$set": {format!("{at}.closed"): true, format!("{at}.drawn_n"): c.drawn_n,
                            format!("{at}.drawn_tokens"): c.drawn_tokens},
                    },
                )
                .await?;
            if closed.modified_count == 1 {
                self.finalize_lease(&c.key_hash, &c.lease_id).await?;
                return Ok((SettleOutcome::Settled, None));
            }
        }
        Ok((SettleOutcome::AlreadySettled, Some("closed or expiring meanwhile".into())))
    }

    /// One record: returns its outcome and, when it settled now, the owner and the
    /// audit row to write (key hash, request id, row).
    async fn settle_one(&self, r: &SettleRecord, now: DateTime) -> Result<Settled, AppError> {
        if let Err(why) = validate_record(r) {
            return Ok((SettleOutcome::Invalid, Some(why), None));
        }
        if r.lease_id.is_some() {
            let mut one = self.settle_leased(&[r], now).await?;
            return Ok(one.pop().unwrap_or((SettleOutcome::Invalid, None, None)));
        }
        let total = r.input_tokens + r.output_tokens;
        let entry = audit_entry(r, total, false, now);
        let outbox = outbox_path(&r.request_id);
        let projection = doc! {"user_name": 1, "key_prefix": 1, "key_last4": 1};
        let hold = hold_path(&r.request_id);
        // The hold, if there is one: replaced by the actual usage.
        let mut attempt = 0;
        let owner = loop {
            attempt += 1;
            let owner = self
                .keys
                .find_one_and_update(
                    doc! {"_id": &r.key_hash, format!("{hold}.tokens"): r.reserved},
                    doc! {
                        "$inc": {"balance_tokens": r.reserved - total, "holds_n": -1_i64, "outbox_n": 1_i64},
                        "$unset": {&hold: ""},
                        "$set": {&outbox: &entry},
                    },
                )
                .projection(projection.clone())
                .await?;
            if owner.is_some() || !r.release {
                break owner;
            }
            // A release that found no hold: the reservation failed, or it is still
            // on its way. Mark the id so that it is refused when it comes, but only
            // while there is still no hold: one landing just now is released above.
            if self.mark_released(&r.key_hash, &hold, &r.request_id).await? {
                return Ok((SettleOutcome::Unknown, Some("released before any hold was made".into()), None));
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
                self.keys
                    .find_one_and_update(
                        doc! {"_id": &r.key_hash, &outbox: {"$exists": false}},
                        doc! {"$inc": {"balance_tokens": -total, "outbox_n": 1_i64}, "$set": {&outbox: &entry}},
                    )
                    .projection(projection)
                    .await?
            }
            None => None,
        };
        match owner {
            Some(owner) => Ok((
                SettleOutcome::Settled,
                None,
                Some(OutboxRow::new(&r.key_hash, &r.request_id, &owner, entry)),
            )),
            None => {
                let (outcome, message) = self.classify_unsettled(r).await?;
                Ok((outcome, message, None))
            }
        }
    }

    /// Why a settlement found no hold to replace.
    async fn classify_unsettled(&self, r: &SettleRecord) -> Result<(SettleOutcome, Option<String>), AppError> {
        let hold = hold_path(&r.request_id);
        let outbox = outbox_path(&r.request_id);
        let key = self
            .keys
            .find_one(doc! {"_id": &r.key_hash})
            .projection(doc! {&hold: 1, &outbox: 1})
            .await?;
        let pending = key.as_ref().and_then(|k| {
            k.get_document("outbox").ok().and_then(|o| o.get_document(&r.request_id).ok()).cloned()
        });
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
        if key.as_ref().is_some_and(|k| k.get_document("holds").is_ok_and(|h| h.contains_key(&r.request_id))) {
            return Ok((SettleOutcome::Invalid, Some("reserved does not match the hold".into())));
        }
        Ok(match &r.lease_id {
            Some(_) => (SettleOutcome::Unknown, Some("no open lease of this id under this key".into())),
            None => (SettleOutcome::Unknown, Some("no hold for this request id under this key".into())),
        })
    }

    /// Inserts audit rows (a row already there counts as written) and then removes
    /// their outbox entries.
    async fn write_audit_rows(&self, rows: Vec<OutboxRow>) -> Result<(), AppError> {
        if rows.is_empty() {
            return Ok(());
        }
        let docs: Vec<&Document> = rows.iter().map(|r| &r.row).collect();
        match self.audit.insert_many(docs).ordered(false).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
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
            let all = self
                .keys
                .update_one(filter, doc! {"$unset": unset, "$inc": {"outbox_n": -n}})
                .await?;
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
    pub async fn flush_outboxes(&self) -> Result<usize, AppError> {
        let docs: Vec<Document> = self
            .keys
            .find(doc! {"outbox_n": {"$gt": 0_i64}})
            .projection(doc! {"outbox": 1, "user_name": 1, "key_prefix": 1, "key_last4": 1})
            .await?
            .try_collect()
            .await?;
        let mut rows = Vec::new();
        for owner in &docs {
            let hash = owner.get_str("_id").unwrap_or_default();
            if let Ok(outbox) = owner.get_document("outbox") {
                for (request_id, entry) in outbox {
                    if let Some(entry) = entry.as_document() {
                        rows.push(OutboxRow::new(hash, request_id, owner, entry.clone()));
                    }
                }
            }
        }
        let n = rows.len();
        self.write_audit_rows(rows).await?;
        Ok(n)
    }

    /// Charges holds older than the TTL in full and writes their audit rows.
    /// Returns how many holds it finalised.
    pub async fn expire_holds(&self) -> Result<usize, AppError> {
        let ttl_ms = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
        let now = DateTime::now();
        let cutoff = now.timestamp_millis().saturating_sub(ttl_ms);
        let docs: Vec<Document> = self
            .keys
            .find(doc! {"holds_n": {"$gt": 0_i64}})
            .projection(doc! {"holds": 1})
            .await?
            .try_collect()
            .await?;
        let mut expired = Vec::new();
        for key in &docs {
            let hash = key.get_str("_id").unwrap_or_default();
            let Ok(holds) = key.get_document("holds") else { continue };
            for (request_id, hold) in holds {
                let Some(hold) = hold.as_document() else { continue };
                let Ok(at) = hold.get_datetime("at") else { continue };
                if at.timestamp_millis() <= cutoff {
                    expired.push((hash.to_owned(), request_id.clone(), hold.clone(), *at));
                }
            }
        }
        let mut rows = Vec::new();
        for (hash, request_id, hold, at) in expired {
            let tokens = int(&hold, "tokens");
            let record = expired_record(&request_id, &hash, &hold, tokens, at, now, None);
            let entry = audit_entry(&record, tokens, true, now);
            let hold_at = hold_path(&request_id);
            let outbox = outbox_path(&request_id);
            // Guarded by the hold's own timestamp: a settlement that won the race keeps its hold.
            let owner = self
                .keys
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
        let leases = self.expire_leases(cutoff, now).await?;
        self.forget_releases(cutoff).await?;
        Ok(n + leases)
    }

    /// Leases past the TTL, in two sweeps: the first marks the lease
    /// `expiring`, which settlements check before they write a row; the next,
    /// once no settlement that passed that check can still be writing, sums the
    /// rows that came. Their requests pay what they used; the drawn requests
    /// that never settled (or the whole lease, if it never closed) are charged
    /// at their estimates, with one audit row whose `request_id` is the lease
    /// id. Closed leases not yet finalised (a failure between two steps) are
    /// finalised here too.
    async fn expire_leases(&self, cutoff: i64, now: DateTime) -> Result<usize, AppError> {
        let docs: Vec<Document> = self
            .keys
            .find(doc! {"leases_n": {"$gt": 0_i64}})
            .projection(doc! {"leases": 1})
            .await?
            .try_collect()
            .await?;
        let grace_ms = i64::try_from(self.hold_ttl.min(EXPIRY_GRACE).as_millis()).unwrap_or(i64::MAX);
        let mut rows = Vec::new();
        for key in &docs {
            let hash = key.get_str("_id").unwrap_or_default();
            let Ok(leases) = key.get_document("leases") else { continue };
            for (lease_id, lease) in leases {
                let Some(lease) = lease.as_document() else { continue };
                let Ok(at) = lease.get_datetime("at") else { continue };
                let path = lease_path(lease_id);
                if at.timestamp_millis() > cutoff {
                    if lease.get_bool("closed").unwrap_or(false) {
                        self.finalize_lease(hash, lease_id).await?;
                    }
                    continue;
                }
                let Ok(marked) = lease.get_datetime("expiring") else {
                    self.keys
                        .update_one(
                            doc! {"_id": hash, format!("{path}.at"): *at, format!("{path}.expiring"): {"$exists": false}},
                            doc! {"$set": {format!("{path}.expiring"): now}},
                        )
                        .await?;
                    continue;
                };
                if now.timestamp_millis() - marked.timestamp_millis() < grace_ms {
                    continue;
                }
                let used = self.lease_usage(lease_id).await?;
                let taken = if lease.get_bool("closed").unwrap_or(false) {
                    int(lease, "drawn_tokens")
                } else {
                    int(lease, "tokens")
                };
                let kept = (taken - used.reserved).max(0);
                let record = expired_record(lease_id, hash, lease, kept, *at, now, Some(lease_id));
                let entry = audit_entry(&record, kept, true, now);
                let mut update = doc! {
                    "$inc": {"balance_tokens": used.reserved - used.total, "leases_n": -1_i64},
                    "$unset": {&path: ""},
                };
                if kept > 0 {
                    update.insert("$set", doc! {outbox_path(lease_id): &entry});
                    if let Ok(inc) = update.get_document_mut("$inc") {
                        inc.insert("outbox_n", 1_i64);
                    }
                }
                let owner = self
                    .keys
                    .find_one_and_update(doc! {"_id": hash, format!("{path}.expiring"): *marked}, update)
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

    /// Release marks only need to outlive the reservation they block; drop
    /// those older than the hold TTL.
    async fn forget_releases(&self, cutoff_ms: i64) -> Result<(), AppError> {
        let docs: Vec<Document> = self
            .keys
            .find(doc! {"released_n": {"$gt": 0_i64}})
            .projection(doc! {"released": 1})
            .await?
            .try_collect()
            .await?;
        for key in &docs {
            let hash = key.get_str("_id").unwrap_or_default();
            let Ok(released) = key.get_document("released") else { continue };
            for (request_id, at) in released {
                let Some(at) = at.as_datetime() else { continue };
                if at.timestamp_millis() <= cutoff_ms {
                    self.keys
                        .update_one(
                            doc! {"_id": hash, released_path(request_id): {"$exists": true}},
                            doc! {"$unset": {released_path(request_id): ""}, "$inc": {"released_n": -1_i64}},
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Whether MongoDB answers; used by the readiness endpoint.
    pub async fn ping(&self) -> Result<(), AppError> {
        self.keys.find_one(doc! {"_id": ""}).projection(doc! {"_id": 1}).await?;
        Ok(())
    }
}

/// What became of one settlement record, and the audit row to write if it settled now.
type Settled = (SettleOutcome, Option<String>, Option<OutboxRow>);

/// An audit row waiting in a key's outbox, with the owner's fields filled in.
struct OutboxRow {
    key_hash: String,
    request_id: String,
    row: Document,
}

impl OutboxRow {
    fn new(key_hash: &str, request_id: &str, owner: &Document, mut row: Document) -> Self {
        row.insert("user_id", owner.get_str("user_name").unwrap_or_default());
        row.insert("api_key", masked_key(owner));
        Self { key_hash: key_hash.to_owned(), request_id: request_id.to_owned(), row }
    }
}
