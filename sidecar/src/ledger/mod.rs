//! The ledger in MongoDB, one module per workflow.
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

//!
//! Modules: `keys` (the admin's view and changes), `reserve`, `lease`,
//! `settle`, `outbox` (audit rows that outlive a crash), `expiry` (the
//! sweeper's work). Errors are `LedgerError`, mapped to the API's `AppError`
//! at the handler edge; refusals are typed (`Refusal`) and worded for clients
//! by `crate::refusal`.

mod audit;
mod docs;
mod expiry;
mod keys;
mod lease;
mod outbox;
mod reserve;
mod responses;
mod settle;
mod usage;

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, IndexModel};

pub use audit::{AuditPage, AuditQuery, Cursor};
pub use keys::{Controls, KeyStatus, KeyView, NewKey, Usage, CHANGE_SLACK_MS};
pub use lease::REFUNDS_DUE;
pub use usage::GroupBy;

use bridge_protocol::SettleOutcome;
use docs::KeyDoc;
use outbox::OutboxRow;

/// What can go wrong in the ledger, apart from a refusal (which is an answer).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Database(#[from] mongodb::error::Error),
    #[error("{message}")]
    Conflict { message: String, code: &'static str },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

/// Why a key may not take what a request needs; `crate::refusal` words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownKey,
    Frozen {
        masked_key: String,
    },
    /// Past its `expires_at` (RFC 3339).
    Expired {
        masked_key: String,
        at: String,
    },
    /// The request names a model the key may not use.
    ModelNotAllowed {
        model: String,
        allowed: Vec<String>,
    },
    /// The key has as much in flight as its document may hold: retry shortly.
    Busy,
    /// The balance is below what the request needs.
    Insufficient {
        needed: i64,
        balance: i64,
    },
}

/// The ledger's answer to a reservation or a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Granted {
        tokens: i64,
        balance_tokens: i64,
        policy: bridge_protocol::KeyPolicy,
    },
    Refused(Refusal),
    /// Not now: the balance the request needs is in other gateways' leases
    /// (recalled), or it moved under every try. The request asks again shortly.
    Retry,
}

pub(super) const DUPLICATE_KEY: i32 = 11000;

/// Cheap to clone: the driver's handles are `Arc`s inside.
#[derive(Clone, Debug)]
pub struct Store {
    keys: Collection<Document>,
    /// The same collection, read as typed documents.
    key_docs: Collection<KeyDoc>,
    audit: Collection<Document>,
    /// Which key made which response stored upstream (`_id`: the response id).
    responses: Collection<Document>,
    /// For `hello`, whose `localTime` is the database server's clock.
    admin: mongodb::Database,
    hold_ttl: Duration,
    /// Added to this process's clock: 0 but in tests that play a sidecar
    /// whose clock is off.
    local_skew_ms: i64,
    /// How long release and charge marks stand: they guard calls that may
    /// still be on their way, so minutes, not the hold TTL.
    mark_ttl: Duration,
    limits: KeyLimits,
    leases: LeasePolicy,
    /// When this store was made: lost leases are judged only after `lost_after` of it.
    started: std::time::Instant,
}

/// How much of a balance one lease may take, and when an unclosed lease is
/// taken for lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// One lease takes at most this percent of the balance (but always one
    /// request's estimate when the balance holds it), so that several
    /// gateways each hold one and none moves a whole balance into its memory.
    pub share_percent: u8,
    /// An open lease neither closed nor reported for this long is its
    /// gateway gone: its reported draws are charged at their estimates, the
    /// rest returns to the balance.
    pub lost_after: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        Self { share_percent: 25, lost_after: Duration::from_secs(30) }
    }
}

/// What one key's document may hold at most, so that no stall can push it
/// toward MongoDB's 16 MB document limit (past which every operation on the
/// key would fail). Holds and leases past theirs are refused
/// `rate_limit_exceeded` (too much in flight), never `insufficient_quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests reserved alone and in flight (~0.1-0.4 KB each).
    pub holds: usize,
    /// Open leases (~0.1 KB each).
    pub leases: usize,
    /// Release marks, and charge marks, each (~0.05 KB each).
    pub marks: usize,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self { holds: 10_000, leases: 1_000, marks: 20_000 }
    }
}

pub(super) fn hold_path(request_id: &str) -> String {
    format!("holds.{request_id}")
}

pub(super) fn outbox_path(request_id: &str) -> String {
    format!("outbox.{request_id}")
}

/// Mark of an unreserved request (failure mode `allow`) that was charged.
pub(super) fn charged_path(request_id: &str) -> String {
    format!("charged.{request_id}")
}

/// An expired lease's estimates that late records of it take back.
pub(super) fn lapsed_path(lease_id: &str) -> String {
    format!("lapsed.{lease_id}")
}

pub(super) fn released_path(request_id: &str) -> String {
    format!("released.{request_id}")
}

/// The conditions of a guarded reservation or lease that a key's controls
/// add, to merge into its filter: `model` among its allowed models (if it
/// has a list) and not past its expiry. Written as conditions on the fields
/// (`$in` with `null` matches a missing or null field; `$not $lte` a missing,
/// null or later one), not as a top-level `$and` of `$or`s, which the
/// embedded server answers by scanning every key (25 ms at 1,000 keys,
/// against under 2 ms by `_id`).
pub(super) fn policy_clauses(model: &str, now: DateTime) -> Document {
    doc! {
        "allowed_models": {"$in": [null, model]},
        "expires_at": {"$not": {"$lte": now}},
    }
}

/// What a grant reads back: the balance and the key's controls.
pub(super) fn grant_projection() -> Document {
    doc! {"balance_tokens": 1, "allowed_models": 1, "expires_at": 1, "rpm_limit": 1, "tpm_limit": 1}
}

pub(super) fn lease_path(lease_id: &str) -> String {
    format!("leases.{lease_id}")
}

pub(super) fn rfc3339(at: Option<DateTime>) -> String {
    at.and_then(|d| d.try_to_rfc3339_string().ok()).unwrap_or_default()
}

pub(super) fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => {
            m.write_errors.as_ref().is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

impl Store {
    /// A guarded update of key `hash`, then its fields in `projection` read
    /// back; `None` when the guard did not match. The embedded server answers
    /// a `findAndModify` ten times slower than an update and a read by `_id`
    /// (9.5 ms against 1.5); what is read back may already include a change
    /// made just after (a balance shown in a reply, never a guard).
    async fn update_then_read(
        &self,
        hash: &str,
        filter: Document,
        update: Document,
        projection: Document,
    ) -> Result<Option<KeyDoc>, LedgerError> {
        if self.key_docs.update_one(filter, update).await?.matched_count == 0 {
            return Ok(None);
        }
        Ok(self.key_docs.find_one(doc! {"_id": hash}).projection(projection).await?)
    }

    pub async fn connect(uri: &str, db_name: &str, hold_ttl: Duration) -> Result<Self, LedgerError> {
        let client = Client::with_uri_str(uri).await?;
        let db = client.database(db_name);
        Ok(Self {
            keys: db.collection("api_keys"),
            key_docs: db.collection("api_keys"),
            audit: db.collection("audit_logs"),
            responses: db.collection("responses"),
            admin: client.database("admin"),
            hold_ttl,
            local_skew_ms: 0,
            mark_ttl: Duration::from_secs(120),
            limits: KeyLimits::default(),
            leases: LeasePolicy::default(),
            started: std::time::Instant::now(),
        })
    }

    pub fn with_lease_policy(mut self, leases: LeasePolicy) -> Self {
        self.leases = leases;
        self
    }

    pub fn with_mark_ttl(mut self, ttl: Duration) -> Self {
        self.mark_ttl = ttl;
        self
    }

    pub fn with_limits(mut self, limits: KeyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// This store as a sidecar whose clock is `ms` off would run it (tests of
    /// clock skew between sidecars).
    pub fn with_local_skew(mut self, ms: i64) -> Self {
        self.local_skew_ms = ms;
        self
    }

    /// The database server's clock (`hello`'s `localTime`): every time the
    /// expiry compares (a hold's or lease's `at`, an `expiring` mark, a
    /// release or charge mark) is written with `$currentDate` and compared
    /// with this, so the sidecars' own clocks, which may differ, never meet.
    /// Servers before MongoDB 4.4.2 know `isMaster` only; one that reports
    /// no time leaves this sidecar's own clock, with a warning.
    pub(super) async fn server_now(&self) -> Result<DateTime, LedgerError> {
        for command in ["hello", "isMaster"] {
            if let Ok(reply) = self.admin.run_command(doc! {command: 1}).await {
                if let Ok(at) = reply.get_datetime("localTime") {
                    return Ok(*at);
                }
            }
        }
        tracing::warn!("the database reports no localTime; expiry uses this sidecar's clock");
        Ok(self.local_now())
    }

    /// This process's clock, for what only records when something happened.
    pub(super) fn local_now(&self) -> DateTime {
        DateTime::from_millis(DateTime::now().timestamp_millis().saturating_add(self.local_skew_ms))
    }

    /// Creates the indexes the ledger relies on; `request_id` uniqueness is what
    /// makes audit writes idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), LedgerError> {
        let unique = IndexOptions::builder().unique(true).build();
        self.audit.create_index(IndexModel::builder().keys(doc! {"request_id": 1}).options(unique).build()).await?;
        self.audit.create_index(IndexModel::builder().keys(doc! {"key_id": 1, "timestamp": -1}).build()).await?;
        // The audit log API: newest first (also by time range alone: the
        // prefix of this index, so `{timestamp: -1}` on its own is not kept;
        // each index costs every audit insert about a tenth of its time on
        // the embedded default), by owner or model.
        match self.audit.drop_index("timestamp_-1").await {
            Ok(()) => tracing::info!("dropped the audit index timestamp_-1 (served by timestamp_-1__id_-1)"),
            Err(e) => tracing::debug!(error = %e, "no audit index timestamp_-1 to drop"),
        }
        self.audit.create_index(IndexModel::builder().keys(doc! {"timestamp": -1, "_id": -1}).build()).await?;
        self.audit.create_index(IndexModel::builder().keys(doc! {"user_id": 1, "timestamp": -1}).build()).await?;
        self.audit.create_index(IndexModel::builder().keys(doc! {"model": 1, "timestamp": -1}).build()).await?;
        // A lease's rows are summed when it is finalised.
        self.audit.create_index(IndexModel::builder().keys(doc! {"lease_id": 1}).build()).await?;
        for field in ["holds_n", "outbox_n", "leases_n", "released_n", "charged_n", "lapsed_n"] {
            self.keys.create_index(IndexModel::builder().keys(doc! {field: 1}).build()).await?;
        }
        self.keys.create_index(IndexModel::builder().keys(doc! {"created_at": 1, "_id": 1}).build()).await?;
        // Every gateway's tick reads the keys changed in the last seconds.
        self.keys.create_index(IndexModel::builder().keys(doc! {"updated_at": 1}).build()).await?;
        Ok(())
    }

    /// Marks `id` released so that a reservation or lease of it arriving later
    /// is refused, but only while `occupied` (its hold or lease) does not
    /// exist: one that landed meanwhile must be undone instead.
    pub(super) async fn mark_released(&self, key_hash: &str, occupied: &str, id: &str) -> Result<Mark, LedgerError> {
        let limit = self.limits.marks as i64;
        let mark = self
            .keys
            .update_one(
                doc! {"_id": key_hash, occupied: {"$exists": false}, released_path(id): {"$exists": false},
                "released_n": {"$not": {"$gte": limit}}},
                doc! {"$currentDate": {released_path(id): true}, "$inc": {"released_n": 1_i64}},
            )
            .await?;
        if mark.matched_count == 1 {
            return Ok(Mark::Set);
        }
        let key = self.key_docs.find_one(doc! {"_id": key_hash}).projection(doc! {"released_n": 1}).await?;
        Ok(if key.is_some_and(|k| k.released_n >= limit) { Mark::Full } else { Mark::Again })
    }

    /// Leases and holds open over all keys (the keys' own counters, summed).
    pub async fn open_counts(&self) -> Result<(i64, i64), LedgerError> {
        use futures::TryStreamExt;
        let mut cursor = self
            .keys
            .aggregate([doc! {"$group": {"_id": mongodb::bson::Bson::Null,
            "leases": {"$sum": "$leases_n"}, "holds": {"$sum": "$holds_n"}}}])
            .await?;
        let d = cursor.try_next().await?.unwrap_or_default();
        Ok((usage::int(d.get("leases")), usage::int(d.get("holds"))))
    }

    /// Whether MongoDB answers; used by the readiness endpoint.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        self.keys.find_one(doc! {"_id": ""}).projection(doc! {"_id": 1}).await?;
        Ok(())
    }
}

pub(super) const MARKS_FULL: &str = "not marked: the key's release marks are at their limit";

/// Whether a release mark was set.
pub(super) enum Mark {
    Set,
    /// The hold or lease landed meanwhile (or the id is marked): look again.
    Again,
    /// The key's marks are at their limit: a late reservation of this id is
    /// not refused, and its hold is charged when it expires.
    Full,
}

/// What became of one settlement record, and the audit row to write if it settled now.
type Settled = (SettleOutcome, Option<String>, Option<OutboxRow>);
