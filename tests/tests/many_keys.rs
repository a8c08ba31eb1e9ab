//! Many tenants through real Envoy: two gateways (Envoy + sidecar each) on
//! one MongoDB, requests naming no maximum spread evenly over a thousand
//! keys. Every answered request has exactly one audit row, every key's
//! balance is exactly what its rows charged, and what the rows charged is
//! exactly what the mock upstreams served. The load is a short pass; `make
//! bench` (`BENCH_ONLY=keys`) measures the rates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use bridge_tests::stack::{Stack, StackOptions};
use bridge_tests::unique_db;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use serde_json::json;

const KEYS: usize = 1_000;
const REQUESTS: usize = 2_000;
const BALANCE: i64 = 1_000_000;

fn key(i: usize) -> String {
    format!("sk-tenant-{i:06}-of-many")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keys_over_two_gateways_are_each_billed_exactly_with_one_row_a_request() {
    let opts = StackOptions { db_name: Some(unique_db("many_keys")), ..StackOptions::default() };
    let gws = [Stack::start(opts.clone()).await, Stack::start(opts).await];
    futures::stream::iter((0..KEYS).map(|i| {
        let gw = &gws[0];
        async move { gw.create_key(&key(i), BALANCE).await }
    }))
    .buffer_unordered(8)
    .collect::<Vec<()>>()
    .await;

    // Spread evenly: request i goes to key i % KEYS on gateway i % 2, sixteen at a time.
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "hello from a tenant"}]});
    let answers: Vec<(usize, u16, Option<String>)> = futures::stream::iter((0..REQUESTS).map(|i| {
        let (gw, k, body) = (&gws[i % 2], key(i % KEYS), body.clone());
        async move {
            // A client retries a 503 (backpressure) after its Retry-After, as OpenAI's SDKs do.
            for _ in 0..30 {
                let resp = gw.chat(&k, &body).send().await.unwrap();
                let status = resp.status().as_u16();
                let id = resp.headers().get("x-bridge-request-id").map(|v| v.to_str().unwrap().to_owned());
                if status != 503 {
                    return (i % KEYS, status, id);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            (i % KEYS, 503, None)
        }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    let answered: Vec<&(usize, u16, Option<String>)> = answers.iter().filter(|a| a.1 == 200).collect();
    assert_eq!(answered.len(), REQUESTS, "every request answered: {:?}", answers.iter().find(|a| a.1 != 200));

    // Every answered request settles: one row each, and no key holds anything after.
    let audit = gws[0].db.collection::<Document>("audit_logs");
    let keys = gws[0].db.collection::<Document>("api_keys");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows = audit.count_documents(doc! {}).await.unwrap() as usize;
        let holding = keys
            .count_documents(
                doc! {"$or": [{"leases_n": {"$gt": 0}}, {"holds_n": {"$gt": 0}}, {"outbox_n": {"$gt": 0}}]},
            )
            .await
            .unwrap();
        if rows >= REQUESTS && holding == 0 {
            assert_eq!(rows, REQUESTS, "one row a request, no more");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows} of {REQUESTS} rows, {holding} keys still holding");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows: Vec<Document> = audit.find(doc! {}).await.unwrap().try_collect().await.unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|r| r.get_str("request_id").unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), REQUESTS, "each row its own request");
    for (_, _, id) in &answered {
        assert!(ids.binary_search(&id.as_deref().unwrap()).is_ok(), "no row for {id:?}");
    }

    // Each key's balance is exactly what its rows charged; the rows are what the upstreams served.
    let mut charged: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        *charged.entry(r.get_str("key_id").unwrap().to_owned()).or_default() += r.get_i64("total_tokens").unwrap();
    }
    let docs: Vec<Document> = keys.find(doc! {}).await.unwrap().try_collect().await.unwrap();
    assert_eq!(docs.len(), KEYS);
    for d in &docs {
        let hash = d.get_str("_id").unwrap();
        let used = charged.get(hash).copied().unwrap_or_default();
        assert!(used > 0, "{hash}: its requests charged nothing");
        assert_eq!(d.get_i64("balance_tokens").unwrap(), BALANCE - used, "{hash}");
    }
    let mut served = 0;
    for gw in &gws {
        served += gw.served().await.iter().map(|s| s.prompt_tokens + s.completion_tokens).sum::<i64>();
    }
    assert_eq!(charged.values().sum::<i64>(), served, "charged exactly what was served");
}
