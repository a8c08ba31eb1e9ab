//! A model catalog (`MODELS_FILE`) through real Envoy: requests routed by
//! their `model` to two upstreams in three path styles, embeddings billed by
//! their input, unknown models refused without reaching anything, and
//! `/v1/models` listing the catalog.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bridge_tests::mock::Seen;
use bridge_tests::stack::{Stack, StackOptions, UPSTREAM_KEY};
use serde_json::{json, Value};

const WEST_KEY: &str = "second-upstream-key-0042";

async fn second_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, bridge_tests::mock::app(WEST_KEY)).await });
    url
}

async fn seen(http: &reqwest::Client, mock: &str) -> Vec<Seen> {
    http.get(format!("{mock}/mock/requests")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_routed_by_model_and_each_endpoint_is_billed_exactly() {
    let west = second_upstream().await;
    let models = json!({"models": [
        {"name": "chat-east", "endpoints": ["chat", "responses"], "prices": {"cached_input": 0.5, "output": 2},
         "upstream": {"style": "azure", "base_url": "{mock}", "deployment": "dep-east", "api_key_env": "KEY_EAST"}},
        {"name": "chat-west", "default_output_tokens": 64, "max_output_tokens": 1000,
         "prices": {"input": 2, "cached_input": 0.5, "output": 3},
         "upstream": {"style": "azure_v1", "base_url": west, "deployment": "dep-west", "api_key_env": "KEY_WEST"}},
        {"name": "embed-small", "endpoints": ["embeddings"],
         "upstream": {"style": "openai", "base_url": format!("{west}/v1"), "model": "text-embedding-3-small",
                      "api_key_env": "KEY_WEST"}},
    ]});
    let extra_env =
        vec![("KEY_EAST".to_owned(), UPSTREAM_KEY.to_owned()), ("KEY_WEST".to_owned(), WEST_KEY.to_owned())];
    let s = Stack::start(StackOptions { models: Some(models), extra_env, ..StackOptions::default() }).await;
    let key = "sk-catalog-user-0001";
    s.create_key(key, 1_000_000).await;
    let post = |path: &str, body: Value| s.http.post(format!("{}{path}", s.base)).bearer_auth(key).json(&body).send();
    let msgs = json!([{"role": "user", "content": "hello"}]);

    // Chat to the east deployment (Azure's legacy path, its key).
    let resp = post("/v1/chat/completions", json!({"model": "chat-east", "messages": msgs})).await.unwrap();
    assert_eq!(resp.status(), 200);
    let east_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    resp.bytes().await.unwrap();
    let east = seen(&s.http, &s.mock).await;
    assert_eq!(east.len(), 1);
    assert!(east[0].path.starts_with("/openai/deployments/dep-east/chat/completions"), "{}", east[0].path);
    assert_eq!(east[0].api_key_header.as_deref(), Some(UPSTREAM_KEY));

    // Chat to the west one (Azure's v1 path: the deployment as model), capped at its own reservation.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(key)
        .header("x-mock-cached", "3")
        .json(&json!({"model": "chat-west", "messages": msgs, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let west_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    resp.text().await.unwrap();
    let west_seen = seen(&s.http, &west).await;
    assert_eq!(west_seen[0].path, "/openai/v1/chat/completions");
    assert_eq!(west_seen[0].api_key_header.as_deref(), Some(WEST_KEY));
    assert_eq!(west_seen[0].body["model"], "dep-west");
    assert_eq!(west_seen[0].body["max_completion_tokens"], 64, "the model's own default reservation");
    let over = post("/v1/chat/completions", json!({"model": "chat-west", "messages": msgs, "max_tokens": 5000}))
        .await
        .unwrap();
    assert_eq!(over.status(), 400, "beyond the model's largest reservation");

    // Embeddings: strings and token ids, billed by the input the upstream counted.
    let resp = post("/v1/embeddings", json!({"model": "embed-small", "input": ["first text here", "second one"]}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let emb_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);
    let resp = post("/v1/embeddings", json!({"model": "embed-small", "input": [[1, 2, 3], [4, 5]]})).await.unwrap();
    let ids_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    resp.bytes().await.unwrap();
    let west_seen = seen(&s.http, &west).await;
    assert_eq!(west_seen.len(), 3);
    assert_eq!(
        (west_seen[1].path.as_str(), west_seen[1].body["model"].as_str()),
        ("/v1/embeddings", Some("text-embedding-3-small"))
    );
    assert_eq!(west_seen[1].authorization, Some(format!("Bearer {WEST_KEY}")));
    assert_eq!(west_seen[2].prompt_tokens, 5);

    // The west model's prices: uncached input 2, cached 0.5, output 3.
    let row = s.settled_row(&west_id).await;
    let (input, output) = (west_seen[0].prompt_tokens, west_seen[0].completion_tokens);
    assert_eq!(row.get_i64("cached_tokens"), Ok(3));
    let weighted = 2 * (input - 3) + 3 * output + 2; // the cached 1.5, rounded up
    assert_eq!(row.get_i64("charged_tokens"), Ok(weighted));
    assert_eq!(row.get_i64("total_tokens"), Ok(input + output), "the seed's count stays raw");
    assert_eq!(row.get_str("endpoint"), Ok("chat"));
    let emb_row = s.settled_row(&emb_id).await;
    assert_eq!(emb_row.get_str("endpoint"), Ok("embeddings"));
    assert_eq!(emb_row.get_i64("charged_tokens"), Ok(west_seen[1].prompt_tokens), "unpriced: the tokens");

    for (id, upstream, model) in [
        (&east_id, &east[0], "chat-east"),
        (&west_id, &west_seen[0], "chat-west"),
        (&emb_id, &west_seen[1], "embed-small"),
        (&ids_id, &west_seen[2], "embed-small"),
    ] {
        let row = s.settled_row(id).await;
        assert_eq!(row.get_str("model"), Ok(model), "the catalog's name");
        let deployment = ["dep-east", "dep-west", "text-embedding-3-small"]
            [["chat-east", "chat-west", "embed-small"].iter().position(|m| *m == model).unwrap()];
        assert_eq!(row.get_str("deployment"), Ok(deployment), "and where it went");
        assert_eq!(row.get_i64("input_tokens").unwrap(), upstream.prompt_tokens, "{model}");
        assert_eq!(row.get_i64("output_tokens").unwrap(), upstream.completion_tokens, "{model}");
        assert_eq!(row.get_str("usage_source"), Ok("upstream"));
    }

    // The east model's prices on a Responses request with cached input and
    // reasoning: uncached input 1, cached 0.5, output (reasoning in it) 2.
    let resp = s
        .http
        .post(format!("{}/v1/responses", s.base))
        .bearer_auth(key)
        .header("x-mock-cached", "2")
        .header("x-mock-reasoning", "7")
        .json(&json!({"model": "chat-east", "input": "think first", "max_output_tokens": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    resp.bytes().await.unwrap();
    let resp_seen = seen(&s.http, &s.mock).await.pop().unwrap();
    assert_eq!(resp_seen.path, "/openai/v1/responses");
    let row = s.settled_row(&resp_id).await;
    let (r_in, r_out) = (resp_seen.prompt_tokens, resp_seen.completion_tokens);
    assert_eq!((row.get_i64("cached_tokens"), row.get_i64("reasoning_tokens")), (Ok(2), Ok(7)));
    assert_eq!(row.get_i64("output_tokens"), Ok(r_out), "reasoning is output");
    let resp_charged = (r_in - 2) + 1 + 2 * r_out;
    assert_eq!((row.get_i64("charged_tokens"), row.get_str("endpoint")), (Ok(resp_charged), Ok("responses")));
    let east_charged = east[0].prompt_tokens + 2 * east[0].completion_tokens;
    assert_eq!(s.settled_row(&east_id).await.get_i64("charged_tokens"), Ok(east_charged));

    // Unknown models, or a model on an endpoint it does not serve: refused
    // here, nothing reaches an upstream.
    for (path, body, status, code) in [
        ("/v1/chat/completions", json!({"model": "gpt-4.1", "messages": msgs}), 404, "model_not_found"),
        ("/v1/embeddings", json!({"model": "chat-east", "input": "x"}), 400, "model_not_supported"),
        ("/v1/responses", json!({"model": "embed-small", "input": "x"}), 400, "model_not_supported"),
    ] {
        let resp = post(path, body).await.unwrap();
        assert_eq!(resp.status(), status);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{err}");
    }
    assert_eq!(seen(&s.http, &s.mock).await.len() + seen(&s.http, &west).await.len(), 5);

    // The catalog is what /v1/models lists.
    let list: Value =
        s.http.get(format!("{}/v1/models", s.base)).bearer_auth(key).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["chat-east", "chat-west", "embed-small"]);

    let served: i64 = seen(&s.http, &s.mock)
        .await
        .iter()
        .chain(seen(&s.http, &west).await.iter())
        .map(|x| x.prompt_tokens + x.completion_tokens)
        .sum();
    let rows = s.audit_rows(key).await;
    assert_eq!(rows.len(), 5);
    let charged: i64 = rows.iter().map(|r| r.get_i64("charged_tokens").unwrap()).sum();
    let raw_priced = (input + output) + (r_in + r_out) + (east[0].prompt_tokens + east[0].completion_tokens);
    assert_eq!(
        charged,
        served - raw_priced + weighted + resp_charged + east_charged,
        "every row at its model's prices"
    );
    assert_eq!(s.settled_balance(key).await, 1_000_000 - charged, "the debits are the charged tokens");
}

/// An upstream that answers every request 429, counting them.
async fn busy_upstream() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"error": {"message": "busy", "type": "requests", "param": null, "code": "429"}})),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_fails_over_between_its_deployments_with_each_ones_key_and_bills_once() {
    use std::sync::atomic::Ordering;
    let (busy, busy_hits) = busy_upstream().await;
    let dead = format!("http://127.0.0.1:{}", bridge_tests::free_port());
    let member = |base: &str, key_env: &str| json!({"style": "azure", "base_url": base, "deployment": "dep-pool", "api_key_env": key_env});
    let models = json!({"models": [{"name": "pooled", "upstreams": [
        member(&dead, "KEY_DEAD"), member(&busy, "KEY_BUSY"), member("{mock}", "KEY_GOOD")]}]});
    let extra_env = vec![
        ("KEY_DEAD".to_owned(), "dead-deployment-key-01".to_owned()),
        ("KEY_BUSY".to_owned(), "busy-deployment-key-01".to_owned()),
        ("KEY_GOOD".to_owned(), UPSTREAM_KEY.to_owned()),
    ];
    let s = Stack::start(StackOptions { models: Some(models), extra_env, ..StackOptions::default() }).await;
    let key = "sk-pool-user-000001";
    s.create_key(key, 1_000_000).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let body = json!({"model": "pooled", "stream": i % 2 == 1, "messages": [{"role": "user", "content": "hi"}]});
        let resp = s.chat(key, &body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i} failed over to the deployment that answers");
        ids.push(resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned());
        resp.text().await.unwrap();
    }
    let served = s.served().await;
    assert_eq!(served.len(), 6, "each request answered once, by the good deployment");
    assert!(served.iter().all(|x| x.api_key_header.as_deref() == Some(UPSTREAM_KEY)), "each attempt its own key");
    assert!(served.iter().all(|x| x.path.starts_with("/openai/deployments/dep-pool/chat/completions")));
    assert!(busy_hits.load(Ordering::SeqCst) >= 1, "the busy deployment was tried and failed over from");
    let good = s.mock.trim_start_matches("http://").to_owned();
    let mut billed = 0;
    for id in &ids {
        let row = s.settled_row(id).await;
        billed += row.get_i64("charged_tokens").unwrap();
        assert_eq!(row.get_str("deployment"), Ok("dep-pool"));
        assert_eq!(row.get_str("upstream"), Ok(good.as_str()), "the deployment of the pool that answered");
    }
    let upstream: i64 = served.iter().map(|x| x.prompt_tokens + x.completion_tokens).sum();
    assert_eq!(billed, upstream, "billed once, on the answer the client got");
    assert_eq!(s.audit_rows(key).await.len(), 6);
    assert_eq!(s.settled_balance(key).await, 1_000_000 - upstream);
}
