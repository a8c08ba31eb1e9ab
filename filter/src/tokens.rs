//! Token counting with tiktoken, for requests whose upstream reported no usage
//! (client abort, truncated stream, an upstream that never reports it).
//!
//! The tokenizer takes 0.4-0.6 s to set up inside V8, so it is built lazily, once
//! per VM, on the first fallback; requests with upstream usage never pay for it.

use std::cell::OnceCell;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::config::Encoding;

thread_local! {
    static CL100K: OnceCell<Option<CoreBPE>> = const { OnceCell::new() };
    static O200K: OnceCell<Option<CoreBPE>> = const { OnceCell::new() };
}

/// Tokens in `text`. Falls back to a bytes/4 estimate only if the tokenizer's
/// embedded tables fail to load, which would be a build defect.
pub fn count_text(encoding: Encoding, text: &str) -> i64 {
    if text.is_empty() {
        return 0;
    }
    let cell = match encoding {
        Encoding::Cl100kBase => &CL100K,
        Encoding::O200kBase => &O200K,
    };
    cell.with(|c| {
        let bpe = c.get_or_init(|| match encoding {
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base().ok(),
            Encoding::O200kBase => tiktoken_rs::o200k_base().ok(),
        });
        match bpe {
            Some(bpe) => bpe.encode_ordinary(text).len() as i64,
            None => text.len().div_ceil(4) as i64,
        }
    })
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
    if let Some(tools) = value.get("tools").filter(|t| !t.is_null()) {
        text.push_str(&tools.to_string());
    }
    framing + count_text(encoding, &text)
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
    fn counts_match_tiktoken() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200kBase, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100kBase, ""), 0);
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
