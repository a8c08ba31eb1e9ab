//! Usage reports: the audit rows of a period summed by MongoDB, grouped by
//! key, owner, model, day and/or hour (UTC), never read row by row into the
//! sidecar. The `timestamp` index narrows the rows to the period.

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};

use super::{LedgerError, Store};

/// What a report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    User,
    Model,
    Day,
    Hour,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "key" => GroupBy::Key,
            "user" => GroupBy::User,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "hour" => GroupBy::Hour,
            _ => return None,
        })
    }

    /// The row's field and the expression that computes it from an audit row.
    fn field(self) -> (&'static str, mongodb::bson::Bson) {
        match self {
            // The hash; shortened to the key_id of key views below.
            GroupBy::Key => ("key_id", "$key_id".into()),
            GroupBy::User => ("user_name", "$user_id".into()),
            GroupBy::Model => ("model", "$model".into()),
            GroupBy::Day => {
                ("day", doc! {"$dateToString": {"format": "%Y-%m-%d", "date": "$timestamp", "timezone": "UTC"}}.into())
            }
            GroupBy::Hour => (
                "hour",
                doc! {"$dateToString": {"format": "%Y-%m-%dT%H:00:00Z", "date": "$timestamp", "timezone": "UTC"}}
                    .into(),
            ),
        }
    }
}

/// What every usage figure sums over audit rows.
const SUMS: [&str; 6] =
    ["requests", "input_tokens", "cached_tokens", "output_tokens", "total_tokens", "charged_tokens"];

/// The `$group` accumulators of [`SUMS`] (add `_id`). Rows written before
/// `charged_tokens` existed charged their `total_tokens`.
pub(super) fn sums() -> Document {
    let mut group = doc! {"requests": {"$sum": 1_i64}};
    for f in &SUMS[1..] {
        group.insert(*f, doc! {"$sum": format!("${f}")});
    }
    group.insert("charged_tokens", doc! {"$sum": charged()});
    group
}

/// What an audit row took from the balance.
pub(super) fn charged() -> Document {
    doc! {"$ifNull": ["$charged_tokens", "$total_tokens"]}
}

/// A number an aggregation returned, whatever its BSON type (0 if none).
pub(super) fn int(value: Option<&mongodb::bson::Bson>) -> i64 {
    match value {
        Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
        Some(mongodb::bson::Bson::Int64(n)) => *n,
        Some(mongodb::bson::Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

impl Store {
    /// One row per group of the rows in `[from, to)`: the group's fields and
    /// `requests`, `input_tokens`, `cached_tokens`, `output_tokens`,
    /// `total_tokens` (input plus output) and `charged_tokens` (what left the
    /// balance). Sorted by the group's fields.
    pub async fn usage_report(
        &self,
        from: Option<DateTime>,
        to: Option<DateTime>,
        groups: &[GroupBy],
    ) -> Result<Vec<Document>, LedgerError> {
        let mut time = Document::new();
        if let Some(from) = from {
            time.insert("$gte", from);
        }
        if let Some(to) = to {
            time.insert("$lt", to);
        }
        let mut id = Document::new();
        for g in groups {
            let (name, expr) = g.field();
            id.insert(name, expr);
        }
        let mut pipeline = Vec::new();
        if !time.is_empty() {
            pipeline.push(doc! {"$match": {"timestamp": time}});
        }
        let mut group = sums();
        group.insert("_id", id);
        pipeline.push(doc! {"$group": group});
        let sort: Document = groups.iter().map(|g| (format!("_id.{}", g.field().0), 1_i32.into())).collect();
        if !sort.is_empty() {
            pipeline.push(doc! {"$sort": sort});
        }
        let rows: Vec<Document> = self.audit.aggregate(pipeline).await?.try_collect().await?;
        Ok(rows
            .into_iter()
            .map(|mut r| {
                let mut out = match r.remove("_id") {
                    Some(mongodb::bson::Bson::Document(d)) => d,
                    _ => Document::new(),
                };
                if let Ok(hash) = out.get_str("key_id") {
                    let short: String = hash.chars().take(16).collect();
                    out.insert("key_id", short);
                }
                for f in SUMS {
                    out.insert(f, int(r.get(f)));
                }
                out
            })
            .collect())
    }
}
