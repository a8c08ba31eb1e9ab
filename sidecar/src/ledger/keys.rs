//! Keys: creating, listing, topping up and freezing them. A key's document
//! is its account: the balance and everything held against it.

use bridge_protocol::{KeyChange, MAX_CHANGES};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;

use super::docs::{KeyDoc, LeaseDoc};

/// How much further back than its cursor a change read looks: more than
/// the clocks of two sidecars differ (each corrects its own to the
/// database's) plus a read's time.
pub const CHANGE_SLACK_MS: i64 = 5_000;
use super::{is_duplicate_key, rfc3339, LedgerError, Refusal, Store};
use crate::keys;

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
    /// What the key has left: settled usage is out of it, the undrawn part of
    /// its leases is not (right within a settlement tick of a request's end).
    pub balance_tokens: i64,
    /// What requests in flight hold at their estimates, apart from `balance_tokens`.
    pub held_tokens: i64,
    pub status: String,
    /// The models it may use; `null`: any.
    pub allowed_models: Option<Vec<String>>,
    /// When it expires (RFC 3339); `null`: never.
    pub expires_at: Option<String>,
    /// Requests and tokens a minute each gateway admits; `null`: no limit.
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
}

/// Changes of a key's controls: `None` leaves one as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    pub allowed_models: Option<Option<Vec<String>>>,
    pub expires_at: Option<Option<mongodb::bson::DateTime>>,
    pub rpm_limit: Option<Option<i64>>,
    pub tpm_limit: Option<Option<i64>>,
}

impl Controls {
    pub fn is_empty(&self) -> bool {
        self.allowed_models.is_none()
            && self.expires_at.is_none()
            && self.rpm_limit.is_none()
            && self.tpm_limit.is_none()
    }
}

/// What a key's audit rows over a period add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Usage {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// What left the balance (the tokens weighted by their models' prices).
    pub charged_tokens: i64,
}

/// The first millisecond of the UTC month of `ms`.
fn month_start(ms: i64) -> i64 {
    use chrono_free::civil;
    let days = ms.div_euclid(86_400_000);
    let (y, m, _) = civil::from_days(days);
    civil::to_days(y, m, 1) * 86_400_000
}

/// Calendar arithmetic on days since 1970-01-01 (Howard Hinnant's civil algorithms).
mod chrono_free {
    pub mod civil {
        pub fn from_days(z: i64) -> (i64, u32, u32) {
            let z = z + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
            let y = yoe + era * 400;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
            let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
            (if m <= 2 { y + 1 } else { y }, m, d)
        }

        pub fn to_days(y: i64, m: u32, d: u32) -> i64 {
            let y = if m <= 2 { y - 1 } else { y };
            let era = y.div_euclid(400);
            let yoe = y - era * 400;
            let m = i64::from(m);
            let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
            let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
            era * 146_097 + doe - 719_468
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub api_key: String,
    pub user_name: String,
    pub balance_tokens: i64,
    pub status: KeyStatus,
    pub controls: Controls,
}

/// What a key's leases hold apart from its stored balance, by their rows
/// settled so far: `(back, held)`, where `back` is what belongs to the
/// balance already (the undrawn part, and what settled requests did not use)
/// and `held` is what requests still in flight hold at their estimates.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LeaseShares {
    back: i64,
    held: i64,
}

/// A lease's part of the key's view. `settled` is (rows' reserved, rows' total).
fn lease_share(lease: &LeaseDoc, settled: (i64, i64)) -> LeaseShares {
    let (reserved, used) = settled;
    let drawn = lease.drawn_known().max(reserved);
    let undrawn = lease.outstanding() - drawn;
    LeaseShares { back: undrawn + reserved - used, held: drawn - reserved }
}

pub(super) fn key_view(doc: &KeyDoc, full_key: Option<&str>, leases: LeaseShares) -> KeyView {
    let held = doc.holds.values().map(|h| h.tokens).sum::<i64>() + leases.held;
    KeyView {
        object: "api_key",
        api_key: full_key.map(str::to_owned).unwrap_or_else(|| masked_key(doc)),
        key_id: doc.hash.chars().take(16).collect(),
        user_name: doc.user_name.clone(),
        balance_tokens: doc.balance_tokens + leases.back,
        held_tokens: held,
        status: doc.status.clone(),
        allowed_models: doc.allowed_models.clone(),
        expires_at: doc.expires_at.map(|d| rfc3339(Some(d))),
        rpm_limit: doc.rpm_limit,
        tpm_limit: doc.tpm_limit,
        created_at: rfc3339(doc.created_at),
        updated_at: rfc3339(doc.updated_at),
    }
}

/// Why a key may not be used at all right now (frozen, or past its
/// `expires_at` by the sidecar's clock), whatever a request asks.
pub(super) fn access_refusal(d: &KeyDoc, now: mongodb::bson::DateTime) -> Option<Refusal> {
    if d.status != "active" {
        Some(Refusal::Frozen { masked_key: masked_key(d) })
    } else if d.expires_at.is_some_and(|at| at <= now) {
        Some(Refusal::Expired { masked_key: masked_key(d), at: rfc3339(d.expires_at) })
    } else {
        None
    }
}

pub(super) fn masked_key(doc: &KeyDoc) -> String {
    keys::masked(&doc.key_prefix, &doc.key_last4)
}

impl Store {
    pub async fn create_key(&self, new: NewKey, generated: bool) -> Result<KeyView, LedgerError> {
        let hash = bridge_protocol::key_hash(&new.api_key);
        let (prefix, last4) = keys::mask_parts(&new.api_key);
        let now = self.local_now();
        let mut document = doc! {
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
        if let Some(Some(models)) = &new.controls.allowed_models {
            document.insert("allowed_models", models.clone());
        }
        if let Some(Some(at)) = new.controls.expires_at {
            document.insert("expires_at", at);
        }
        for (field, limit) in [("rpm_limit", new.controls.rpm_limit), ("tpm_limit", new.controls.tpm_limit)] {
            if let Some(Some(n)) = limit {
                document.insert(field, n);
            }
        }
        match self.keys.insert_one(&document).await {
            Ok(_) => {
                let typed: KeyDoc =
                    mongodb::bson::from_document(document).map_err(|e| LedgerError::Internal(e.to_string()))?;
                Ok(key_view(&typed, generated.then_some(new.api_key.as_str()), LeaseShares::default()))
            }
            Err(e) if is_duplicate_key(&e) => Err(LedgerError::Conflict {
                message: "A key with this api_key already exists.".into(),
                code: "key_exists",
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The hash of the key an admin names in a URL: its `key_id` (the first 16
    /// hex digits of its hash, which reveal nothing) or, as in the seed's flow,
    /// the key itself. A `key_id` is looked up by an index range on `_id`.
    pub async fn resolve(&self, key_or_id: &str) -> Result<String, LedgerError> {
        let is_key_id = key_or_id.len() == 16 && key_or_id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if is_key_id {
            let matches: Vec<KeyDoc> = self
                .key_docs
                .find(doc! {"_id": {"$gte": key_or_id, "$lt": format!("{key_or_id}g")}})
                .projection(doc! {"_id": 1})
                .limit(2)
                .await?
                .try_collect()
                .await?;
            match &matches[..] {
                [one] => return Ok(one.hash.clone()),
                [_, _] => {
                    return Err(LedgerError::Conflict {
                        message: "This key_id names more than one key; name the key itself.".into(),
                        code: "ambiguous_key_id",
                    })
                }
                _ => {}
            }
        }
        Ok(bridge_protocol::key_hash(key_or_id))
    }

    /// One page of keys, oldest first, and whether more follow.
    pub async fn list_keys(&self, limit: i64, offset: u64) -> Result<(Vec<KeyView>, u64), LedgerError> {
        let total = self.keys.count_documents(doc! {}).await?;
        let docs: Vec<KeyDoc> = self
            .key_docs
            .find(doc! {})
            .sort(doc! {"created_at": 1, "_id": 1})
            .skip(offset)
            .limit(limit)
            .projection(doc! {"outbox": 0})
            .await?
            .try_collect()
            .await?;
        let views = futures::future::try_join_all(docs.iter().map(|d| self.view(d))).await?;
        Ok((views, total))
    }

    /// A key as it stands: its stored balance with what its leases hold apart
    /// from it put right (one aggregation of audit rows per open lease).
    pub(super) async fn view(&self, doc: &KeyDoc) -> Result<KeyView, LedgerError> {
        let mut shares = LeaseShares::default();
        for (id, lease) in &doc.leases {
            let used = self.lease_usage(id).await?;
            let share = lease_share(lease, (used.reserved, used.total));
            shares.back += share.back;
            shares.held += share.held;
        }
        Ok(key_view(doc, None, shares))
    }

    /// What a key may use, for `GET /v1/models`: its `allowed_models` (`None`:
    /// any), or why it may use nothing (unknown, frozen, expired). One read of
    /// a few fields of the key's document.
    pub async fn key_models(&self, hash: &str) -> Result<Result<Option<Vec<String>>, Refusal>, LedgerError> {
        let found = self
            .key_docs
            .find_one(doc! {"_id": hash})
            .projection(doc! {"status": 1, "key_prefix": 1, "key_last4": 1, "allowed_models": 1, "expires_at": 1})
            .await?;
        let Some(d) = found else { return Ok(Err(Refusal::UnknownKey)) };
        Ok(match access_refusal(&d, self.local_now()) {
            Some(refusal) => Err(refusal),
            None => Ok(d.allowed_models),
        })
    }

    /// A key's own view, for `GET /v1/key`: `None` for a key that does not exist.
    pub async fn own_view(&self, hash: &str) -> Result<Option<(KeyView, Usage, Usage)>, LedgerError> {
        let Some(doc) = self.key_docs.find_one(doc! {"_id": hash}).projection(doc! {"outbox": 0}).await? else {
            return Ok(None);
        };
        let view = self.view(&doc).await?;
        let now = self.local_now().timestamp_millis();
        let day_ms = 86_400_000;
        let today = now - now.rem_euclid(day_ms);
        let month = month_start(now);
        let (day, month) =
            futures::future::try_join(self.usage_since(hash, today), self.usage_since(hash, month)).await?;
        Ok(Some((view, day, month)))
    }

    /// What a key's audit rows since `from_ms` add up to (the `key_id` +
    /// `timestamp` index serves it).
    async fn usage_since(&self, hash: &str, from_ms: i64) -> Result<Usage, LedgerError> {
        let mut group = super::usage::sums();
        group.insert("_id", mongodb::bson::Bson::Null);
        let mut cursor = self
            .audit
            .aggregate([
                doc! {"$match": {"key_id": hash, "timestamp": {"$gte": mongodb::bson::DateTime::from_millis(from_ms)}}},
                doc! {"$group": group},
            ])
            .await?;
        Ok(match cursor.try_next().await? {
            Some(d) => mongodb::bson::from_document(d).map_err(|e| LedgerError::Internal(e.to_string()))?,
            None => Usage::default(),
        })
    }

    /// The keys changed since the cursor `since` (their `updated_at`, set
    /// by every admin change), and the next cursor: one indexed read, which
    /// every gateway's settlement tick makes, so that a freeze, a top-up or
    /// new controls reach every gateway within a tick. The read goes
    /// [`CHANGE_SLACK_MS`] further back than the cursor, for a change whose
    /// stamp (another sidecar's clock) lags; the gateway skips a change it
    /// has seen by its stamp. `None`: a cursor only.
    pub async fn key_changes(&self, since: Option<i64>) -> Result<(Vec<KeyChange>, i64), LedgerError> {
        let now = self.local_now().timestamp_millis();
        let Some(since) = since else { return Ok((Vec::new(), now)) };
        let from = DateTime::from_millis(since.min(now).saturating_sub(CHANGE_SLACK_MS));
        let docs: Vec<Document> = self
            .keys
            .find(doc! {"updated_at": {"$gte": from}})
            .projection(doc! {"updated_at": 1, "created_at": 1})
            .sort(doc! {"updated_at": 1})
            .limit(MAX_CHANGES as i64)
            .await?
            .try_collect()
            .await?;
        // A key just created has no lease to end (closing its first one
        // churned every new key's requests), only a cached refusal.
        let created = |d: &Document| d.get_datetime("updated_at").ok() == d.get_datetime("created_at").ok();
        let changes: Vec<KeyChange> = docs
            .iter()
            .filter_map(|d| {
                Some(KeyChange {
                    key_hash: d.get_str("_id").ok()?.to_owned(),
                    at_ms: d.get_datetime("updated_at").ok()?.timestamp_millis(),
                    created: created(d),
                })
            })
            .collect();
        // Cut short: the next read starts at the last change named.
        let last = docs.last().and_then(|d| d.get_datetime("updated_at").ok()).map(|t| t.timestamp_millis());
        let cursor = match last {
            Some(last) if docs.len() >= MAX_CHANGES => last.saturating_add(CHANGE_SLACK_MS),
            _ => now,
        };
        Ok((changes, cursor))
    }

    /// Top-up (or deduction) and status change in one atomic update. A deduction
    /// may not take the balance below zero.
    pub async fn patch_key(
        &self,
        hash: &str,
        delta: Option<i64>,
        status: Option<KeyStatus>,
        controls: &Controls,
    ) -> Result<KeyView, LedgerError> {
        let mut filter = doc! {"_id": hash};
        let mut set = doc! {"updated_at": self.local_now()};
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
        let mut unset = Document::new();
        match &controls.allowed_models {
            Some(Some(models)) => {
                set.insert("allowed_models", models.clone());
            }
            Some(None) => {
                unset.insert("allowed_models", "");
            }
            None => {}
        }
        match controls.expires_at {
            Some(Some(at)) => {
                set.insert("expires_at", at);
            }
            Some(None) => {
                unset.insert("expires_at", "");
            }
            None => {}
        }
        for (field, limit) in [("rpm_limit", controls.rpm_limit), ("tpm_limit", controls.tpm_limit)] {
            match limit {
                Some(Some(n)) => {
                    set.insert(field, n);
                }
                Some(None) => {
                    unset.insert(field, "");
                }
                None => {}
            }
        }
        update.insert("$set", set);
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        let after = self
            .key_docs
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .projection(doc! {"outbox": 0})
            .await?;
        match after {
            Some(d) => self.view(&d).await,
            None if self.keys.find_one(doc! {"_id": hash}).projection(doc! {"_id": 1}).await?.is_some() => {
                Err(LedgerError::Conflict {
                    message: "The deduction would take the balance below zero.".into(),
                    code: "balance_would_go_negative",
                })
            }
            None => Err(LedgerError::NotFound("No such api_key.".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_on_their_first_day_in_utc() {
        // 2026-12-01T00:00:00Z and a moment in 2024-02-29.
        assert_eq!(month_start(1_796_083_200_000 + 3_600_000), 1_796_083_200_000);
        assert_eq!(month_start(1_709_208_000_000), 1_706_745_600_000);
        assert_eq!(chrono_free::civil::from_days(0), (1970, 1, 1));
    }

    #[test]
    fn a_leases_share_of_the_view_counts_settled_rows_and_what_was_not_drawn() {
        let open = LeaseDoc { tokens: 1_000, reported_tokens: 300, ..LeaseDoc::default() };
        // 300 drawn, of which rows reserving 200 settled using 50.
        let s = lease_share(&open, (200, 50));
        assert_eq!((s.back, s.held), (700 + 150, 100));
        let closed = LeaseDoc { tokens: 1_000, closed: true, drawn_tokens: 400, ..LeaseDoc::default() };
        let s = lease_share(&closed, (400, 120));
        assert_eq!((s.back, s.held), (280, 0));
    }
}
