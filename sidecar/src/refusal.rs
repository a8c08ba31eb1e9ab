//! The words a client sees when the ledger refuses its key: OpenAI error
//! objects with the status each refusal calls for. Kept apart from the
//! ledger, which only says why.

use bridge_protocol::{ErrorBody, ErrorEnvelope};

use crate::ledger::Refusal;

/// Status and error object for a refusal, relayed by the filter verbatim.
pub fn reply(refusal: &Refusal) -> (u16, ErrorBody) {
    let (status, envelope) = match refusal {
        Refusal::UnknownKey => (
            401,
            ErrorEnvelope::new("Incorrect API key provided.", "invalid_request_error", None, Some("invalid_api_key")),
        ),
        Refusal::Frozen { masked_key } => (
            403,
            ErrorEnvelope::new(
                format!("The API key {masked_key} is frozen; ask an administrator to reactivate it."),
                "permission_error",
                None,
                Some("key_frozen"),
            ),
        ),
        Refusal::Expired { masked_key, at } => (
            401,
            ErrorEnvelope::new(
                format!("The API key {masked_key} expired at {at}; ask an administrator for a new one."),
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
        ),
        Refusal::ModelNotAllowed { model, allowed } => (
            403,
            ErrorEnvelope::new(
                format!("This API key may not use the model '{model}'; it may use: {}.", allowed.join(", ")),
                "permission_error",
                Some("model"),
                Some("model_not_allowed"),
            ),
        ),
        Refusal::Busy => (
            429,
            ErrorEnvelope::new(
                "Too many requests of this key are in flight; retry shortly.",
                "requests",
                None,
                Some("rate_limit_exceeded"),
            ),
        ),
        Refusal::Insufficient { needed, balance } => (
            429,
            ErrorEnvelope::new(
                format!("You exceeded your current quota: this request needs up to {needed} tokens and the key has {balance} left."),
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
            ),
        ),
    };
    (status, envelope.error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_status_and_code() {
        let cases = [
            (Refusal::UnknownKey, 401, "invalid_api_key"),
            (Refusal::Frozen { masked_key: "sk-ab...cd".into() }, 403, "key_frozen"),
            (Refusal::Insufficient { needed: 10, balance: 3 }, 429, "insufficient_quota"),
            (Refusal::Busy, 429, "rate_limit_exceeded"),
            (
                Refusal::Expired { masked_key: "sk-ab...cd".into(), at: "2026-01-01T00:00:00Z".into() },
                401,
                "invalid_api_key",
            ),
            (
                Refusal::ModelNotAllowed { model: "gpt-4.1".into(), allowed: vec!["gpt-5-nano".into()] },
                403,
                "model_not_allowed",
            ),
        ];
        for (refusal, status, code) in cases {
            let (s, body) = reply(&refusal);
            assert_eq!((s, body.code.as_deref()), (status, Some(code)));
        }
        assert!(reply(&Refusal::Insufficient { needed: 10, balance: 3 }).1.message.contains("needs up to 10 tokens"));
    }
}
