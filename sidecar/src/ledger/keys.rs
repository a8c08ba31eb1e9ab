//! Keys: creating, listing, topping up and freezing them. A key's document
//! is its account: the balance and everything held against it.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::ReturnDocument;

use super::docs::{KeyDoc, LeaseDoc};
use super::{is_duplicate_key, rfc3339, LedgerError, Store};
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

pub(super) fn key_view(doc: &KeyDoc, full_key: Option<&str>) -> KeyView {
    let held =
        doc.holds.values().map(|h| h.tokens).sum::<i64>() + doc.leases.values().map(LeaseDoc::outstanding).sum::<i64>();
    KeyView {
        object: "api_key",
        api_key: full_key.map(str::to_owned).unwrap_or_else(|| masked_key(doc)),
        key_id: doc.hash.chars().take(16).collect(),
        user_name: doc.user_name.clone(),
        balance_tokens: doc.balance_tokens,
        held_tokens: held,
        status: doc.status.clone(),
        created_at: rfc3339(doc.created_at),
        updated_at: rfc3339(doc.updated_at),
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
            Ok(_) => {
                let typed: KeyDoc =
                    mongodb::bson::from_document(document).map_err(|e| LedgerError::Internal(e.to_string()))?;
                Ok(key_view(&typed, generated.then_some(new.api_key.as_str())))
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
        Ok((docs.iter().map(|d| key_view(d, None)).collect(), total))
    }

    /// Top-up (or deduction) and status change in one atomic update. A deduction
    /// may not take the balance below zero.
    pub async fn patch_key(
        &self,
        hash: &str,
        delta: Option<i64>,
        status: Option<KeyStatus>,
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
        update.insert("$set", set);
        let after = self
            .key_docs
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .projection(doc! {"outbox": 0})
            .await?;
        match after {
            Some(d) => Ok(key_view(&d, None)),
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
