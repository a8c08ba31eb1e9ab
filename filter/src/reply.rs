//! Local replies the filter sends instead of forwarding: OpenAI error objects
//! with the status each case calls for.

use bridge_protocol::ErrorEnvelope;

/// A response the filter answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub body: Vec<u8>,
    /// Extra headers besides `content-type: application/json`.
    pub headers: Vec<(&'static str, String)>,
}

/// The key's live lease says its model is not allowed: as the sidecar words it.
pub fn model_not_allowed_error(model: &str, allowed: &[String]) -> bridge_protocol::ErrorBody {
    ErrorEnvelope::new(
        format!("This API key may not use the model '{model}'; it may use: {}.", allowed.join(", ")),
        "permission_error",
        Some("model"),
        Some("model_not_allowed"),
    )
    .error
}

/// The key's live lease says it has expired.
pub fn key_expired_error() -> bridge_protocol::ErrorBody {
    ErrorEnvelope::new(
        "This API key has expired; ask an administrator for a new one.",
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    )
    .error
}

impl LocalReply {
    /// An error a client is to retry, with `Retry-After`.
    fn retry_after(status: u32, message: &str, kind: &str, code: &str, secs: u64) -> Self {
        let mut r = Self::json(status, &ErrorEnvelope::new(message, kind, None, Some(code)));
        r.headers.push(("retry-after", secs.to_string()));
        r
    }

    pub fn json(status: u32, envelope: &ErrorEnvelope) -> Self {
        Self { status, body: envelope.to_json(), headers: Vec::new() }
    }

    /// 400 `invalid_request_error`, naming the parameter at fault.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::json(400, &ErrorEnvelope::new(message, "invalid_request_error", param, None))
    }

    /// 400 for a field (or a value of it) the gateway does not forward:
    /// `unsupported_parameter` or `unsupported_value`, as OpenAI words them.
    pub fn unsupported(message: impl Into<String>, param: &str, code: &str) -> Self {
        Self::json(400, &ErrorEnvelope::new(message, "invalid_request_error", Some(param), Some(code)))
    }

    /// 401 for a missing or malformed key; answered without asking the sidecar.
    /// 404 `model_not_found`: a model the catalog does not list (answered
    /// without asking the sidecar).
    pub fn model_not_found(model: &str) -> Self {
        let message = format!("The model '{model}' does not exist or you do not have access to it.");
        Self::json(404, &ErrorEnvelope::new(message, "invalid_request_error", Some("model"), Some("model_not_found")))
    }

    /// 400: the model is served, but not on this endpoint.
    pub fn model_not_supported(model: &str, endpoint: &str) -> Self {
        let message = format!("The model '{model}' is not served on the {endpoint} endpoint of this gateway.");
        Self::json(
            400,
            &ErrorEnvelope::new(message, "invalid_request_error", Some("model"), Some("model_not_supported")),
        )
    }

    pub fn missing_key() -> Self {
        Self::json(
            401,
            &ErrorEnvelope::new(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::json(
            413,
            &ErrorEnvelope::new(
                format!("The request body is larger than this gateway accepts ({limit} bytes)."),
                "invalid_request_error",
                None,
                Some("request_too_large"),
            ),
        )
    }

    pub fn not_found(path: &str) -> Self {
        Self::json(
            404,
            &ErrorEnvelope::new(
                format!(
                    "Unknown request URL: {path}. This gateway serves POST /v1/chat/completions, /v1/responses \
                     and /v1/embeddings, and GET /v1/models."
                ),
                "invalid_request_error",
                None,
                Some("unknown_url"),
            ),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        let mut r = Self::json(
            405,
            &ErrorEnvelope::new(
                format!("Method {method} is not allowed on {path}."),
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
        );
        let allowed = if path.starts_with("/v1/models") { "GET" } else { "POST" };
        r.headers.push(("allow", allowed.to_owned()));
        r
    }

    /// The billing service is unreachable or failing: a temporary fault of ours,
    /// never a 401 or 429, which clients treat as final for the key.
    pub fn unavailable(retry_after_secs: u32) -> Self {
        Self::retry_after(
            503,
            "The gateway's billing service is temporarily unavailable; retry shortly.",
            "server_error",
            "billing_unavailable",
            u64::from(retry_after_secs),
        )
    }

    /// Over the key's own rate limit (`rpm_limit`, `tpm_limit`): never
    /// `insufficient_quota`, which clients take as a billing failure.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::retry_after(
            429,
            "Rate limit reached for this API key; retry after the time in Retry-After.",
            "requests",
            "rate_limit_exceeded",
            retry_after_secs,
        )
    }

    /// This gateway sheds load (too many requests waiting for leases or in
    /// admission calls): a temporary fault of ours, as above.
    pub fn overloaded(retry_after_secs: u32) -> Self {
        Self::retry_after(
            503,
            "The gateway is overloaded; retry shortly.",
            "server_error",
            "gateway_overloaded",
            u64::from(retry_after_secs),
        )
    }

    /// The sidecar's refusal (unknown key, frozen, no balance, too much in
    /// flight), relayed as it wrote it; a rate limit says when to come back.
    pub fn refusal(status: u16, error: bridge_protocol::ErrorBody) -> Self {
        let rate_limited = error.code.as_deref() == Some("rate_limit_exceeded");
        let mut r = Self::json(u32::from(status), &ErrorEnvelope { error });
        if rate_limited {
            r.headers.push(("retry-after", "1".to_owned()));
        }
        r
    }
}

/// `GET /v1/models`: the models this gateway serves, in the OpenAI list shape.
pub fn models_list<'a>(models: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let data: Vec<_> = models
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "openclaw-llm-bridge"}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(r: &LocalReply) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn unavailable_is_503_with_retry_after() {
        let r = LocalReply::unavailable(7);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "7".to_owned())));
        assert_eq!(parsed(&r)["error"]["type"], "server_error");
    }

    #[test]
    fn a_rate_limit_refusal_says_when_to_retry_and_a_quota_one_does_not() {
        let limit = ErrorEnvelope::new("busy", "requests", None, Some("rate_limit_exceeded")).error;
        assert!(LocalReply::refusal(429, limit).headers.contains(&("retry-after", "1".to_owned())));
        let quota = ErrorEnvelope::new("no", "insufficient_quota", None, Some("insufficient_quota")).error;
        assert!(LocalReply::refusal(429, quota).headers.is_empty());
    }

    #[test]
    fn every_reply_is_an_openai_error_object() {
        for r in [
            LocalReply::missing_key(),
            LocalReply::too_large(10),
            LocalReply::not_found("/v1/x"),
            LocalReply::bad_request("m", Some("messages")),
            LocalReply::method_not_allowed("GET", "/v1/chat/completions"),
        ] {
            let v = parsed(&r);
            let e = v["error"].as_object().unwrap();
            for field in ["message", "type", "param", "code"] {
                assert!(e.contains_key(field), "{v}");
            }
        }
        assert_eq!(parsed(&LocalReply::missing_key())["error"]["code"], "invalid_api_key");
    }
}
