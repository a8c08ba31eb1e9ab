//! `POST /v1/responses` through the built `.wasm` in real Envoy, with the real
//! sidecar and the mock upstream: plain and streamed, with a function call
//! round trip, on an Azure and an OpenAI-style upstream; each billed exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bridge_tests::stack::{Stack, StackOptions, UPSTREAM_KEY};
use mongodb::bson::Document;
use serde_json::{json, Value};

fn total(row: &Document) -> i64 {
    row.get_i64("total_tokens").unwrap()
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned()
}

fn responses(s: &Stack, key: &str, body: &Value) -> reqwest::RequestBuilder {
    s.http.post(format!("{}/v1/responses", s.base)).bearer_auth(key).json(body)
}

/// `(event, data)` of each event of a Responses stream.
fn named_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let field = |name: &str| e.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_owned();
            (field("event: "), serde_json::from_str(&field("data: ")).unwrap())
        })
        .collect()
}

const TOOLS: &str = r#"[{"type": "function", "name": "read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]"#;

async fn billed_exactly(provider: &'static str) {
    let s = Stack::start(StackOptions { provider, ..StackOptions::default() }).await;
    let key = "sk-responses-user-01";
    s.create_key(key, 100_000).await;
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let mut spent = 0;
    let (path, auth) = match provider {
        "azure" => ("/openai/v1/responses", (Some(UPSTREAM_KEY.to_owned()), None)),
        _ => ("/v1/responses", (None, Some(format!("Bearer {UPSTREAM_KEY}")))),
    };

    // Plain, with tools: the model calls one; no maximum named, so the
    // output is capped at what the hold reserved.
    let body = json!({"model": "my-agent-model", "input": "read hello.txt", "tools": tools});
    let resp = responses(&s, key, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["output"][0]["type"], "function_call", "{answer}");
    let seen = s.served().await.pop().unwrap();
    assert_eq!(seen.path, path);
    assert_eq!((seen.api_key_header, seen.authorization), auth, "the upstream's key, never the client's");
    assert_eq!(seen.body["model"], "gpt-5-nano", "the deployment or configured model");
    assert_eq!(seen.body["max_output_tokens"], 4096, "capped at the output the hold reserved");
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_i64("input_tokens").unwrap(), answer["usage"]["input_tokens"].as_i64().unwrap());
    assert_eq!(row.get_i64("output_tokens").unwrap(), answer["usage"]["output_tokens"].as_i64().unwrap());
    assert_eq!((row.get_str("usage_source"), row.get_bool("stream")), (Ok("upstream"), Ok(false)));
    assert_eq!(row.get_str("model"), Ok("my-agent-model"), "the audit row keeps the name the client sent");
    spent += total(&row);

    // Streamed, the call's output sent back: the events reach the client as
    // sent, and the usage of `response.completed` is what is charged.
    let call = &answer["output"][0];
    let body = json!({"model": "gpt-5-nano", "stream": true, "tools": tools, "max_output_tokens": 100, "input": [
        {"role": "user", "content": "read hello.txt"},
        {"type": "function_call", "call_id": call["call_id"], "name": call["name"], "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "the secret is 4711"},
    ]});
    let resp = responses(&s, key, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let evs = named_events(&resp.text().await.unwrap());
    let (last, done) = evs.last().unwrap();
    assert_eq!(last, "response.completed");
    let text: String = evs
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "the secret is 4711");
    let seen = s.served().await.pop().unwrap();
    assert_eq!(seen.body["max_output_tokens"], 100, "the client's maximum, as sent");
    assert_eq!(seen.body.get("stream_options"), None);
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_i64("input_tokens").unwrap(), done["response"]["usage"]["input_tokens"].as_i64().unwrap());
    assert_eq!(row.get_i64("output_tokens").unwrap(), seen.completion_tokens);
    assert_eq!((row.get_str("usage_source"), row.get_bool("stream")), (Ok("upstream"), Ok(true)));
    spent += total(&row);

    // Cut by its maximum: `response.incomplete` carries the usage too.
    let body = json!({"model": "gpt-5-nano", "stream": true, "max_output_tokens": 2, "input": "say a lot"});
    let resp = responses(&s, key, &body).header("x-mock-words", "40").send().await.unwrap();
    let id = request_id(&resp);
    let evs = named_events(&resp.text().await.unwrap());
    assert_eq!(evs.last().unwrap().0, "response.incomplete");
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_i64("output_tokens").unwrap(), 2);
    spent += total(&row);

    // No usage at all (an upstream that never says): tiktoken counts the
    // input and the streamed deltas, and a model that reasons (gpt-5-nano)
    // pays its hold, as its unseen reasoning tokens could have used it.
    let body = json!({"model": "gpt-5-nano", "stream": true, "max_output_tokens": 50, "input": "hello there"});
    let resp = responses(&s, key, &body).header("x-mock-scenario", "no_usage").send().await.unwrap();
    let id = request_id(&resp);
    resp.text().await.unwrap();
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("estimate"));
    assert_eq!(total(&row), row.get_i64("reserved_tokens").unwrap(), "{row:?}");
    assert!(row.get_i64("output_tokens").unwrap() >= 5, "never less than the text seen: {row:?}");
    spent += total(&row);

    // Bad input: an OpenAI error naming the field, nothing upstream, nothing charged.
    let before = s.served().await.len();
    let resp = responses(&s, key, &json!({"model": "gpt-5-nano", "input": 42})).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "input", "{err}");
    assert_eq!(s.served().await.len(), before);

    assert_eq!(s.audit_rows(key).await.len(), 4, "one row per admitted request");
    assert_eq!(s.settled_balance(key).await, 100_000 - spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_billed_exactly_on_azure() {
    billed_exactly("azure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_billed_exactly_on_an_openai_style_upstream() {
    billed_exactly("openai").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_read_and_deleted_by_the_key_that_made_it_only() {
    let s = Stack::start(StackOptions::default()).await;
    let (owner, other) = ("sk-responses-owner-1", "sk-responses-other-1");
    s.create_key(owner, 100_000).await;
    s.create_key(other, 100_000).await;
    // One plain, one streamed: each response's id is the owner's.
    let mut ids = Vec::new();
    for stream in [false, true] {
        let body = json!({"model": "gpt-5-nano", "input": "remember this", "max_output_tokens": 20, "stream": stream});
        let resp = responses(&s, owner, &body).send().await.unwrap();
        let request = request_id(&resp);
        let text = resp.text().await.unwrap();
        let id = if stream {
            named_events(&text)[0].1["response"]["id"].as_str().unwrap().to_owned()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_owned()
        };
        let row = s.settled_row(&request).await;
        assert_eq!(row.get_str("endpoint"), Ok("responses"));
        ids.push(id);
    }
    let balance = s.settled_balance(owner).await;
    let call = |method: reqwest::Method, key: &'static str, path: String| {
        let req = s.http.request(method, format!("{}{path}", s.base)).bearer_auth(key);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for id in &ids {
        // Another key gets a 404, as for a response that does not exist; nothing reaches the upstream.
        let before = s.served().await.len();
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/responses/{id}")),
            (reqwest::Method::GET, format!("/v1/responses/{id}/input_items")),
            (reqwest::Method::POST, format!("/v1/responses/{id}/cancel")),
            (reqwest::Method::DELETE, format!("/v1/responses/{id}")),
        ] {
            let (status, body) = call(method, other, path.clone()).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(body["error"]["message"].as_str().unwrap().contains(id.as_str()), "{body}");
        }
        assert_eq!(s.served().await.len(), before, "another key's ask never reaches the upstream");
        // The owner reads it, lists its input items, deletes it.
        let (status, body) = call(reqwest::Method::GET, owner, format!("/v1/responses/{id}")).await;
        assert_eq!((status, body["id"].as_str()), (200, Some(id.as_str())), "{body}");
        let (status, body) = call(reqwest::Method::GET, owner, format!("/v1/responses/{id}/input_items?limit=5")).await;
        assert_eq!((status, body["object"].as_str()), (200, Some("list")), "{body}");
        let (status, body) = call(reqwest::Method::DELETE, owner, format!("/v1/responses/{id}")).await;
        assert_eq!((status, body["deleted"].as_bool()), (200, Some(true)), "{body}");
        let seen = s.served().await;
        let last = seen.last().unwrap();
        assert_eq!(last.path, format!("/openai/v1/responses/{id}"));
    }
    // Made up, or without a key.
    assert_eq!(call(reqwest::Method::GET, owner, "/v1/responses/resp_made_up".into()).await.0, 404);
    let resp = s.http.get(format!("{}/v1/responses/{}", s.base, ids[0])).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // A made-up key gets 401, as on every other endpoint (never 404).
    let (status, body) = call(reqwest::Method::GET, "sk-made-up-key-000009", format!("/v1/responses/{}", ids[0])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{body}");
    // None of it is billed.
    assert_eq!(s.settled_balance(owner).await, balance);
    assert_eq!(s.audit_rows(owner).await.len(), 2);
    assert!(s.audit_rows(other).await.is_empty());
    // A frozen owner is refused its own responses too.
    s.patch_key(owner, json!({"status": "frozen"})).await;
    let mut frozen = (0, Value::Null);
    for _ in 0..50 {
        frozen = call(reqwest::Method::GET, owner, format!("/v1/responses/{}", ids[1])).await;
        if frozen.0 == 403 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!((frozen.0, frozen.1["error"]["code"].as_str()), (403, Some("key_frozen")), "{}", frozen.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_is_continued_by_the_key_that_made_it_only_and_unpriced_fields_never_reach_the_upstream() {
    let s = Stack::start(StackOptions::default()).await;
    let (owner, other) = ("sk-responses-owner-2", "sk-responses-other-2");
    s.create_key(owner, 100_000).await;
    s.create_key(other, 100_000).await;
    let made = json!({"model": "gpt-5-nano", "input": "remember 7", "max_output_tokens": 20});
    let resp = responses(&s, owner, &made).send().await.unwrap();
    let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // At once, before its settlement: the owner continues it.
    let follow =
        json!({"model": "gpt-5-nano", "input": "which number?", "previous_response_id": id, "max_output_tokens": 20});
    let resp = responses(&s, owner, &follow).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let continued = request_id(&resp);
    let before = s.served().await.len();
    // Another key: 404, and the upstream never sees it.
    let resp = responses(&s, other, &follow).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["error"]["param"].as_str(), v["error"]["code"].as_str()),
        (Some("previous_response_id"), Some("previous_response_not_found"))
    );
    // Fields that cost beyond the tokens, or name the operator's account's objects: 400, naming them.
    for (body, param) in [
        (json!({"model": "gpt-5-nano", "input": "x", "background": true}), "background"),
        (json!({"model": "gpt-5-nano", "input": "x", "tools": [{"type": "web_search"}]}), "tools[0].type"),
        (json!({"model": "gpt-5-nano", "input": "x", "conversation": "conv_1"}), "conversation"),
        (json!({"model": "gpt-5-nano", "input": "x", "service_tier": "priority"}), "service_tier"),
        (json!({"model": "gpt-5-nano", "input": [{"type": "item_reference", "id": "msg_1"}]}), "input[0].type"),
    ] {
        let resp = responses(&s, owner, &body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["code"].as_str().unwrap().starts_with("unsupported_"), "{v}");
    }
    assert_eq!(s.served().await.len(), before, "none of them reached the upstream");
    let row = s.settled_row(&continued).await;
    assert_eq!(row.get_str("usage_source"), Ok("upstream"));
    assert!(s.audit_rows(other).await.is_empty(), "nothing billed to the other key");
}
