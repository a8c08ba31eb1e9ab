//! The field policy: for each billed endpoint, what the gateway does with
//! every request field the OpenAI API defines, in one table, enforced by
//! [`check`] before anything reaches the upstream. A field forwarded unread
//! is a way around the bill (a fee the usage does not show) or around
//! tenancy (an id of the operator's one upstream account), so each is one of
//! the [`Class`]es. Fields the table does not name pass through as sent (the
//! README says so, beside the table generated from [`markdown`]).

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::body::{self, Fields};
use crate::catalog::Endpoint;
use crate::reply::LocalReply;

/// Client headers that select the operator's upstream account state (its
/// organization and project): removed from every request of ours.
pub const ACCOUNT_HEADERS: [&str; 2] = ["openai-organization", "openai-project"];

/// What the gateway does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The gateway reads it (model, stream, maxima): its own checks apply.
    Read,
    /// No cost beyond tokens and no tenancy: forwarded as sent.
    Passed,
    /// Its cost shows in the answer's usage, which is what is charged.
    Metered,
    /// Names an object that must be the key's own: checked before forwarding,
    /// another key's is a 404 that never reaches the upstream.
    Owned,
    /// Costs beyond tokens: only the values the gateway prices pass; the
    /// others are refused `400 unsupported_value`.
    Priced,
    /// Refused `400 unsupported_parameter` (or, for a flag, when set).
    Refused,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Passed => "passed",
            Class::Metered => "metered",
            Class::Owned => "owned",
            Class::Priced => "priced",
            Class::Refused => "refused",
        }
    }
}

/// One field of an endpoint.
pub struct Rule {
    pub field: &'static str,
    pub class: Class,
    /// What the gateway does, for the README.
    pub what: &'static str,
}

const fn rule(field: &'static str, class: Class, what: &'static str) -> Rule {
    Rule { field, class, what }
}

use Class::{Metered, Owned, Passed, Priced, Read, Refused};

const TOOLS: &str = "`function` and `custom` tools pass; built-in tools (`web_search`, `file_search`, \
`code_interpreter`, `image_generation`, `mcp`, `computer_use_preview`, `local_shell`, ...) carry per-call fees \
and loops the usage does not show: refused";
const SERVICE_TIER: &str = "`auto` and `default` pass; another tier (`priority`, `flex`, `scale`) passes only where \
the model's catalog entry prices it (`service_tiers`, a multiplier of its prices), and is refused elsewhere";

/// `POST /v1/chat/completions`.
pub const CHAT: &[Rule] = &[
    rule("model", Read, "picks the catalog's model; unknown is 404 `model_not_found`"),
    rule(
        "messages",
        Metered,
        "counted as input; `input_audio` parts (audio is not priced) and parts naming a `file_id` (the operator's \
         account's files) are refused",
    ),
    rule("max_completion_tokens", Read, "held for; at most the model's reservation"),
    rule("max_tokens", Read, "held for, as `max_completion_tokens`"),
    rule("n", Metered, "each choice held for and counted"),
    rule("stream", Read, "streamed answers are metered as they pass"),
    rule("stream_options", Read, "`include_usage` is asked for, and hidden from a client that did not"),
    rule("tools", Priced, TOOLS),
    rule("service_tier", Priced, SERVICE_TIER),
    rule("modalities", Priced, "`[\"text\"]` passes; `audio` output is not priced: refused"),
    rule("audio", Refused, "audio output is not priced"),
    rule("web_search_options", Refused, "web search carries per-call fees"),
    rule("data_sources", Refused, "Azure \"on your data\" searches the operator's indexes"),
    rule("prediction", Metered, "rejected prediction tokens are counted as output"),
    rule("reasoning_effort", Metered, "reasoning tokens are counted as output"),
    rule("frequency_penalty", Passed, ""),
    rule("presence_penalty", Passed, ""),
    rule("logit_bias", Passed, ""),
    rule("logprobs", Passed, ""),
    rule("top_logprobs", Passed, ""),
    rule("response_format", Passed, ""),
    rule("seed", Passed, ""),
    rule("stop", Passed, ""),
    rule("temperature", Passed, ""),
    rule("top_p", Passed, ""),
    rule("tool_choice", Passed, ""),
    rule("parallel_tool_calls", Passed, ""),
    rule("functions", Passed, "function definitions (deprecated form of `tools`)"),
    rule("function_call", Passed, ""),
    rule("store", Passed, "stored completions are not served by the gateway"),
    rule("metadata", Passed, ""),
    rule("user", Passed, ""),
    rule("safety_identifier", Passed, ""),
    rule("prompt_cache_key", Passed, "cached input is priced as the catalog says"),
    rule("prompt_cache_retention", Passed, ""),
    rule("verbosity", Passed, ""),
];

/// `POST /v1/responses`.
pub const RESPONSES: &[Rule] = &[
    rule("model", Read, "picks the catalog's model; unknown is 404 `model_not_found`"),
    rule(
        "input",
        Metered,
        "counted as input; `item_reference` items (items of stored responses) and parts naming a `file_id` are \
         refused",
    ),
    rule("instructions", Metered, "counted as input"),
    rule("max_output_tokens", Read, "held for; at most the model's reservation"),
    rule("stream", Read, "streamed answers are metered as they pass"),
    rule(
        "previous_response_id",
        Owned,
        "must be a response this key made (404 otherwise, never forwarded); its earlier turns are held for",
    ),
    rule("background", Refused, "`true` is refused: the output is made after the answer, unbilled"),
    rule("conversation", Refused, "conversations are objects of the operator's account"),
    rule("prompt", Refused, "prompt templates are objects of the operator's account"),
    rule("tools", Priced, TOOLS),
    rule("service_tier", Priced, SERVICE_TIER),
    rule("reasoning", Metered, "reasoning tokens are counted as output"),
    rule("include", Passed, ""),
    rule("store", Passed, "stored responses are read only by the key that made them"),
    rule("metadata", Passed, ""),
    rule("text", Passed, ""),
    rule("temperature", Passed, ""),
    rule("top_p", Passed, ""),
    rule("top_logprobs", Passed, ""),
    rule("tool_choice", Passed, ""),
    rule("parallel_tool_calls", Passed, ""),
    rule("max_tool_calls", Passed, ""),
    rule("truncation", Passed, ""),
    rule("user", Passed, ""),
    rule("safety_identifier", Passed, ""),
    rule("prompt_cache_key", Passed, "cached input is priced as the catalog says"),
    rule("prompt_cache_retention", Passed, ""),
    rule("stream_options", Passed, ""),
];

/// `POST /v1/embeddings`.
pub const EMBEDDINGS: &[Rule] = &[
    rule("model", Read, "picks the catalog's model; unknown is 404 `model_not_found`"),
    rule("input", Metered, "counted as input"),
    rule("dimensions", Passed, ""),
    rule("encoding_format", Passed, ""),
    rule("user", Passed, ""),
];

pub fn rules(endpoint: Endpoint) -> &'static [Rule] {
    match endpoint {
        Endpoint::Chat => CHAT,
        Endpoint::Responses => RESPONSES,
        Endpoint::Embeddings => EMBEDDINGS,
    }
}

/// What the policy found that admission must still do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// A stored response the request continues: the key must own it.
    pub previous_response: Option<String>,
    /// The service tier it names: priced by the model's entry, or refused (`request::admit`).
    pub service_tier: Option<String>,
}

fn unsupported_parameter(field: &str, why: &str) -> LocalReply {
    let message = format!("'{field}' is not supported by this gateway: {why}.");
    LocalReply::unsupported(message, field, "unsupported_parameter")
}

pub fn unsupported_value(field: &str, value: &str, why: &str) -> LocalReply {
    let message = format!("'{field}' may not be {value} through this gateway: {why}.");
    LocalReply::unsupported(message, field, "unsupported_value")
}

/// Applies the endpoint's policy to the body's fields: every refused field,
/// every priced value the gateway does not price and every id of another
/// account is a `400` naming it; owned ids come back to be checked.
pub fn check(endpoint: Endpoint, fields: &Fields) -> Result<Checked, LocalReply> {
    let mut checked = Checked::default();
    for rule in rules(endpoint) {
        let Some(raw) = fields.get(rule.field) else { continue };
        match (endpoint, rule.field) {
            (_, "tools") => check_tools(raw)?,
            (_, "service_tier") => match serde_json::from_str::<String>(raw) {
                Ok(tier) => checked.service_tier = Some(tier),
                Err(_) => {
                    return Err(LocalReply::bad_request("'service_tier' must be a string.", Some("service_tier")))
                }
            },
            (Endpoint::Chat, "modalities") => match serde_json::from_str::<Vec<&str>>(raw) {
                Ok(m) if m.iter().all(|m| *m == "text") => {}
                Ok(_) => return Err(unsupported_value("modalities", "audio", "audio output is not priced")),
                Err(_) => {
                    return Err(LocalReply::bad_request(
                        "'modalities' must be an array of strings.",
                        Some("modalities"),
                    ))
                }
            },
            (Endpoint::Chat, "messages") => check_parts(raw, "messages")?,
            (Endpoint::Responses, "input") => check_parts(raw, "input")?,
            (Endpoint::Responses, "background") => match raw {
                "false" => {}
                "true" => {
                    return Err(unsupported_value(
                        "background",
                        "true",
                        "a background response is written after the answer, where its usage cannot be billed",
                    ))
                }
                _ => return Err(LocalReply::bad_request("'background' must be a boolean.", Some("background"))),
            },
            (Endpoint::Responses, "previous_response_id") => match serde_json::from_str::<String>(raw) {
                Ok(id) => checked.previous_response = Some(id),
                Err(_) => {
                    return Err(LocalReply::bad_request(
                        "'previous_response_id' must be a string.",
                        Some("previous_response_id"),
                    ))
                }
            },
            _ if rule.class == Refused => return Err(unsupported_parameter(rule.field, rule.what)),
            _ => {}
        }
    }
    Ok(checked)
}

/// A tool's `type`, lexed without keeping the rest of its definition.
struct ToolType(Option<String>);

impl<'de> Deserialize<'de> for ToolType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolType;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tool")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ToolType, A::Error> {
                let mut kind = None;
                while let Some(name) = map.next_key::<body::Name<'de>>()? {
                    if name.0 == "type" {
                        // Read whole whatever it is (a non-string is no type), unescaped if a string.
                        kind = serde_json::from_str::<String>(map.next_value::<&'de RawValue>()?.get()).ok();
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ToolType(kind))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ToolType, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ToolType(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `tools`: an array of tools, each `function` or `custom`.
fn check_tools(raw: &str) -> Result<(), LocalReply> {
    let Ok(tools) = serde_json::from_str::<Vec<ToolType>>(raw) else {
        return Err(LocalReply::bad_request("'tools' must be an array of tool objects.", Some("tools")));
    };
    for (i, tool) in tools.iter().enumerate() {
        match tool.0.as_deref() {
            Some("function" | "custom") => {}
            Some(kind) => {
                return Err(unsupported_value(
                    &format!("tools[{i}].type"),
                    &format!("'{kind}'"),
                    "built-in tools carry fees the gateway does not price; only function and custom tools pass",
                ))
            }
            None => {
                let field = format!("tools[{i}].type");
                return Err(LocalReply::bad_request(format!("'{field}' must be a string."), Some(&field)));
            }
        }
    }
    Ok(())
}

/// Markers of content the policy refuses inside `messages` or `input`, as
/// they appear in JSON text outside strings: only a body that holds one is
/// walked (a string holding them escapes their quotes).
const PART_MARKERS: [&str; 3] = ["\"file_id\"", "\"item_reference\"", "\"input_audio\""];

/// Content parts that name the operator's account's files, items of stored
/// responses, or audio: refused, naming where they stand.
fn check_parts(raw: &str, field: &str) -> Result<(), LocalReply> {
    if !PART_MARKERS.iter().any(|m| raw.contains(m)) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_str::<Value>(raw) else { return Ok(()) };
    match refused_part(&value, field.to_owned(), 0) {
        Some(reply) => Err(reply),
        None => Ok(()),
    }
}

/// Deep enough for any message or input item; deeper is not content.
const PART_DEPTH: usize = 8;

fn refused_part(v: &Value, at: String, depth: usize) -> Option<LocalReply> {
    if depth > PART_DEPTH {
        return None;
    }
    match v {
        Value::Object(o) => {
            if o.contains_key("file_id") {
                let field = format!("{at}.file_id");
                return Some(unsupported_parameter(
                    &field,
                    "file ids name files of the operator's upstream account; send the file's content inline",
                ));
            }
            match o.get("type").and_then(Value::as_str) {
                Some("item_reference") => {
                    return Some(unsupported_value(
                        &format!("{at}.type"),
                        "'item_reference'",
                        "items of stored responses are not checked for ownership; continue with \
                         previous_response_id, or send the items themselves",
                    ))
                }
                Some("input_audio") => {
                    return Some(unsupported_value(&format!("{at}.type"), "'input_audio'", "audio is not priced"))
                }
                _ => {}
            }
            o.iter().find_map(|(k, v)| refused_part(v, format!("{at}.{k}"), depth + 1))
        }
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, v)| refused_part(v, format!("{at}[{i}]"), depth + 1))
        }
        _ => None,
    }
}

/// The README's tables: one per endpoint.
pub fn markdown() -> String {
    let mut out = String::new();
    for (title, endpoint) in [
        ("`POST /v1/chat/completions`", Endpoint::Chat),
        ("`POST /v1/responses`", Endpoint::Responses),
        ("`POST /v1/embeddings`", Endpoint::Embeddings),
    ] {
        out.push_str(&format!("\n{title}:\n\n| field | class | what the gateway does |\n| --- | --- | --- |\n"));
        for r in rules(endpoint) {
            out.push_str(&format!("| `{}` | {} | {} |\n", r.field, r.class.name(), r.what));
        }
        out.push_str("| any other | passed | forwarded as sent |\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(endpoint: Endpoint, body: &str) -> Result<Checked, (u32, Value)> {
        let fields = Fields::parse(body).unwrap();
        check(endpoint, &fields).map_err(|r| (r.status, serde_json::from_slice(&r.body).unwrap()))
    }

    fn refused(endpoint: Endpoint, body: &str) -> (String, String) {
        let (status, v) = checked(endpoint, body).expect_err(body);
        assert_eq!(status, 400, "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        let param = v["error"]["param"].as_str().unwrap_or_default().to_owned();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&param), "the message names the field: {message}");
        (param, v["error"]["code"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn every_field_is_named_once_per_endpoint_and_every_refused_one_is_refused() {
        for endpoint in [Endpoint::Chat, Endpoint::Responses, Endpoint::Embeddings] {
            let rules = rules(endpoint);
            for (i, r) in rules.iter().enumerate() {
                assert!(!rules[..i].iter().any(|e| e.field == r.field), "{} twice", r.field);
                if r.class == Refused {
                    // Any value of a refused field is refused, but for a flag (refused when set).
                    let body = format!(r#"{{"{}":{{"x":1}}}}"#, r.field);
                    assert!(checked(endpoint, &body).is_err(), "{body}");
                }
            }
        }
    }

    #[test]
    fn built_in_tools_are_refused_naming_the_tool_and_functions_pass() {
        // OpenClaw's shape: eleven function tools with JSON-schema parameters (whose own "type"s are not tools').
        let tool = r#"{"type":"function","function":{"name":"read","parameters":{"type":"object","properties":{"path":{"type":"string"}}}}}"#;
        let openclaw = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{}]}}"#,
            [tool; 11].join(",")
        );
        let f = Fields::parse(&openclaw).unwrap();
        assert_eq!(check(Endpoint::Chat, &f), Ok(Checked::default()), "OpenClaw's 11 function tools pass");
        for kind in ["web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation", "mcp"] {
            let body = format!(r#"{{"tools":[{{"type":"function","name":"a"}},{{"type":"{kind}"}}]}}"#);
            for endpoint in [Endpoint::Chat, Endpoint::Responses] {
                assert_eq!(refused(endpoint, &body), ("tools[1].type".into(), "unsupported_value".into()), "{kind}");
            }
        }
        let custom = r#"{"tools":[{"type":"custom","name":"grammar"}]}"#;
        assert!(checked(Endpoint::Responses, custom).is_ok());
        assert_eq!(refused(Endpoint::Chat, r#"{"tools":[{"name":"x"}]}"#).0, "tools[0].type");
        assert_eq!(refused(Endpoint::Chat, r#"{"tools":{"type":"function"}}"#).0, "tools");
    }

    #[test]
    fn service_tiers_audio_and_searches_beyond_the_tokens_are_refused() {
        for tier in ["auto", "default"] {
            assert!(checked(Endpoint::Chat, &format!(r#"{{"service_tier":"{tier}"}}"#)).is_ok());
        }
        assert!(checked(Endpoint::Chat, r#"{"service_tier":null}"#).is_ok(), "null reads as absent");
        // Other tiers come back for the model's entry to price (or refuse: `request::admit`).
        let priority = checked(Endpoint::Responses, r#"{"service_tier":"priority"}"#).unwrap();
        assert_eq!(priority.service_tier.as_deref(), Some("priority"));
        assert_eq!(refused(Endpoint::Chat, r#"{"service_tier":7}"#).0, "service_tier");
        assert!(checked(Endpoint::Chat, r#"{"modalities":["text"]}"#).is_ok());
        assert_eq!(refused(Endpoint::Chat, r#"{"modalities":["text","audio"]}"#).1, "unsupported_value");
        for (field, value) in [("audio", r#"{"voice":"alloy","format":"wav"}"#), ("web_search_options", "{}")] {
            let body = format!(r#"{{"{field}":{value}}}"#);
            assert_eq!(refused(Endpoint::Chat, &body), (field.into(), "unsupported_parameter".into()));
        }
        let azure = r#"{"data_sources":[{"type":"azure_search","parameters":{}}]}"#;
        assert_eq!(refused(Endpoint::Chat, azure).0, "data_sources");
    }

    #[test]
    fn responses_made_or_kept_outside_the_answer_are_refused_and_a_previous_one_comes_back_to_check() {
        assert_eq!(
            refused(Endpoint::Responses, r#"{"background":true}"#),
            ("background".into(), "unsupported_value".into())
        );
        assert!(checked(Endpoint::Responses, r#"{"background":false}"#).is_ok());
        for body in [r#"{"conversation":"conv_1"}"#, r#"{"conversation":{"id":"conv_1"}}"#] {
            assert_eq!(refused(Endpoint::Responses, body), ("conversation".into(), "unsupported_parameter".into()));
        }
        assert_eq!(refused(Endpoint::Responses, r#"{"prompt":{"id":"pmpt_1"}}"#).0, "prompt");
        let follow = checked(Endpoint::Responses, r#"{"input":"x","previous_response_id":"resp_a"}"#).unwrap();
        assert_eq!(follow.previous_response.as_deref(), Some("resp_a"));
        // The chat endpoint has no such fields: they pass there as unknown ones do.
        assert!(checked(Endpoint::Chat, r#"{"background":true,"previous_response_id":"resp_a"}"#).is_ok());
    }

    #[test]
    fn file_ids_item_references_and_audio_parts_are_refused_where_they_stand() {
        let chat = r#"{"messages":[{"role":"user","content":"hi"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"file","file":{"file_id":"file-1"}}]}]}"#;
        assert_eq!(
            refused(Endpoint::Chat, chat),
            ("messages[1].content[1].file.file_id".into(), "unsupported_parameter".into())
        );
        let audio = r#"{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA==","format":"wav"}}]}]}"#;
        assert_eq!(refused(Endpoint::Chat, audio), ("messages[0].content[0].type".into(), "unsupported_value".into()));
        let reference = r#"{"input":[{"role":"user","content":"x"},{"type":"item_reference","id":"msg_1"}]}"#;
        assert_eq!(refused(Endpoint::Responses, reference), ("input[1].type".into(), "unsupported_value".into()));
        let image = r#"{"input":[{"role":"user","content":[{"type":"input_image","file_id":"file-2"}]}]}"#;
        assert_eq!(refused(Endpoint::Responses, image).0, "input[0].content[0].file_id");
        // Inline content passes, and so does text that only speaks of such things.
        let inline = r#"{"input":[{"role":"user","content":[{"type":"input_file","file_data":"data:application/pdf;base64,AA==","filename":"a.pdf"}]}]}"#;
        assert!(checked(Endpoint::Responses, inline).is_ok());
        let talk = r#"{"messages":[{"role":"user","content":"what is \"file_id\" or \"input_audio\"?"}]}"#;
        assert!(checked(Endpoint::Chat, talk).is_ok());
    }

    #[test]
    fn the_readme_table_is_the_policy() {
        let readme = include_str!("../../README.md");
        let (begin, end) = ("<!-- field-policy:begin -->\n", "<!-- field-policy:end -->");
        let at = readme.find(begin).expect("the README has the field-policy markers") + begin.len();
        let len = readme[at..].find(end).expect("and their end");
        assert_eq!(
            readme[at..at + len].trim(),
            markdown().trim(),
            "README's table; regenerate it from policy::markdown()"
        );
    }
}
