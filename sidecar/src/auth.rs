//! The two guards of the sidecar's API: the admin token on `/admin`, and the
//! optional shared secret on `/internal` (the filter's calls).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::{AppError, Json};
use crate::AppState;

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = bearer(request.headers()).map(|t| Sha256::digest(t.as_bytes()));
    match presented {
        Some(d) if constant_time_eq(&d, &state.admin_digest) => next.run(request).await,
        _ => {
            // The route, never the path: an admin may name a key in the URL.
            let route = request.extensions().get::<MatchedPath>().map_or("?", MatchedPath::as_str);
            tracing::info!(%route, "admin call refused: bad token");
            AppError::Unauthorized.into_response()
        }
    }
}

pub async fn require_internal(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.internal_token {
        let presented =
            request.headers().get(bridge_protocol::INTERNAL_TOKEN_HEADER).map(|v| Sha256::digest(v.as_bytes()));
        let wanted = Sha256::digest(expected.expose().as_bytes());
        if !presented.is_some_and(|p| constant_time_eq(&p, &wanted)) {
            // 403, not 401: the caller is the filter, and a refusal here is a
            // deployment fault the filter turns into 503.
            return (
                axum::http::StatusCode::FORBIDDEN,
                Json(bridge_protocol::ErrorEnvelope::new(
                    "internal API: missing or wrong shared secret",
                    "permission_error",
                    None,
                    None,
                )),
            )
                .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn bearer_is_case_insensitive_on_the_scheme() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer tok".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, "Basic tok".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(bearer(&h), None);
    }
}
