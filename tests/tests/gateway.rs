//! The built `.wasm` in a real Envoy, with the real sidecar on the MongoDB-wire
//! server and the mock upstream. Every test checks the balance and the audit
//! rows, not only the status code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bridge_tests::stack::{Stack, StackOptions, ADMIN_TOKEN, UPSTREAM_KEY};
use futures::StreamExt;
use openclaw_filter::config::Encoding;
use openclaw_filter::tokens::{count_prompt, count_text};
use serde_json::{json, Value};

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-bridge-request-id")
        .unwrap_or_else(|| panic!("no x-bridge-request-id in {:?}", resp.headers()))
        .to_str()
        .unwrap()
        .to_owned()
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

/// Status of a request sent byte for byte (no client-side path normalisation).
async fn raw_status(base: &str, method: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 64];
    let n = conn.read(&mut head).await.unwrap();
    let line = String::from_utf8_lossy(&head[..n]).to_string();
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {line:?}"))
}

/// A slow streamed answer the client leaves after its third word; its request id.
async fn leave_mid_stream(s: &Stack, key: &str, prompt: &str) -> String {
    let resp = s
        .chat(key, &json!({"model": "gpt-5-nano", "stream": true, "messages": messages(prompt)}))
        .header("x-mock-scenario", "slow")
        .header("x-mock-words", "60")
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("word2 ") {
        got.extend(stream.next().await.unwrap().unwrap());
    }
    drop(stream); // the client goes away mid-answer
    id
}

fn not_reasoning() -> Vec<(String, String)> {
    vec![("LLM_REASONING".into(), "0".into())]
}

fn total(row: &mongodb::bson::Document) -> i64 {
    row.get_i64("total_tokens").unwrap()
}

fn messages(text: &str) -> Value {
    json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_streamed_requests_are_billed_exactly() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-gateway-user-001";
    s.create_key(key, 100_000).await;
    let mut spent = 0;

    // Plain JSON: usage straight from the upstream's body.
    let resp = s.chat(key, &json!({"model": "gpt-5-nano", "messages": messages("hi")})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    let usage = &body["usage"];
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_i64("input_tokens").unwrap(), usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(row.get_i64("output_tokens").unwrap(), usage["completion_tokens"].as_i64().unwrap());
    assert_eq!(
        (row.get_str("usage_source"), row.get_bool("stream"), row.get_i32("status_code")),
        (Ok("upstream"), Ok(false), Ok(200))
    );
    assert_eq!(row.get_str("model"), Ok("gpt-5-nano"));
    spent += total(&row);

    // Streamed, the client did not ask for usage (as OpenClaw to a remote base URL):
    // the filter asks the upstream for it and hides the usage event from the client.
    let resp = s
        .chat(key, &json!({"model": "gpt-5-nano", "stream": true, "messages": messages("stream please")}))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    let evs = events(&text);
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"));
    assert!(evs.iter().all(|e| !e.contains("\"prompt_tokens\"")), "usage leaked to a client that did not ask: {text}");
    let served = s.served().await;
    let seen = served.last().unwrap();
    assert!(seen.include_usage, "the filter must ask the upstream for usage");
    assert_eq!(seen.api_key_header.as_deref(), Some(UPSTREAM_KEY));
    assert_eq!(seen.authorization, None, "the client's key must not reach the upstream");
    assert_eq!(seen.accept_encoding, None, "the answer must come uncompressed for metering");
    assert!(seen.path.starts_with("/openai/deployments/gpt-5-nano/chat/completions"), "{}", seen.path);
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_i64("input_tokens").unwrap(), seen.prompt_tokens);
    assert_eq!(row.get_i64("output_tokens").unwrap(), seen.completion_tokens);
    assert_eq!((row.get_str("usage_source"), row.get_bool("stream")), (Ok("upstream"), Ok(true)));
    spent += total(&row);

    // Streamed, the client asked: it gets the usage event, byte for byte.
    let resp = s
        .chat(
            key,
            &json!({"model": "gpt-5-nano", "stream": true, "stream_options": {"include_usage": true},
            "messages": messages("with usage")}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    let usage_event: Value = events(&text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage event in {text}"));
    let row = s.settled_row(&id).await;
    assert_eq!(total(&row), usage_event["usage"]["total_tokens"].as_i64().unwrap());
    spent += total(&row);

    // A tool call round trip, streamed.
    let tools = json!([{"type": "function", "function": {"name": "read", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]);
    let resp = s
        .chat(
            key,
            &json!({"model": "gpt-5-nano", "stream": true, "tools": tools, "tool_choice": "auto",
            "max_completion_tokens": 500, "messages": messages("read hello.txt")}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"tool_calls\""), "{text}");
    spent += total(&s.settled_row(&id).await);

    assert_eq!(s.settled_balance(key).await, 100_000 - spent);
    assert_eq!(s.open_holds(key).await, 0);
    assert_eq!(s.audit_rows(key).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_usage_tiktoken_counts_and_upstream_errors_pass_through() {
    // A model that does not reason: tiktoken's count of what it wrote is its bill.
    let s = Stack::start(StackOptions { extra_env: not_reasoning(), ..StackOptions::default() }).await;
    let key = "sk-gateway-user-002";
    s.create_key(key, 100_000).await;

    // An upstream that never reports usage: tiktoken over the prompt and the output.
    let body = json!({"model": "gpt-5-nano", "stream": true, "messages": messages("count me")});
    let resp = s.chat(key, &body).header("x-mock-scenario", "no_usage").send().await.unwrap();
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("tiktoken"));
    // What the upstream received is what tiktoken counts (the filter added stream_options).
    let served = s.served().await.last().unwrap().body.clone();
    // It named no maximum: it went upstream capped at the output its hold reserved.
    assert_eq!(served["max_completion_tokens"], 4096);
    let sent = serde_json::to_vec(&served).unwrap();
    assert_eq!(row.get_i64("input_tokens").unwrap(), count_prompt(Encoding::Cl100kBase, &sent));
    assert_eq!(
        row.get_i64("output_tokens").unwrap(),
        count_text(Encoding::Cl100kBase, "word0 word1 word2 word3 word4 ")
    );
    let mut spent = total(&row);

    // Upstream 4xx and 5xx reach the client unchanged and cost nothing.
    for (scenario, status, code) in [("error_400", 400, "mock_400"), ("error_500", 500, "mock_500")] {
        let resp = s.chat(key, &body).header("x-mock-scenario", scenario).send().await.unwrap();
        assert_eq!(resp.status(), status);
        let id = request_id(&resp);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code);
        let row = s.settled_row(&id).await;
        assert_eq!((total(&row), row.get_i32("status_code").unwrap()), (0, i32::from(status)));
    }

    // An error event mid-stream is forwarded; what streamed before it is charged.
    let resp = s.chat(key, &body).header("x-mock-scenario", "midstream_error").send().await.unwrap();
    let id = request_id(&resp);
    let text = resp.text().await.unwrap();
    assert!(text.contains("mock_midstream"), "{text}");
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("tiktoken"));
    assert!(row.get_i64("output_tokens").unwrap() > 0);
    spent += total(&row);

    assert_eq!(s.settled_balance(key).await, 100_000 - spent);
    assert_eq!(s.open_holds(key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_abort_mid_stream_is_settled_for_what_was_streamed() {
    // A model that does not reason: tiktoken's count of what it wrote is its bill.
    let s = Stack::start(StackOptions { extra_env: not_reasoning(), ..StackOptions::default() }).await;
    let key = "sk-gateway-user-003";
    s.create_key(key, 100_000).await;
    let id = leave_mid_stream(&s, key, "a long answer").await;
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("tiktoken"));
    let output = row.get_i64("output_tokens").unwrap();
    assert!(output >= 3, "at least what the client saw is charged: {output}");
    assert!(
        output < count_text(Encoding::Cl100kBase, "word0 word1 word2 word3 word4 "),
        "not the whole answer: {output}"
    );
    assert!(row.get_i64("input_tokens").unwrap() > 0);
    assert_eq!(s.settled_balance(key).await, 100_000 - total(&row));
    assert_eq!(s.open_holds(key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_input_get_openai_errors_and_cost_nothing() {
    let s = Stack::start(StackOptions { max_body_bytes: Some(64 * 1024), ..StackOptions::default() }).await;
    let good = json!({"model": "gpt-5-nano", "messages": messages("hi")});
    s.create_key("sk-frozen-user-01", 10_000).await;
    s.patch_key("sk-frozen-user-01", json!({"status": "frozen"})).await;
    s.create_key("sk-broke-user-001", 10).await;
    s.create_key("sk-fine-user-0001", 10_000).await;

    let check = |status: u16, code: Option<&'static str>, param: Option<&'static str>| {
        move |resp_status: u16, v: Value| {
            assert_eq!(resp_status, status, "{v}");
            let e = v["error"].as_object().unwrap_or_else(|| panic!("not an OpenAI error: {v}"));
            for f in ["message", "type", "param", "code"] {
                assert!(e.contains_key(f), "{v}");
            }
            if let Some(c) = code {
                assert_eq!(v["error"]["code"], c, "{v}");
            }
            if let Some(p) = param {
                assert_eq!(v["error"]["param"], p, "{v}");
            }
        }
    };
    let send = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let url = format!("{}/v1/chat/completions", s.base);

    let (st, v) = send(s.chat("sk-unknown-user-1", &good)).await;
    check(401, Some("invalid_api_key"), None)(st, v);
    let (st, v) = send(s.http.post(&url).json(&good)).await;
    check(401, Some("invalid_api_key"), None)(st, v);
    let (st, v) = send(s.http.post(&url).header("authorization", "Basic abc").json(&good)).await;
    check(401, Some("invalid_api_key"), None)(st, v);
    let (st, v) = send(s.chat("sk-frozen-user-01", &good)).await;
    check(403, Some("key_frozen"), None)(st, v);
    let (st, v) = send(s.chat("sk-broke-user-001", &good)).await;
    check(429, Some("insufficient_quota"), None)(st, v);

    let fine = "sk-fine-user-0001";
    let raw =
        |body: &'static str| s.http.post(&url).bearer_auth(fine).header("content-type", "application/json").body(body);
    let (st, v) = send(raw("{not json")).await;
    check(400, None, None)(st, v);
    let (st, v) = send(raw(r#"{"model":"gpt-5-nano"}"#)).await;
    check(400, None, Some("messages"))(st, v);
    let (st, v) = send(raw(r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#)).await;
    check(400, None, Some("stream"))(st, v);
    let (st, v) = send(s.http.post(&url).bearer_auth(fine).body(vec![0xff, 0xfe, 0x00])).await;
    check(400, None, None)(st, v);
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(100 * 1024)}]});
    let (st, v) = send(s.chat(fine, &huge)).await;
    check(413, Some("request_too_large"), None)(st, v);
    let (st, v) = send(s.http.post(format!("{}/v1/audio/speech", s.base)).bearer_auth(fine).json(&good)).await;
    check(404, Some("unknown_url"), None)(st, v);
    let (st, v) = send(s.http.get(&url).bearer_auth(fine)).await;
    check(405, Some("method_not_allowed"), None)(st, v);
    // The upstream routes are closed to anything the filter did not admit,
    // even with the filter's own route marker forged.
    let (st, v) = send(
        s.http
            .post(format!("{}/openai/deployments/gpt-5-nano/chat/completions?api-version=x", s.base))
            .header("x-openclaw-bridge-route", "upstream")
            .json(&good),
    )
    .await;
    check(404, None, None)(st, v);

    // Deeply nested JSON is refused, not recursed into.
    let nested = format!("{{\"messages\":{}1{}}}", "[".repeat(5000), "]".repeat(5000));
    let (st, v) =
        send(s.http.post(&url).bearer_auth(fine).header("content-type", "application/json").body(nested)).await;
    check(400, None, None)(st, v);
    // Odd headers: a key with spaces, an empty bearer, a header-injection attempt.
    for auth in ["Bearer sk-fine user-0001", "Bearer ", "Bearer\tsk-fine-user-0001"] {
        let (st, v) = send(s.http.post(&url).header("authorization", auth).json(&good)).await;
        check(401, Some("invalid_api_key"), None)(st, v);
    }
    // The sidecar's internal API is not reachable through the public listener,
    // also with dot segments sent as they are.
    let (st, v) = send(s.http.post(format!("{}/internal/reserve", s.base)).json(&good)).await;
    check(404, None, None)(st, v);
    for raw_path in ["/admin/../internal/settle", "/admin/%2e%2e/internal/settle", "/v1/../internal/reserve"] {
        let status = raw_status(&s.base, "POST", raw_path).await;
        assert_eq!(status, 404, "{raw_path}");
    }
    for (method, path) in [("PATCH", "/admin/keys/..%2F..%2Finternal%2Fsettle"), ("GET", "/admin/keys/%00")] {
        let status = raw_status(&s.base, method, path).await;
        assert!(matches!(status, 400 | 401 | 404), "{method} {path}: {status}");
    }

    // The model list answers locally.
    let (st, v) = send(s.http.get(format!("{}/v1/models", s.base)).bearer_auth(fine)).await;
    assert_eq!((st, v["data"][0]["id"].as_str()), (200, Some("gpt-5-nano")), "{v}");

    assert!(s.served().await.is_empty(), "nothing refused may reach the upstream");
    for key in ["sk-frozen-user-01", "sk-broke-user-001", fine] {
        assert!(s.audit_rows(key).await.is_empty(), "{key} has audit rows");
        assert_eq!(s.open_holds(key).await, 0);
    }
    assert_eq!(s.settled_balance(fine).await, 10_000);
    assert_eq!(s.settled_balance("sk-broke-user-001").await, 10);

    // The gateway still serves after all that.
    let resp = s.chat(fine, &good).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let row = s.settled_row(&request_id(&resp)).await;
    assert_eq!(s.settled_balance(fine).await, 10_000 - total(&row));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_sidecar_down_clients_get_503_and_queued_settlements_arrive_later() {
    let mut s = Stack::start(StackOptions::default()).await;
    let key = "sk-gateway-user-005";
    s.create_key(key, 100_000).await;
    // A key with no lease yet: its next request needs the sidecar.
    let idle = "sk-gateway-user-05b";
    s.create_key(idle, 100_000).await;
    // Admitted while the sidecar is up; it goes down while the answer streams.
    let resp = s
        .chat(key, &json!({"model": "gpt-5-nano", "stream": true, "messages": messages("slow")}))
        .header("x-mock-scenario", "slow")
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    s.stop_sidecar();
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));

    let resp = s.chat(idle, &json!({"messages": messages("refused?")})).send().await.unwrap();
    assert_eq!(resp.status(), 503, "a fault of ours is never 401 or 429");
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("3"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "billing_unavailable");
    // Let the root context fail a few sends first.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(s.audit_row(&id).await.is_none());

    s.start_sidecar();
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("upstream"));
    assert_eq!(s.settled_balance(key).await, 100_000 - total(&row));
    assert_eq!(s.open_holds(key).await, 0);
    assert_eq!(s.audit_rows(key).await.len(), 1);
    assert_eq!(s.settled_balance(idle).await, 100_000, "the refused request cost nothing");
    assert!(s.audit_rows(idle).await.is_empty(), "the refused request left a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_style_upstream_gets_bearer_auth_and_the_configured_model() {
    let s = Stack::start(StackOptions { provider: "openai", ..StackOptions::default() }).await;
    let key = "sk-gateway-user-006";
    s.create_key(key, 50_000).await;
    let resp = s
        .chat(key, &json!({"model": "something-else", "stream": true, "messages": messages("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    resp.text().await.unwrap();
    let seen = s.served().await.pop().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.authorization.as_deref(), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    assert_eq!(seen.body["model"], "gpt-5-nano");
    let row = s.settled_row(&id).await;
    assert_eq!(total(&row), seen.prompt_tokens + seen.completion_tokens);
    assert_eq!(s.settled_balance(key).await, 50_000 - total(&row));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_never_overdraw_a_key_that_affords_ten() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-overdraft-user-1";
    let body = json!({"model": "gpt-5-nano", "stream": true, "max_completion_tokens": 200, "messages": messages("go")});
    // The hold each request asks for, computed as the filter does (render.py's defaults).
    let cfg = openclaw_filter::config::PluginConfig::from_json(
        br#"{"sidecar_cluster":"sidecar","upstream_key":"k","deployment":"gpt-5-nano"}"#,
    )
    .unwrap();
    let estimate = openclaw_filter::request::admit(
        &serde_json::to_vec(&body).unwrap(),
        &cfg,
        openclaw_filter::request::Endpoint::Chat,
    )
    .unwrap()
    .estimate;
    let balance = 10 * estimate + estimate - 1;
    s.create_key(key, balance).await;
    // Slow, long answers: every reservation is decided while the first holds still stand.
    let responses = futures::future::join_all((0..200).map(|_| async {
        let resp =
            s.chat(key, &body).header("x-mock-scenario", "slow").header("x-mock-words", "60").send().await.unwrap();
        let status = resp.status().as_u16();
        let id = resp.headers().get("x-bridge-request-id").map(|v| v.to_str().unwrap().to_owned());
        let text = resp.text().await.unwrap();
        (status, id, text)
    }))
    .await;
    let admitted: Vec<&String> = responses.iter().filter(|r| r.0 == 200).filter_map(|r| r.1.as_ref()).collect();
    assert_eq!(admitted.len(), 10, "exactly what the balance can hold is admitted");
    for (status, _, text) in &responses {
        if *status != 200 {
            assert_eq!(*status, 429, "{text}");
            assert!(text.contains("insufficient_quota"), "{text}");
        }
    }
    let mut billed = 0;
    for id in admitted {
        billed += total(&s.settled_row(id).await);
    }
    assert_eq!(s.settled_balance(key).await, balance - billed);
    assert!(s.settled_balance(key).await >= 0);
    assert_eq!(s.audit_rows(key).await.len(), 10);
    assert_eq!(s.open_holds(key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_whose_reply_comes_too_late_is_released_not_charged() {
    // A 1 ms callout timeout: the sidecar makes the hold, the filter has given up.
    let s = Stack::start(StackOptions {
        extra_env: vec![("SIDECAR_TIMEOUT_MS".into(), "1".into())],
        ..StackOptions::default()
    })
    .await;
    let key = "sk-late-reserve-01";
    s.create_key(key, 100_000).await;
    let mut refused = 0;
    for _ in 0..5 {
        let resp = s.chat(key, &json!({"messages": messages("hi")})).send().await.unwrap();
        let status = resp.status().as_u16();
        assert!(status == 200 || status == 503, "{status}");
        if status == 503 {
            assert!(resp.headers().contains_key("retry-after"));
            refused += 1;
        }
        resp.bytes().await.unwrap();
    }
    assert!(refused > 0, "no reservation timed out; the test proves nothing");
    bridge_tests::eventually("every hold released or settled", Duration::from_secs(30), || async {
        s.open_holds(key).await == 0 && s.key_doc(key).await.get_i64("outbox_n").unwrap_or(0) == 0
    })
    .await;
    let balance = s.settled_balance(key).await;
    let rows = s.audit_rows(key).await;
    let billed: i64 = rows.iter().map(total).sum();
    assert_eq!(balance, 100_000 - billed, "a refused request was charged");
    for r in rows.iter().filter(|r| r.get_i32("status_code") == Ok(503)) {
        assert_eq!(total(r), 0, "a 503 costs nothing: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_draw_from_a_lease_without_a_call_each_and_a_freeze_ends_it() {
    let lease_ms = 1_000;
    let s = Stack::start(StackOptions {
        extra_env: vec![("LEASE_MS".into(), lease_ms.to_string())],
        ..StackOptions::default()
    })
    .await;
    let key = "sk-leased-user-001";
    s.create_key(key, 1_000_000).await;
    let body = json!({"model": "gpt-5-nano", "max_completion_tokens": 100, "messages": messages("lease me")});
    // One after another for a few lease windows: no request finds a lease being
    // fetched (the next is asked for in the background half way through), so
    // every one is drawn from a lease, and few leases serve them all.
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    while ids.len() < 30 || started.elapsed() < Duration::from_millis(3 * lease_ms) {
        let resp = s.chat(key, &body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
        resp.bytes().await.unwrap();
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let mut leases = std::collections::BTreeSet::new();
    let mut billed = 0;
    for id in &ids {
        let row = s.settled_row(id).await;
        let lease = row.get_str("lease_id").unwrap_or_else(|_| panic!("request {id} reserved alone: {row:?}"));
        leases.insert(lease.to_owned());
        billed += total(&row);
    }
    // One renewal each half window, plus the first few: the key's first lease
    // is sized for 64 requests, and its successors grow to its draw rate.
    assert!(
        leases.len() as u64 <= elapsed_ms / (lease_ms / 2) + 4,
        "{} leases for {} requests in {elapsed_ms} ms",
        leases.len(),
        ids.len()
    );
    // Closed after their window, they give back what was not used.
    assert_eq!(s.settled_balance(key).await, 1_000_000 - billed);
    // The leases in Envoy's own metrics: fetched, renewed, their sizes; nothing shed.
    let stats = s.prometheus().await;
    let value = |name: &str| -> f64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    assert!(value("openclaw_bridge_lease_fetches") >= 1.0);
    // Every lease fetched served requests, but for the renewal asked for half
    // way through the last window, which the loop may end before drawing from.
    let fetched = value("openclaw_bridge_lease_fetches") + value("openclaw_bridge_lease_renewals");
    let unused = fetched - leases.len() as f64;
    assert!(unused == 0.0 || unused == 1.0, "{fetched} leases fetched, {} drawn from", leases.len());
    assert_eq!(value("openclaw_bridge_shed"), 0.0);
    assert!(stats.contains("openclaw_bridge_lease_fetch_ms_bucket"), "{stats}");
    assert_eq!(s.open_leases(key).await, 0);

    // A freeze reaches requests within one lease window.
    let resp = s.chat(key, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    s.patch_key(key, json!({"status": "frozen"})).await;
    let frozen_at = std::time::Instant::now();
    let refused = loop {
        let resp = s.chat(key, &body).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if status != 200 {
            break (status, text);
        }
        assert!(frozen_at.elapsed() < Duration::from_millis(lease_ms + 2_000), "still admitted after the freeze");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert!(refused.1.contains("key_frozen"), "{}", refused.1);
    // Rows are read once nothing is held: every drawn request has its row then.
    let balance = s.settled_balance(key).await;
    let billed: i64 = s.audit_rows(key).await.iter().map(total).sum();
    assert_eq!(balance, 1_000_000 - billed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_whole_balance_is_leased_keeps_being_served_across_lease_windows() {
    // A slow settlement tick: nothing but the next request closes the expired lease.
    let s = Stack::start(StackOptions {
        extra_env: vec![("SETTLE_INTERVAL_MS".into(), "3000".into())],
        ..StackOptions::default()
    })
    .await;
    // Less than one lease: the first lease takes all of it, and the renewal
    // asked for half way through is refused; the request after the window
    // must replace the lease, not reserve against an empty balance.
    let key = "sk-small-balance-02";
    s.create_key(key, 20_000).await;
    let body = json!({"model": "gpt-5-nano", "max_completion_tokens": 50, "messages": messages("hi")});
    for pause_ms in [0, 600, 700, 1_200] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let resp = s.chat(key, &body).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "after {pause_ms} ms: {text}");
    }
    let balance = s.settled_balance(key).await;
    let billed: i64 = s.audit_rows(key).await.iter().map(total).sum();
    assert_eq!(balance, 20_000 - billed);
}

/// Sends `body` over HTTP/2 (h2c, prior knowledge), ending it with trailers
/// instead of end-of-stream when `trailers`; returns the answer's status and body.
async fn h2_post(base: &str, key: &str, body: &[u8], trailers: bool) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(bytes::Bytes::copy_from_slice(body), !trailers).unwrap();
    if trailers {
        let mut map = http::HeaderMap::new();
        map.insert("x-checksum", http::HeaderValue::from_static("1"));
        stream.send_trailers(map).unwrap();
    }
    let response = tokio::time::timeout(Duration::from_secs(20), response).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let mut recv = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    (status, serde_json::from_slice(&answer).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_ending_in_trailers_never_reaches_the_upstream() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-trailers-user-01";
    s.create_key(key, 100_000).await;
    let body = serde_json::to_vec(&json!({"model": "gpt-5-nano", "messages": messages("hi")})).unwrap();
    for key in [key, "sk-made-up-key-00001"] {
        let (status, answer) = h2_post(&s.base, key, &body, true).await;
        assert_eq!(status, 400, "{key}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    }
    assert!(s.served().await.is_empty(), "nothing reached the upstream");
    assert!(s.audit_rows(key).await.is_empty());
    // The same body over HTTP/2 without trailers is served and billed.
    let (status, answer) = h2_post(&s.base, key, &body, false).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(s.served().await.len(), 1);
    bridge_tests::eventually("the HTTP/2 request settled", Duration::from_secs(30), || async {
        s.audit_rows(key).await.len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_named_in_an_admin_url_reaches_no_log_and_a_key_id_serves_instead() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-url-secret-user-0001";
    s.create_key(key, 1_000).await;
    // The seed's flow: the key in the URL, with the admin token and with a wrong one.
    s.patch_key(key, json!({"balance_tokens": 5})).await;
    let url = format!("{}/admin/keys/{key}", s.base);
    let resp = s.http.patch(&url).bearer_auth("not-the-token").json(&json!({"status": "frozen"})).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // By key_id, which names no secret.
    let key_id = bridge_protocol::key_hash(key)[..16].to_owned();
    let resp = s
        .http
        .patch(format!("{}/admin/keys/{key_id}", s.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"balance_tokens": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.unwrap();
    assert_eq!((view["key_id"].as_str(), view["balance_tokens"].as_i64()), (Some(key_id.as_str()), Some(1_015)));
    // An unknown key_id is 404, like an unknown key.
    let resp = s
        .http
        .patch(format!("{}/admin/keys/0123456789abcdef", s.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"balance_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Every admin call is in Envoy's access log, and the key in none of the logs.
    bridge_tests::eventually("the access log has the admin calls", Duration::from_secs(15), || async {
        std::fs::read_to_string(&s.envoy.log_path).unwrap_or_default().matches("\"PATCH /admin/").count() >= 4
    })
    .await;
    let envoy_log = std::fs::read_to_string(&s.envoy.log_path).unwrap();
    let app_log = std::fs::read_to_string(&s.sidecar_log).unwrap();
    assert!(app_log.contains("admin call refused"), "{app_log}");
    for (name, log) in [("envoy", &envoy_log), ("app.log", &app_log)] {
        assert!(!log.contains(key), "{name} names the key:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_model_name_is_refused_at_admission_and_settlement_keeps_flowing() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-huge-model-user-01";
    s.create_key(key, 100_000).await;
    let huge = json!({"model": "m".repeat(105_000), "max_completion_tokens": 5, "messages": messages("hi")});
    for _ in 0..20 {
        let resp = s.chat(key, &huge).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "model");
    }
    assert!(s.served().await.is_empty());
    // The worker's settlements are not wedged: an ordinary request settles.
    let resp = s.chat(key, &json!({"model": "gpt-5-nano", "max_completion_tokens": 5, "messages": messages("hi")}));
    let resp = resp.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    s.settled_row(&id).await;
    // Nothing stays pending: the gauge reaches 0 once the key's lease closed.
    bridge_tests::eventually("no settlement pending", Duration::from_secs(15), || async {
        s.pending_settlements().await == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_model_cut_short_without_usage_pays_its_hold() {
    // The seed's gpt-5-nano reasons: its hidden reasoning is billed, never streamed.
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-reasoning-user-01";
    s.create_key(key, 100_000).await;
    let id = leave_mid_stream(&s, key, "think hard").await;
    let row = s.settled_row(&id).await;
    assert_eq!(row.get_str("usage_source"), Ok("estimate"));
    let reserved = row.get_i64("reserved_tokens").unwrap();
    assert_eq!(total(&row), reserved, "the hold, which caps what the upstream can bill");
    assert!(reserved > 4_096, "the output reservation and the prompt: {reserved}");
    assert_eq!(s.settled_balance(key).await, 100_000 - reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reads_its_own_true_balance_right_after_a_request() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-own-view-user-01";
    s.create_key(key, 10_000).await;
    let body = json!({"model": "gpt-5-nano", "max_completion_tokens": 20, "messages": messages("hi")});
    let resp = s.chat(key, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    resp.bytes().await.unwrap();
    let used = total(&s.settled_row(&id).await);
    // The lease is still open, and took a share of the balance; the key's own
    // view (through Envoy, with its own key) is already what it has left.
    let own = || async {
        let resp = s.http.get(format!("{}/v1/key", s.base)).bearer_auth(key).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()
    };
    bridge_tests::eventually("the balance net of the request", Duration::from_secs(5), || async {
        let me = own().await;
        me["balance_tokens"] == json!(10_000 - used) && me["held_tokens"] == json!(0)
    })
    .await;
    let me = own().await;
    assert_eq!(me["usage"]["today"]["requests"], 1);
    assert_eq!(me["usage"]["today"]["total_tokens"], used);
    let resp = s.http.get(format!("{}/v1/key", s.base)).bearer_auth("sk-made-up-key-9").send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_allowed_models_and_expiry_hold_through_envoy_and_its_leases() {
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-controlled-user-01";
    let resp = s
        .http
        .post(format!("{}/admin/keys", s.base))
        .bearer_auth(bridge_tests::stack::ADMIN_TOKEN)
        .json(&json!({"api_key": key, "user_name": "c", "balance_tokens": 1_000_000, "allowed_models": ["gpt-5-nano"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let made: Value = resp.json().await.unwrap();
    let ask = |model: &str| json!({"model": model, "max_completion_tokens": 20, "messages": messages("hi")});
    // Before any lease (the sidecar refuses) and with one live (the filter does).
    for _ in 0..2 {
        let resp = s.chat(key, &ask("gpt-4.1")).send().await.unwrap();
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
        let resp = s.chat(key, &ask("gpt-5-nano")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    assert!(s.served().await.iter().all(|r| r.body["model"] != "gpt-4.1"), "a refused model reached the upstream");

    // `/v1/models` lists what is served and the key may use, a header of the
    // client's naming other models notwithstanding.
    let models = |path: &'static str, key: &'static str| {
        let req = s.http.get(format!("{}{path}", s.base)).bearer_auth(key).header("x-bridge-served-models", "gpt-4.1");
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let ids = |v: &Value| {
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let (st, v) = models("/v1/models", key).await;
    assert_eq!((st, ids(&v)), (200, vec!["gpt-5-nano".to_owned()]), "{v}");
    let (st, v) = models("/v1/models/gpt-5-nano", key).await;
    assert_eq!((st, v["id"].as_str()), (200, Some("gpt-5-nano")), "{v}");
    let (st, v) = models("/v1/models/gpt-4.1", key).await;
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("model_not_found")), "{v}");
    let key_id = made["key_id"].as_str().unwrap();
    s.patch_key(key_id, json!({"allowed_models": ["gpt-4.1"]})).await;
    let (st, v) = models("/v1/models", key).await;
    assert_eq!((st, ids(&v)), (200, vec![]), "only a model the gateway does not serve is allowed: {v}");
    let (st, v) = models("/v1/models/gpt-5-nano", key).await;
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("model_not_found")), "{v}");
    let (st, v) = models("/v1/models", "sk-made-up-key-000001").await;
    assert_eq!((st, v["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{v}");
    s.patch_key(key_id, json!({"allowed_models": null})).await;
    let (st, v) = models("/v1/models", key).await;
    assert_eq!((st, ids(&v)), (200, vec!["gpt-5-nano".to_owned()]), "{v}");

    // Expired: every request of the key is a 401 that says so, within a lease window.
    s.patch_key(key_id, json!({"expires_at": "2020-01-01T00:00:00Z"})).await;
    let (st, v) = models("/v1/models", key).await;
    assert_eq!((st, v["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{v}");
    bridge_tests::eventually("the key refused as expired", Duration::from_secs(5), || async {
        let resp = s.chat(key, &ask("gpt-5-nano")).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        status == 401 && text.contains("expired") && text.contains("invalid_api_key")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_rate_limit_answers_429_rate_limit_exceeded_with_retry_after() {
    // With leases, and with a reservation a request (the limits come with
    // each reservation's answer).
    for extra_env in [vec![], vec![("LEASE_TOKENS".to_owned(), "0".to_owned())]] {
        rate_limited_through_envoy(StackOptions { extra_env, ..StackOptions::default() }).await;
    }
}

async fn rate_limited_through_envoy(opts: StackOptions) {
    let s = Stack::start(opts).await;
    let key = "sk-rate-limited-user-1";
    let resp = s
        .http
        .post(format!("{}/admin/keys", s.base))
        .bearer_auth(bridge_tests::stack::ADMIN_TOKEN)
        .json(&json!({"api_key": key, "user_name": "r", "balance_tokens": 1_000_000, "rpm_limit": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body = json!({"model": "gpt-5-nano", "max_completion_tokens": 20, "messages": messages("hi")});
    let mut admitted = 0;
    let mut limited = 0;
    for _ in 0..12 {
        let resp = s.chat(key, &body).send().await.unwrap();
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry), "{retry}");
                let text = resp.text().await.unwrap();
                assert!(text.contains("rate_limit_exceeded") && !text.contains("insufficient_quota"), "{text}");
                limited += 1;
                continue;
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
        resp.bytes().await.unwrap();
    }
    // Per gateway: the limit, plus the request that fetched the key's lease
    // or made its first reservation (admitted before the limit was known).
    assert!((5..=6).contains(&admitted), "{admitted} admitted of 12 at rpm_limit 5");
    assert_eq!(admitted + limited, 12);
    assert_eq!(s.served().await.len(), admitted);
}
