//! Property tests (many generated cases) of the two parsers that see untrusted
//! bytes: the SSE parser and the request body rewriter. Failing cases are
//! saved beside this file (`properties.proptest-regressions`) and replayed first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use openclaw_filter::config::PluginConfig;
use openclaw_filter::request::{admit, Endpoint};
use openclaw_filter::sse::{Event, SseParser};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// One SSE event as the upstream might frame it.
#[derive(Debug, Clone)]
struct Frame {
    data_lines: Vec<String>,
    comment: Option<String>,
    eol: &'static str,
}

impl Frame {
    fn bytes(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.comment {
            s.push(':');
            s.push_str(c);
            s.push_str(self.eol);
        }
        for d in &self.data_lines {
            s.push_str("data: ");
            s.push_str(d);
            s.push_str(self.eol);
        }
        s.push_str(self.eol);
        s
    }
    fn data(&self) -> String {
        self.data_lines.join("\n")
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        prop::collection::vec("[^\r\n]{0,40}", 1..4),
        prop::option::of("[^\r\n]{0,10}"),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
    )
        .prop_map(|(data_lines, comment, eol)| Frame { data_lines, comment, eol })
}

fn feed_in_pieces(p: &mut SseParser, input: &[u8], cuts: &[usize], keep: &mut dyn FnMut(&Event) -> bool) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for c in cuts.into_iter().chain(std::iter::once(input.len())) {
        out.extend(p.feed(&input[last..c], keep));
        last = c;
    }
    out.extend(p.finish(keep));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn sse_events_do_not_depend_on_chunking(frames in prop::collection::vec(frame(), 1..8),
                                            cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let input: String = frames.iter().map(Frame::bytes).collect();
        let mut seen = Vec::new();
        let mut p = SseParser::new(true);
        let out = feed_in_pieces(&mut p, input.as_bytes(), &cuts, &mut |e| { seen.push(e.data.clone()); true });
        let want: Vec<String> = frames.iter().map(Frame::data).collect();
        prop_assert_eq!(seen, want);
        prop_assert_eq!(out, input.as_bytes().to_vec());
    }

    #[test]
    fn dropping_an_event_removes_exactly_its_bytes(frames in prop::collection::vec(frame(), 1..8),
                                                   victim in any::<usize>(),
                                                   cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let victim = victim % frames.len();
        let input: String = frames.iter().map(Frame::bytes).collect();
        let want: String = frames.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, f)| f.bytes()).collect();
        let mut index = 0;
        let mut p = SseParser::new(true);
        let out = feed_in_pieces(&mut p, input.as_bytes(), &cuts, &mut |_| { index += 1; index - 1 != victim });
        prop_assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[test]
    fn arbitrary_bytes_never_break_the_parser(input in prop::collection::vec(any::<u8>(), 0..400),
                                              cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut p = SseParser::new(false);
        let out = feed_in_pieces(&mut p, &input, &cuts, &mut |_| true);
        prop_assert_eq!(out, input);
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1.0e6f64..1.0e6).prop_map(|f| json!(f)),
        "[^\u{0}]{0,20}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

fn cfg() -> PluginConfig {
    PluginConfig::from_json(br#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d"}"#).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_rewrite_only_adds_include_usage_and_the_output_cap(
        extra in prop::collection::btree_map("[a-z]{1,10}", json_value(), 0..6),
        content in "[^\u{0}]{0,200}",
        stream in any::<bool>(),
        client_max in prop::option::of(1i64..100_000),
        pretty in any::<bool>(),
    ) {
        let mut body = Map::new();
        for (k, v) in extra {
            if !["messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"].contains(&k.as_str()) {
                body.insert(k, v);
            }
        }
        body.insert("messages".into(), json!([{"role": "user", "content": content}]));
        body.insert("stream".into(), json!(stream));
        if let Some(m) = client_max {
            body.insert("max_tokens".into(), json!(m));
        }
        let original = Value::Object(body);
        let bytes = if pretty { serde_json::to_vec_pretty(&original) } else { serde_json::to_vec(&original) }.unwrap();
        let a = admit(&bytes, &cfg(), Endpoint::Chat).unwrap();
        prop_assert!(a.estimate > 0);
        match a.rewritten {
            None => prop_assert!(!stream && client_max.is_some()),
            Some(new) => {
                prop_assert!(stream || client_max.is_none());
                // Spliced, not re-encoded: the client's bytes up to its closing brace reach the upstream as sent.
                prop_assert!(new.starts_with(&bytes[..bytes.len() - 1]));
                let mut rewritten: Value = serde_json::from_slice(&new).unwrap();
                let fields = rewritten.as_object_mut().unwrap();
                let usage = fields.remove("stream_options");
                prop_assert_eq!(usage.is_some(), stream);
                if stream {
                    prop_assert_eq!(&usage.unwrap()["include_usage"], &json!(true));
                }
                // The cap is what the hold reserved for output, set only when the client named none.
                let cap = fields.remove("max_completion_tokens");
                prop_assert_eq!(cap, client_max.is_none().then(|| json!(cfg().default_output_reservation)));
                prop_assert_eq!(rewritten, original);
            }
        }
    }

    #[test]
    fn arbitrary_bodies_get_an_answer_not_a_panic(input in prop::collection::vec(any::<u8>(), 0..300)) {
        match admit(&input, &cfg(), Endpoint::Chat) {
            Ok(a) => prop_assert!(a.estimate > 0),
            Err(reply) => {
                prop_assert_eq!(reply.status, 400);
                let v: Value = serde_json::from_slice(&reply.body).unwrap();
                prop_assert!(v["error"]["message"].is_string());
            }
        }
    }
}
