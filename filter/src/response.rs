//! Metering of the upstream's answer while it streams to the client: usage
//! from the upstream when it reports it, otherwise the generated text for a
//! tiktoken count. Chunks are forwarded as they arrive; only the usage-only
//! event the filter itself asked for is removed.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::Encoding;
use crate::sse::{Event, SseParser};
use crate::tokens::{collect_choice_text, collect_output_item, MAX_EXACT_BYTES};

/// Plain responses are copied up to this size to read their `usage` (a chat
/// answer is far smaller). Beyond it only the last `PLAIN_TAIL` bytes are
/// kept, where a long answer's `usage` stands (its last field: 2,048
/// embeddings of 3,072 dimensions are some 60 MB); a cut answer without one
/// is charged its hold, never a count of a fragment. Memory per request stays
/// bounded by the two.
pub const MAX_PLAIN_COPY: usize = 4 * 1024 * 1024;
pub const PLAIN_TAIL: usize = 64 * 1024;

/// Token counts the upstream reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: i64,
    pub output: i64,
    /// Of `input`, read from the prompt cache.
    pub cached: i64,
    /// Of `output`, spent reasoning.
    pub reasoning: i64,
}

/// What to do with a response chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// Pass the chunk as it came.
    Unchanged,
    /// Replace the chunk by these bytes.
    Replace(Vec<u8>),
}

#[derive(Debug, Default, PartialEq)]
struct Tally {
    usage: Option<Usage>,
    /// Generated text, at most `MAX_EXACT_BYTES` of it: all the fallback
    /// tokenizes exactly.
    text: String,
    /// Bytes of generated text beyond that, only counted.
    beyond: usize,
    error_event: bool,
    /// The id of the response the upstream stored (the Responses API).
    response_id: Option<String>,
    /// The plain answer was longer than what was copied of it.
    cut: bool,
}

impl Tally {
    /// Chat's `usage` (`prompt_tokens`, `completion_tokens`) or the Responses
    /// API's (`input_tokens`, `output_tokens`), at the top (a plain answer, a
    /// chat chunk) or in the event's `response` (`response.completed`,
    /// `.incomplete`, `.failed`).
    /// A Responses answer's `id` (plain), or its events' `response.id`.
    fn take_response_id(&mut self, v: &Value) {
        if self.response_id.is_some() {
            return;
        }
        let response =
            if v.get("object").and_then(Value::as_str) == Some("response") { Some(v) } else { v.get("response") };
        let id = response.and_then(|r| r.get("id")).and_then(Value::as_str);
        self.response_id = id.filter(|id| bridge_protocol::valid_request_id(id)).map(str::to_owned);
    }

    fn take_usage(&mut self, v: &Value) -> bool {
        let usage = |v: &Value| v.get("usage").filter(|u| u.is_object()).cloned();
        let Some(u) = usage(v).or_else(|| v.get("response").and_then(usage)) else { return false };
        self.usage_from(&u);
        true
    }

    /// Reads a `usage` object (chat's or the Responses API's names).
    fn usage_from(&mut self, u: &Value) {
        let n = |chat: &str, responses: &str| {
            u.get(chat).or_else(|| u.get(responses)).and_then(Value::as_i64).unwrap_or(0).max(0)
        };
        let detail = |chat: &str, responses: &str, field: &str| {
            let d = u.get(chat).filter(|d| d.is_object()).or_else(|| u.get(responses));
            d.and_then(|d| d.get(field)).and_then(Value::as_i64).unwrap_or(0).max(0)
        };
        let (input, output) = (n("prompt_tokens", "input_tokens"), n("completion_tokens", "output_tokens"));
        self.usage = Some(Usage {
            input,
            output,
            cached: detail("prompt_tokens_details", "input_tokens_details", "cached_tokens").min(input),
            reasoning: detail("completion_tokens_details", "output_tokens_details", "reasoning_tokens").min(output),
        });
    }

    /// Reads one stream event through [`EventView`], which builds nothing but
    /// what it names; `None` when the event does not fit it (the caller then
    /// reads it as a tree).
    fn on_view(&mut self, data: &str, drop_usage_event: bool) -> Option<bool> {
        let view: EventView = serde_json::from_str(data).ok()?;
        let kind = view.kind.as_deref().unwrap_or_default();
        if view.error.is_some() && !kind.starts_with("response.") || kind == "error" {
            self.error_event = true;
        }
        // Only the Responses API's lifecycle events carry a `response`: read as a tree, they are few.
        let response = match view.response {
            Some(raw) => Some(serde_json::from_str::<Value>(raw.get()).ok()?),
            None => None,
        };
        if kind == "response.created" || kind == "response.completed" {
            if let Some(r) = &response {
                self.take_response_id(&serde_json::json!({ "response": r }));
            }
        }
        if kind.starts_with("response.") && kind.ends_with(".delta") {
            if let Some(delta) = view.delta.filter(|d| d.get().starts_with('"')) {
                self.text.push_str(&serde_json::from_str::<Cow<str>>(delta.get()).ok()?);
            }
        }
        for c in view.choices.iter().flatten() {
            if let Some(delta) = &c.delta {
                delta.collect(&mut self.text);
            }
        }
        self.bound_text();
        let usage = match view.usage {
            Some(raw) => Some(serde_json::from_str::<Value>(raw.get()).ok()?).filter(Value::is_object),
            None => None,
        };
        let usage = usage.or_else(|| response.as_ref().and_then(|r| r.get("usage")).filter(|u| u.is_object()).cloned());
        let has_usage = usage.is_some();
        if let Some(u) = &usage {
            self.usage_from(u);
        }
        let usage_only = has_usage && view.choices.as_ref().is_none_or(Vec::is_empty);
        Some(!(drop_usage_event && usage_only))
    }

    /// Keeps at most `MAX_EXACT_BYTES` of text; the rest is counted in bytes.
    fn bound_text(&mut self) {
        if self.text.len() <= MAX_EXACT_BYTES {
            return;
        }
        let mut cut = MAX_EXACT_BYTES;
        while !self.text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.beyond += self.text.len() - cut;
        self.text.truncate(cut);
    }

    /// Reads one stream event; returns whether the client should see it.
    fn on_event(&mut self, e: &Event, drop_usage_event: bool) -> bool {
        if e.data == "[DONE]" {
            return true;
        }
        match self.on_view(&e.data, drop_usage_event) {
            Some(keep) => keep,
            None => self.on_tree(&e.data, drop_usage_event),
        }
    }

    /// Reads one stream event as a tree: any event [`Tally::on_view`] does not fit.
    fn on_tree(&mut self, data: &str, drop_usage_event: bool) -> bool {
        let Ok(v) = serde_json::from_str::<Value>(data) else { return true };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        if v.get("error").is_some_and(|err| !err.is_null()) && !kind.starts_with("response.") || kind == "error" {
            self.error_event = true;
        }
        // The Responses API's stream: text, arguments, refusals and reasoning
        // summaries come as `*.delta` events.
        if kind == "response.created" || kind == "response.completed" {
            self.take_response_id(&v);
        }
        if kind.starts_with("response.") && kind.ends_with(".delta") {
            if let Some(delta) = v.get("delta").and_then(Value::as_str) {
                self.text.push_str(delta);
            }
        }
        let choices = v.get("choices").and_then(Value::as_array);
        for c in choices.into_iter().flatten() {
            if let Some(delta) = c.get("delta") {
                collect_choice_text(delta, &mut self.text);
            }
        }
        self.bound_text();
        let has_usage = self.take_usage(&v);
        // The usage-only event: non-null usage and no choices. Azure's content
        // filter events also have empty choices but no usage, and stay.
        let usage_only = has_usage && choices.is_none_or(|c| c.is_empty());
        !(drop_usage_event && usage_only)
    }
}

/// What the meter reads of a stream event, borrowed from its text: chat's
/// chunks are typed down to their deltas, nothing else is built.
#[derive(Deserialize)]
struct EventView<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    #[serde(borrow)]
    delta: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(borrow)]
    delta: Option<crate::tokens::TextView<'a>>,
}

#[derive(Debug)]
pub struct ResponseMeter {
    sse: Option<SseParser>,
    drop_usage_event: bool,
    plain: Vec<u8>,
    /// Past `MAX_PLAIN_COPY`: the plain answer's last bytes (at most twice
    /// `PLAIN_TAIL`, trimmed to it as they come).
    tail: Option<Vec<u8>>,
    tally: Tally,
    ended: bool,
}

impl ResponseMeter {
    /// `is_sse`: the response is `text/event-stream`. `drop_usage_event`: the
    /// client did not ask for usage, so the usage-only event is removed.
    pub fn new(is_sse: bool, drop_usage_event: bool) -> Self {
        let drop = is_sse && drop_usage_event;
        Self {
            sse: is_sse.then(|| SseParser::new(drop)),
            drop_usage_event: drop,
            plain: Vec::new(),
            tail: None,
            tally: Tally::default(),
            ended: false,
        }
    }

    /// Whether chunks may change size, so a `content-length` must go.
    pub fn rewrites_body(&self) -> bool {
        self.drop_usage_event
    }

    pub fn on_chunk(&mut self, chunk: &[u8]) -> Forward {
        let drop = self.drop_usage_event;
        match &mut self.sse {
            Some(parser) => {
                let tally = &mut self.tally;
                let out = parser.feed(chunk, &mut |e| tally.on_event(e, drop));
                if !drop || out == chunk {
                    Forward::Unchanged
                } else {
                    Forward::Replace(out)
                }
            }
            None => {
                let room = MAX_PLAIN_COPY.saturating_sub(self.plain.len());
                let (head, rest) = chunk.split_at(chunk.len().min(room));
                self.plain.extend_from_slice(head);
                if !rest.is_empty() {
                    let plain = &self.plain;
                    let tail =
                        self.tail.get_or_insert_with(|| plain[plain.len().saturating_sub(PLAIN_TAIL)..].to_vec());
                    tail.extend_from_slice(rest);
                    if tail.len() > 2 * PLAIN_TAIL {
                        tail.drain(..tail.len() - PLAIN_TAIL);
                    }
                }
                Forward::Unchanged
            }
        }
    }

    /// End of the response body (or of the request, for a client that left):
    /// bytes still held back, if any. Later calls do nothing.
    pub fn on_end(&mut self) -> Vec<u8> {
        if std::mem::replace(&mut self.ended, true) {
            return Vec::new();
        }
        let drop = self.drop_usage_event;
        match &mut self.sse {
            Some(parser) => {
                let tally = &mut self.tally;
                parser.finish(&mut |e| tally.on_event(e, drop))
            }
            None if self.tail.is_some() => {
                // Cut: the usage from the end, or nothing (charged its hold).
                if let Some(usage) = self.tail.as_deref().and_then(last_usage) {
                    self.tally.take_usage(&serde_json::json!({ "usage": usage }));
                }
                self.plain = Vec::new();
                self.tail = None;
                self.tally.cut = true;
                Vec::new()
            }
            None => {
                let fields = std::str::from_utf8(&self.plain).ok().and_then(|t| crate::body::Fields::parse(t).ok());
                if let Some(f) = fields {
                    // The answer's usage, read without building the rest; its text only when there is none.
                    let tree = |name: &str| f.get(name).and_then(|raw| serde_json::from_str::<Value>(raw).ok());
                    let top: serde_json::Map<String, Value> =
                        ["usage", "object", "id"].into_iter().filter_map(|n| Some((n.to_owned(), tree(n)?))).collect();
                    let top = Value::Object(top);
                    self.tally.take_response_id(&top);
                    if !self.tally.take_usage(&top) {
                        for c in tree("choices").as_ref().and_then(Value::as_array).into_iter().flatten() {
                            if let Some(m) = c.get("message") {
                                collect_choice_text(m, &mut self.tally.text);
                            }
                        }
                        for item in tree("output").as_ref().and_then(Value::as_array).into_iter().flatten() {
                            collect_output_item(item, &mut self.tally.text);
                        }
                        self.tally.bound_text();
                    }
                } else if let Ok(v) = serde_json::from_slice::<Value>(&self.plain) {
                    self.tally.take_usage(&v);
                    self.tally.take_response_id(&v);
                    for c in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
                        if let Some(m) = c.get("message") {
                            collect_choice_text(m, &mut self.tally.text);
                        }
                    }
                    for item in v.get("output").and_then(Value::as_array).into_iter().flatten() {
                        collect_output_item(item, &mut self.tally.text);
                    }
                    self.tally.bound_text();
                } else if self.tally.text.is_empty() {
                    // Not JSON (a truncated body): count what arrived.
                    self.tally.text = String::from_utf8_lossy(&self.plain).into_owned();
                    self.tally.bound_text();
                }
                self.plain = Vec::new();
                Vec::new()
            }
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.tally.usage
    }

    /// Generated text seen so far (at most `MAX_EXACT_BYTES` of it).
    pub fn output_text(&self) -> &str {
        &self.tally.text
    }

    /// Output tokens by the tiktoken fallback: the text kept, counted, plus
    /// what went beyond it, estimated.
    pub fn output_tokens(&self, encoding: Encoding) -> i64 {
        crate::tokens::count_text(encoding, &self.tally.text) + self.tally.beyond.div_ceil(2) as i64
    }

    /// The id of the response the upstream stored, if it was a Responses answer.
    pub fn response_id(&self) -> Option<&str> {
        self.tally.response_id.as_deref()
    }

    pub fn saw_error_event(&self) -> bool {
        self.tally.error_event
    }

    /// A plain answer longer than what is copied of it: without usage, its
    /// text cannot be counted and its hold is charged.
    pub fn was_cut(&self) -> bool {
        self.tally.cut || self.tail.is_some()
    }
}

/// The object after the last `"usage":` in a plain answer's last bytes (its
/// quotes are JSON's own: in a string they would be escaped).
fn last_usage(tail: &[u8]) -> Option<Value> {
    const NAME: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(NAME.len()).rposition(|w| w == NAME) {
        end = at;
        let escaped = tail[..at].iter().rev().take_while(|b| **b == b'\\').count() % 2 == 1;
        let rest = &tail[at + NAME.len()..];
        let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
        let Some(value) = rest.strip_prefix(b":") else { continue };
        if escaped {
            continue;
        }
        if let Some(Ok(v @ Value::Object(_))) = serde_json::Deserializer::from_slice(value).into_iter::<Value>().next()
        {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_borrowed_view_of_an_event_reads_what_the_tree_reads() {
        let events = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel\"lo"}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"read","arguments":"{\"a\":1}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"refusal":"no","reasoning_content":"hm"}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":3}}}"#,
            r#"{"choices":[],"prompt_filter_results":[{"prompt_index":0}]}"#,
            r#"{"type":"response.output_text.delta","delta":"wor\u0064"}"#,
            r#"{"type":"response.created","response":{"id":"resp_abc123","object":"response"}}"#,
            r#"{"type":"response.completed","response":{"id":"resp_abc123","usage":{"input_tokens":5,"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1}}}}"#,
            r#"{"type":"error","message":"overloaded"}"#,
            r#"{"error":{"message":"bad"}}"#,
            r#"{"error":null,"choices":null}"#,
        ];
        for drop in [false, true] {
            for e in events {
                let (mut view, mut tree) = (Tally::default(), Tally::default());
                let kept = view.on_view(e, drop).expect(e);
                assert_eq!(kept, tree.on_tree(e, drop), "{e}");
                assert_eq!(view, tree, "{e}");
            }
        }
        // What the view does not fit is read as a tree.
        let odd = r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}]}}]}"#;
        assert_eq!(Tally::default().on_view(odd, false), None);
    }

    fn chunk(content: &str) -> String {
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n")
    }
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n";
    const AZURE_FILTER: &str = "data: {\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\n";

    fn stream() -> String {
        format!("{AZURE_FILTER}{}{}{USAGE}data: [DONE]\n\n", chunk("Hel"), chunk("lo"))
    }

    fn run(meter: &mut ResponseMeter, body: &[u8], at: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in [&body[..at], &body[at..]] {
            match meter.on_chunk(part) {
                Forward::Unchanged => out.extend_from_slice(part),
                Forward::Replace(b) => out.extend(b),
            }
        }
        out.extend(meter.on_end());
        out
    }

    #[test]
    fn usage_is_taken_and_hidden_when_the_client_did_not_ask() {
        let body = stream();
        let want = body.replace(USAGE, "");
        for at in 0..=body.len() {
            let mut m = ResponseMeter::new(true, true);
            let out = run(&mut m, body.as_bytes(), at);
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {at}");
            assert_eq!(m.usage(), Some(Usage { input: 11, output: 7, ..Usage::default() }));
            assert_eq!(m.output_text(), "Hello");
        }
    }

    #[test]
    fn a_long_stream_without_usage_keeps_bounded_text_and_counts_all_of_it() {
        let mut m = ResponseMeter::new(true, false);
        let piece = "x".repeat(1_000);
        let n = crate::tokens::MAX_EXACT_BYTES / 1_000 + 300;
        for _ in 0..n {
            m.on_chunk(chunk(&piece).as_bytes());
        }
        m.on_end();
        assert!(m.output_text().len() <= crate::tokens::MAX_EXACT_BYTES, "kept {}", m.output_text().len());
        let kept = crate::tokens::count_text(Encoding::Cl100kBase, m.output_text());
        let rest = (n * 1_000 - m.output_text().len()).div_ceil(2) as i64;
        assert_eq!(m.output_tokens(Encoding::Cl100kBase), kept + rest);
    }

    #[test]
    fn usage_stays_when_the_client_asked() {
        let body = stream();
        let mut m = ResponseMeter::new(true, false);
        assert_eq!(run(&mut m, body.as_bytes(), 40), body.as_bytes());
        assert_eq!(m.usage(), Some(Usage { input: 11, output: 7, ..Usage::default() }));
    }

    #[test]
    fn a_stream_without_usage_leaves_the_text_to_count() {
        let body = format!("{}{}data: [DONE]\n\n", chunk("a"), chunk("b"));
        let mut m = ResponseMeter::new(true, true);
        assert_eq!(run(&mut m, body.as_bytes(), 10), body.as_bytes());
        assert_eq!((m.usage(), m.output_text()), (None, "ab"));
    }

    #[test]
    fn an_error_event_mid_stream_is_forwarded_and_noticed() {
        let body = format!("{}data: {{\"error\":{{\"message\":\"boom\"}}}}\n\n", chunk("a"));
        let mut m = ResponseMeter::new(true, true);
        assert_eq!(run(&mut m, body.as_bytes(), 5), body.as_bytes());
        assert!(m.saw_error_event());
    }

    #[test]
    fn a_responses_stream_is_metered_from_its_last_event_and_its_deltas() {
        let ev = |kind: &str, data: serde_json::Value| format!("event: {kind}\ndata: {data}\n\n");
        let created = ev(
            "response.created",
            serde_json::json!({"type": "response.created", "response": {"id": "resp_abc", "usage": null}}),
        );
        let text =
            ev("response.output_text.delta", serde_json::json!({"type": "response.output_text.delta", "delta": "Hi "}));
        let args = ev(
            "response.function_call_arguments.delta",
            serde_json::json!({"type": "response.function_call_arguments.delta", "delta": "{\"p\":1}"}),
        );
        for last in ["response.completed", "response.incomplete", "response.failed"] {
            let done = ev(
                last,
                serde_json::json!({"type": last, "response": {"usage": {
                "input_tokens": 12, "input_tokens_details": {"cached_tokens": 4},
                "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 21}}}),
            );
            let body = format!("{created}{text}{args}{done}");
            for at in [0, 7, body.len() / 2, body.len()] {
                let mut m = ResponseMeter::new(true, false);
                assert_eq!(run(&mut m, body.as_bytes(), at), body.as_bytes(), "forwarded untouched");
                assert_eq!(
                    m.usage(),
                    Some(Usage { input: 12, output: 9, cached: 4, reasoning: 5 }),
                    "{last} split at {at}"
                );
                assert_eq!(m.output_text(), "Hi {\"p\":1}");
                assert_eq!(m.response_id(), Some("resp_abc"));
                assert!(!m.saw_error_event());
            }
        }
        // Cut short: the deltas are left to count; an error event is noticed.
        let body = format!(
            "{created}{text}{}",
            ev("error", serde_json::json!({"type": "error", "code": "x", "message": "boom"}))
        );
        let mut m = ResponseMeter::new(true, false);
        run(&mut m, body.as_bytes(), 3);
        assert_eq!((m.usage(), m.output_text(), m.saw_error_event()), (None, "Hi ", true));
    }

    #[test]
    fn a_plain_responses_answer_gives_its_usage_and_output_text() {
        let body = br#"{"id":"resp_1","object":"response","output":[{"type":"reasoning","summary":[{"type":"summary_text","text":"think "}]},{"type":"function_call","name":"read","arguments":"{}","call_id":"c1"},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hello"}]}],"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}"#;
        let mut m = ResponseMeter::new(false, false);
        assert_eq!(run(&mut m, body, 30), body);
        assert_eq!(m.usage(), Some(Usage { input: 3, output: 2, ..Usage::default() }));
        assert_eq!(m.output_text(), "", "with usage there is nothing to count: the output is not read");
        assert_eq!(m.response_id(), Some("resp_1"));
        let without = String::from_utf8_lossy(body)
            .replace(r#","usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}"#, "");
        let mut m = ResponseMeter::new(false, false);
        run(&mut m, without.as_bytes(), 30);
        assert_eq!((m.usage(), m.output_text(), m.response_id()), (None, "think read{}Hello", Some("resp_1")));
    }

    #[test]
    fn chats_cached_and_reasoning_tokens_are_read_from_its_usage_details() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":12},"completion_tokens_details":{"reasoning_tokens":15}}}"#;
        let mut m = ResponseMeter::new(false, false);
        run(&mut m, body, 10);
        assert_eq!(m.usage(), Some(Usage { input: 30, output: 20, cached: 12, reasoning: 15 }));
    }

    #[test]
    fn plain_json_usage_and_text() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let mut m = ResponseMeter::new(false, true);
        assert_eq!(run(&mut m, body, 17), body);
        assert_eq!(m.usage(), Some(Usage { input: 3, output: 2, ..Usage::default() }));
        assert_eq!(m.output_text(), "", "with usage there is nothing to count");
        let without = br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}]}"#;
        let mut m = ResponseMeter::new(false, true);
        run(&mut m, without, 17);
        assert_eq!((m.usage(), m.output_text()), (None, "Hi there"));
    }

    /// 512 embeddings of 1,536 dimensions (11 MB; the issue's 2,048 of 3,072
    /// are 88 MB, more than the WASI test runner holds), as an upstream
    /// writes them: usage last.
    fn huge_embeddings(usage: bool) -> Vec<u8> {
        let vector = format!("[{}]", ["-0.0123456789"; 1536].join(","));
        let mut body = String::with_capacity(512 * (vector.len() + 50) + 200);
        body.push_str(r#"{"object":"list","data":["#);
        for i in 0..512 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#));
        }
        body.push_str(r#"],"model":"text-embedding-3-large""#);
        if usage {
            body.push_str(r#","usage":{"prompt_tokens":70000,"total_tokens":70000}"#);
        }
        body.push('}');
        body.into_bytes()
    }

    #[test]
    fn an_answer_beyond_the_copy_is_metered_from_its_end_and_copied_only_so_far() {
        let body = huge_embeddings(true);
        assert!(body.len() > 2 * MAX_PLAIN_COPY, "{} bytes", body.len());
        let mut m = ResponseMeter::new(false, false);
        for chunk in body.chunks(16 * 1024) {
            assert_eq!(m.on_chunk(chunk), Forward::Unchanged);
            assert!(m.plain.len() <= MAX_PLAIN_COPY && m.tail.as_ref().map_or(0, Vec::len) <= 2 * PLAIN_TAIL);
        }
        m.on_end();
        assert_eq!(m.usage(), Some(Usage { input: 70000, output: 0, ..Usage::default() }));
        // Without usage: nothing counted from a fragment, and the meter says it was cut.
        drop(body);
        let mut m = ResponseMeter::new(false, false);
        for chunk in huge_embeddings(false).chunks(1 << 20) {
            m.on_chunk(chunk);
        }
        m.on_end();
        assert_eq!((m.usage(), m.output_text(), m.was_cut()), (None, "", true));
        // A usage name inside a string, or escaped, is not the usage.
        assert_eq!(last_usage(br#"{"a":"x\"usage\":{\"prompt_tokens\":9}"}"#), None);
        assert_eq!(last_usage(br#""usage": {"prompt_tokens":2}}"#), Some(serde_json::json!({"prompt_tokens": 2})));
        let small = ResponseMeter::new(false, false);
        assert!(!small.was_cut());
    }
}
