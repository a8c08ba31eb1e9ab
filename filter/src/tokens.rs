//! Token counting with tiktoken, for requests whose upstream reported no usage
//! (client abort, truncated stream, an upstream that never reports it).
//!
//! The tokenizer takes 0.4-0.6 s to set up inside V8, so each VM builds it when
//! it is configured (`warm`), before it serves traffic, never on a request's
//! worker turn. Counting is bounded too: at most `MAX_EXACT_BYTES` of a text
//! are tokenized; the rest is estimated, so one fallback holds a worker for
//! tens of milliseconds at most, whatever a client sent or an upstream wrote.

use std::borrow::Cow;
use std::cell::OnceCell;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::config::Encoding;

thread_local! {
    static CL100K: OnceCell<Option<CoreBPE>> = const { OnceCell::new() };
    static O200K: OnceCell<Option<CoreBPE>> = const { OnceCell::new() };
}

/// Bytes of one text tokenized exactly (about 60 ms in V8); beyond, 2 bytes
/// a token, the admission estimate's rate, which errs high for text.
pub const MAX_EXACT_BYTES: usize = 256 * 1024;

fn with_bpe<T>(encoding: Encoding, f: impl FnOnce(Option<&CoreBPE>) -> T) -> T {
    let cell = match encoding {
        Encoding::Cl100kBase => &CL100K,
        Encoding::O200kBase => &O200K,
    };
    cell.with(|c| {
        f(c.get_or_init(|| match encoding {
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base().ok(),
            Encoding::O200kBase => tiktoken_rs::o200k_base().ok(),
        })
        .as_ref())
    })
}

/// Builds this VM's tokenizer now; whether its tables loaded.
pub fn warm(encoding: Encoding) -> bool {
    with_bpe(encoding, |bpe| bpe.is_some())
}

/// Tokens in `text`: exact for its first `MAX_EXACT_BYTES`, estimated beyond.
/// Falls back to a bytes/4 estimate only if the tokenizer's embedded tables
/// fail to load, which would be a build defect.
pub fn count_text(encoding: Encoding, text: &str) -> i64 {
    if text.is_empty() {
        return 0;
    }
    let mut cut = text.len().min(MAX_EXACT_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let beyond = (text.len() - cut).div_ceil(2) as i64;
    let exact = with_bpe(encoding, |bpe| match bpe {
        Some(bpe) => bpe.encode_ordinary(&text[..cut]).len() as i64,
        None => cut.div_ceil(4) as i64,
    });
    exact + beyond
}

fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        _ => {}
    }
}

/// Prompt tokens of a chat request, as OpenAI's cookbook counts them: three
/// tokens of framing per message, one per name, three to prime the reply, and
/// the tool definitions as their JSON text.
pub fn count_prompt(encoding: Encoding, body: &[u8]) -> i64 {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return count_text(encoding, &String::from_utf8_lossy(body));
    };
    let mut text = String::new();
    let mut framing = 3;
    for m in value["messages"].as_array().into_iter().flatten() {
        framing += 3;
        if let Some(role) = m["role"].as_str() {
            text.push_str(role);
            text.push('\n');
        }
        if let Some(name) = m["name"].as_str() {
            framing += 1;
            text.push_str(name);
            text.push('\n');
        }
        content_text(&m["content"], &mut text);
        for call in m["tool_calls"].as_array().into_iter().flatten() {
            text.push_str(call["function"]["name"].as_str().unwrap_or_default());
            text.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        text.push('\n');
    }
    // A Responses request: its instructions and input (a string or items).
    if let Some(instructions) = value["instructions"].as_str() {
        framing += 3;
        text.push_str(instructions);
        text.push('\n');
    }
    match &value["input"] {
        Value::String(s) => {
            framing += 3;
            text.push_str(s);
        }
        // Embeddings: strings, or token ids (each one token).
        Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            framing = 0;
            for item in items {
                match item {
                    Value::String(s) => text.push_str(s),
                    Value::Number(_) => framing += 1,
                    Value::Array(ids) => framing += ids.len() as i64,
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                framing += 3;
                if let Some(role) = item["role"].as_str() {
                    text.push_str(role);
                    text.push('\n');
                }
                collect_output_item(item, &mut text);
                text.push('\n');
            }
        }
        _ => {}
    }
    if let Some(tools) = value.get("tools").filter(|t| !t.is_null()) {
        text.push_str(&tools.to_string());
    }
    framing + count_text(encoding, &text)
}

/// Appends the text of one Responses API output (or input) item: a
/// message's text parts, a function call's name and arguments, a tool
/// output, a reasoning summary.
pub fn collect_output_item(item: &Value, out: &mut String) {
    match item.get("content") {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for part in parts {
                out.push_str(
                    part.get("text").or_else(|| part.get("refusal")).and_then(Value::as_str).unwrap_or_default(),
                );
            }
        }
        _ => {}
    }
    for field in ["name", "arguments"] {
        out.push_str(item.get(field).and_then(Value::as_str).unwrap_or_default());
    }
    match item.get("output") {
        Some(Value::String(s)) => out.push_str(s),
        Some(other @ (Value::Array(_) | Value::Object(_))) => out.push_str(&other.to_string()),
        _ => {}
    }
    for part in item.get("summary").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
    }
}

/// The generated text of one choice (`delta` in a stream, `message` in a
/// plain answer), borrowed where it has no escapes: what
/// [`collect_choice_text`] reads, without building a tree.
#[derive(serde::Deserialize)]
pub struct TextView<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallView<'a>>>,
}

#[derive(serde::Deserialize)]
struct ToolCallView<'a> {
    #[serde(borrow)]
    function: Option<FunctionView<'a>>,
}

#[derive(serde::Deserialize)]
struct FunctionView<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

impl TextView<'_> {
    /// Appends the text, in [`collect_choice_text`]'s order.
    pub fn collect(&self, out: &mut String) {
        for s in [&self.content, &self.refusal, &self.reasoning_content].into_iter().flatten() {
            out.push_str(s);
        }
        for f in self.tool_calls.iter().flatten().filter_map(|c| c.function.as_ref()) {
            out.push_str(f.name.as_deref().unwrap_or_default());
            out.push_str(f.arguments.as_deref().unwrap_or_default());
        }
    }
}

/// Appends the generated text of one choice (`delta` in a stream, `message` in
/// a plain response) to `out`: content, refusal, reasoning and tool calls.
pub fn collect_choice_text(part: &Value, out: &mut String) {
    for field in ["content", "refusal", "reasoning_content"] {
        if let Some(s) = part.get(field).and_then(Value::as_str) {
            out.push_str(s);
        }
    }
    for call in part.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        if let Some(f) = call.get("function") {
            out.push_str(f.get("name").and_then(Value::as_str).unwrap_or_default());
            out.push_str(f.get("arguments").and_then(Value::as_str).unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_prompt_counts_its_instructions_input_items_and_tools() {
        let e = Encoding::Cl100kBase;
        let plain = br#"{"input":"hello world"}"#;
        assert_eq!(count_prompt(e, plain), 3 + 3 + count_text(e, "hello world"));
        let body = br#"{"instructions":"be terse","input":[{"role":"user","content":[{"type":"input_text","text":"hello world"}]},{"type":"function_call","name":"read","arguments":"{}"},{"type":"function_call_output","output":"42"}],"tools":[{"type":"function","name":"read"}]}"#;
        let tools = r#"[{"name":"read","type":"function"}]"#;
        let text = format!("be terse\nuser\nhello world\nread{{}}\n42\n{tools}");
        assert_eq!(count_prompt(e, body), 3 + 3 + 3 * 3 + count_text(e, &text));
        // Embeddings: the strings' tokens, or the token ids given.
        assert_eq!(
            count_prompt(e, br#"{"input":["hello world","hello world"]}"#),
            count_text(e, "hello worldhello world")
        );
        assert_eq!(count_prompt(e, br#"{"input":[[1,2,3],[4]]}"#), 4);
    }

    #[test]
    fn counts_match_tiktoken() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, ""), 0);
    }

    #[test]
    fn long_text_is_counted_exactly_up_to_the_bound_and_estimated_beyond() {
        let unit = "hello world ";
        let text = unit.repeat(MAX_EXACT_BYTES / unit.len() + 5_000);
        let cut = MAX_EXACT_BYTES;
        let exact = count_text(Encoding::Cl100kBase, &text[..cut]);
        let beyond = (text.len() - cut).div_ceil(2) as i64;
        assert_eq!(count_text(Encoding::Cl100kBase, &text), exact + beyond);
        // The estimate errs high: more than tiktoken would count for the rest.
        assert!(
            beyond > count_text(Encoding::Cl100kBase, &text[cut..cut + 24_000]) * (text.len() - cut) as i64 / 24_000
        );
        // A cut inside a multi-byte character moves back to its start.
        let wide = "é".repeat(MAX_EXACT_BYTES);
        assert!(count_text(Encoding::Cl100kBase, &wide) > 0);
    }

    #[test]
    fn warming_loads_each_tokenizer_once() {
        assert!(warm(Encoding::Cl100kBase));
        assert!(warm(Encoding::O200kBase));
    }

    #[test]
    fn prompt_count_adds_the_framing() {
        let body = br#"{"messages":[{"role":"user","content":"hello world"}]}"#;
        let text_tokens = count_text(Encoding::Cl100kBase, "user\nhello world\n");
        assert_eq!(count_prompt(Encoding::Cl100kBase, body), 3 + 3 + text_tokens);
    }

    #[test]
    fn prompt_count_includes_tools_and_parts() {
        let plain = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#;
        let with_tools = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hello world"}]}],"tools":[{"type":"function","function":{"name":"read"}}]}"#;
        let a = count_prompt(Encoding::Cl100kBase, plain);
        let b = count_prompt(Encoding::Cl100kBase, with_tools);
        assert!(a > 6 && b > a, "{a} {b}");
    }

    #[test]
    fn choice_text_covers_content_and_tool_calls() {
        let delta: Value = serde_json::from_str(
            r#"{"content":"Hi","tool_calls":[{"index":0,"function":{"name":"read","arguments":"{\"path\":"}}]}"#,
        )
        .unwrap();
        let mut out = String::new();
        collect_choice_text(&delta, &mut out);
        assert_eq!(out, "Hiread{\"path\":");
    }
}
