//! The sidecar over HTTP against the MongoDB-wire server: the seed's admin flow,
//! validation, reservations under contention, idempotent settlement, hold
//! expiry, a restart between settlement batches, and leases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bridge_protocol::{
    key_hash, LeaseClose, LeaseReply, LeaseRequest, ReserveReply, ReserveRequest, SettleOutcome, SettleRecord,
    SettleReply, UsageSource,
};
use bridge_tests::{mongo_uri, start_sidecar, unique_db};
use mongodb::bson::{doc, Document};
use openclaw_sidecar::config::Secret;
use openclaw_sidecar::ledger::{Decision, KeyStatus, LeasePolicy, NewKey, Store};
use openclaw_sidecar::{app, sweeper, AppState};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const ADMIN: &str = "test-admin-token-0123456789abcdef";

struct Sidecar {
    url: String,
    http: Client,
    db: mongodb::Database,
    state: AppState,
}

async fn start_with(ttl: Duration, internal: Option<&str>) -> Sidecar {
    start_with_store(ttl, internal, |store| store).await
}

async fn start_with_store(ttl: Duration, internal: Option<&str>, tune: impl FnOnce(Store) -> Store) -> Sidecar {
    let db_name = unique_db("sidecar");
    let store = tune(Store::connect(&mongo_uri(), &db_name, ttl).await.unwrap());
    store.ensure_indexes().await.unwrap();
    let state = AppState::new(store, &Secret::new(ADMIN), internal.map(Secret::new));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let db = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap().database(&db_name);
    Sidecar { url, http: Client::new(), db, state }
}

async fn start() -> Sidecar {
    start_with(Duration::from_secs(1800), None).await
}

/// Leases that may take the whole balance (the tests of lease mechanics).
fn whole_share(store: Store) -> Store {
    store.with_lease_policy(LeasePolicy { share_percent: 100, ..LeasePolicy::default() })
}

impl Sidecar {
    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn create(&self, key: &str, balance: i64) -> Value {
        let (s, v) = self
            .admin(
                reqwest::Method::POST,
                "/admin/keys",
                Some(json!({"api_key": key, "user_name": "张三", "balance_tokens": balance, "status": "active"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    async fn reserve(&self, key: &str, request_id: &str, estimate: i64) -> ReserveReply {
        let resp = self
            .http
            .post(format!("{}/internal/reserve", self.url))
            .json(&json!({"key_hash": key_hash(key), "request_id": request_id, "model": "gpt-5-nano", "estimate": estimate}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    async fn settle(&self, records: &[SettleRecord]) -> SettleReply {
        settle_at(&self.http, &self.url, records).await
    }

    async fn lease(&self, key: &str, lease_id: &str, want: i64, min: i64) -> (StatusCode, Option<LeaseReply>) {
        let resp = self
            .http
            .post(format!("{}/internal/lease", self.url))
            .json(&json!({"key_hash": key_hash(key), "lease_id": lease_id, "model": "gpt-5-nano", "want": want, "min": min}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.ok().filter(|_| status == StatusCode::OK))
    }

    async fn granted(&self, key: &str, lease_id: &str, want: i64, min: i64) -> i64 {
        match self.lease(key, lease_id, want, min).await {
            (StatusCode::OK, Some(LeaseReply::Grant { tokens, .. })) => tokens,
            other => panic!("lease {lease_id} not granted: {other:?}"),
        }
    }

    /// A settlement batch as the filter sends it.
    async fn batch(&self, batch: Value) -> SettleReply {
        let resp = self.http.post(format!("{}/internal/settle", self.url)).json(&batch).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    async fn close(&self, closes: &[LeaseClose]) -> SettleReply {
        self.batch(json!({"records": [], "closes": closes})).await
    }

    /// A gateway's progress report of its open leases: the leases it is told to close.
    async fn report(&self, key: &str, leases: &[(&str, i64, i64)]) -> Vec<String> {
        let progress: Vec<Value> = leases
            .iter()
            .map(|(id, t, n)| json!({"key_hash": key_hash(key), "lease_id": id, "drawn_tokens": t, "drawn_n": n}))
            .collect();
        self.batch(json!({"records": [], "progress": progress})).await.recalled
    }

    async fn key_doc(&self, key: &str) -> Document {
        self.db.collection::<Document>("api_keys").find_one(doc! {"_id": key_hash(key)}).await.unwrap().unwrap()
    }

    async fn balance(&self, key: &str) -> i64 {
        let d =
            self.db.collection::<Document>("api_keys").find_one(doc! {"_id": key_hash(key)}).await.unwrap().unwrap();
        d.get_i64("balance_tokens").unwrap()
    }

    async fn audit_rows(&self) -> Vec<Document> {
        use futures::TryStreamExt;
        self.db.collection::<Document>("audit_logs").find(doc! {}).await.unwrap().try_collect().await.unwrap()
    }
}

async fn settle_at(http: &Client, url: &str, records: &[SettleRecord]) -> SettleReply {
    let resp = http.post(format!("{url}/internal/settle")).json(&json!({"records": records})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

fn record(key: &str, request_id: &str, reserved: i64, input: i64, output: i64) -> SettleRecord {
    SettleRecord {
        request_id: request_id.into(),
        key_hash: key_hash(key),
        model: "gpt-5-nano".into(),
        reserved,
        input_tokens: input,
        output_tokens: output,
        usage_source: UsageSource::Upstream,
        duration_ms: 12,
        status_code: 200,
        stream: true,
        unreserved: false,
        release: false,
        lease_id: None,
        detail: bridge_protocol::RecordDetail::default(),
    }
}

fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
    assert!(e.as_object().unwrap().contains_key("param") && e.as_object().unwrap().contains_key("code"), "{v}");
}

#[tokio::test]
async fn seed_flow_create_list_top_up_freeze() {
    let s = start().await;
    let created = s.create("sk-my-user-key-001", 10_000).await;
    assert_eq!(created["user_name"], "张三");
    assert_eq!(created["balance_tokens"], 10_000);
    assert_eq!(created["status"], "active");
    assert_eq!(created["api_key"], "sk-my-...-001", "a given key is shown masked");

    let (st, list) = s.admin(reqwest::Method::GET, "/admin/keys", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["api_key"], "sk-my-...-001");
    assert!(!list.to_string().contains("sk-my-user-key-001"), "listing leaks the key: {list}");

    let (st, v) =
        s.admin(reqwest::Method::PATCH, "/admin/keys/sk-my-user-key-001", Some(json!({"balance_tokens": 500}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["balance_tokens"], 10_500);
    assert_eq!(s.balance("sk-my-user-key-001").await, 10_500);

    let (st, v) =
        s.admin(reqwest::Method::PATCH, "/admin/keys/sk-my-user-key-001", Some(json!({"status": "frozen"}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "frozen");
    match s.reserve("sk-my-user-key-001", "r-frozen", 10).await {
        ReserveReply::Refuse { status: 403, error } => assert_eq!(error.code.as_deref(), Some("key_frozen")),
        other => panic!("frozen key reserved: {other:?}"),
    }

    // Top-up and reactivation together, then a deduction that may not go below zero.
    let (st, v) = s
        .admin(
            reqwest::Method::PATCH,
            "/admin/keys/sk-my-user-key-001",
            Some(json!({"balance_tokens": -500, "status": "active"})),
        )
        .await;
    assert_eq!(
        (st, v["balance_tokens"].as_i64(), v["status"].as_str()),
        (StatusCode::OK, Some(10_000), Some("active"))
    );
    let (st, v) = s
        .admin(reqwest::Method::PATCH, "/admin/keys/sk-my-user-key-001", Some(json!({"balance_tokens": -10_001})))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "balance_would_go_negative");
    assert_eq!(s.balance("sk-my-user-key-001").await, 10_000);

    // Stored hashed: no document holds the key itself.
    let raw: Vec<Document> = {
        use futures::TryStreamExt;
        s.db.collection::<Document>("api_keys").find(doc! {}).await.unwrap().try_collect().await.unwrap()
    };
    assert_eq!(raw[0].get_str("_id").unwrap(), key_hash("sk-my-user-key-001"));
    assert!(!format!("{raw:?}").contains("sk-my-user-key-001"));
}

#[tokio::test]
async fn generated_keys_are_shown_once_and_work() {
    let s = start().await;
    let (st, v) =
        s.admin(reqwest::Method::POST, "/admin/keys", Some(json!({"user_name": "li", "balance_tokens": 50}))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let key = v["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-") && key.len() == 51, "{key}");
    let (_, list) = s.admin(reqwest::Method::GET, "/admin/keys", None).await;
    assert!(!list.to_string().contains(&key));
    assert!(matches!(s.reserve(&key, "r1", 50).await, ReserveReply::Admit { balance_tokens: 0, .. }));
}

#[tokio::test]
async fn admin_auth_failures_are_401_in_openai_shape() {
    let s = start().await;
    for auth in [None, Some("Bearer wrong-token"), Some("Basic dGVzdA=="), Some(format!("Bearer {ADMIN}x").as_str())] {
        let mut req = s.http.get(format!("{}/admin/keys", s.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let v: Value = resp.json().await.unwrap();
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "invalid_admin_token");
    }
}

#[tokio::test]
async fn every_validation_error_names_its_field() {
    let s = start().await;
    s.create("sk-existing-key-1", 10).await;
    let cases = [
        (json!({"api_key": "sk-abcdefgh1", "user_name": "a", "balance_tokens": "100"}), Some("balance_tokens")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": "a", "balance_tokens": 1.5}), Some("balance_tokens")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": "a", "balance_tokens": -1}), Some("balance_tokens")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": "a", "status": "deleted"}), Some("status")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": "  "}), Some("user_name")),
        (json!({"api_key": "sk-abcdefgh1"}), Some("user_name")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": 5}), Some("user_name")),
        (json!({"api_key": "sk-abcdefgh1", "user_name": "a", "colour": "red"}), Some("colour")),
        (json!({"api_key": "short", "user_name": "a"}), Some("api_key")),
        (json!({"api_key": "sk with space", "user_name": "a"}), Some("api_key")),
        (json!([1, 2]), None),
    ];
    for (body, param) in cases {
        let (st, v) = s.admin(reqwest::Method::POST, "/admin/keys", Some(body.clone())).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_openai_error(&v);
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
    }
    // Not JSON at all.
    let resp = s
        .http
        .post(format!("{}/admin/keys", s.url))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_openai_error(&resp.json().await.unwrap());
    // Deeply nested, invalid UTF-8, no content type: 400 in our shape, never a crash.
    let nested = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    for (body, content_type) in [
        (nested.into_bytes(), "application/json"),
        (vec![b'{', 0xff, 0xfe, b'}'], "application/json"),
        (b"{}".to_vec(), "text/plain"),
    ] {
        let resp = s
            .http
            .post(format!("{}/admin/keys", s.url))
            .bearer_auth(ADMIN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_openai_error(&resp.json().await.unwrap());
    }
    // Path tricks on the key: hashed like any key, so simply unknown.
    for path in ["/admin/keys/..%2F..%2Finternal%2Fsettle", "/admin/keys/%00", "/admin/keys/%E2%80%AE"] {
        let resp = s
            .http
            .patch(format!("{}{path}", s.url))
            .bearer_auth(ADMIN)
            .json(&json!({"balance_tokens": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert_openai_error(&resp.json().await.unwrap());
    }
    // Duplicate.
    let (st, v) = s
        .admin(reqwest::Method::POST, "/admin/keys", Some(json!({"api_key": "sk-existing-key-1", "user_name": "b"})))
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("key_exists")), "{v}");
    // PATCH: unknown key, nothing to change, bad types.
    let (st, v) =
        s.admin(reqwest::Method::PATCH, "/admin/keys/sk-nobody-here", Some(json!({"balance_tokens": 5}))).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_openai_error(&v);
    let (st, _) = s.admin(reqwest::Method::PATCH, "/admin/keys/sk-existing-key-1", Some(json!({}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) =
        s.admin(reqwest::Method::PATCH, "/admin/keys/sk-existing-key-1", Some(json!({"status": "gone"}))).await;
    assert_eq!((st, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("status")));
    let (st, v) =
        s.admin(reqwest::Method::PATCH, "/admin/keys/sk-existing-key-1", Some(json!({"user_name": "x"}))).await;
    assert_eq!((st, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("user_name")));
    // Listing parameters.
    for q in ["limit=0", "limit=1001", "limit=abc", "offset=-1", "page=2"] {
        let (st, v) = s.admin(reqwest::Method::GET, &format!("/admin/keys?{q}"), None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_openai_error(&v);
    }
    assert_eq!(s.balance("sk-existing-key-1").await, 10);
}

#[tokio::test]
async fn listing_is_paginated() {
    let s = start().await;
    for i in 0..5 {
        s.create(&format!("sk-page-key-{i:03}"), i).await;
    }
    let (_, p1) = s.admin(reqwest::Method::GET, "/admin/keys?limit=2", None).await;
    let (_, p3) = s.admin(reqwest::Method::GET, "/admin/keys?limit=2&offset=4", None).await;
    assert_eq!(p1["data"].as_array().unwrap().len(), 2);
    assert_eq!((p1["total"].as_u64(), p1["has_more"].as_bool()), (Some(5), Some(true)));
    assert_eq!(p3["data"].as_array().unwrap().len(), 1);
    assert_eq!(p3["has_more"], false);
    assert_eq!(p3["data"][0]["balance_tokens"], 4);
}

#[tokio::test]
async fn reservations_refuse_unknown_and_broke_keys_with_their_codes() {
    let s = start().await;
    s.create("sk-small-balance", 5).await;
    match s.reserve("sk-not-a-key-at-all", "r1", 1).await {
        ReserveReply::Refuse { status: 401, error } => assert_eq!(error.code.as_deref(), Some("invalid_api_key")),
        other => panic!("{other:?}"),
    }
    match s.reserve("sk-small-balance", "r2", 6).await {
        ReserveReply::Refuse { status: 429, error } => {
            assert_eq!(error.code.as_deref(), Some("insufficient_quota"));
            assert_eq!(error.kind, "insufficient_quota");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.balance("sk-small-balance").await, 5);
    // Malformed reservations are 400s, not refusals.
    for body in [
        json!({"key_hash": key_hash("x"), "request_id": "a.b", "model": "m", "estimate": 1}),
        json!({"key_hash": "nothex", "request_id": "ab", "model": "m", "estimate": 1}),
        json!({"key_hash": key_hash("x"), "request_id": "ab", "model": "m", "estimate": 0}),
        json!({"key_hash": key_hash("x"), "request_id": "ab", "model": "m".repeat(257), "estimate": 1}),
    ] {
        let resp = s.http.post(format!("{}/internal/reserve", s.url)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    // A field this sidecar does not know (a newer filter's) is ignored, not refused:
    // in a rolling upgrade a 400 here would be a 503 for every request.
    let newer =
        json!({"key_hash": key_hash("sk-small-balance"), "request_id": "r3", "model": "m", "estimate": 1, "extra": 1});
    let resp = s.http.post(format!("{}/internal/reserve", s.url)).json(&newer).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(matches!(resp.json().await.unwrap(), ReserveReply::Admit { balance_tokens: 4, .. }));
}

#[tokio::test]
async fn concurrent_reserves_never_overdraw_and_settlement_is_exact_and_idempotent() {
    let s = start().await;
    let key = "sk-contended-key";
    s.create(key, 10_000).await;
    let attempts = futures::future::join_all((0..200).map(|i| {
        let s = &s;
        async move { (i, s.reserve(key, &format!("req-{i}"), 100).await) }
    }))
    .await;
    let admitted: Vec<usize> =
        attempts.iter().filter_map(|(i, r)| matches!(r, ReserveReply::Admit { .. }).then_some(*i)).collect();
    assert_eq!(admitted.len(), 100, "exactly the balance's worth is admitted");
    for (_, r) in &attempts {
        if let ReserveReply::Refuse { status, .. } = r {
            assert_eq!(*status, 429);
        }
    }
    assert_eq!(s.balance(key).await, 0, "the balance never goes below zero");

    // Settle with pseudo-random actual usage (a fixed LCG keeps the test reproducible).
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut records = Vec::new();
    for i in &admitted {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let input = (seed >> 33) as i64 % 60;
        let output = (seed >> 40) as i64 % 41;
        records.push(record(key, &format!("req-{i}"), 100, input, output));
    }
    let used: i64 = records.iter().map(|r| r.input_tokens + r.output_tokens).sum();
    for batch in records.chunks(30) {
        let reply = s.settle(batch).await;
        assert!(reply.results.iter().all(|r| r.outcome == SettleOutcome::Settled), "{reply:?}");
    }
    assert_eq!(s.balance(key).await, 10_000 - used);
    let rows = s.audit_rows().await;
    assert_eq!(rows.len(), 100);
    let audited: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(audited, used);
    for field in [
        "timestamp",
        "user_id",
        "api_key",
        "model",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "duration_ms",
        "status_code",
        "request_id",
        "stream",
        "usage_source",
        "expired_hold",
    ] {
        assert!(rows[0].contains_key(field), "audit row lacks {field}: {:?}", rows[0]);
    }
    assert_eq!(rows[0].get_str("api_key").unwrap(), "sk-co...-key");
    assert_eq!(rows[0].get_str("user_id").unwrap(), "张三");

    // The same batch again changes nothing.
    let reply = s.settle(&records).await;
    assert!(reply.results.iter().all(|r| r.outcome == SettleOutcome::AlreadySettled), "{reply:?}");
    assert_eq!(s.balance(key).await, 10_000 - used);
    assert_eq!(s.audit_rows().await.len(), 100);

    // A request id nobody reserved is reported, not dropped.
    let reply = s.settle(&[record(key, "never-reserved", 100, 1, 1)]).await;
    assert_eq!(reply.results[0].outcome, SettleOutcome::Unknown);
    let reply = s.settle(&[record(key, "bad.id", 100, 1, 1)]).await;
    assert_eq!(reply.results[0].outcome, SettleOutcome::Invalid);
}

#[tokio::test]
async fn usage_beyond_the_hold_is_charged_in_full() {
    let s = start().await;
    let key = "sk-overrun-key-1";
    s.create(key, 1_000).await;
    assert!(matches!(s.reserve(key, "over-1", 100).await, ReserveReply::Admit { balance_tokens: 900, .. }));
    let reply = s.settle(&[record(key, "over-1", 100, 90, 60)]).await;
    assert_eq!(reply.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 850);
}

#[tokio::test]
async fn a_weighted_charge_is_what_leaves_the_balance_on_holds_and_leases_and_rows_keep_the_raw_counts() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let key = "sk-weighted-key-1";
    s.create(key, 1_000).await;
    assert!(matches!(s.reserve(key, "w-1", 100).await, ReserveReply::Admit { .. }));
    let weighted = |r: SettleRecord, charged: i64| SettleRecord {
        detail: bridge_protocol::RecordDetail {
            cached_tokens: 8,
            reasoning_tokens: 4,
            charged_tokens: Some(charged),
            endpoint: Some("responses".into()),
            ..Default::default()
        },
        ..r
    };
    assert_eq!(
        s.settle(&[weighted(record(key, "w-1", 100, 20, 10), 75)]).await.results[0].outcome,
        SettleOutcome::Settled
    );
    assert_eq!(s.balance(key).await, 925, "75 charged, not the 30 tokens counted");
    // From a lease: the close returns what its rows did not charge.
    assert_eq!(s.granted(key, "WL", 300, 100).await, 300);
    let drawn_row = weighted(drawn(key, "WL", "w-2", 100, 20, 10), 60);
    assert_eq!(s.settle(&[drawn_row]).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.close(&[close_of(key, "WL", Some(300), 100, 1)]).await.closes[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 925 - 60);
    let rows = s.audit_rows().await;
    let row = rows.iter().find(|r| r.get_str("request_id") == Ok("w-1")).unwrap();
    assert_eq!(
        (
            row.get_i64("total_tokens"),
            row.get_i64("charged_tokens"),
            row.get_i64("cached_tokens"),
            row.get_i64("reasoning_tokens")
        ),
        (Ok(30), Ok(75), Ok(8), Ok(4))
    );
    assert_eq!(row.get_str("endpoint"), Ok("responses"));
    let (_, report) = s.admin(reqwest::Method::GET, "/admin/usage", None).await;
    assert_eq!(
        (report["data"][0]["total_tokens"].as_i64(), report["data"][0]["charged_tokens"].as_i64()),
        (Some(60), Some(135))
    );
    assert_eq!(report["data"][0]["cached_tokens"], 16);
    // Counts that cannot be are refused, alone.
    let bad = SettleRecord {
        detail: bridge_protocol::RecordDetail { cached_tokens: 50, ..Default::default() },
        ..record(key, "w-3", 100, 20, 10)
    };
    assert_eq!(s.settle(&[bad]).await.results[0].outcome, SettleOutcome::Invalid);
}

#[tokio::test]
async fn an_unsettled_hold_expires_and_is_charged_in_full() {
    let s = start_with(Duration::from_secs(1), None).await;
    let key = "sk-expiring-key";
    s.create(key, 1_000).await;
    assert!(matches!(s.reserve(key, "lost-1", 300).await, ReserveReply::Admit { .. }));
    assert!(matches!(s.reserve(key, "kept-1", 100).await, ReserveReply::Admit { .. }));
    assert_eq!(s.settle(&[record(key, "kept-1", 100, 10, 10)]).await.results[0].outcome, SettleOutcome::Settled);
    // Nothing expires before the TTL has passed.
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 1);
    assert_eq!(s.balance(key).await, 1_000 - 300 - 20, "the expired hold is charged, the settled one refunded");
    let rows = s.audit_rows().await;
    let lost = rows.iter().find(|r| r.get_str("request_id") == Ok("lost-1")).unwrap();
    assert_eq!(lost.get_bool("expired_hold"), Ok(true));
    assert_eq!(lost.get_str("usage_source"), Ok("estimate"));
    assert_eq!(lost.get_i64("total_tokens"), Ok(300));
    // A late settlement still settles: the key pays what it used and gets the
    // estimate back, and its row replaces the expired one (one row a request).
    let late = s.settle(&[record(key, "lost-1", 300, 5, 5)]).await;
    assert_eq!(late.results[0].outcome, SettleOutcome::Settled, "{late:?}");
    assert_eq!(s.balance(key).await, 1_000 - 10 - 20);
    let rows = s.audit_rows().await;
    assert_eq!(rows.len(), 2);
    let lost = rows.iter().find(|r| r.get_str("request_id") == Ok("lost-1")).unwrap();
    assert_eq!((lost.get_bool("expired_hold"), lost.get_i64("total_tokens")), (Ok(false), Ok(10)), "{lost:?}");
    assert_eq!(lost.get_bool("settled_late"), Ok(true));
    // Sent again (a lost reply): nothing changes.
    let again = s.settle(&[record(key, "lost-1", 300, 5, 5)]).await;
    assert_eq!(again.results[0].outcome, SettleOutcome::AlreadySettled);
    assert_eq!(s.balance(key).await, 970);
    // A second pass finds nothing more.
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap(), (0, 0));
    assert_eq!(s.audit_rows().await.len(), 2);
}

#[tokio::test]
async fn an_audit_row_left_in_the_outbox_by_a_crash_is_written_once() {
    let s = start().await;
    let key = "sk-crashing-key";
    s.create(key, 1_000).await;
    assert!(matches!(s.reserve(key, "crash-1", 100).await, ReserveReply::Admit { .. }));
    // Do by hand what settle's first step does, then "crash" before the audit insert.
    let entry = doc! {"timestamp": mongodb::bson::DateTime::now(), "request_id": "crash-1", "key_id": key_hash(key),
    "model": "m", "input_tokens": 30_i64, "output_tokens": 10_i64, "total_tokens": 40_i64, "duration_ms": 5_i64,
    "status_code": 200, "stream": false, "usage_source": "upstream", "expired_hold": false, "reserved_tokens": 100_i64};
    s.db.collection::<Document>("api_keys")
        .update_one(
            doc! {"_id": key_hash(key), "holds.crash-1.tokens": 100_i64},
            doc! {"$inc": {"balance_tokens": 60_i64, "holds_n": -1_i64, "outbox_n": 1_i64},
            "$unset": {"holds.crash-1": ""}, "$set": {"outbox.crash-1": entry}},
        )
        .await
        .unwrap();
    // A retry of the settlement sees it as settled; the sweeper writes the row.
    let retry = s.settle(&[record(key, "crash-1", 100, 30, 10)]).await;
    assert_eq!(retry.results[0].outcome, SettleOutcome::AlreadySettled);
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap(), (0, 1));
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap(), (0, 0));
    let rows = s.audit_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get_str("user_id"), Ok("张三"));
    assert_eq!(s.balance(key).await, 960);
}

#[tokio::test]
async fn internal_api_requires_the_shared_secret_when_configured() {
    let s = start_with(Duration::from_secs(1800), Some("inner-secret")).await;
    s.create("sk-guarded-key", 100).await;
    let body = json!({"key_hash": key_hash("sk-guarded-key"), "request_id": "g1", "model": "m", "estimate": 1});
    let resp = s.http.post(format!("{}/internal/reserve", s.url)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = s
        .http
        .post(format!("{}/internal/reserve", s.url))
        .header(bridge_protocol::INTERNAL_TOKEN_HEADER, "inner-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.balance("sk-guarded-key").await, 99);
}

#[tokio::test]
async fn a_restart_between_settlement_batches_neither_double_charges_nor_loses_rows() {
    let db = unique_db("restart");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_openclaw-sidecar"));
    let http = Client::new();
    let key = "sk-restart-key-1";
    let (mut first, url) = start_sidecar(&bin, &db, ADMIN, &[]);
    let resp = http
        .post(format!("{url}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"api_key": key, "user_name": "wang", "balance_tokens": 5_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let mut records = Vec::new();
    for i in 0..20 {
        let resp = http
            .post(format!("{url}/internal/reserve"))
            .json(&json!({"key_hash": key_hash(key), "request_id": format!("rs-{i}"), "model": "m", "estimate": 200}))
            .send()
            .await
            .unwrap();
        let reply: ReserveReply = resp.json().await.unwrap();
        assert!(matches!(reply, ReserveReply::Admit { .. }), "{reply:?}");
        records.push(record(key, &format!("rs-{i}"), 200, 50 + i, 25));
    }
    let (batch1, batch2) = records.split_at(10);
    assert!(settle_at(&http, &url, batch1).await.results.iter().all(|r| r.outcome == SettleOutcome::Settled));
    let status = first.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let (_second, url) = start_sidecar(&bin, &db, ADMIN, &[]);
    // The filter resends batch 1 (its reply was "lost") together with batch 2.
    let again = settle_at(&http, &url, &records).await;
    for (r, result) in records.iter().zip(&again.results) {
        let want = if batch2.contains(r) { SettleOutcome::Settled } else { SettleOutcome::AlreadySettled };
        assert_eq!(result.outcome, want, "{}", r.request_id);
    }
    let used: i64 = records.iter().map(|r| r.input_tokens + r.output_tokens).sum();
    let resp = http.get(format!("{url}/admin/keys")).bearer_auth(ADMIN).send().await.unwrap();
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["data"][0]["balance_tokens"], 5_000 - used);
    assert_eq!(list["data"][0]["held_tokens"], 0);
    let mongo = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap().database(&db);
    let rows = mongo.collection::<Document>("audit_logs").count_documents(doc! {}).await.unwrap();
    assert_eq!(rows, 20);
    // The log file got the start-up, admin and settlement lines, without the key.
    let log = std::fs::read_to_string(bridge_tests::log_dir().join(format!("{db}-app.log"))).unwrap();
    assert!(
        log.contains("sidecar listening") && log.contains("admin created key") && log.contains("settlement batch"),
        "{log}"
    );
    assert!(!log.contains(key) && !log.contains(ADMIN));
}

#[tokio::test]
async fn the_binary_refuses_to_start_without_admin_token() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openclaw-sidecar"))
        .env_clear()
        .env("MONGODB_URI", mongo_uri())
        .current_dir(bridge_tests::log_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ADMIN_TOKEN"), "{out:?}");
}

#[tokio::test]
async fn concurrent_outbox_flushes_write_each_row_once_and_keep_the_count_exact() {
    let s = start().await;
    let key = "sk-double-flush";
    s.create(key, 1_000).await;
    let keys = s.db.collection::<Document>("api_keys");
    for (i, id) in ["f-1", "f-2", "f-3"].iter().enumerate() {
        let entry = doc! {"timestamp": mongodb::bson::DateTime::now(), "request_id": *id, "key_id": key_hash(key),
        "model": "m", "input_tokens": 1_i64, "output_tokens": i as i64, "total_tokens": 1 + i as i64,
        "duration_ms": 5_i64, "status_code": 200, "stream": false, "usage_source": "upstream",
        "expired_hold": false, "reserved_tokens": 10_i64};
        keys.update_one(
            doc! {"_id": key_hash(key)},
            doc! {"$inc": {"outbox_n": 1_i64}, "$set": {format!("outbox.{id}"): entry}},
        )
        .await
        .unwrap();
    }
    let (a, b) = tokio::join!(sweeper::sweep_once(&s.state), sweeper::sweep_once(&s.state));
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(s.audit_rows().await.len(), 3);
    let d = keys.find_one(doc! {"_id": key_hash(key)}).await.unwrap().unwrap();
    assert_eq!(d.get_i64("outbox_n"), Ok(0), "{d:?}");
    assert!(d.get_document("outbox").unwrap().is_empty());
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap(), (0, 0));
}

#[tokio::test]
async fn a_release_undoes_a_hold_and_blocks_a_reservation_that_comes_later() {
    let s = start_with(Duration::from_secs(1), None).await;
    let key = "sk-released-key";
    s.create(key, 1_000).await;
    let release = |id: &str| SettleRecord { status_code: 503, release: true, ..record(key, id, 100, 0, 0) };
    // Reserved, then released (the filter timed out waiting): the hold is undone.
    assert!(matches!(s.reserve(key, "late-1", 100).await, ReserveReply::Admit { balance_tokens: 900, .. }));
    assert_eq!(s.settle(&[release("late-1")]).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 1_000);
    // Released before the reservation arrived: the reservation is refused.
    assert_eq!(s.settle(&[release("late-2")]).await.results[0].outcome, SettleOutcome::Unknown);
    let resp = s
        .http
        .post(format!("{}/internal/reserve", s.url))
        .json(&json!({"key_hash": key_hash(key), "request_id": "late-2", "model": "m", "estimate": 100}))
        .send()
        .await
        .unwrap();
    assert_ne!(resp.status(), StatusCode::OK);
    assert_eq!(s.balance(key).await, 1_000);
    // The mark is forgotten after the hold TTL; nothing else changed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sweeper::sweep_once(&s.state).await.unwrap();
    let d = s.db.collection::<Document>("api_keys").find_one(doc! {"_id": key_hash(key)}).await.unwrap().unwrap();
    assert_eq!(d.get_i64("released_n"), Ok(0), "{d:?}");
    assert_eq!(d.get_i64("holds_n"), Ok(0));
    let rows = s.audit_rows().await;
    assert_eq!(rows.len(), 1, "only the released hold leaves a row");
    assert_eq!((rows[0].get_i64("total_tokens"), rows[0].get_i32("status_code")), (Ok(0), Ok(503)));
}

fn drawn(key: &str, lease: &str, request_id: &str, reserved: i64, input: i64, output: i64) -> SettleRecord {
    SettleRecord { lease_id: Some(lease.into()), ..record(key, request_id, reserved, input, output) }
}

fn close_of(key: &str, lease: &str, tokens: Option<i64>, drawn_tokens: i64, drawn_n: i64) -> LeaseClose {
    LeaseClose { key_hash: key_hash(key), lease_id: lease.into(), tokens, drawn_tokens, drawn_n }
}

#[tokio::test]
async fn one_batch_settles_the_records_of_many_keys_leases_each_once_and_finalises_the_closed_ones() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let keys: Vec<String> = (0..20).map(|i| format!("sk-many-leases-{i:02}")).collect();
    let mut records = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        s.create(key, 1_000).await;
        let lease = format!("L{i}");
        s.granted(key, &lease, 500, 100).await;
        // Half the leases closed before their records arrive, half still open.
        if i % 2 == 0 {
            s.close(&[close_of(key, &lease, Some(500), 200, 2)]).await;
        }
        records.push(drawn(key, &lease, &format!("{key}-a"), 100, 20, 10));
        records.push(drawn(key, &lease, &format!("{key}-b"), 100, 5, 5));
    }
    let reply = s.settle(&records).await;
    assert!(reply.results.iter().all(|r| r.outcome == SettleOutcome::Settled), "{:?}", reply.results);
    for (i, key) in keys.iter().enumerate() {
        let d = s.key_doc(key).await;
        match i % 2 {
            // Finalised by the batch: the lease gone, the key paid its rows' 40.
            0 => assert_eq!((d.get_i64("leases_n"), d.get_i64("balance_tokens")), (Ok(0), Ok(960)), "{key}"),
            _ => assert_eq!((d.get_i64("leases_n"), d.get_i64("balance_tokens")), (Ok(1), Ok(500)), "{key}"),
        }
    }
    assert_eq!(s.audit_rows().await.len(), 40);
    let again = s.settle(&records).await;
    assert!(again.results.iter().all(|r| r.outcome == SettleOutcome::AlreadySettled), "{:?}", again.results);
    assert_eq!(s.audit_rows().await.len(), 40, "one row a request");
}

#[tokio::test]
async fn one_batch_closes_the_leases_of_many_keys_each_once_and_finalises_those_whose_rows_are_in() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let keys: Vec<String> = (0..30).map(|i| format!("sk-many-closes-{i:02}")).collect();
    let mut closes = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        s.create(key, 1_000).await;
        let lease = format!("C{i}");
        s.granted(key, &lease, 500, 100).await;
        // A third with their two rows in, a third with one of two, a third drawn from by none.
        match i % 3 {
            0 => {
                let rows = [
                    drawn(key, &lease, &format!("{key}-a"), 100, 20, 10),
                    drawn(key, &lease, &format!("{key}-b"), 100, 5, 5),
                ];
                s.settle(&rows).await;
                closes.push(close_of(key, &lease, Some(500), 200, 2));
            }
            1 => {
                s.settle(&[drawn(key, &lease, &format!("{key}-a"), 100, 20, 10)]).await;
                closes.push(close_of(key, &lease, Some(500), 200, 2));
            }
            _ => closes.push(close_of(key, &lease, Some(500), 0, 0)),
        }
    }
    // One that claims more than its lease holds, and one of no lease at all.
    closes.push(close_of(&keys[0], "C-none", Some(500), 0, 0));
    let mut oversized = close_of(&keys[1], "C1", Some(500), 200, 2);
    oversized.tokens = Some(900);
    closes.push(oversized);
    let reply = s.close(&closes).await;
    let outcomes: Vec<SettleOutcome> = reply.closes.iter().map(|c| c.outcome).collect();
    assert!(outcomes[..30].iter().all(|o| *o == SettleOutcome::Settled), "{:?}", reply.closes);
    assert_eq!(&outcomes[30..], &[SettleOutcome::Unknown, SettleOutcome::Invalid]);
    for (i, key) in keys.iter().enumerate() {
        let d = s.key_doc(key).await;
        let state = (d.get_i64("leases_n").unwrap(), d.get_i64("balance_tokens").unwrap());
        match i % 3 {
            // Finalised: the rows' 40 paid, the rest back.
            0 => assert_eq!(state, (0, 960), "{key}"),
            // Closed, waiting for its second row: the undrawn 300 back, 200 held.
            1 => assert_eq!(state, (1, 800), "{key}"),
            _ => assert_eq!(state, (0, 1_000), "{key}"),
        }
    }
    // Sent again (a lost reply): nothing moves (a lease finalised is gone: unknown).
    let again = s.close(&closes[..30]).await;
    assert!(again.closes.iter().all(|c| c.outcome != SettleOutcome::Settled), "{:?}", again.closes);
    for (i, key) in keys.iter().enumerate() {
        let want = [960, 800, 1_000][i % 3];
        assert_eq!(s.key_doc(key).await.get_i64("balance_tokens").unwrap(), want, "{key}");
    }
    for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 3 == 1) {
        // The missing row arrives: the lease is finalised with it.
        s.settle(&[drawn(key, &format!("C{i}"), &format!("{key}-b"), 100, 5, 5)]).await;
        assert_eq!(s.key_doc(key).await.get_i64("balance_tokens").unwrap(), 960, "{key}");
    }
}

#[tokio::test]
async fn every_tick_names_the_keys_changed_since_its_cursor() {
    let s = start().await;
    let (a, b) = ("sk-changed-key-01", "sk-changed-key-02");
    s.create(a, 1_000).await;
    s.create(b, 1_000).await;
    // No cursor yet: a cursor back, no changes.
    let first = s.batch(json!({"records": []})).await;
    assert!(first.changed.is_empty());
    let cursor = first.cursor.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _) =
        s.admin(reqwest::Method::PATCH, &format!("/admin/keys/{a}"), Some(json!({"status": "frozen"}))).await;
    assert_eq!(status, StatusCode::OK);
    let reply = s.batch(json!({"records": [], "changes_since": cursor})).await;
    let frozen = reply.changed.iter().find(|c| c.key_hash == key_hash(a)).expect("the frozen key is named");
    let stamp = s.key_doc(a).await.get_datetime("updated_at").unwrap().timestamp_millis();
    assert_eq!(frozen.at_ms, stamp, "by its own stamp, the same on every reply");
    assert!(reply.cursor.unwrap() >= cursor);
    assert!(!frozen.created);
    // A key only created has no lease to end, only a refusal cached before it was made.
    let created: Vec<_> = reply.changed.iter().filter(|c| c.key_hash == key_hash(b)).collect();
    assert!(created.iter().all(|c| c.created) && !created.is_empty(), "{:?}", reply.changed);
    // Named again while the read looks back a few seconds, with the same stamp.
    let again = s.batch(json!({"records": [], "changes_since": reply.cursor})).await;
    assert!(again.changed.iter().any(|c| c.key_hash == key_hash(a) && c.at_ms == stamp));
    // Past the look-back, no more.
    tokio::time::sleep(Duration::from_millis(openclaw_sidecar::ledger::CHANGE_SLACK_MS as u64 + 200)).await;
    let past = s.batch(json!({"records": [], "changes_since": again.cursor})).await;
    let later = s.batch(json!({"records": [], "changes_since": past.cursor})).await;
    assert!(later.changed.iter().all(|c| c.key_hash != key_hash(a)), "{:?}", later.changed);
}

#[tokio::test]
async fn a_lease_takes_at_most_the_balance_and_closes_and_settlements_commute() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let key = "sk-leased-key-01";
    s.create(key, 1_000).await;
    assert_eq!(s.granted(key, "L1", 600, 100).await, 600);
    // Less left than asked but at least the request's estimate: all of it.
    assert_eq!(s.granted(key, "L2", 600, 100).await, 400);
    assert_eq!(s.balance(key).await, 0);
    // Nothing left, but the open leases hold it undrawn: not refused, recalled.
    assert!(matches!(s.lease(key, "L3", 50, 10).await, (StatusCode::OK, Some(LeaseReply::Retry))));
    // Two of L1's three requests settle in one batch, before L1 closes: their
    // rows are written, the balance moves when the lease is finalised.
    let batch = [drawn(key, "L1", "a", 100, 20, 10), drawn(key, "L1", "b", 100, 40, 10)];
    let reply = s.settle(&batch).await;
    assert!(reply.results.iter().all(|r| r.outcome == SettleOutcome::Settled), "{reply:?}");
    assert_eq!(s.audit_rows().await.len(), 2);
    // Resent (a lost reply): nothing changes.
    let again = s.settle(&batch).await;
    assert!(again.results.iter().all(|r| r.outcome == SettleOutcome::AlreadySettled), "{again:?}");
    assert_eq!(s.audit_rows().await.len(), 2);
    // L1 closes with 300 drawn by 3 requests: its other 300 return at once.
    assert_eq!(s.close(&[close_of(key, "L1", Some(600), 300, 3)]).await.closes[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 300);
    assert_eq!(
        s.close(&[close_of(key, "L1", Some(600), 300, 3)]).await.closes[0].outcome,
        SettleOutcome::AlreadySettled
    );
    let (_, admin) = s.admin(reqwest::Method::GET, "/admin/keys", None).await;
    // The admin's view is the true one: L2's 400 undrawn and what a and b did
    // not use (200 - 80) are the key's; only c's draw (100) is held.
    assert_eq!(admin["data"][0]["held_tokens"], json!(100), "{admin}");
    assert_eq!(admin["data"][0]["balance_tokens"], json!(300 + 400 + 120), "{admin}");
    // The third settles after the close: the lease is finalised, its drawn 300
    // less the 180 its rows used return, and it goes away.
    assert_eq!(s.settle(&[drawn(key, "L1", "c", 100, 100, 0)]).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 420);
    let d = s.key_doc(key).await;
    assert!(!d.get_document("leases").unwrap().contains_key("L1"), "{d:?}");
    assert_eq!(d.get_i64("leases_n"), Ok(1));
    // L2 closes with nothing drawn: the balance is what the three used less.
    s.close(&[close_of(key, "L2", Some(400), 0, 0)]).await;
    assert_eq!(s.balance(key).await, 1_000 - 30 - 50 - 100);
    assert_eq!(s.key_doc(key).await.get_i64("leases_n"), Ok(0));
    let rows = s.audit_rows().await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum::<i64>(), 180);
    // A settlement of a lease this ledger no longer knows (finalised and gone,
    // or never seen) is never dropped: it pays what it used, once.
    let stray = [drawn(key, "L9", "z", 10, 1, 1)];
    assert_eq!(s.settle(&stray).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.settle(&stray).await.results[0].outcome, SettleOutcome::AlreadySettled);
    assert_eq!(s.balance(key).await, 820 - 2);
    assert_eq!(s.audit_rows().await.len(), 4);
}

#[tokio::test]
async fn a_released_lease_returns_everything_and_a_late_grant_is_refused() {
    let s = start().await;
    let key = "sk-leased-key-02";
    s.create(key, 1_000).await;
    // Granted, but the reply was lost: the release gives it all back.
    s.granted(key, "lost", 500, 10).await;
    assert_eq!(s.close(&[close_of(key, "lost", None, 0, 0)]).await.closes[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 1_000);
    // Released before the grant arrived: the grant is refused.
    assert_eq!(s.close(&[close_of(key, "late", None, 0, 0)]).await.closes[0].outcome, SettleOutcome::Unknown);
    let (status, _) = s.lease(key, "late", 500, 10).await;
    assert_ne!(status, StatusCode::OK);
    assert_eq!(s.balance(key).await, 1_000);
    // A frozen key gets no lease, with the same refusal as a reservation.
    s.admin(reqwest::Method::PATCH, &format!("/admin/keys/{key}"), Some(json!({"status": "frozen"}))).await;
    match s.lease(key, "L3", 500, 10).await {
        (StatusCode::OK, Some(LeaseReply::Refuse { status: 403, error })) => {
            assert_eq!(error.code.as_deref(), Some("key_frozen"))
        }
        other => panic!("frozen key leased: {other:?}"),
    }
    // Nothing drawn can be more than was granted.
    s.admin(reqwest::Method::PATCH, &format!("/admin/keys/{key}"), Some(json!({"status": "active"}))).await;
    s.granted(key, "L4", 100, 10).await;
    let bad = s.close(&[close_of(key, "L4", Some(100), 101, 2)]).await;
    assert_eq!(bad.closes[0].outcome, SettleOutcome::Invalid);
    assert_eq!(s.balance(key).await, 900);
}

#[tokio::test]
async fn an_expired_lease_charges_what_never_settled_with_one_row() {
    let s = start_with_store(Duration::from_secs(1), None, whole_share).await;
    let key = "sk-leased-key-03";
    s.create(key, 1_000).await;
    s.granted(key, "L1", 500, 100).await;
    s.granted(key, "L2", 200, 100).await;
    // L1: two drawn (100 each), closed, one settled; L2 never closed (Envoy
    // died), its last report 150 drawn.
    s.close(&[close_of(key, "L1", Some(500), 200, 2)]).await;
    assert!(s.report(key, &[("L2", 150, 2)]).await.is_empty());
    s.settle(&[drawn(key, "L1", "kept", 100, 10, 10)]).await;
    assert_eq!(s.balance(key).await, 1_000 - 200 - 200);
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The first sweep past the TTL marks them; the next, a grace later, sums their rows.
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 0);
    // While its rows are summed a row would be counted twice or not at all:
    // the record is to be sent again.
    let late = s.settle(&[drawn(key, "L1", "late", 100, 1, 1)]).await;
    assert_eq!(late.results[0].outcome, SettleOutcome::Later, "{late:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 2);
    // L1's unsettled request pays its estimate and 80 of the settled one's
    // hold return; L2 pays its reported draws and its undrawn 50 return.
    assert_eq!(s.balance(key).await, 1_000 - 200 - 200 + 80 + 50);
    let rows = s.audit_rows().await;
    let lease_row = |id: &str| rows.iter().find(|r| r.get_str("request_id") == Ok(id)).cloned().unwrap();
    assert_eq!(lease_row("L1").get_i64("total_tokens"), Ok(100));
    assert_eq!(lease_row("L2").get_i64("total_tokens"), Ok(150));
    assert_eq!(lease_row("L2").get_bool("expired_hold"), Ok(true));
    // The balance is the start less every row's total.
    let charged: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(s.balance(key).await, 1_000 - charged);
    let d = s.key_doc(key).await;
    assert_eq!(d.get_i64("leases_n"), Ok(0), "{d:?}");
    // After the expiry the record sent again settles late: it pays its 2 and
    // takes back the 100 that L1's row charged for it, which gives it back.
    assert_eq!(s.settle(&[drawn(key, "L1", "late", 100, 1, 1)]).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 1_000 - charged + 100 - 2);
    let rows = s.audit_rows().await;
    let lease_row = |id: &str| rows.iter().find(|r| r.get_str("request_id") == Ok(id)).cloned().unwrap();
    assert_eq!((lease_row("L1").get_i64("total_tokens"), lease_row("L1").get_i64("charged_tokens")), (Ok(0), Ok(0)));
    assert_eq!(lease_row("late").get_str("estimate_row"), Ok("L1"));
    let charged: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(s.balance(key).await, 1_000 - charged, "every row once, whatever the order");
    // One more than L1 had unsettled: nothing is left to take back, it pays what it used.
    assert_eq!(s.settle(&[drawn(key, "L1", "more", 100, 1, 1)]).await.results[0].outcome, SettleOutcome::Settled);
    let rows = s.audit_rows().await;
    let charged: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(s.balance(key).await, 1_000 - charged);
    assert_eq!(lease_row("L1").get_i64("total_tokens"), Ok(0));
}

/// Sums of a key's audit rows (`total_tokens`), for the invariant.
async fn audited(s: &Sidecar) -> i64 {
    s.audit_rows().await.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum()
}

#[tokio::test]
async fn records_of_a_lease_taken_for_lost_settle_late_in_any_order_and_once_each() {
    // The gateway was cut off, not dead: its lease is taken for lost, and its
    // records arrive afterwards, some twice, some in one batch, one beyond
    // what the expiry charged for.
    let lost = LeasePolicy { share_percent: 100, lost_after: Duration::from_secs(1) };
    let s = start_with_store(Duration::from_secs(1800), None, |store| store.with_lease_policy(lost)).await;
    let key = "sk-leased-late-01";
    s.create(key, 10_000).await;
    s.granted(key, "L1", 1_000, 100).await;
    assert!(s.report(key, &[("L1", 400, 4)]).await.is_empty());
    s.settle(&[drawn(key, "L1", "r1", 100, 10, 10)]).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    sweeper::sweep_once(&s.state).await.unwrap();
    // Marked expiring: its records wait.
    let r2 = drawn(key, "L1", "r2", 100, 30, 0);
    assert_eq!(s.settle(std::slice::from_ref(&r2)).await.results[0].outcome, SettleOutcome::Later);
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 1);
    // Charged: r1's 20 and three unsettled estimates (300); the rest back.
    assert_eq!(s.balance(key).await, 10_000 - 20 - 300);
    assert_eq!(s.balance(key).await, 10_000 - audited(&s).await);
    // r2, then r3 and r2 again in one batch, then r4, r5 (drawn after the last
    // report: nothing charged it), and the close the gateway still had queued.
    let mut all = vec![r2.clone()];
    assert_eq!(s.settle(std::slice::from_ref(&r2)).await.results[0].outcome, SettleOutcome::Settled);
    let r3 = drawn(key, "L1", "r3", 100, 5, 5);
    let batch = s.settle(&[r3.clone(), r2.clone()]).await;
    let outcomes: Vec<SettleOutcome> = batch.results.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [SettleOutcome::Settled, SettleOutcome::AlreadySettled]);
    all.push(r3);
    for (id, used) in [("r4", 50), ("r5", 7)] {
        let r = drawn(key, "L1", id, 100, used, 0);
        assert_eq!(s.settle(std::slice::from_ref(&r)).await.results[0].outcome, SettleOutcome::Settled);
        all.push(r);
    }
    let close = s.close(&[close_of(key, "L1", Some(1_000), 500, 5)]).await;
    assert_ne!(close.closes[0].outcome, SettleOutcome::Settled, "its lease is gone");
    sweeper::sweep_once(&s.state).await.unwrap();
    // Every request has one row with what it used; the lease's row keeps only
    // what no record took back (r4 was the last of the three it charged).
    let rows = s.audit_rows().await;
    for id in ["r1", "r2", "r3", "r4", "r5"] {
        assert_eq!(rows.iter().filter(|r| r.get_str("request_id") == Ok(id)).count(), 1, "{id}: {rows:?}");
    }
    let lease_row = rows.iter().find(|r| r.get_str("request_id") == Ok("L1")).unwrap();
    assert_eq!(lease_row.get_i64("total_tokens"), Ok(0), "{lease_row:?}");
    assert_eq!(s.balance(key).await, 10_000 - 20 - 30 - 10 - 50 - 7);
    assert_eq!(s.balance(key).await, 10_000 - audited(&s).await);
    // All of it once more, as a gateway retrying a batch whose reply it lost.
    let again = s.settle(&all).await;
    assert!(again.results.iter().all(|r| r.outcome == SettleOutcome::AlreadySettled), "{again:?}");
    assert_eq!(s.balance(key).await, 10_000 - audited(&s).await);
    let d = s.key_doc(key).await;
    assert_eq!((d.get_i64("outbox_n"), d.get_i64("leases_n")), (Ok(0), Ok(0)), "{d:?}");
}

#[tokio::test]
async fn a_lease_that_replaces_another_closes_it_first_and_takes_what_it_gave_back() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let key = "sk-leased-key-04";
    s.create(key, 1_000).await;
    // The first lease took the whole balance; it expired with 100 drawn.
    assert_eq!(s.granted(key, "L1", 5_000, 100).await, 1_000);
    let resp = s
        .http
        .post(format!("{}/internal/lease", s.url))
        .json(&json!({"key_hash": key_hash(key), "lease_id": "L2", "model": "m", "want": 5_000, "min": 100,
            "replaces": close_of(key, "L1", Some(1_000), 100, 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    match resp.json::<LeaseReply>().await.unwrap() {
        LeaseReply::Grant { tokens, .. } => assert_eq!(tokens, 900, "the 900 L1 gave back"),
        other => panic!("not granted: {other:?}"),
    }
    // Another key's lease cannot be named.
    let resp = s
        .http
        .post(format!("{}/internal/lease", s.url))
        .json(&json!({"key_hash": key_hash(key), "lease_id": "L3", "model": "m", "want": 5, "min": 1,
            "replaces": close_of("sk-someone-else-1", "X", Some(1), 0, 0)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn one_malformed_record_is_refused_alone_and_unknown_fields_are_tolerated() {
    let s = start().await;
    let key = "sk-batch-user-0001";
    s.create(key, 1_000).await;
    for id in ["good-1", "newer-1", "long-1"] {
        assert!(matches!(s.reserve(key, id, 100).await, ReserveReply::Admit { .. }));
    }
    let good = serde_json::to_value(record(key, "good-1", 100, 10, 5)).unwrap();
    // A newer filter's record carries a field this sidecar does not know.
    let mut newer = serde_json::to_value(record(key, "newer-1", 100, 7, 3)).unwrap();
    newer["cached_tokens"] = json!(2);
    // A record whose model is longer than any client may send is invalid alone.
    let mut long = record(key, "long-1", 100, 1, 1);
    long.model = "m".repeat(bridge_protocol::MAX_MODEL_LEN + 1);
    let broken = json!({"request_id": "broken-1", "key_hash": key_hash(key), "input_tokens": "many"});
    let resp = s
        .http
        .post(format!("{}/internal/settle", s.url))
        .json(&json!({"records": [good, broken, newer, long], "version": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let reply: SettleReply = resp.json().await.unwrap();
    let outcomes: Vec<(&str, SettleOutcome)> =
        reply.results.iter().map(|r| (r.request_id.as_str(), r.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            ("good-1", SettleOutcome::Settled),
            ("broken-1", SettleOutcome::Invalid),
            ("newer-1", SettleOutcome::Settled),
            ("long-1", SettleOutcome::Invalid),
        ]
    );
    // The long record's hold stays, to be charged at expiry; the others paid what they used.
    assert_eq!(s.balance(key).await, 1_000 - 15 - 10 - 100);
}

#[tokio::test]
async fn an_unreserved_record_retried_concurrently_is_charged_once() {
    let s = start().await;
    let key = "sk-allow-mode-user-1";
    s.create(key, 10_000).await;
    for round in 0..5 {
        let mut r = record(key, &format!("unreserved-{round}"), 100, 30, 20);
        r.unreserved = true;
        // A retried batch racing the first attempt: many copies at once.
        let replies =
            futures::future::join_all((0..12).map(|_| settle_at(&s.http, &s.url, std::slice::from_ref(&r)))).await;
        let settled = replies.iter().filter(|rep| rep.results[0].outcome == SettleOutcome::Settled).count();
        assert_eq!(settled, 1, "round {round}: {replies:?}");
    }
    assert_eq!(s.balance(key).await, 10_000 - 5 * 50);
    assert_eq!(s.audit_rows().await.len(), 5);
}

#[tokio::test]
async fn an_unreserved_record_is_charged_once_even_when_its_audit_row_is_not_seen() {
    let s = start().await;
    let key = "sk-allow-mode-user-2";
    s.create(key, 10_000).await;
    let mut r = record(key, "unreserved-stale", 100, 30, 20);
    r.unreserved = true;
    assert_eq!(s.settle(std::slice::from_ref(&r)).await.results[0].outcome, SettleOutcome::Settled);
    assert_eq!(s.balance(key).await, 9_950);
    // A second attempt that read before the first wrote its row: the read
    // finds no row (removed here to make that interleaving deterministic) and
    // the outbox entry is gone. Only the write's own guard stands.
    s.db.collection::<Document>("audit_logs").delete_one(doc! {"request_id": "unreserved-stale"}).await.unwrap();
    let again = s.settle(std::slice::from_ref(&r)).await;
    assert_ne!(again.results[0].outcome, SettleOutcome::Settled, "{again:?}");
    assert_eq!(s.balance(key).await, 9_950, "debited twice");
}

async fn skewed_pair(ttl: Duration, behind_ms: i64, ahead_ms: i64) -> (Store, Store, mongodb::Database) {
    let db_name = unique_db("skew");
    let behind = Store::connect(&mongo_uri(), &db_name, ttl).await.unwrap().with_local_skew(-behind_ms);
    let ahead = Store::connect(&mongo_uri(), &db_name, ttl).await.unwrap().with_local_skew(ahead_ms);
    behind.ensure_indexes().await.unwrap();
    let new = NewKey {
        api_key: "sk-skewed-user-01".into(),
        user_name: "u".into(),
        balance_tokens: 10_000,
        status: KeyStatus::Active,
        controls: Default::default(),
    };
    behind.create_key(new, false).await.unwrap();
    let db = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap().database(&db_name);
    (behind, ahead, db)
}

#[tokio::test]
async fn expiry_does_not_depend_on_the_sidecars_clocks() {
    // One sidecar's clock 20 minutes behind, another's 20 minutes ahead, a 10-minute TTL.
    let (behind, ahead, db) = skewed_pair(Duration::from_secs(600), 20 * 60_000, 20 * 60_000).await;
    let hash = key_hash("sk-skewed-user-01");
    let reserve =
        ReserveRequest { key_hash: hash.clone(), request_id: "fresh-1".into(), model: "m".into(), estimate: 100 };
    assert!(matches!(behind.reserve(&reserve).await.unwrap(), Decision::Granted { .. }));
    let lease = LeaseRequest {
        key_hash: hash.clone(),
        lease_id: "fresh-L".into(),
        model: "m".into(),
        want: 500,
        min: 1,
        replaces: None,
    };
    assert!(matches!(behind.lease(&lease).await.unwrap(), Decision::Granted { .. }));
    // Milliseconds old, though 40 minutes apart by the two clocks: nothing expires.
    assert_eq!(ahead.expire_holds().await.unwrap(), 0);
    let key = db.collection::<Document>("api_keys").find_one(doc! {"_id": &hash}).await.unwrap().unwrap();
    assert!(key.get_document("holds").unwrap().contains_key("fresh-1"), "{key:?}");
    let l = key.get_document("leases").unwrap().get_document("fresh-L").unwrap();
    assert!(!l.contains_key("expiring"), "a fresh lease marked expiring: {l:?}");
    assert_eq!(key.get_i64("balance_tokens").unwrap(), 10_000 - 100 - 500);
}

#[tokio::test]
async fn the_grace_between_the_two_expiry_sweeps_holds_whatever_the_clocks() {
    // A 1 s TTL, so the grace between marking and summing is 1 s; the marking
    // sidecar's clock is 10 s behind the summing one's.
    let (behind, ahead, db) = skewed_pair(Duration::from_secs(1), 10_000, 0).await;
    let hash = key_hash("sk-skewed-user-01");
    let lease = LeaseRequest {
        key_hash: hash.clone(),
        lease_id: "old-L".into(),
        model: "m".into(),
        want: 500,
        min: 1,
        replaces: None,
    };
    // Granted and, once expired, marked by the sidecar whose clock is behind.
    assert!(matches!(behind.lease(&lease).await.unwrap(), Decision::Granted { .. }));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    behind.expire_holds().await.unwrap();
    ahead.expire_holds().await.unwrap();
    // Marked, not yet summed: a settlement that checked before the mark may still be writing.
    let key = db.collection::<Document>("api_keys").find_one(doc! {"_id": &hash}).await.unwrap().unwrap();
    let l = key.get_document("leases").unwrap().get_document("old-L").unwrap();
    assert!(l.contains_key("expiring"), "{l:?}");
}

#[tokio::test]
async fn a_stall_cannot_grow_a_key_document_past_its_bounds() {
    use openclaw_sidecar::ledger::KeyLimits;
    let limits = KeyLimits { holds: 40, leases: 5, marks: 100 };
    let s = start_with_store(Duration::from_secs(1800), None, |store| {
        store.with_mark_ttl(Duration::from_secs(1)).with_limits(limits)
    })
    .await;
    let key = "sk-stalled-busy-key";
    s.create(key, 10_000_000).await;
    let doc_bytes = || async { mongodb::bson::to_vec(&s.key_doc(key).await).unwrap().len() };
    // The stall: reservations pile up, then the filter gives up on hundreds more
    // (release records for holds that never landed) and, in failure mode allow,
    // settles hundreds unreserved. Each leaves a mark on the key.
    for i in 0..60 {
        let reply = s.reserve(key, &format!("held-{i}"), 10).await;
        match (i < limits.holds, reply) {
            (true, ReserveReply::Admit { .. }) => {}
            (false, ReserveReply::Refuse { status: 429, error }) => {
                assert_eq!(error.code.as_deref(), Some("rate_limit_exceeded"), "never insufficient_quota")
            }
            (_, other) => panic!("hold {i}: {other:?}"),
        }
    }
    for batch in 0..4 {
        let records: Vec<SettleRecord> = (0..150)
            .map(|i| {
                let mut r = record(key, &format!("gone-{batch}-{i}"), 10, 0, 0);
                r.release = batch % 2 == 0;
                r.unreserved = batch % 2 == 1;
                r.input_tokens = if r.unreserved { 3 } else { 0 };
                r
            })
            .collect();
        let reply = s.settle(&records).await;
        assert_eq!(reply.results.len(), 150);
    }
    let key_doc = s.key_doc(key).await;
    for (map, n) in [("released", "released_n"), ("charged", "charged_n")] {
        let count = key_doc.get_document(map).map_or(0, |m| m.len());
        assert!(count <= limits.marks, "{map}: {count} marks");
        assert_eq!(key_doc.get_i64(n).unwrap_or(0), count as i64, "{n} counts them");
    }
    assert_eq!(key_doc.get_document("holds").unwrap().len(), limits.holds);
    let peak = doc_bytes().await;
    assert!(peak < 64 * 1024, "{peak} bytes at the peak");
    // Marks need only outlive the calls they guard: a sweep after their TTL drops them.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    s.state.store.expire_holds().await.unwrap();
    let key_doc = s.key_doc(key).await;
    assert!(key_doc.get_document("released").map_or(true, |m| m.is_empty()), "{key_doc:?}");
    assert!(key_doc.get_document("charged").map_or(true, |m| m.is_empty()));
    let after = doc_bytes().await;
    assert!(after < peak / 2, "{after} bytes after the sweep, {peak} at the peak");
}

#[tokio::test]
async fn a_lease_takes_at_most_its_share_of_the_balance_but_always_one_request() {
    let s = start().await;
    let key = "sk-leased-share-01";
    s.create(key, 1_000).await;
    // A quarter of the balance at most, by default.
    assert_eq!(s.granted(key, "L1", 600, 100).await, 250);
    assert_eq!(s.granted(key, "L2", 600, 100).await, 187);
    // A request larger than the share still gets its estimate.
    assert_eq!(s.granted(key, "L3", 600, 400).await, 400);
    assert_eq!(s.balance(key).await, 1_000 - 250 - 187 - 400);
    // Asked for less than the share: what was asked.
    assert_eq!(s.granted(key, "L4", 20, 10).await, 20);
}

#[tokio::test]
async fn a_shortfall_that_open_holds_may_give_back_is_retry_not_insufficient_quota() {
    let s = start().await;
    let key = "sk-held-short-01";
    s.create(key, 300).await;
    assert!(matches!(s.reserve(key, "h-1", 163).await, ReserveReply::Admit { balance_tokens: 137, .. }));
    // 137 left, but h-1 will give back what it does not use: not a 429 yet.
    assert!(matches!(s.reserve(key, "h-2", 163).await, ReserveReply::Retry));
    assert_eq!(s.settle(&[record(key, "h-1", 163, 15, 5)]).await.results[0].outcome, SettleOutcome::Settled);
    assert!(matches!(s.reserve(key, "h-2", 163).await, ReserveReply::Admit { balance_tokens: 117, .. }));
    // Nothing held and nothing leased: a real shortfall is refused.
    assert_eq!(s.settle(&[record(key, "h-2", 163, 100, 63)]).await.results[0].outcome, SettleOutcome::Settled);
    match s.reserve(key, "h-3", 163).await {
        ReserveReply::Refuse { status: 429, error } => assert_eq!(error.code.as_deref(), Some("insufficient_quota")),
        other => panic!("beyond the balance: {other:?}"),
    }
}

#[tokio::test]
async fn balance_in_other_gateways_leases_is_recalled_instead_of_refused() {
    let s = start_with_store(Duration::from_secs(1800), None, whole_share).await;
    let key = "sk-leased-recall-1";
    s.create(key, 1_000).await;
    // Gateway A holds 900 in a lease and has drawn 300 of it.
    s.granted(key, "A1", 900, 100).await;
    assert!(s.report(key, &[("A1", 300, 3)]).await.is_empty());
    // Gateway B needs 500: 100 left, but A's lease holds 600 undrawn. Not a 429.
    assert!(matches!(s.reserve(key, "b-1", 500).await, ReserveReply::Retry));
    assert!(matches!(s.lease(key, "B1", 2_000, 500).await, (StatusCode::OK, Some(LeaseReply::Retry))));
    // A learns it with its next tick and closes the lease: the 600 return.
    assert_eq!(s.report(key, &[("A1", 300, 3)]).await, ["A1"]);
    s.close(&[close_of(key, "A1", Some(900), 300, 3)]).await;
    assert!(matches!(s.reserve(key, "b-1", 500).await, ReserveReply::Admit { .. }));
    // While b-1 is in flight, what its hold will give back is on its way too.
    assert!(matches!(s.reserve(key, "b-2", 201).await, ReserveReply::Retry));
    assert_eq!(s.settle(&[record(key, "b-1", 500, 400, 100)]).await.results[0].outcome, SettleOutcome::Settled);
    // A1's 300 drawn may still come back in part (its rows come with A's next
    // tick): asked to retry for a moment; past that, a real shortfall.
    assert!(matches!(s.reserve(key, "b-2", 201).await, ReserveReply::Retry));
    tokio::time::sleep(openclaw_sidecar::ledger::REFUNDS_DUE + Duration::from_millis(100)).await;
    match s.reserve(key, "b-2", 201).await {
        ReserveReply::Refuse { status: 429, error } => assert_eq!(error.code.as_deref(), Some("insufficient_quota")),
        other => panic!("beyond the balance: {other:?}"),
    }
    assert!(matches!(s.reserve(key, "b-3", 200).await, ReserveReply::Admit { .. }));
    // A closed lease is reported no more: a report of it is told to stop.
    assert_eq!(s.report(key, &[("A1", 300, 3)]).await, ["A1"]);
}

#[tokio::test]
async fn a_lease_its_gateway_stopped_reporting_costs_only_its_reported_draws() {
    let lost = LeasePolicy { share_percent: 100, lost_after: Duration::from_secs(1) };
    let s = start_with_store(Duration::from_secs(1800), None, |store| store.with_lease_policy(lost)).await;
    let key = "sk-leased-lost-01";
    s.create(key, 1_000).await;
    s.granted(key, "L1", 500, 60).await;
    // Two requests drawn (60 each), one settled (30 used); then the gateway is killed.
    assert!(s.report(key, &[("L1", 120, 2)]).await.is_empty());
    s.settle(&[drawn(key, "L1", "done", 60, 20, 10)]).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Marked; a grace later (5 s) summed: charged the unsettled draw's
    // estimate, the rest of the lease back, long before the hold TTL.
    sweeper::sweep_once(&s.state).await.unwrap();
    assert_eq!(s.report(key, &[("L1", 180, 3)]).await, ["L1"], "an expiring lease is not drawn from");
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 1);
    assert_eq!(s.balance(key).await, 1_000 - 30 - 60);
    let rows = s.audit_rows().await;
    let charged: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(charged, 90);
    assert_eq!(s.key_doc(key).await.get_i64("leases_n"), Ok(0));
}

#[tokio::test]
async fn a_lease_closed_with_a_heartbeat_in_the_same_batch_is_taken_for_lost_when_its_gateway_goes_silent() {
    let lost = LeasePolicy { share_percent: 100, lost_after: Duration::from_secs(1) };
    let s = start_with_store(Duration::from_secs(1800), None, |store| store.with_lease_policy(lost)).await;
    let key = "sk-leased-lost-02";
    s.create(key, 1_000).await;
    s.granted(key, "L1", 500, 60).await;
    // The window ends with two requests drawn and still streaming: the filter
    // sends the close and a heartbeat of the lease in one call, then dies.
    let close =
        LeaseClose { key_hash: key_hash(key), lease_id: "L1".into(), tokens: Some(500), drawn_tokens: 120, drawn_n: 2 };
    let beat = json!({"key_hash": key_hash(key), "lease_id": "L1", "drawn_tokens": 0, "drawn_n": 0});
    let reply = s.batch(json!({"records": [], "closes": [close], "progress": [beat]})).await;
    assert_eq!(reply.closes[0].outcome, SettleOutcome::Settled);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Lost, not left to the hold TTL: marked, and a grace later charged its draws.
    sweeper::sweep_once(&s.state).await.unwrap();
    assert!(s.key_doc(key).await.get_document("leases").unwrap().get_document("L1").unwrap().contains_key("expiring"));
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    assert_eq!(sweeper::sweep_once(&s.state).await.unwrap().0, 1);
    assert_eq!(s.balance(key).await, 1_000 - 120);
    assert_eq!(s.key_doc(key).await.get_i64("leases_n"), Ok(0));
}

#[tokio::test]
async fn balances_are_true_while_leases_are_open_and_a_key_reads_its_own() {
    let s = start().await;
    let key = "sk-true-balance-01";
    s.create(key, 10_000).await;
    let balance_and_held = |v: &Value| (v["balance_tokens"].as_i64().unwrap(), v["held_tokens"].as_i64().unwrap());
    let admin_view = || async {
        let (_, list) = s.admin(reqwest::Method::GET, "/admin/keys", None).await;
        list["data"][0].clone()
    };
    // A lease took a quarter of the balance; nothing drawn: the key still has all of it.
    assert_eq!(s.granted(key, "L1", 5_000, 100).await, 2_500);
    assert_eq!(s.balance(key).await, 7_500, "stored");
    assert_eq!(balance_and_held(&admin_view().await), (10_000, 0));
    // Three requests drawn (300), one settled: 100 held, 30 used, the rest still the key's.
    s.report(key, &[("L1", 300, 3)]).await;
    assert_eq!(balance_and_held(&admin_view().await), (9_700, 300));
    s.settle(&[drawn(key, "L1", "r1", 100, 20, 10)]).await;
    assert_eq!(balance_and_held(&admin_view().await), (9_770, 200));

    // The key's own view, with the user's key and no admin token.
    let own = |auth: Option<&str>| {
        let mut req = s.http.get(format!("{}/v1/key", s.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, me) = own(Some(&format!("Bearer {key}"))).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(balance_and_held(&me), (9_770, 200));
    assert_eq!((me["user_name"].as_str(), me["status"].as_str()), (Some("张三"), Some("active")));
    assert!(!me.to_string().contains(key), "the key itself is never shown: {me}");
    for period in ["today", "month"] {
        assert_eq!(
            me["usage"][period],
            json!({"requests": 1, "input_tokens": 20, "output_tokens": 10, "total_tokens": 30, "charged_tokens": 30})
        );
    }
    // An unknown or missing key is a 401 in the OpenAI shape, as on the chat path.
    for auth in [Some("Bearer sk-no-such-key-000"), None, Some("Basic abc")] {
        let (status, body) = own(auth).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
}

#[tokio::test]
async fn the_audit_log_pages_newest_first_exactly_once_while_rows_arrive_and_exports_csv() {
    let s = start().await;
    let (alice, bob) = ("sk-audit-alice-001", "sk-audit-bob-0001");
    s.create(alice, 100_000).await;
    let (_, made) = s
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"api_key": bob, "user_name": "bob, \"the builder\"", "balance_tokens": 100_000})),
        )
        .await;
    let bob_id = made["key_id"].as_str().unwrap().to_owned();
    // Seven settled requests: alternating keys, two models, one upstream error.
    let settle_one = |key: &'static str, id: String, model: &'static str, status: u16| {
        let s = &s;
        async move {
            assert!(matches!(s.reserve(key, &id, 50).await, ReserveReply::Admit { .. }));
            let r = SettleRecord { model: model.into(), status_code: status, ..record(key, &id, 50, 10, 5) };
            assert_eq!(s.settle(&[r]).await.results[0].outcome, SettleOutcome::Settled);
        }
    };
    for i in 0..7 {
        let key = if i % 2 == 0 { alice } else { bob };
        let model = if i < 4 { "gpt-5-nano" } else { "gpt-4.1" };
        settle_one(key, format!("row-{i}"), model, if i == 3 { 500 } else { 200 }).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let get = |query: String| {
        let s = &s;
        async move { s.admin(reqwest::Method::GET, &format!("/admin/audit_logs{query}"), None).await }
    };
    // Pages of three, newest first; two more rows arrive mid-walk.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let q = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".into(),
        };
        let (status, body) = get(q).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.extend(body["data"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap().to_owned()));
        if page == 0 {
            settle_one(alice, "late-1".into(), "gpt-5-nano", 200).await;
            settle_one(bob, "late-2".into(), "gpt-5-nano", 200).await;
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => {
                assert_eq!(body["has_more"], false);
                break;
            }
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("row-{i}")).collect();
    assert_eq!(seen, expected, "each row once, newest first, unmoved by rows arriving meanwhile");
    // A new walk starts with them.
    let (_, first) = get("?limit=2".into()).await;
    let ids: Vec<&str> = first["data"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["late-2", "late-1"]);
    let row = &first["data"][0];
    assert_eq!(row["key_id"], bob_id.as_str());
    assert_eq!((row["total_tokens"].as_i64(), row["user_id"].as_str()), (Some(15), Some("bob, \"the builder\"")));
    assert!(row["timestamp"].as_str().unwrap().ends_with('Z'), "{row}");
    assert!(!first.to_string().contains(bob), "no key in the rows");

    // Filters, each on an indexed field.
    let count = |body: &Value| body["data"].as_array().unwrap().len();
    assert_eq!(count(&get(format!("?key_id={bob_id}")).await.1), 4);
    assert_eq!(count(&get("?user_name=%E5%BC%A0%E4%B8%89".into()).await.1), 5, "alice is 张三");
    assert_eq!(count(&get("?model=gpt-4.1".into()).await.1), 3);
    assert_eq!(get("?status_code=500".into()).await.1["data"][0]["request_id"], "row-3");
    assert_eq!(count(&get("?from=2000-01-01T00:00:00Z&to=2001-01-01T00:00:00Z".into()).await.1), 0);

    // The CSV export: a header, one line a row, cells quoted where they must be.
    let resp = s
        .http
        .get(format!("{}/admin/audit_logs?format=csv&key_id={bob_id}&limit=2", s.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert!(resp.headers().contains_key("x-next-cursor"));
    let text = resp.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("timestamp,request_id,key_id,api_key,user_id,model,"));
    assert!(lines[1].contains(",\"bob, \"\"the builder\"\"\","), "{}", lines[1]);

    // Bad parameters are 400s naming the parameter; no admin token, 401.
    for (q, param) in [
        ("?limit=0", "limit"),
        ("?cursor=nope", "cursor"),
        ("?from=yesterday", "from"),
        ("?key_id=sk-audit-bob-0001", "key_id"),
        ("?format=xml", "format"),
    ] {
        let (status, body) = get(q.into()).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{q}: {body}");
    }
    let resp = s.http.get(format!("{}/admin/audit_logs", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn usage_reports_are_summed_by_the_database_in_any_grouping() {
    let s = start().await;
    let (alice, bob) = ("sk-usage-alice-01", "sk-usage-bob-001");
    s.create(alice, 100_000).await;
    s.admin(
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"api_key": bob, "user_name": "bob", "balance_tokens": 100_000})),
    )
    .await;
    // alice: 3 on nano (10+5 each), 1 on 4.1 (20+10); bob: 2 on nano.
    for (i, (key, model, input, output)) in [
        (alice, "gpt-5-nano", 10, 5),
        (alice, "gpt-5-nano", 10, 5),
        (alice, "gpt-5-nano", 10, 5),
        (alice, "gpt-4.1", 20, 10),
        (bob, "gpt-5-nano", 10, 5),
        (bob, "gpt-5-nano", 10, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("use-{i}");
        assert!(matches!(s.reserve(key, &id, 50).await, ReserveReply::Admit { .. }));
        let r = SettleRecord { model: model.into(), ..record(key, &id, 50, input, output) };
        assert_eq!(s.settle(&[r]).await.results[0].outcome, SettleOutcome::Settled);
    }
    let report = |q: &str| {
        let s = &s;
        let q = q.to_owned();
        async move {
            let (status, body) = s.admin(reqwest::Method::GET, &format!("/admin/usage{q}"), None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["data"].as_array().unwrap().clone()
        }
    };
    let all = report("").await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        (&all[0]["requests"], &all[0]["input_tokens"], &all[0]["output_tokens"], &all[0]["total_tokens"]),
        (&json!(6), &json!(70), &json!(35), &json!(105))
    );
    assert_eq!(all[0]["cached_tokens"], 0);
    let by = report("?group_by=user,model").await;
    let find = |user: &str, model: &str| {
        by.iter().find(|r| r["user_name"] == user && r["model"] == model).cloned().unwrap_or(Value::Null)
    };
    assert_eq!(by.len(), 3, "{by:?}");
    assert_eq!(
        (find("张三", "gpt-5-nano")["requests"].as_i64(), find("张三", "gpt-5-nano")["total_tokens"].as_i64()),
        (Some(3), Some(45))
    );
    assert_eq!(find("张三", "gpt-4.1")["total_tokens"], 30);
    assert_eq!(find("bob", "gpt-5-nano")["total_tokens"], 30);
    let keys = report("?group_by=key").await;
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|r| r["key_id"].as_str().is_some_and(|k| k.len() == 16)));
    let days = report("?group_by=day,hour").await;
    assert_eq!(days.iter().map(|r| r["requests"].as_i64().unwrap()).sum::<i64>(), 6);
    let today = days[0]["day"].as_str().unwrap().to_owned();
    assert!(days[0]["hour"].as_str().unwrap().starts_with(&today));
    assert!(report("?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z").await.is_empty());
    let (status, body) = s.admin(reqwest::Method::GET, "/admin/usage?group_by=week", None).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("group_by")));
}

#[tokio::test]
async fn metrics_count_tokens_requests_refusals_and_batches_without_naming_a_key() {
    let s = start().await;
    let key = "sk-metrics-user-01";
    s.create(key, 100_000).await;
    for i in 0..3 {
        let id = format!("m-{i}");
        assert!(matches!(s.reserve(key, &id, 50).await, ReserveReply::Admit { .. }));
        s.settle(&[record(key, &id, 50, 10, 5)]).await;
    }
    assert!(matches!(s.reserve(key, "held", 50).await, ReserveReply::Admit { .. }));
    assert!(matches!(s.reserve("sk-nobody-at-all-1", "x", 5).await, ReserveReply::Refuse { status: 401, .. }));
    let resp = s.http.get(format!("{}/admin/metrics", s.url)).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let model = "gen_ai_request_model=\"gpt-5-nano\"";
    assert_eq!(value(&format!("gen_ai_client_token_usage_total{{{model},gen_ai_token_type=\"input\"}}")), 30.0);
    assert_eq!(value(&format!("gen_ai_client_token_usage_total{{{model},gen_ai_token_type=\"output\"}}")), 15.0);
    assert_eq!(value(&format!("openclaw_bridge_requests_total{{{model},status_code=\"200\"}}")), 3.0);
    assert_eq!(value("openclaw_bridge_refusals_total{reason=\"unknown_key\"}"), 1.0);
    assert_eq!(value("openclaw_bridge_settlement_batches_total"), 3.0);
    assert_eq!(value("openclaw_bridge_settlement_records_total{outcome=\"settled\"}"), 3.0);
    assert_eq!(value("openclaw_bridge_ledger_seconds_count{op=\"reserve\"}"), 5.0);
    assert_eq!(value("openclaw_bridge_open_holds"), 1.0);
    assert_eq!(value("openclaw_bridge_open_leases"), 0.0);
    assert!(text.contains("# TYPE openclaw_bridge_ledger_seconds histogram"));
    assert!(!text.contains(&key_hash(key)[..16]) && !text.contains(key), "no key in the metrics");
    let resp = s.http.get(format!("{}/admin/metrics", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn allowed_models_and_expiry_are_set_cleared_and_enforced_on_reservations_and_leases() {
    let s = start().await;
    let key = "sk-controls-user-1";
    let (status, made) = s
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(
                json!({"api_key": key, "user_name": "c", "balance_tokens": 100_000, "allowed_models": ["gpt-5-nano"]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!((made["allowed_models"].clone(), made["expires_at"].clone()), (json!(["gpt-5-nano"]), Value::Null));
    let id = made["key_id"].as_str().unwrap().to_owned();
    let reserve_model = |model: &'static str, rid: &'static str| {
        let s = &s;
        async move {
            let resp = s
                .http
                .post(format!("{}/internal/reserve", s.url))
                .json(&json!({"key_hash": key_hash(key), "request_id": rid, "model": model, "estimate": 10}))
                .send()
                .await
                .unwrap();
            resp.json::<ReserveReply>().await.unwrap()
        }
    };
    assert!(matches!(reserve_model("gpt-5-nano", "ok-1").await, ReserveReply::Admit { .. }));
    match reserve_model("gpt-4.1", "no-1").await {
        ReserveReply::Refuse { status: 403, error } => {
            assert_eq!(error.code.as_deref(), Some("model_not_allowed"));
            assert!(error.message.contains("gpt-5-nano"), "{}", error.message);
        }
        other => panic!("another model reserved: {other:?}"),
    }
    // A lease's grant carries the controls its draws must obey.
    match s.lease(key, "L1", 100, 10).await {
        (StatusCode::OK, Some(LeaseReply::Grant { policy, .. })) => {
            assert_eq!(policy.allowed_models, Some(vec!["gpt-5-nano".to_owned()]));
            assert!(policy.expires_at_ms.is_none());
        }
        other => panic!("not granted: {other:?}"),
    }
    // Expired: refused 401 with a message saying so.
    let (status, patched) = s
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["expires_at"], "2020-01-01T00:00:00Z");
    match reserve_model("gpt-5-nano", "late-1").await {
        ReserveReply::Refuse { status: 401, error } => {
            assert_eq!(error.code.as_deref(), Some("invalid_api_key"));
            assert!(error.message.contains("expired"), "{}", error.message);
        }
        other => panic!("an expired key reserved: {other:?}"),
    }
    // null clears both; the key serves any model again.
    let (_, cleared) = s
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"expires_at": null, "allowed_models": null})),
        )
        .await;
    assert_eq!((cleared["allowed_models"].clone(), cleared["expires_at"].clone()), (Value::Null, Value::Null));
    assert!(matches!(reserve_model("gpt-4.1", "any-1").await, ReserveReply::Admit { .. }));
    // Rate limits: set, shown, carried by a grant, cleared.
    let (_, limited) = s
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"rpm_limit": 60, "tpm_limit": 10_000})),
        )
        .await;
    assert_eq!((limited["rpm_limit"].as_i64(), limited["tpm_limit"].as_i64()), (Some(60), Some(10_000)));
    match s.lease(key, "L2", 100, 10).await {
        (StatusCode::OK, Some(LeaseReply::Grant { policy, .. })) => {
            assert_eq!((policy.rpm_limit, policy.tpm_limit), (Some(60), Some(10_000)))
        }
        other => panic!("not granted: {other:?}"),
    }
    // And by a reservation's admission (the filter counts by them without leases).
    match reserve_model("gpt-4.1", "limited-1").await {
        ReserveReply::Admit { policy, .. } => {
            assert_eq!((policy.rpm_limit, policy.tpm_limit), (Some(60), Some(10_000)))
        }
        other => panic!("not admitted: {other:?}"),
    }
    let (_, unlimited) =
        s.admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(json!({"rpm_limit": null}))).await;
    assert_eq!((unlimited["rpm_limit"].clone(), unlimited["tpm_limit"].as_i64()), (Value::Null, Some(10_000)));
    // Bad values name their field.
    for (body, param) in [
        (json!({"rpm_limit": 0}), "rpm_limit"),
        (json!({"tpm_limit": "lots"}), "tpm_limit"),
        (json!({"allowed_models": []}), "allowed_models"),
        (json!({"allowed_models": "gpt-5-nano"}), "allowed_models"),
        (json!({"allowed_models": [""]}), "allowed_models"),
        (json!({"expires_at": "next week"}), "expires_at"),
        (json!({"expires_at": 5}), "expires_at"),
    ] {
        let (status, err) = s.admin(reqwest::Method::PATCH, &format!("/admin/keys/{id}"), Some(body.clone())).await;
        assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {err}");
    }
}

#[tokio::test]
async fn a_batch_records_whose_each_response_is_once_and_a_resend_changes_nothing() {
    let s = start().await;
    let (alice, bob) = ("sk-owner-alice-0001", "sk-owner-bob-0001");
    s.create(alice, 10_000).await;
    s.create(bob, 10_000).await;
    let mut records = Vec::new();
    for (key, id, response) in [(alice, "own-1", "resp_a1"), (alice, "own-2", "resp_a2"), (bob, "own-3", "resp_b1")] {
        assert!(matches!(s.reserve(key, id, 100).await, ReserveReply::Admit { .. }));
        let mut r = record(key, id, 100, 10, 10);
        r.detail.response_id = Some(response.into());
        records.push(r);
    }
    // A record refused settles nothing and owns nothing.
    let mut unknown = record(bob, "own-never-reserved", 100, 10, 10);
    unknown.detail.response_id = Some("resp_nobody".into());
    records.push(unknown);
    for _ in 0..2 {
        s.settle(&records).await;
    }
    let owner = |key: &'static str, id: &'static str| {
        let http = s.http.clone();
        let url = format!("{}{}", s.url, bridge_protocol::OWNER_PATH);
        async move {
            let ask = bridge_protocol::OwnerRequest { key_hash: key_hash(key), response_id: id.into() };
            let reply: bridge_protocol::OwnerReply =
                http.post(url).json(&ask).send().await.unwrap().json().await.unwrap();
            reply.model
        }
    };
    assert_eq!(owner(alice, "resp_a1").await.as_deref(), Some("gpt-5-nano"));
    assert_eq!(owner(alice, "resp_a2").await.as_deref(), Some("gpt-5-nano"));
    assert_eq!(owner(bob, "resp_b1").await.as_deref(), Some("gpt-5-nano"));
    assert_eq!(owner(bob, "resp_a1").await, None, "another key's response");
    assert_eq!(owner(bob, "resp_nobody").await, None, "a record that settled nothing owns nothing");
}
