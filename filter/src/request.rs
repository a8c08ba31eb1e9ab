//! The client's request: key extraction, body validation, the cheap token
//! estimate for the hold, and the body rewrite for the upstream.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::body::{self, Fields, Unreadable};

use crate::config::PluginConfig;
use crate::reply::LocalReply;

pub use bridge_protocol::client_key;

pub use crate::catalog::Endpoint;

/// Input a Responses request with `previous_response_id` is held for beyond
/// its body: the upstream bills the earlier turns' context too, which the body
/// does not show. (What it bills beyond the hold is still charged in full.)
pub const PREVIOUS_CONTEXT_ALLOWANCE: i64 = 8_192;

/// What the filter learned from a valid body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub endpoint: Endpoint,
    /// The catalog's entry for the model (its index in `PluginConfig::catalog`).
    pub model_index: usize,
    /// The client's `model`, or the served model when absent.
    pub model: String,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`; if not, the
    /// filter asked for it and must hide the usage event from the client.
    pub client_wants_usage: bool,
    /// Tokens to hold: input estimate plus the output reservation.
    pub estimate: i64,
    /// The body to send upstream when it differs from the client's.
    pub rewritten: Option<Vec<u8>>,
    /// The stored response it continues (`previous_response_id`): the key
    /// must own it before anything goes upstream.
    pub previous_response: Option<String>,
    /// The service tier it names, priced by the model's entry (`Model::prices_for`).
    pub service_tier: Option<String>,
}

fn integer_param(fields: &Fields, name: &str) -> Result<Option<i64>, LocalReply> {
    match fields.get(name) {
        None => Ok(None),
        Some(raw) => match serde_json::from_str::<i64>(raw) {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(LocalReply::bad_request(format!("'{name}' must be a positive integer."), Some(name))),
        },
    }
}

/// One element of `messages`, checked as it is lexed: whether it is an
/// object with a string `role` (nothing of it is kept).
struct MessageCheck(bool);

impl<'de> serde::Deserialize<'de> for MessageCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageCheck;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessageCheck, A::Error> {
                let mut role = false;
                while let Some(name) = map.next_key::<body::Name<'de>>()? {
                    if name.0 == "role" {
                        role = body::is_string(map.next_value::<&'de RawValue>()?.get());
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(MessageCheck(role))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageCheck, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MessageCheck(false))
            }
            fn visit_bool<E>(self, _: bool) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
            fn visit_i64<E>(self, _: i64) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
            fn visit_u64<E>(self, _: u64) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
            fn visit_f64<E>(self, _: f64) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
            fn visit_str<E>(self, _: &str) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
            fn visit_unit<E>(self) -> Result<MessageCheck, E> {
                Ok(MessageCheck(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: a non-empty array of objects with a string `role`.
fn check_messages(fields: &Fields) -> Result<(), LocalReply> {
    let Some(raw) = fields.get("messages") else {
        return Err(LocalReply::bad_request("Missing required parameter: 'messages'.", Some("messages")));
    };
    let checked = match raw.starts_with('[') {
        true => serde_json::from_str::<Vec<MessageCheck>>(raw).ok(),
        false => None,
    };
    let Some(msgs) = checked else {
        return Err(LocalReply::bad_request("'messages' must be an array.", Some("messages")));
    };
    if msgs.is_empty() {
        return Err(LocalReply::bad_request("'messages' must not be empty.", Some("messages")));
    }
    if let Some(i) = msgs.iter().position(|m| !m.0) {
        return Err(LocalReply::bad_request(
            format!("'messages[{i}]' must be an object with a string 'role'."),
            Some(&format!("messages[{i}].role")),
        ));
    }
    Ok(())
}

/// `input` of a Responses request: a string or an array of input items
/// (objects). (`previous_response_id` is the field policy's.)
fn check_input(fields: &Fields) -> Result<(), LocalReply> {
    match fields.get("input") {
        None => return Err(LocalReply::bad_request("Missing required parameter: 'input'.", Some("input"))),
        Some(raw) if body::is_string(raw) => {}
        Some(raw) => match body::elements(raw) {
            Some(items) => {
                if let Some(i) = items.iter().position(|item| !body::is_object(item)) {
                    return Err(LocalReply::bad_request(
                        format!("'input[{i}]' must be an object (an input item)."),
                        Some(&format!("input[{i}]")),
                    ));
                }
            }
            None => return Err(LocalReply::bad_request("'input' must be a string or an array.", Some("input"))),
        },
    }
    Ok(())
}

/// `input` of an embeddings request: a string, an array of strings, an array
/// of token ids or an array of such arrays; not empty.
fn check_embedding_input(fields: &Fields) -> Result<(), LocalReply> {
    let bad = || {
        LocalReply::bad_request(
            "'input' must be a string, or a non-empty array of strings or of token arrays.",
            Some("input"),
        )
    };
    let token = |v: &Value| v.as_u64().is_some();
    let Some(raw) = fields.get("input") else {
        return Err(LocalReply::bad_request("Missing required parameter: 'input'.", Some("input")));
    };
    match serde_json::from_str::<Value>(raw).map_err(|_| bad())? {
        Value::String(_) => Ok(()),
        Value::Array(items) if items.is_empty() => Err(bad()),
        Value::Array(items) => {
            let ok = items.iter().all(Value::is_string)
                || items.iter().all(token)
                || items.iter().all(|i| i.as_array().is_some_and(|t| !t.is_empty() && t.iter().all(token)));
            if ok {
                Ok(())
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

/// A boolean field: `None` when absent or null, an error naming it otherwise.
fn boolean(raw: Option<&str>, name: &str) -> Result<Option<bool>, LocalReply> {
    match raw {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(LocalReply::bad_request(format!("'{name}' must be a boolean."), Some(name))),
    }
}

/// Validates the body and prepares the upstream request. The body is read
/// one level deep ([`Fields`]); what the gateway changes is spliced in, the
/// rest reaches the upstream byte for byte.
pub fn admit(body: &[u8], cfg: &PluginConfig, endpoint: Endpoint) -> Result<Admission, LocalReply> {
    let text =
        std::str::from_utf8(body).map_err(|_| LocalReply::bad_request("The request body is not valid UTF-8.", None))?;
    let fields = Fields::parse(text).map_err(|e| match e {
        Unreadable::Syntax(e) => {
            LocalReply::bad_request(format!("We could not parse the JSON body of your request: {e}."), None)
        }
        Unreadable::NotAnObject => LocalReply::bad_request("The request body must be a JSON object.", None),
        Unreadable::Duplicate(name) => {
            LocalReply::bad_request(format!("'{name}' appears more than once in the body."), Some(&name))
        }
    })?;
    match endpoint {
        Endpoint::Chat => check_messages(&fields)?,
        Endpoint::Responses => check_input(&fields)?,
        Endpoint::Embeddings => check_embedding_input(&fields)?,
    }
    let checked = crate::policy::check(endpoint, &fields)?;
    let named = match fields.get("model").map(serde_json::from_str::<Cow<str>>) {
        None => None,
        Some(Ok(s)) if s.len() <= bridge_protocol::MAX_MODEL_LEN => Some(s),
        Some(Ok(_)) => {
            let why = format!("'model' must be at most {} bytes.", bridge_protocol::MAX_MODEL_LEN);
            return Err(LocalReply::bad_request(why, Some("model")));
        }
        Some(Err(_)) => return Err(LocalReply::bad_request("'model' must be a string.", Some("model"))),
    };
    let named = named.as_deref();
    let Some((model_index, entry)) = cfg.model_index(named).and_then(|i| cfg.catalog.get(i).map(|m| (i, m))) else {
        return Err(match named {
            Some(name) => LocalReply::model_not_found(name),
            None => LocalReply::bad_request("Missing required parameter: 'model'.", Some("model")),
        });
    };
    if !entry.serves(endpoint) {
        return Err(LocalReply::model_not_supported(&entry.name, endpoint.name()));
    }
    // The audit row keeps the name the client sent (the catalog's, or any without one).
    let model = named.unwrap_or(&entry.name).to_owned();
    let stream = boolean(fields.get("stream"), "stream")?.unwrap_or(false) && endpoint != Endpoint::Embeddings;
    // The Responses API always reports usage, in its last event, and
    // embeddings in their answer: nothing to ask for or hide.
    let options = match fields.get("stream_options").filter(|_| endpoint == Endpoint::Chat) {
        None => None,
        Some(raw) => match Fields::parse(raw) {
            Ok(o) => Some(o),
            Err(Unreadable::Duplicate(name)) => {
                let field = format!("stream_options.{name}");
                return Err(LocalReply::bad_request(format!("'{field}' appears more than once."), Some(&field)));
            }
            Err(_) => {
                return Err(LocalReply::bad_request("'stream_options' must be an object.", Some("stream_options")))
            }
        },
    };
    let include_usage = options.as_ref().and_then(|o| o.get("include_usage"));
    let client_wants_usage =
        endpoint != Endpoint::Chat || boolean(include_usage, "stream_options.include_usage")?.unwrap_or(false);
    let (client_max, choices, cap_field, earlier) = match endpoint {
        Endpoint::Chat => (
            integer_param(&fields, "max_completion_tokens")?.or(integer_param(&fields, "max_tokens")?),
            integer_param(&fields, "n")?.unwrap_or(1),
            Some("max_completion_tokens"),
            0,
        ),
        Endpoint::Responses => (
            integer_param(&fields, "max_output_tokens")?,
            1,
            Some("max_output_tokens"),
            if checked.previous_response.is_some() { PREVIOUS_CONTEXT_ALLOWANCE } else { 0 },
        ),
        // Embeddings write no output.
        Endpoint::Embeddings => (None, 0, None, 0),
    };
    if let (Some(n), Some(largest), Some(field)) = (client_max, entry.max_output_reservation, cap_field) {
        if n > largest {
            let why = format!("'{field}' may be at most {largest} for the model '{}'.", entry.name);
            return Err(LocalReply::bad_request(why, Some(field)));
        }
    }
    let output = client_max.unwrap_or(entry.default_output_reservation.unwrap_or(cfg.default_output_reservation));
    let input = body.len().div_ceil(cfg.estimate_bytes_per_token as usize) as i64 + 16 + earlier;
    // In charged tokens: what the model's prices (at the tier named) make of the input and output held.
    let Some(prices) = entry.prices_for(checked.service_tier.as_deref()) else {
        let tier = checked.service_tier.as_deref().unwrap_or_default();
        let why = format!("the model '{}' prices no such tier; auto and default pass", entry.name);
        return Err(crate::policy::unsupported_value("service_tier", &format!("'{tier}'"), &why));
    };
    let estimate = prices.hold(input, output.saturating_mul(choices));

    let mut edits = fields.edit();
    if stream && !client_wants_usage {
        // Spliced into the client's options, if it sent any.
        let spliced = options.as_ref().and_then(|o| {
            let mut e = o.edit();
            e.set("include_usage", "true".into());
            e.finish().and_then(|bytes| String::from_utf8(bytes).ok())
        });
        edits.set("stream_options", spliced.unwrap_or_else(|| r#"{"include_usage":true}"#.to_owned()));
    }
    if let (None, true, Some(field)) = (client_max, cfg.cap_output, cap_field) {
        // The hold is a ceiling: what it reserved for output is all the upstream may write.
        edits.set(field, output.to_string());
    }
    // The model the upstream reads from the body, where it reads one.
    if let Some(m) = entry.body_model(endpoint) {
        if named != Some(m) {
            edits.set("model", Value::from(m).to_string());
        }
    }
    let rewritten = crate::itemise::time(crate::itemise::Step::Reencode, || edits.finish());
    Ok(Admission {
        endpoint,
        model_index,
        model,
        stream,
        client_wants_usage,
        estimate,
        rewritten,
        previous_response: checked.previous_response,
        service_tier: checked.service_tier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PluginConfig {
        PluginConfig::from_json(br#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"gpt-5-nano"}"#).unwrap()
    }

    #[test]
    fn keys_come_from_bearer_or_api_key() {
        assert_eq!(client_key(Some("Bearer sk-user-0001"), None), Some("sk-user-0001"));
        assert_eq!(client_key(Some("bearer  sk-user-0001 "), None), Some("sk-user-0001"));
        assert_eq!(client_key(None, Some("sk-user-0001")), Some("sk-user-0001"));
        for bad in [
            Some("Basic abc"),
            Some("Bearer"),
            Some("Bearer short"),
            Some("Bearer sk-\u{7f}xxxxxxx"),
            Some("sk-user-0001"),
        ] {
            assert_eq!(client_key(bad, None), None, "{bad:?}");
        }
        assert_eq!(client_key(None, None), None);
    }

    #[test]
    fn streamed_requests_get_include_usage_and_remember_who_asked() {
        let body =
            br#"{"model":"gpt-5-nano","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.7}"#;
        let a = admit(body, &cfg(), Endpoint::Chat).unwrap();
        assert!(a.stream && !a.client_wants_usage);
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["temperature"], 0.7, "other fields survive unchanged");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["model", "messages", "stream", "temperature", "stream_options", "max_completion_tokens"],
            "field order kept, the cap last"
        );

        let asked =
            br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":5}"#;
        let a = admit(asked, &cfg(), Endpoint::Chat).unwrap();
        assert!(a.client_wants_usage);
        assert_eq!(a.rewritten, None, "nothing to change");
        assert_eq!(a.model, "gpt-5-nano", "absent model falls back to the served one");
    }

    #[test]
    fn a_responses_body_is_capped_by_max_output_tokens_and_held_for_earlier_turns() {
        let body = br#"{"model":"gpt-5-nano","input":"hi","stream":true,"tools":[{"type":"function","name":"read"}]}"#;
        let a = admit(body, &cfg(), Endpoint::Responses).unwrap();
        assert!(a.stream && a.client_wants_usage, "usage always comes in the last event: nothing hidden");
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["max_output_tokens"], 4096, "capped at what is held");
        assert_eq!(v.get("stream_options"), None, "the Responses API has no stream_options");
        assert_eq!(v.get("max_completion_tokens"), None);
        assert_eq!(a.estimate, body.len().div_ceil(2) as i64 + 16 + 4096);
        // Azure's Responses API takes the deployment as the model.
        assert_eq!(v["model"], "gpt-5-nano");
        let named = br#"{"model":"other","input":[{"role":"user","content":"hi"}],"max_output_tokens":50}"#;
        let a = admit(named, &cfg(), Endpoint::Responses).unwrap();
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!((v["model"].as_str(), v["max_output_tokens"].as_i64()), (Some("gpt-5-nano"), Some(50)));
        assert_eq!(a.model, "other", "the audit keeps the name the client sent");
        assert_eq!(a.estimate, named.len().div_ceil(2) as i64 + 16 + 50);
        // The earlier turns of previous_response_id are billed too: held for.
        let follow = br#"{"model":"gpt-5-nano","input":"more","previous_response_id":"resp_1","max_output_tokens":50}"#;
        let a = admit(follow, &cfg(), Endpoint::Responses).unwrap();
        assert_eq!(a.estimate, follow.len().div_ceil(2) as i64 + 16 + PREVIOUS_CONTEXT_ALLOWANCE + 50);
        assert_eq!(a.rewritten, None, "nothing to change");
        // Bad input names its field; a chat body is not a Responses body.
        for (bad, param) in [
            (&br#"{"model":"m"}"#[..], "input"),
            (br#"{"input":7}"#, "input"),
            (br#"{"input":["x"]}"#, "input[0]"),
            (br#"{"input":"x","max_output_tokens":0}"#, "max_output_tokens"),
            (br#"{"input":"x","previous_response_id":5}"#, "previous_response_id"),
            (br#"{"messages":[{"role":"user","content":"hi"}]}"#, "input"),
        ] {
            let r = admit(bad, &cfg(), Endpoint::Responses).unwrap_err();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                (r.status, v["error"]["param"].as_str()),
                (400, Some(param)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_field_named_twice_is_refused_and_a_null_stream_options_gets_include_usage() {
        // Which of two maxima (or models) the upstream reads is not ours to guess: a cap could be bypassed.
        let twice = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_tokens":50000}"#;
        let r = admit(twice, &cfg(), Endpoint::Chat).unwrap_err();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status, v["error"]["param"].as_str()), (400, Some("max_tokens")));
        let null =
            br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":null,"max_tokens":5}"#;
        let a = admit(null, &cfg(), Endpoint::Chat).unwrap();
        assert!(!a.client_wants_usage);
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true}), "asked for in place of the null");
        // Options the client set are kept beside it.
        let other = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"x":1},"n":1}"#;
        let v: Value =
            serde_json::from_slice(admit(other, &cfg(), Endpoint::Chat).unwrap().rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"x": 1, "include_usage": true}));
        // Nor may the options name include_usage twice.
        let twice = br#"{"messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#;
        let r = admit(twice, &cfg(), Endpoint::Chat).unwrap_err();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status, v["error"]["param"].as_str()), (400, Some("stream_options.include_usage")));
        // A false one is set true where it stands.
        let off = br#"{"messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":false},"n":1}"#;
        let a = admit(off, &cfg(), Endpoint::Chat).unwrap();
        let text = String::from_utf8(a.rewritten.unwrap()).unwrap();
        assert!(text.contains(r#""stream_options":{"include_usage":true}"#), "{text}");
    }

    #[test]
    fn a_service_tier_passes_only_where_its_model_prices_it_and_is_held_at_its_multiplier() {
        let body = |tier: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_completion_tokens":100,"service_tier":"{tier}"}}"#
            )
        };
        // Without tier prices: auto and default only.
        for tier in ["auto", "default"] {
            assert!(admit(body(tier).as_bytes(), &cfg(), Endpoint::Chat).is_ok());
        }
        for tier in ["priority", "flex", "scale"] {
            let r = admit(body(tier).as_bytes(), &cfg(), Endpoint::Chat).unwrap_err();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                (r.status, v["error"]["param"].as_str(), v["error"]["code"].as_str()),
                (400, Some("service_tier"), Some("unsupported_value"))
            );
        }
        // A catalog that prices priority at twice and flex at half.
        let priced = PluginConfig::from_json(
            br#"{"sidecar_cluster":"s","models":[{"name":"m","deployment":"d","upstream_key":"k","service_tiers":{"priority":2.0,"flex":0.5}}]}"#,
        )
        .unwrap();
        // What the default prices hold for a body: its input estimate and the 100 output tokens it names.
        let held = |tier: &str| body(tier).len().div_ceil(2) as i64 + 16 + 100;
        let plain = admit(body("default").as_bytes(), &priced, Endpoint::Chat).unwrap().estimate;
        assert_eq!(plain, held("default"));
        let priority = admit(body("priority").as_bytes(), &priced, Endpoint::Chat).unwrap();
        assert_eq!(priority.estimate, 2 * held("priority"), "held at twice");
        assert_eq!(priority.service_tier.as_deref(), Some("priority"));
        let flex = admit(body("flex").as_bytes(), &priced, Endpoint::Chat).unwrap().estimate;
        assert_eq!(flex, (held("flex") + 1) / 2, "at half, rounded up");
        assert!(admit(body("scale").as_bytes(), &priced, Endpoint::Chat).is_err(), "still refused: not priced");
        let m = &priced.catalog[0];
        assert_eq!(m.prices_for(Some("priority")).unwrap().charge(10, 0, 5), 30);
    }

    #[test]
    fn non_streamed_bodies_that_name_a_maximum_pass_unchanged() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":9}"#;
        assert_eq!(admit(body, &cfg(), Endpoint::Chat).unwrap().rewritten, None);
    }

    #[test]
    fn a_request_naming_no_maximum_is_capped_at_what_is_held() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#;
        let a = admit(body, &cfg(), Endpoint::Chat).unwrap();
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["max_completion_tokens"], 4096, "the cap is the output the hold reserved");
        assert_eq!(a.estimate, body.len().div_ceil(2) as i64 + 16 + 2 * 4096, "per choice");
        // A client maximum is what is held, and the body keeps it as sent.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":7}"#;
        assert_eq!(admit(body, &cfg(), Endpoint::Chat).unwrap().rewritten, None);
        // An operator may turn the cap off: then the body passes as sent.
        let off = PluginConfig::from_json(
            br#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","cap_output":false}"#,
        )
        .unwrap();
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(admit(body, &off, Endpoint::Chat).unwrap().rewritten, None);
    }

    #[test]
    fn the_estimate_holds_input_and_requested_output() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":100,"n":2}"#;
        let a = admit(body, &cfg(), Endpoint::Chat).unwrap();
        let input = body.len().div_ceil(2) as i64 + 16;
        assert_eq!(a.estimate, input + 200);
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
        assert_eq!(admit(body, &cfg(), Endpoint::Chat).unwrap().estimate, body.len().div_ceil(2) as i64 + 16 + 10);
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(admit(body, &cfg(), Endpoint::Chat).unwrap().estimate, body.len().div_ceil(2) as i64 + 16 + 4096);
    }

    #[test]
    fn a_model_name_longer_than_any_record_may_carry_is_refused() {
        let long = "m".repeat(bridge_protocol::MAX_MODEL_LEN + 1);
        let body = format!(r#"{{"model":"{long}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let r = admit(body.as_bytes(), &cfg(), Endpoint::Chat).unwrap_err();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((r.status, v["error"]["param"].as_str()), (400, Some("model")));
        let fits = format!(r#"{{"model":"{}","messages":[{{"role":"user","content":"hi"}}]}}"#, &long[1..]);
        assert!(admit(fits.as_bytes(), &cfg(), Endpoint::Chat).is_ok());
    }

    #[test]
    fn invalid_bodies_say_what_is_wrong() {
        let cases: [(&[u8], Option<&str>); 11] = [
            (b"{not json", None),
            (b"[1,2]", None),
            (b"\xff\xfe{}", None),
            (br#"{"model":"m"}"#, Some("messages")),
            (br#"{"messages":"hi"}"#, Some("messages")),
            (br#"{"messages":[]}"#, Some("messages")),
            (br#"{"messages":[{"content":"x"}]}"#, Some("messages[0].role")),
            (br#"{"messages":[{"role":"user"}],"model":5}"#, Some("model")),
            (br#"{"messages":[{"role":"user"}],"stream":"yes"}"#, Some("stream")),
            (br#"{"messages":[{"role":"user"}],"max_completion_tokens":-5}"#, Some("max_completion_tokens")),
            (
                br#"{"messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":"y"}}"#,
                Some("stream_options.include_usage"),
            ),
        ];
        for (body, param) in cases {
            let r = admit(body, &cfg(), Endpoint::Chat).unwrap_err();
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["error"]["param"].as_str(), param, "{}", String::from_utf8_lossy(body));
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn openai_upstream_with_a_model_overrides_the_clients() {
        let c = PluginConfig::from_json(
            br#"{"sidecar_cluster":"s","upstream_key":"k","upstream":"openai","model":"gpt-4o-mini"}"#,
        )
        .unwrap();
        let a = admit(br#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#, &c, Endpoint::Chat).unwrap();
        let v: Value = serde_json::from_slice(a.rewritten.as_ref().unwrap()).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
    }
}
