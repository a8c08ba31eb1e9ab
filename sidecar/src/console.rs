//! `GET /admin/ui/`: the admin console, three static files compiled into the
//! binary (no build step, nothing fetched from elsewhere). The page itself
//! needs no token: it asks for the admin token and calls the admin API with
//! it, which checks it as for any other client.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/console.js");
const STYLE: &str = include_str!("../ui/console.css");

/// Only this origin's files and API; no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/admin/ui", get(|| async { Redirect::permanent("/admin/ui/") }))
        .route("/admin/ui/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/admin/ui/console.js", get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/admin/ui/console.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}
