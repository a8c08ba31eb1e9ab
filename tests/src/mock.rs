//! A mock of Azure OpenAI and OpenAI chat completions and Responses, for
//! tests, the benchmark and the demo. It behaves as the real APIs do where billing depends on it:
//! usage comes in a last stream event only when `stream_options.include_usage`
//! is set; Azure streams start with a `prompt_filter_results` event with empty
//! `choices`. A tool call is answered when tools are offered and no tool result
//! is in the conversation yet; the tool's result is then echoed back.
//!
//! The header `x-mock-scenario` picks a behaviour: `no_usage` (never reports
//! usage), `error_400`, `error_500`, `midstream_error`, `slow` (50 ms between
//! chunks); `x-mock-words: N` sets the answer's length (5 words by default);
//! `x-mock-cached: N` reports N of the prompt's tokens as cached;
//! `x-mock-reasoning: N` adds N reasoning tokens to the output (billed, never streamed).
//! Every request is recorded and listed
//! by `GET /mock/requests` so tests can compare billing with what was served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the mock saw and answered for one request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub path: String,
    pub api_key_header: Option<String>,
    pub authorization: Option<String>,
    pub accept_encoding: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub scenario: String,
    pub body: Value,
}

#[derive(Clone)]
pub struct MockState {
    /// The key the mock expects from the gateway (`api-key` or `Authorization: Bearer`).
    pub upstream_key: String,
    pub seen: Arc<Mutex<std::collections::VecDeque<Seen>>>,
    /// Responses made, by id, as the Responses API stores them.
    pub stored: Arc<Mutex<std::collections::HashMap<String, Value>>>,
    /// Numbers the responses it makes.
    pub next_id: Arc<std::sync::atomic::AtomicU64>,
    /// How many requests (and stored responses) it keeps at most: the oldest
    /// go first. The program keeps few (a benchmark sends millions).
    pub keep: usize,
}

impl MockState {
    fn record(&self, seen: Seen) {
        if let Ok(mut all) = self.seen.lock() {
            while all.len() >= self.keep {
                all.pop_front();
            }
            all.push_back(seen);
        }
    }
}

pub fn app(upstream_key: &str) -> Router {
    app_keeping(upstream_key, usize::MAX)
}

/// The mock keeping at most `keep` requests in its record.
pub fn app_keeping(upstream_key: &str, keep: usize) -> Router {
    let state = MockState {
        upstream_key: upstream_key.to_owned(),
        seen: Arc::default(),
        stored: Arc::default(),
        next_id: Arc::default(),
        keep: keep.max(1),
    };
    Router::new()
        .route("/openai/deployments/{deployment}/chat/completions", post(azure))
        .route("/v1/chat/completions", post(openai))
        .route("/openai/v1/responses", post(azure_responses))
        .route("/openai/v1/responses/{*rest}", get(azure_stored).post(azure_stored).delete(azure_stored))
        .route("/v1/responses/{*rest}", get(openai_stored).post(openai_stored).delete(openai_stored))
        .route("/openai/v1/chat/completions", post(azure_v1_chat))
        .route("/openai/deployments/{deployment}/embeddings", post(azure_embeddings))
        .route("/openai/v1/embeddings", post(azure_v1_embeddings))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/responses", post(openai_responses))
        .route("/mock/requests", get(list).delete(clear))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

async fn list(State(s): State<MockState>) -> Json<Vec<Seen>> {
    Json(s.seen.lock().map(|v| v.iter().cloned().collect()).unwrap_or_default())
}

async fn clear(State(s): State<MockState>) -> StatusCode {
    if let Ok(mut v) = s.seen.lock() {
        v.clear();
    }
    StatusCode::NO_CONTENT
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))).into_response()
}

#[derive(serde::Deserialize)]
struct ApiVersion {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// Azure's answer to a legacy-path request without `api-version` or with a
/// wrong key, or `None` for one it serves.
fn azure_legacy_refusal(s: &MockState, q: &ApiVersion, headers: &HeaderMap) -> Option<Response> {
    if q.api_version.is_none() {
        return Some(error(
            StatusCode::NOT_FOUND,
            "api-version query parameter is required",
            "invalid_request_error",
            "404",
        ));
    }
    azure_refusal(s, headers)
}

async fn azure(
    State(s): State<MockState>,
    Path(deployment): Path<String>,
    Query(q): Query<ApiVersion>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = azure_legacy_refusal(&s, &q, &headers) {
        return r;
    }
    complete(s, format!("/openai/deployments/{deployment}/chat/completions"), headers, body, true, &deployment).await
}

async fn openai(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = bearer_refusal(&s, &headers) {
        return r;
    }
    complete(s, "/v1/chat/completions".into(), headers, body, false, "").await
}

/// Deterministic prompt size: about four bytes of message text a token, plus framing.
pub fn mock_prompt_tokens(body: &Value) -> i64 {
    let text_len: usize =
        body["messages"].as_array().map(|m| m.iter().map(|msg| msg["content"].to_string().len()).sum()).unwrap_or(0);
    (text_len / 4) as i64 + 7
}

fn tool_call_for(body: &Value) -> Option<(String, String)> {
    let answered = body["messages"].as_array()?.iter().any(|m| m["role"] == "tool");
    let functions: Vec<&Value> = body["tools"].as_array()?.iter().map(|t| &t["function"]).collect();
    if answered {
        return None;
    }
    read_call(&functions)
}

/// A call of the function `read` (else the first one) offered as
/// `{name, parameters}`: its name and arguments naming `hello.txt`.
fn read_call(functions: &[&Value]) -> Option<(String, String)> {
    let f = functions.iter().find(|f| f["name"] == "read").or(functions.first())?;
    let name = f["name"].as_str()?.to_owned();
    let params = &f["parameters"];
    let arg = params["required"][0]
        .as_str()
        .or_else(|| params["properties"].as_object().and_then(|p| p.keys().next().map(String::as_str)))
        .unwrap_or("path")
        .to_owned();
    Some((name, json!({ arg: "hello.txt" }).to_string()))
}

fn answer_text(body: &Value, words: usize) -> Vec<String> {
    let tool_result = body["messages"].as_array().and_then(|m| {
        m.iter().rev().find(|msg| msg["role"] == "tool").map(|msg| match &msg["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "),
            other => other.to_string(),
        })
    });
    echo_or_words(tool_result, words)
}

/// The answer's pieces: a tool's result echoed word by word, or `words` words.
fn echo_or_words(echo: Option<String>, words: usize) -> Vec<String> {
    match echo {
        Some(text) => text.split_inclusive(' ').map(str::to_owned).collect(),
        None => (0..words).map(|i| format!("word{i} ")).collect(),
    }
}

async fn complete(
    s: MockState,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    azure: bool,
    deployment: &str,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        );
    };
    let scenario = headers.get("x-mock-scenario").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let stream = body["stream"] == true;
    let include_usage = stream && body["stream_options"]["include_usage"] == true && scenario != "no_usage";
    let words =
        headers.get("x-mock-words").and_then(|v| v.to_str().ok()).and_then(|n| n.parse().ok()).unwrap_or(5usize);
    let tool = tool_call_for(&body);
    let pieces = if tool.is_some() { Vec::new() } else { answer_text(&body, words) };
    let prompt_tokens = mock_prompt_tokens(&body);
    let reasoning: i64 =
        headers.get("x-mock-reasoning").and_then(|v| v.to_str().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
    let completion_tokens = reasoning
        + if let Some((name, args)) = &tool {
            (name.len() + args.len()).div_ceil(4) as i64
        } else {
            pieces.len() as i64
        };
    let model = if azure { deployment.to_owned() } else { body["model"].as_str().unwrap_or("mock").to_owned() };
    let record = Seen {
        path,
        api_key_header: headers.get("api-key").and_then(|v| v.to_str().ok()).map(str::to_owned),
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
        accept_encoding: headers.get("accept-encoding").and_then(|v| v.to_str().ok()).map(str::to_owned),
        stream,
        include_usage,
        prompt_tokens,
        completion_tokens,
        scenario: scenario.clone(),
        body: body.clone(),
    };
    s.record(record);
    match scenario.as_str() {
        "error_400" => {
            return error(StatusCode::BAD_REQUEST, "mock: invalid request", "invalid_request_error", "mock_400")
        }
        "error_500" => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "mock: upstream failure", "server_error", "mock_500")
        }
        _ => {}
    }
    let cached: i64 =
        headers.get("x-mock-cached").and_then(|v| v.to_str().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
    let mut usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if cached > 0 {
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached.min(prompt_tokens)});
    }
    if reasoning > 0 {
        usage["completion_tokens_details"] = json!({"reasoning_tokens": reasoning});
    }
    let id = "chatcmpl-mock";
    if !stream {
        let message = match &tool {
            Some((name, args)) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]}),
            None => json!({"role": "assistant", "content": pieces.concat()}),
        };
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        let mut out = json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        });
        if scenario != "no_usage" {
            out["usage"] = usage;
        }
        return Json(out).into_response();
    }
    let mut events: Vec<Value> = Vec::new();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    if azure {
        events.push(json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}));
    }
    events.push(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
    match &tool {
        Some((name, args)) => {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ));
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                events.push(chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}), Value::Null));
            }
            events.push(chunk(json!({}), json!("tool_calls")));
        }
        None => {
            for p in &pieces {
                events.push(chunk(json!({"content": p}), Value::Null));
            }
            events.push(chunk(json!({}), json!("stop")));
        }
    }
    if include_usage {
        events.push(json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "choices": [], "usage": usage}));
    }
    let slow = scenario == "slow";
    let midstream_error = scenario == "midstream_error";
    let stream = async_stream(events, slow, midstream_error);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn async_stream(
    events: Vec<Value>,
    slow: bool,
    midstream_error: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let half = events.len() / 2;
        for (i, e) in events.iter().enumerate() {
            if midstream_error && i == half {
                let err = json!({"error": {"message": "mock: upstream failed mid-stream", "type": "server_error", "param": null, "code": "mock_midstream"}});
                let _ = tx.send(Ok(Bytes::from(format!("data: {err}\n\n")))).await;
                return;
            }
            if tx.send(Ok(Bytes::from(format!("data: {e}\n\n")))).await.is_err() {
                return;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

async fn azure_responses(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = azure_refusal(&s, &headers) {
        return r;
    }
    respond(s, "/openai/v1/responses".into(), headers, body).await
}

async fn openai_responses(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = bearer_refusal(&s, &headers) {
        return r;
    }
    respond(s, "/v1/responses".into(), headers, body).await
}

/// The text of a Responses request's `input` (a string or items), for the
/// mock's prompt size.
fn responses_input_len(body: &Value) -> usize {
    let instructions = body["instructions"].as_str().map_or(0, str::len);
    instructions
        + match &body["input"] {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(|i| i.to_string().len()).sum(),
            _ => 0,
        }
}

/// Deterministic input size of a Responses request: four bytes a token, plus
/// framing; `x-mock-cached: N` says N of them were cached.
pub fn mock_input_tokens(body: &Value) -> i64 {
    (responses_input_len(body) / 4) as i64 + 7
}

/// A function call when function tools are offered and no call's output is
/// in the input yet: (name, arguments).
fn responses_tool_call(body: &Value) -> Option<(String, String)> {
    let functions: Vec<&Value> = body["tools"].as_array()?.iter().filter(|t| t["type"] == "function").collect();
    let answered = body["input"].as_array().is_some_and(|i| i.iter().any(|x| x["type"] == "function_call_output"));
    if answered {
        return None;
    }
    read_call(&functions)
}

/// The answer's words: the last function call output echoed, or `words` words.
fn responses_answer(body: &Value, words: usize) -> Vec<String> {
    let output = body["input"].as_array().and_then(|items| {
        items.iter().rev().find(|i| i["type"] == "function_call_output").map(|i| match &i["output"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    });
    echo_or_words(output, words)
}

/// `POST /v1/responses`: plain or streamed (named events, the usage in the
/// last one, `response.completed`, or `response.incomplete` when
/// `max_output_tokens` cut the answer). Scenarios as for chat: `no_usage`,
/// `error_400`, `error_500`, `midstream_error`, `slow`.
async fn respond(s: MockState, path: String, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        );
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scenario = header("x-mock-scenario").unwrap_or("").to_owned();
    let stream = body["stream"] == true;
    let words = header("x-mock-words").and_then(|n| n.parse().ok()).unwrap_or(5usize);
    let cached: i64 = header("x-mock-cached").and_then(|n| n.parse().ok()).unwrap_or(0);
    let reasoning: i64 = header("x-mock-reasoning").and_then(|n| n.parse().ok()).unwrap_or(0);
    let tool = responses_tool_call(&body);
    let mut pieces = if tool.is_some() { Vec::new() } else { responses_answer(&body, words) };
    let cap = body["max_output_tokens"].as_u64().map(|n| n as usize);
    let cut = cap.is_some_and(|c| pieces.len() > c);
    if let Some(c) = cap {
        pieces.truncate(c);
    }
    let input_tokens = mock_input_tokens(&body);
    let output_tokens = reasoning
        + if let Some((name, args)) = &tool {
            (name.len() + args.len()).div_ceil(4) as i64
        } else {
            pieces.len() as i64
        };
    let model = body["model"].as_str().unwrap_or("mock").to_owned();
    let response_id = format!("resp_mock{:06}", s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    s.record(Seen {
        path,
        api_key_header: header("api-key").map(str::to_owned),
        authorization: header("authorization").map(str::to_owned),
        accept_encoding: header("accept-encoding").map(str::to_owned),
        stream,
        include_usage: scenario != "no_usage",
        prompt_tokens: input_tokens,
        completion_tokens: output_tokens,
        scenario: scenario.clone(),
        body: body.clone(),
    });
    match scenario.as_str() {
        "error_400" => {
            return error(StatusCode::BAD_REQUEST, "mock: invalid request", "invalid_request_error", "mock_400")
        }
        "error_500" => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "mock: upstream failure", "server_error", "mock_500")
        }
        _ => {}
    }
    let usage = (scenario != "no_usage").then(|| {
        json!({
            "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens,
        })
    });
    let item = match &tool {
        Some((name, args)) => json!({"type": "function_call", "id": "fc_mock", "call_id": "call_1", "name": name,
            "arguments": args, "status": "completed"}),
        None => json!({"type": "message", "id": "msg_mock", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": pieces.concat(), "annotations": []}]}),
    };
    let status = if cut { "incomplete" } else { "completed" };
    let response = |status: &str, output: Value, usage: Option<&Value>| {
        let mut r = json!({"id": response_id, "object": "response", "created_at": 1_700_000_000, "status": status,
            "model": model, "output": output, "usage": usage});
        if status == "incomplete" {
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        r
    };
    let last = response(status, json!([item]), usage.as_ref());
    if let Ok(mut stored) = s.stored.lock() {
        if stored.len() < s.keep {
            stored.insert(response_id.clone(), last.clone());
        }
    }
    if !stream {
        return Json(last).into_response();
    }
    let mut events: Vec<(String, Value)> = Vec::new();
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        events.push((kind.to_owned(), data));
    };
    push("response.created", json!({"response": response("in_progress", json!([]), None)}));
    let added = match &tool {
        Some((name, _)) => json!({"type": "function_call", "id": "fc_mock", "call_id": "call_1", "name": name,
            "arguments": "", "status": "in_progress"}),
        None => {
            json!({"type": "message", "id": "msg_mock", "role": "assistant", "status": "in_progress", "content": []})
        }
    };
    push("response.output_item.added", json!({"output_index": 0, "item": added}));
    match &tool {
        Some((_, args)) => {
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                push(
                    "response.function_call_arguments.delta",
                    json!({"output_index": 0, "item_id": "fc_mock", "delta": part}),
                );
            }
            push(
                "response.function_call_arguments.done",
                json!({"output_index": 0, "item_id": "fc_mock", "arguments": args}),
            );
        }
        None => {
            push(
                "response.content_part.added",
                json!({"output_index": 0, "item_id": "msg_mock", "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
            for p in &pieces {
                push(
                    "response.output_text.delta",
                    json!({"output_index": 0, "item_id": "msg_mock", "content_index": 0, "delta": p}),
                );
            }
            push(
                "response.output_text.done",
                json!({"output_index": 0, "item_id": "msg_mock", "content_index": 0, "text": pieces.concat()}),
            );
            push(
                "response.content_part.done",
                json!({"output_index": 0, "item_id": "msg_mock", "content_index": 0,
                "part": {"type": "output_text", "text": pieces.concat(), "annotations": []}}),
            );
        }
    }
    push("response.output_item.done", json!({"output_index": 0, "item": item}));
    push(&format!("response.{status}"), json!({"response": response(status, json!([item]), usage.as_ref())}));
    let frames: Vec<String> = events
        .into_iter()
        .enumerate()
        .map(|(i, (kind, mut data))| {
            data["sequence_number"] = json!(i);
            format!("event: {kind}\ndata: {data}\n\n")
        })
        .collect();
    let (slow, midstream_error) = (scenario == "slow", scenario == "midstream_error");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let half = frames.len() / 2;
        for (i, f) in frames.into_iter().enumerate() {
            if midstream_error && i == half {
                let err = json!({"type": "error", "code": "mock_midstream", "message": "mock: upstream failed mid-stream", "param": null});
                let _ = tx.send(Ok(Bytes::from(format!("event: error\ndata: {err}\n\n")))).await;
                return;
            }
            if tx.send(Ok(Bytes::from(f))).await.is_err() {
                return;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Azure's answer to a wrong `api-key`, or `None` for the right one.
fn azure_refusal(s: &MockState, headers: &HeaderMap) -> Option<Response> {
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    (key != Some(s.upstream_key.as_str())).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "Access denied due to invalid subscription key.",
            "invalid_request_error",
            "401",
        )
    })
}

/// OpenAI's answer to a wrong bearer key, or `None` for the right one.
fn bearer_refusal(s: &MockState, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    (auth != Some(format!("Bearer {}", s.upstream_key).as_str())).then(|| {
        error(StatusCode::UNAUTHORIZED, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    })
}

/// Azure's v1 chat path: the deployment is the body's `model`.
async fn azure_v1_chat(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = azure_refusal(&s, &headers) {
        return r;
    }
    let deployment = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_owned))
        .unwrap_or_default();
    complete(s, "/openai/v1/chat/completions".into(), headers, body, true, &deployment).await
}

async fn azure_embeddings(
    State(s): State<MockState>,
    Path(deployment): Path<String>,
    Query(q): Query<ApiVersion>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = azure_legacy_refusal(&s, &q, &headers) {
        return r;
    }
    embed(s, format!("/openai/deployments/{deployment}/embeddings"), headers, body, Some(deployment))
}

async fn azure_v1_embeddings(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = azure_refusal(&s, &headers) {
        return r;
    }
    embed(s, "/openai/v1/embeddings".into(), headers, body, None)
}

async fn openai_embeddings(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = bearer_refusal(&s, &headers) {
        return r;
    }
    embed(s, "/v1/embeddings".into(), headers, body, None)
}

/// Deterministic embedding input size: a token a four bytes of each string
/// (at least one), or the token ids given.
pub fn mock_embedding_tokens(body: &Value) -> i64 {
    let one = |v: &Value| match v {
        Value::String(s) => (s.len() / 4).max(1) as i64,
        Value::Array(ids) => ids.len() as i64,
        Value::Number(_) => 1,
        _ => 0,
    };
    match &body["input"] {
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as i64,
        Value::Array(items) => items.iter().map(one).sum(),
        other => one(other),
    }
}

/// `POST .../embeddings`: one small vector an input; `usage.prompt_tokens`.
/// Scenarios: `no_usage`, `error_500`.
fn embed(s: MockState, path: String, headers: HeaderMap, body: Bytes, deployment: Option<String>) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        );
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scenario = header("x-mock-scenario").unwrap_or("").to_owned();
    let tokens = mock_embedding_tokens(&body);
    s.record(Seen {
        path,
        api_key_header: header("api-key").map(str::to_owned),
        authorization: header("authorization").map(str::to_owned),
        accept_encoding: header("accept-encoding").map(str::to_owned),
        stream: false,
        include_usage: scenario != "no_usage",
        prompt_tokens: tokens,
        completion_tokens: 0,
        scenario: scenario.clone(),
        body: body.clone(),
    });
    if scenario == "error_500" {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "mock: upstream failure", "server_error", "mock_500");
    }
    let n = match &body["input"] {
        Value::Array(items) if !items.iter().all(Value::is_number) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.125, i as f64]}))
        .collect();
    let model = deployment.unwrap_or_else(|| body["model"].as_str().unwrap_or("mock").to_owned());
    let mut out = json!({"object": "list", "data": data, "model": model});
    if scenario != "no_usage" {
        out["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    Json(out).into_response()
}

async fn azure_stored(
    State(s): State<MockState>,
    Path(rest): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    azure_refusal(&s, &headers)
        .unwrap_or_else(|| stored(&s, format!("/openai/v1/responses/{rest}"), &rest, method.as_str()))
}

async fn openai_stored(
    State(s): State<MockState>,
    Path(rest): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    bearer_refusal(&s, &headers).unwrap_or_else(|| stored(&s, format!("/v1/responses/{rest}"), &rest, method.as_str()))
}

/// A stored response: read (`GET`), deleted (`DELETE`), cancelled (`POST
/// .../cancel`) or its input items listed (`GET .../input_items`). Recorded
/// in what the mock saw, with no tokens.
fn stored(s: &MockState, path: String, rest: &str, method: &str) -> Response {
    let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
    s.record(Seen {
        path,
        api_key_header: None,
        authorization: None,
        accept_encoding: None,
        stream: false,
        include_usage: false,
        prompt_tokens: 0,
        completion_tokens: 0,
        scenario: format!("{method} {action}"),
        body: Value::Null,
    });
    let Ok(mut stored) = s.stored.lock() else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
    let Some(response) = stored.get(id).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("Response with id '{id}' not found."),
            "invalid_request_error",
            "not_found",
        );
    };
    match (method, action) {
        ("DELETE", _) => {
            stored.remove(id);
            Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
        }
        ("POST", "cancel") => Json(json!({"id": id, "object": "response", "status": "cancelled"})).into_response(),
        ("GET", "input_items") => Json(json!({"object": "list", "data": [], "has_more": false})).into_response(),
        _ => Json(response).into_response(),
    }
}
