//! `GET /admin/audit_logs`: the audit log, newest first, with filters, cursor
//! pagination and a CSV export (`format=csv`); `GET /admin/usage`: usage
//! reports summed by MongoDB.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use mongodb::bson::{Bson, DateTime, Document};
use serde_json::json;

use crate::error::{AppError, Json};
use crate::ledger::{AuditQuery, Cursor, GroupBy};
use crate::AppState;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1_000;
/// A CSV page may be larger: it is an export.
const MAX_CSV_LIMIT: i64 = 10_000;

/// The columns of the CSV export, in order: the seed's audit fields and the
/// bridge's own.
const COLUMNS: [&str; 22] = [
    "timestamp",
    "request_id",
    "key_id",
    "api_key",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "charged_tokens",
    "reserved_tokens",
    "status_code",
    "stream",
    "duration_ms",
    "usage_source",
    "expired_hold",
    "lease_id",
    "endpoint",
    "deployment",
    "upstream",
];

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    key_id: Option<String>,
    user_name: Option<String>,
    model: Option<String>,
    status_code: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    format: Option<String>,
}

fn time(value: Option<&str>, field: &str) -> Result<Option<DateTime>, AppError> {
    value
        .map(|v| {
            DateTime::parse_rfc3339_str(v).map_err(|_| {
                AppError::bad_request(
                    format!("{field} must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z."),
                    Some(field),
                )
            })
        })
        .transpose()
}

#[tracing::instrument(skip_all)]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(p) = query.map_err(|e| AppError::bad_request(e.body_text(), None))?;
    let csv = match p.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(AppError::bad_request(format!("format must be json or csv, not {other:?}."), Some("format")))
        }
    };
    let max = if csv { MAX_CSV_LIMIT } else { MAX_LIMIT };
    let limit = crate::admin::page_limit(p.limit.as_deref(), DEFAULT_LIMIT, max)?;
    let key_id = p.key_id.map(|k| k.to_ascii_lowercase());
    if let Some(k) = &key_id {
        let hex = k.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex && (k.len() == 16 || k.len() == 64)) {
            return Err(AppError::bad_request(
                "key_id must be the 16 hex digits every key view shows.",
                Some("key_id"),
            ));
        }
    }
    let status_code = p
        .status_code
        .map(|s| {
            s.parse::<i32>().map_err(|_| AppError::bad_request("status_code must be a number.", Some("status_code")))
        })
        .transpose()?;
    let cursor = p
        .cursor
        .map(|c| {
            Cursor::parse(&c).ok_or_else(|| AppError::bad_request("cursor is not one this API gave.", Some("cursor")))
        })
        .transpose()?;
    let q = AuditQuery {
        key_id,
        user_name: p.user_name,
        model: p.model,
        status_code,
        from: time(p.from.as_deref(), "from")?,
        to: time(p.to.as_deref(), "to")?,
        limit,
        cursor,
    };
    let page = state.store.audit_page(&q).await?;
    let next = page.next.map(|c| c.encode());
    tracing::info!(rows = page.rows.len(), csv, "admin read the audit log");
    if csv {
        let mut out = COLUMNS.join(",");
        out.push('\n');
        for row in &page.rows {
            let cells: Vec<String> = COLUMNS.iter().map(|c| csv_cell(row.get(*c))).collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response();
        if let Some(n) = next.as_deref().and_then(|n| n.parse().ok()) {
            resp.headers_mut().insert("x-next-cursor", n);
        }
        return Ok(resp);
    }
    let data: Vec<serde_json::Value> = page.rows.into_iter().map(to_json).collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": next.is_some(), "next_cursor": next})).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

/// `GET /admin/usage?from=&to=&group_by=key,model,day`: one row per group.
#[tracing::instrument(skip_all)]
pub async fn usage(
    State(state): State<AppState>,
    query: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(p) = query.map_err(|e| AppError::bad_request(e.body_text(), None))?;
    let mut groups = Vec::new();
    for name in p.group_by.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let g = GroupBy::parse(name).ok_or_else(|| {
            AppError::bad_request(
                format!("group_by takes key, user, model, day and hour, comma-separated; not {name:?}."),
                Some("group_by"),
            )
        })?;
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let (from, to) = (time(p.from.as_deref(), "from")?, time(p.to.as_deref(), "to")?);
    let started = std::time::Instant::now();
    let rows = state.store.usage_report(from, to, &groups).await?;
    tracing::info!(rows = rows.len(), ms = started.elapsed().as_millis() as u64, "admin read a usage report");
    let data: Vec<serde_json::Value> = rows.into_iter().map(to_json).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

fn to_json(row: Document) -> serde_json::Value {
    Bson::Document(row).into_relaxed_extjson()
}

/// One CSV cell (RFC 4180): quoted when it holds a comma, a quote or a line
/// break. A text cell a spreadsheet would read as a formula (it begins with
/// `=`, `+`, `-`, `@`, a tab or a carriage return: a user name, a model name
/// an agent sent) gets a leading `'`, as OWASP's CSV-injection advice says;
/// numbers stay numbers.
fn csv_cell(value: Option<&Bson>) -> String {
    let text = match value {
        None | Some(Bson::Null) => String::new(),
        Some(Bson::String(s)) if s.starts_with(['=', '+', '-', '@', '\t', '\r']) => format!("'{s}"),
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::Int32(n)) => n.to_string(),
        Some(Bson::Int64(n)) => n.to_string(),
        Some(Bson::Double(n)) => n.to_string(),
        Some(Bson::Boolean(b)) => b.to_string(),
        Some(other) => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_cell(Some(&Bson::String("张三".into()))), "张三");
        assert_eq!(csv_cell(Some(&Bson::String("a,b \"c\"".into()))), "\"a,b \"\"c\"\"\"");
        assert_eq!(csv_cell(Some(&Bson::Int64(42))), "42");
        assert_eq!(csv_cell(None), "");
    }

    #[test]
    fn a_text_cell_a_spreadsheet_would_run_as_a_formula_is_neutralised() {
        for formula in ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"] {
            let cell = csv_cell(Some(&Bson::String(formula.into())));
            let unquoted = cell.strip_prefix('"').and_then(|c| c.strip_suffix('"')).unwrap_or(&cell);
            assert!(unquoted.starts_with('\''), "{formula:?} -> {cell:?}");
        }
        // Quoting still applies on top, and numbers are left as numbers.
        assert_eq!(csv_cell(Some(&Bson::String("=a,b".into()))), "\"'=a,b\"");
        assert_eq!(csv_cell(Some(&Bson::Int64(-5))), "-5");
        assert_eq!(csv_cell(Some(&Bson::String("gpt-5".into()))), "gpt-5");
    }
}
