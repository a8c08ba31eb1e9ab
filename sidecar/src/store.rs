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

use std::time::Duration;

use bridge_protocol::{
    ErrorEnvelope, ReserveReply, ReserveRequest, SettleOutcome, SettleRecord, SettleResult,
    UsageSource,
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
    let held = doc
        .get_document("holds")
        .map(|h| {
            h.values()
                .filter_map(Bson::as_document)
                .map(|hold| int(hold, "tokens"))
                .sum()
        })
        .unwrap_or(0);
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
    doc! {
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
    }
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
    Ok(())
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
        for field in ["holds_n", "outbox_n"] {
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
        // Refused: read the document only to say why.
        let current = self
            .keys
            .find_one(doc! {"_id": &req.key_hash})
            .projection(doc! {"status": 1, "balance_tokens": 1, "key_prefix": 1, "key_last4": 1, &hold: 1,
                released_path(&req.request_id): 1})
            .await?;
        let Some(d) = current else {
            return Ok(refuse(
                401,
                ErrorEnvelope::new(
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    None,
                    Some("invalid_api_key"),
                ),
            ));
        };
        if d.get_str("status") != Ok("active") {
            return Ok(refuse(
                403,
                ErrorEnvelope::new(
                    format!("The API key {} is frozen; ask an administrator to reactivate it.", masked_key(&d)),
                    "permission_error",
                    None,
                    Some("key_frozen"),
                ),
            ));
        }
        if d.get_document("holds").is_ok_and(|h| h.contains_key(&req.request_id)) {
            return Err(AppError::Internal(format!("request id {} reserved twice", req.request_id)));
        }
        if d.get_document("released").is_ok_and(|h| h.contains_key(&req.request_id)) {
            // Nobody waits for this answer: the filter gave up and released it.
            return Err(AppError::Conflict { message: "reservation already released".into(), code: "released" });
        }
        Ok(refuse(
            429,
            ErrorEnvelope::new(
                format!(
                    "You exceeded your current quota: this request needs up to {} tokens and the key has {} left.",
                    req.estimate,
                    int(&d, "balance_tokens")
                ),
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
            ),
        ))
    }

    /// Settles a batch: each record replaces its hold by the actual usage once.
    pub async fn settle(&self, records: &[SettleRecord]) -> Result<Vec<SettleResult>, AppError> {
        let now = DateTime::now();
        let outcomes = futures::future::try_join_all(records.iter().map(|r| self.settle_one(r, now))).await?;
        let mut results = Vec::with_capacity(records.len());
        let mut rows = Vec::new();
        for (record, (outcome, message, row)) in records.iter().zip(outcomes) {
            if let Some(row) = row {
                rows.push(row);
            }
            results.push(SettleResult { request_id: record.request_id.clone(), outcome, message });
        }
        self.write_audit_rows(rows).await?;
        Ok(results)
    }

    /// One record: returns its outcome and, when it settled now, the owner and the
    /// audit row to write (key hash, request id, row).
    async fn settle_one(
        &self,
        r: &SettleRecord,
        now: DateTime,
    ) -> Result<(SettleOutcome, Option<String>, Option<OutboxRow>), AppError> {
        if let Err(why) = validate_record(r) {
            return Ok((SettleOutcome::Invalid, Some(why), None));
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
            let mark = self
                .keys
                .update_one(
                    doc! {"_id": &r.key_hash, &hold: {"$exists": false}, released_path(&r.request_id): {"$exists": false}},
                    doc! {"$set": {released_path(&r.request_id): DateTime::now()}, "$inc": {"released_n": 1_i64}},
                )
                .await?;
            if mark.matched_count == 1 {
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
        Ok((SettleOutcome::Unknown, Some("no hold for this request id under this key".into())))
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
            let record = SettleRecord {
                request_id: request_id.clone(),
                key_hash: hash.clone(),
                model: hold.get_str("model").unwrap_or_default().to_owned(),
                reserved: tokens,
                input_tokens: 0,
                output_tokens: 0,
                usage_source: UsageSource::Estimate,
                duration_ms: now.timestamp_millis().saturating_sub(at.timestamp_millis()),
                status_code: 0,
                stream: false,
                unreserved: false,
                release: false,
            };
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
        self.forget_releases(cutoff).await?;
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

fn refuse(status: u16, envelope: ErrorEnvelope) -> ReserveReply {
    ReserveReply::Refuse { status, error: envelope.error }
}

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
