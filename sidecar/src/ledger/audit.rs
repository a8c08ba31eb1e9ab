//! The audit log over HTTP: rows newest first, filtered on indexed fields,
//! one page at a time with a cursor.
//!
//! Order is `(timestamp, _id)` descending, and a cursor is the last row's
//! pair: the next page is everything strictly after it, so rows written while
//! an admin pages (newer, so before the first page) never shift a page, and
//! every row older than the first page's top is listed exactly once. A row
//! written with an older timestamp than the walk's position (an outbox entry
//! flushed after a crash, a sidecar whose clock is behind) shows in the next
//! walk, not in the one under way.

use futures::TryStreamExt;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, Bson, DateTime, Document};

use super::{LedgerError, Store};

/// What an admin filters the audit log by.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// A key's `key_id` (16 hex digits) or its whole hash (64).
    pub key_id: Option<String>,
    pub user_name: Option<String>,
    pub model: Option<String>,
    pub status_code: Option<i32>,
    pub from: Option<DateTime>,
    pub to: Option<DateTime>,
    pub limit: i64,
    pub cursor: Option<Cursor>,
}

/// Where a page ended: the last row's timestamp and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub timestamp_ms: i64,
    pub id: ObjectId,
}

impl Cursor {
    /// `<ms>-<24 hex>`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Cursor> {
        let (ms, id) = s.split_once('-')?;
        Some(Cursor { timestamp_ms: ms.parse().ok()?, id: ObjectId::parse_str(id).ok()? })
    }

    pub fn encode(&self) -> String {
        format!("{}-{}", self.timestamp_ms, self.id.to_hex())
    }
}

/// One page: rows as the API shows them, and the cursor of the next page if any.
pub struct AuditPage {
    pub rows: Vec<Document>,
    pub next: Option<Cursor>,
}

impl Store {
    pub async fn audit_page(&self, q: &AuditQuery) -> Result<AuditPage, LedgerError> {
        let mut filter = Document::new();
        if let Some(id) = &q.key_id {
            if id.len() == 64 {
                filter.insert("key_id", id);
            } else {
                filter.insert("key_id", doc! {"$gte": id, "$lt": format!("{id}g")});
            }
        }
        if let Some(user) = &q.user_name {
            // The seed's audit field for the owner.
            filter.insert("user_id", user);
        }
        if let Some(model) = &q.model {
            filter.insert("model", model);
        }
        if let Some(code) = q.status_code {
            filter.insert("status_code", code);
        }
        let mut time = Document::new();
        if let Some(from) = q.from {
            time.insert("$gte", from);
        }
        if let Some(to) = q.to {
            time.insert("$lt", to);
        }
        let mut clauses = Vec::new();
        if !time.is_empty() {
            clauses.push(doc! {"timestamp": time});
        }
        if let Some(c) = q.cursor {
            let at = DateTime::from_millis(c.timestamp_ms);
            clauses.push(doc! {"$or": [{"timestamp": {"$lt": at}}, {"timestamp": at, "_id": {"$lt": c.id}}]});
        }
        if !clauses.is_empty() {
            filter.insert("$and", clauses);
        }
        let mut docs: Vec<Document> = self
            .audit
            .find(filter)
            .sort(doc! {"timestamp": -1, "_id": -1})
            .limit(q.limit + 1)
            .await?
            .try_collect()
            .await?;
        let more = docs.len() as i64 > q.limit;
        docs.truncate(q.limit as usize);
        let next = match (more, docs.last()) {
            (true, Some(last)) => match (last.get_datetime("timestamp"), last.get_object_id("_id")) {
                (Ok(at), Ok(id)) => Some(Cursor { timestamp_ms: at.timestamp_millis(), id }),
                _ => None,
            },
            _ => None,
        };
        Ok(AuditPage { rows: docs.into_iter().map(shown).collect(), next })
    }
}

/// A row as the API shows it: no database id, times in RFC 3339, the key by
/// its `key_id` (16 hex digits, as in every key view).
fn shown(mut row: Document) -> Document {
    row.remove("_id");
    if let Ok(at) = row.get_datetime("timestamp") {
        let text = at.try_to_rfc3339_string().unwrap_or_default();
        row.insert("timestamp", text);
    }
    if let Some(Bson::String(hash)) = row.get("key_id") {
        let short: String = hash.chars().take(16).collect();
        row.insert("key_id", short);
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor { timestamp_ms: 1_796_083_200_123, id: ObjectId::new() };
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
        for bad in ["", "x-y", "12-", "-abc", "12-zzzzzzzzzzzzzzzzzzzzzzzz"] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
