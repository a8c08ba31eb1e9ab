//! The middle test tier: whole requests against the fake host, each stage
//! transition driven step by step.

use bridge_protocol::{LeaseClose, UsageSource, LEASE_PATH, RESERVE_PATH};
use serde_json::{json, Value};

use super::harness::*;
use crate::fake::Stream;
use crate::host::Flow;
use crate::lease::Slot;
use crate::settle::Item;

#[test]
fn the_first_request_fetches_a_lease_and_the_next_draws_without_a_call() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, flow) = gw.send(BODY);
    assert_eq!(flow, Flow::Pause, "waits for the lease");
    let call = &gw.world.calls_to(LEASE_PATH)[0];
    let estimate = call.body["min"].as_i64().unwrap();
    assert_eq!(call.body["want"], estimate * crate::lease::FIRST_LEASE_REQUESTS, "no rate yet: 64 requests");
    assert_eq!(s.resumed.get(), 0, "nothing forwarded before the grant");
    gw.answer(&mut ex, &s, "200", grant(100_000));
    assert_eq!(s.resumed.get(), 1);
    let Some(Slot::Live(l)) = gw.slot() else { panic!("no live lease") };
    assert_eq!((l.drawn_tokens, l.drawn_n), (estimate, 1));

    let (mut ex2, s2, flow) = gw.send(BODY);
    assert_eq!(flow, Flow::Continue, "drawn from the lease: no callout");
    assert_eq!(gw.world.calls().len(), 1);
    for (ex, s) in [(&mut ex, &s), (&mut ex2, &s2)] {
        respond(ex, s, "200", USAGE);
        ex.on_log(s);
        assert!(ex.is_settled());
    }
    let records = gw.records();
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!((r.input_tokens, r.output_tokens, r.usage_source), (7, 3, UsageSource::Upstream));
        assert_eq!((r.reserved, r.lease_id.as_deref()), (estimate, Some(l.id.as_str())));
        assert!(!r.unreserved && !r.release);
    }
}

#[test]
fn the_keys_are_swapped_the_upstream_follows_the_body_and_the_route_marker_is_ours_alone() {
    let mut gw = Gateway::new(json!({}));
    let mut ex = gw.exchange();
    let s = Stream::new(
        &gw.world,
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("api-key", KEY),
            ("x-openclaw-bridge-route", "upstream"),
            ("x-openclaw-bridge-cluster", "elsewhere"),
        ],
    );
    ex.on_request_headers(&s, false);
    assert_eq!(s.header("api-key"), None, "the client's key is gone at once");
    assert_eq!(s.header("x-openclaw-bridge-cluster"), None, "a client cannot pick the cluster");
    *s.request_body.borrow_mut() = BODY.to_vec();
    ex.on_request_body(&s, BODY.len(), true);
    assert_eq!(s.header("api-key").as_deref(), Some("upstream-secret"));
    assert_eq!(
        s.header(":path").unwrap(),
        "/openai/deployments/gpt-5-nano/chat/completions?api-version=2024-12-01-preview"
    );
    assert_eq!(s.header("x-openclaw-bridge-cluster").as_deref(), Some("llm_upstream"));
    // Outside /v1 the client's marker is still removed.
    let mut ex = gw.exchange();
    let s = Stream::new(&gw.world, &[(":method", "GET"), (":path", "/other"), ("x-openclaw-bridge-route", "upstream")]);
    assert_eq!(ex.on_request_headers(&s, false), Flow::Continue);
    assert_eq!(s.header("x-openclaw-bridge-route"), None);
}

#[test]
fn a_catalog_routes_each_request_by_its_model_and_refuses_unknown_ones_without_a_call() {
    let mut gw = Gateway::new(json!({"models": [
        {"name": "chat-model", "cluster": "model_0", "authority": "east.example.com", "deployment": "chat-east",
         "upstream_key": "key-east", "api_version": "2025-01-01"},
        {"name": "embed-model", "cluster": "model_1", "authority": "api.example.com:8443", "upstream": "openai",
         "upstream_model": "text-embedding-3-small", "upstream_key": "key-emb", "endpoints": ["embeddings"]},
    ]}));
    let send = |gw: &mut Gateway, path: &str, body: &[u8]| {
        let mut ex = gw.exchange();
        let auth = format!("Bearer {KEY}");
        let s = Stream::new(&gw.world, &[(":method", "POST"), (":path", path), ("authorization", &auth)]);
        ex.on_request_headers(&s, false);
        *s.request_body.borrow_mut() = body.to_vec();
        ex.on_request_body(&s, body.len(), true);
        (ex, s)
    };
    let (_ex, s) =
        send(&mut gw, "/v1/chat/completions", br#"{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(s.header(":path").unwrap(), "/openai/deployments/chat-east/chat/completions?api-version=2025-01-01");
    assert_eq!(
        (
            s.header("api-key").as_deref(),
            s.header(":authority").as_deref(),
            s.header("x-openclaw-bridge-cluster").as_deref()
        ),
        (Some("key-east"), Some("east.example.com"), Some("model_0"))
    );
    let (_ex, s) = send(&mut gw, "/v1/embeddings", br#"{"model":"embed-model","input":["a","b"]}"#);
    assert_eq!(s.header(":path").unwrap(), "/v1/embeddings");
    assert_eq!(s.header("authorization").as_deref(), Some("Bearer key-emb"));
    assert_eq!(s.header("x-openclaw-bridge-cluster").as_deref(), Some("model_1"));
    let sent: Value = serde_json::from_slice(&s.request_body.borrow()).unwrap();
    assert_eq!(sent["model"], "text-embedding-3-small");
    assert_eq!(sent.get("max_completion_tokens"), None, "embeddings have no output to cap");
    let calls = gw.world.calls().len();
    // Unknown, missing, or on an endpoint the model does not serve: answered here.
    for (path, body, status, code, param) in [
        (
            "/v1/chat/completions",
            &br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#[..],
            404,
            Some("model_not_found"),
            "model",
        ),
        ("/v1/chat/completions", br#"{"messages":[{"role":"user","content":"hi"}]}"#, 400, None, "model"),
        (
            "/v1/chat/completions",
            br#"{"model":"embed-model","messages":[{"role":"user","content":"hi"}]}"#,
            400,
            Some("model_not_supported"),
            "model",
        ),
        ("/v1/embeddings", br#"{"model":"chat-model","input":"x"}"#, 400, Some("model_not_supported"), "model"),
        ("/v1/embeddings", br#"{"model":"embed-model","input":[]}"#, 400, None, "input"),
    ] {
        let (_ex, s) = send(&mut gw, path, body);
        assert_eq!(s.replied(), Some(status), "{}", String::from_utf8_lossy(body));
        let reply: Value = serde_json::from_slice(&s.replies.borrow()[0].1).unwrap();
        assert_eq!((reply["error"]["code"].as_str(), reply["error"]["param"].as_str()), (code, Some(param)), "{reply}");
    }
    assert_eq!(gw.world.calls().len(), calls, "no sidecar call for any of them");
}

#[test]
fn local_answers_need_no_callout() {
    let mut gw = Gateway::new(json!({}));
    let cases: [(&str, &str, Option<&str>, u32); 5] = [
        ("GET", "/v1/models", Some(KEY), 200),
        ("GET", "/v1/models", None, 401),
        ("POST", "/v1/models", Some(KEY), 405),
        ("POST", "/v1/audio/speech", Some(KEY), 404),
        ("POST", "/v1/chat/completions", None, 401),
    ];
    for (method, path, key, status) in cases {
        let mut ex = gw.exchange();
        let auth = key.map(|k| format!("Bearer {k}")).unwrap_or_default();
        let mut headers = vec![(":method", method), (":path", path)];
        if key.is_some() {
            headers.push(("authorization", &auth));
        }
        let s = Stream::new(&gw.world, &headers);
        assert_eq!(ex.on_request_headers(&s, false), Flow::Pause);
        assert_eq!(s.replied(), Some(status), "{method} {path}");
        ex.on_log(&s);
    }
    assert!(gw.world.calls().is_empty());
    assert!(gw.queued().is_empty());
}

#[test]
fn trailers_before_admission_never_forward_the_request() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s) = gw.headers(KEY);
    *s.request_body.borrow_mut() = BODY.to_vec();
    assert_eq!(ex.on_request_body(&s, BODY.len(), false), Flow::Pause);
    // HTTP/2: the body ends with trailers, never with end_of_stream.
    assert_eq!(ex.on_request_trailers(&s), Flow::Pause);
    assert_eq!(s.replied(), Some(400));
    assert_eq!(s.resumed.get(), 0);
    ex.on_log(&s);
    assert!(gw.world.calls().is_empty() && gw.queued().is_empty());
    // Trailers while the admission call is out are held too.
    let (mut ex, s, _) = gw.send(BODY);
    assert_eq!(ex.on_request_trailers(&s), Flow::Pause);
}

#[test]
fn a_body_over_the_limit_or_invalid_is_refused_without_a_callout() {
    let mut gw = Gateway::new(json!({"max_body_bytes": 50}));
    let (mut ex, s) = gw.headers(KEY);
    assert_eq!(ex.on_request_body(&s, 51, false), Flow::Pause);
    assert_eq!(s.replied(), Some(413));
    let (_, s, _) = gw.send(b"{}");
    assert_eq!(s.replied(), Some(400));
    assert!(gw.world.calls().is_empty());
}

#[test]
fn a_reply_after_the_client_left_is_ignored_and_what_it_granted_released() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    ex.on_log(&s);
    let lease_id = gw.world.calls_to(LEASE_PATH)[0].body["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(gw.slot(), None, "the fetch marker is cleared");
    gw.answer(&mut ex, &s, "200", grant(100_000));
    assert_eq!(s.resumed.get(), 0, "the late grant forwards nothing");
    assert_eq!(gw.slot(), None, "and installs nothing");
    let key_hash = bridge_protocol::key_hash(KEY);
    assert_eq!(gw.queued(), [Item::Close(LeaseClose::release(key_hash, lease_id))]);

    // A reservation: the release names the hold by its size.
    let mut gw = Gateway::new(json!({"lease_tokens": 0}));
    let (mut ex, s, _) = gw.send(BODY);
    let estimate = gw.world.calls_to(RESERVE_PATH)[0].body["estimate"].as_i64().unwrap();
    ex.on_log(&s);
    gw.answer(&mut ex, &s, "200", json!({"verdict": "admit", "balance_tokens": 5}));
    assert_eq!(s.resumed.get(), 0);
    let [r] = &gw.records()[..] else { panic!("one release") };
    assert!(r.release && r.reserved == estimate && r.status_code == 499);
    assert_eq!((r.input_tokens, r.output_tokens), (0, 0));
}

#[test]
fn a_lost_or_unreadable_reply_answers_503_and_releases() {
    for (status, body) in [("504", json!(null)), ("503", json!(null)), ("200", json!({"verdict": "maybe"}))] {
        let mut gw = Gateway::new(json!({"retry_after_secs": 7}));
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, status, body.clone());
        assert_eq!(s.replied(), Some(503), "{status} {body}");
        assert!(String::from_utf8_lossy(&s.replies.borrow()[0].1).contains("billing_unavailable"));
        assert_eq!(s.resumed.get(), 0);
        assert_eq!(gw.slot(), None);
        let queued = gw.queued();
        assert!(matches!(&queued[..], [Item::Close(LeaseClose { tokens: None, .. })]), "{queued:?}");

        let mut gw = Gateway::new(json!({"lease_tokens": 0}));
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, status, body.clone());
        assert_eq!(s.replied(), Some(503));
        let [r] = &gw.records()[..] else { panic!("one release record") };
        assert!(r.release && r.status_code == 503);
        ex.on_log(&s);
        assert!(gw.queued().is_empty(), "nothing more once answered");
    }
}

#[test]
fn a_call_that_never_left_costs_nothing_and_answers_503() {
    for lease_tokens in [100_000, 0] {
        let mut gw = Gateway::new(json!({"lease_tokens": lease_tokens}));
        gw.world.dispatch_fails.set(true);
        let (mut ex, s, flow) = gw.send(BODY);
        assert_eq!((flow, s.replied()), (Flow::Pause, Some(503)));
        assert_eq!(gw.slot(), None, "no marker left behind");
        ex.on_log(&s);
        assert!(gw.queued().is_empty());
    }
}

#[test]
fn failure_mode_allow_forwards_unreserved_and_gives_back_a_fetched_lease() {
    let mut gw = Gateway::new(json!({"failure_mode": "allow"}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "504", json!(null));
    assert_eq!((s.replied(), s.resumed.get()), (None, 1));
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    let queued = gw.queued();
    let [Item::Close(release), Item::Settle(r)] = &queued[..] else { panic!("{queued:?}") };
    assert_eq!(release.tokens, None);
    assert!(r.unreserved && !r.release && r.lease_id.is_none());
    assert_eq!(r.input_tokens + r.output_tokens, 10);

    // A reservation call that never left: forwarded, settled unreserved.
    let mut gw = Gateway::new(json!({"failure_mode": "allow", "lease_tokens": 0}));
    gw.world.dispatch_fails.set(true);
    let (mut ex, s, _) = gw.send(BODY);
    assert_eq!(s.resumed.get(), 1);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert!(r.unreserved && r.status_code == 0);
}

#[test]
fn refusals_are_relayed_and_cached_for_one_window_without_a_call() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", refuse(401, "invalid_api_key"));
    assert_eq!(s.replied(), Some(401));
    ex.on_log(&s);
    assert!(gw.queued().is_empty());
    assert!(matches!(gw.slot(), Some(Slot::Refused { status: 401, .. })), "{:?}", gw.slot());
    // The same key again within the window: answered alike, no call.
    let calls = gw.world.calls().len();
    let (_, s, flow) = gw.send(BODY);
    assert_eq!((flow, s.replied()), (Flow::Pause, Some(401)));
    assert!(String::from_utf8_lossy(&s.replies.borrow()[0].1).contains("invalid_api_key"));
    assert_eq!(gw.world.calls().len(), calls);
    // After it, the sidecar is asked again (a key created meanwhile works).
    gw.world.advance(1_000);
    gw.send(BODY);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2);
}

#[test]
fn made_up_keys_cannot_grow_envoys_shared_data_past_its_slots() {
    let mut gw = Gateway::new(json!({"lease_slots": 32}));
    for i in 0..500 {
        let (mut ex, s) = gw.headers(&format!("sk-made-up-key-{i:05}"));
        *s.request_body.borrow_mut() = BODY.to_vec();
        ex.on_request_body(&s, BODY.len(), true);
        if gw.world.calls().last().is_some_and(|c| !gw.world.answered(c.token)) {
            let token = gw.world.calls().last().unwrap().token;
            gw.world.mark_answered(token);
            gw.answer(&mut ex, &s, "200", refuse(401, "invalid_api_key"));
        }
        ex.on_log(&s);
    }
    assert!(gw.world.shared_len() <= 32, "{} slots", gw.world.shared_len());
    // A real key sharing a slot with a refused one still gets its lease.
    let (mut ex, s, _) = gw.send(BODY);
    if s.replied().is_none() {
        gw.answer(&mut ex, &s, "200", grant(1_000));
    }
    assert_eq!((s.replied(), s.resumed.get()), (None, 1));
}

#[test]
fn a_lease_not_granted_now_waits_and_asks_again_on_the_tick() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", json!({"verdict": "retry"}));
    assert_eq!(gw.slot(), None);
    assert!(gw.world.calls_to(RESERVE_PATH).is_empty(), "no reservation alone");
    assert!(ex.is_waiting());
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.run_woken(&mut [(&mut ex, &s)]), 1);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2, "asked again");
    gw.answer(&mut ex, &s, "200", grant(10_000));
    assert_eq!(s.resumed.get(), 1);
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert!(r.lease_id.is_some() && !r.unreserved);

    // A reservation the sidecar answers "retry" waits the same way.
    let mut gw = Gateway::new(json!({"lease_tokens": 0}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", json!({"verdict": "retry"}));
    assert!(ex.is_waiting() && s.replied().is_none());
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    gw.run_woken(&mut [(&mut ex, &s)]);
    assert_eq!(gw.world.calls_to(RESERVE_PATH).len(), 2);
}

#[test]
fn while_a_lease_is_fetched_the_keys_other_requests_wait_and_draw_from_it_without_a_call() {
    let mut gw = Gateway::new(json!({}));
    let (mut fetcher, fs, _) = gw.send(BODY);
    let mut others: Vec<_> = (0..20).map(|_| gw.send(BODY)).collect();
    for (ex, s, flow) in &others {
        assert_eq!((*flow, s.resumed.get()), (Flow::Pause, 0));
        assert!(ex.is_waiting());
    }
    assert_eq!(gw.world.calls().len(), 1, "one fetch, no reservation: {:?}", gw.world.calls());
    gw.answer(&mut fetcher, &fs, "200", grant(100_000));
    let mut waiting: Vec<_> = others.iter_mut().map(|(ex, s, _)| (ex, &*s)).collect();
    assert_eq!(gw.run_woken(&mut waiting), 20, "the install woke them");
    for (ex, s, _) in &others {
        assert_eq!((s.resumed.get(), s.replied()), (1, None));
        assert!(!ex.is_waiting());
    }
    assert_eq!(gw.world.calls().len(), 1);
    let Some(Slot::Live(l)) = gw.slot() else { panic!("no lease") };
    assert_eq!(l.drawn_n, 21);
    // What the operator sees: one fetch of 100,000, twenty waits, nothing reserved alone.
    use crate::metrics::Metric;
    let counted = |m| gw.world.counted(m);
    assert_eq!((counted(Metric::LeaseFetches), counted(Metric::LeaseWaits)), (1, 20));
    assert_eq!((counted(Metric::LeaseSize), counted(Metric::Reservations), counted(Metric::Shed)), (100_000, 0, 0));
}

#[test]
fn a_lease_too_small_for_its_waiters_leaves_the_rest_waiting_for_its_renewal() {
    let mut gw = Gateway::new(json!({}));
    let (mut fetcher, fs, _) = gw.send(BODY);
    let estimate = gw.world.calls_to(LEASE_PATH)[0].body["min"].as_i64().unwrap();
    let (mut a, sa, _) = gw.send(BODY);
    let (mut b, sb, _) = gw.send(BODY);
    // Enough for the fetcher and one more.
    gw.answer(&mut fetcher, &fs, "200", grant(2 * estimate));
    gw.run_woken(&mut [(&mut a, &sa), (&mut b, &sb)]);
    assert_eq!((sa.resumed.get(), sb.resumed.get()), (1, 0), "one drew");
    assert!(b.is_waiting());
    // The draw that spent it asked for the next; the root sends the ask and its grant wakes the other.
    gw.root.on_tick(&*gw.world);
    gw.run_woken(&mut [(&mut b, &sb)]);
    assert!(b.is_waiting(), "still nothing to draw from");
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    assert!(ask.body["want"].as_i64().unwrap() >= 16 * estimate);
    let n = gw.world.reply_with("200", &grant(16 * estimate));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    gw.run_woken(&mut [(&mut b, &sb)]);
    assert_eq!(sb.resumed.get(), 1);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2, "two lease calls");
    assert!(gw.world.calls_to(RESERVE_PATH).is_empty());
}

#[test]
fn waits_are_bounded_in_time_and_number_and_admission_calls_in_flight() {
    // In time: past lease_wait_ms, 503 with Retry-After (never 429 or 401).
    let mut gw = Gateway::new(json!({"lease_wait_ms": 500}));
    let (_fetcher, _fs, _) = gw.send(BODY);
    let (mut w, ws, _) = gw.send(BODY);
    gw.world.advance(499);
    gw.root.on_tick(&*gw.world);
    gw.run_woken(&mut [(&mut w, &ws)]);
    assert!(w.is_waiting());
    gw.world.advance(1);
    gw.root.on_tick(&*gw.world);
    gw.run_woken(&mut [(&mut w, &ws)]);
    assert_eq!(ws.replied(), Some(503));
    assert!(ws.reply_headers().iter().any(|(k, v)| k == "retry-after" && v == "5"));
    assert!(w.is_settled() && gw.root.vm.waits.borrow().is_empty());

    // In number: past lease_waiters_max, 503 at once.
    let mut gw = Gateway::new(json!({"lease_waiters_max": 2}));
    let _fetch = gw.send(BODY);
    let waiting: Vec<_> = (0..3).map(|_| gw.send(BODY)).collect();
    let replied: Vec<_> = waiting.iter().map(|(_, s, _)| s.replied()).collect();
    assert_eq!(replied, [None, None, Some(503)]);
    assert_eq!(gw.world.counted(crate::metrics::Metric::Shed), 1);

    // A waiter whose client left leaves the list and owes nothing.
    let (mut w, ws, _) = waiting.into_iter().next().unwrap();
    w.on_log(&ws);
    assert_eq!(gw.root.vm.waits.borrow().len(), 1);
    assert!(gw.records().is_empty());

    // Calls in flight: past admission_calls_max, 503 at once, and the
    // fetch marker it wrote is cleared for the next request.
    let mut gw = Gateway::new(json!({"lease_tokens": 0, "admission_calls_max": 2}));
    let calls: Vec<_> = (0..3).map(|_| gw.send(BODY)).collect();
    assert_eq!(calls.iter().map(|(_, s, _)| s.replied()).collect::<Vec<_>>(), [None, None, Some(503)]);
    assert_eq!(gw.world.calls().len(), 2);
    // An answer frees its place.
    let (mut first, fs, _) = calls.into_iter().next().unwrap();
    let token = gw.world.calls()[0].token;
    let n = gw.world.reply_with("200", &json!({"verdict": "admit", "balance_tokens": 1}));
    first.on_call_response(&fs, token, n);
    let (_, s, _) = gw.send(BODY);
    assert_eq!(s.replied(), None);
    assert_eq!(gw.world.calls().len(), 3);
}

#[test]
fn a_renewal_on_its_way_is_waited_for_when_the_lease_runs_short() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    let estimate = gw.world.calls_to(LEASE_PATH)[0].body["min"].as_i64().unwrap();
    gw.answer(&mut ex, &s, "200", grant(2 * estimate));
    // Half drawn: the background ask goes out, and the next request finds the lease spent.
    let (_, s2, flow) = gw.send(BODY);
    assert_eq!((flow, s2.resumed.get()), (Flow::Continue, 0));
    gw.root.on_tick(&*gw.world);
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    let (mut w, ws, flow) = gw.send(BODY);
    assert_eq!(flow, Flow::Pause);
    assert!(w.is_waiting(), "waits for the renewal instead of fetching or reserving");
    let n = gw.world.reply_with("200", &grant(50 * estimate));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    gw.run_woken(&mut [(&mut w, &ws)]);
    assert_eq!(ws.resumed.get(), 1);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2);
    assert!(gw.world.calls_to(RESERVE_PATH).is_empty());

    // A renewal refused: the waiters stop waiting for it and one fetches in the foreground.
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(2 * estimate));
    gw.send(BODY);
    gw.root.on_tick(&*gw.world);
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    let (mut w, ws, _) = gw.send(BODY);
    let n = gw.world.reply_with("200", &refuse(429, "insufficient_quota"));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    gw.run_woken(&mut [(&mut w, &ws)]);
    let fetches = gw.world.calls_to(LEASE_PATH);
    assert_eq!(fetches.len(), 3, "the woken request fetched");
    gw.answer(&mut w, &ws, "200", refuse(429, "insufficient_quota"));
    assert_eq!(ws.replied(), Some(429));
}

#[test]
fn losing_every_compare_and_swap_falls_back_without_overdrawing() {
    // The precheck: reserve alone.
    let mut gw = Gateway::new(json!({}));
    gw.world.lose_cas.set(crate::slot::CAS_TRIES);
    let (_, _, flow) = gw.send(BODY);
    assert_eq!(flow, Flow::Pause);
    assert_eq!(gw.world.calls_to(RESERVE_PATH).len(), 1);
    assert!(gw.world.calls_to(LEASE_PATH).is_empty());

    // The install: the lease serves this request alone and is closed at once.
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.world.lose_cas.set(crate::slot::CAS_TRIES);
    gw.answer(&mut ex, &s, "200", grant(1_000));
    assert_eq!(s.resumed.get(), 1);
    let queued = gw.queued();
    let [Item::Close(c)] = &queued[..] else { panic!("{queued:?}") };
    assert_eq!((c.tokens, c.drawn_n), (Some(1_000), 1));
    assert!(c.drawn_tokens > 0);
}

#[test]
fn the_client_gone_in_every_stage_settles_once_or_not_at_all() {
    // A model that does not reason: what it wrote is all it is billed for.
    let mut gw = Gateway::new(json!({"reasoning": false}));
    // Gone after the headers, and while the body was buffering: nothing owed.
    let (mut ex, s) = gw.headers(KEY);
    ex.on_log(&s);
    let (mut ex, s) = gw.headers(KEY);
    ex.on_request_body(&s, 10, false);
    ex.on_log(&s);
    assert!(gw.queued().is_empty());

    // Forwarded, gone before any answer: charged the prompt by tiktoken.
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    ex.on_log(&s);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("exactly one record") };
    assert_eq!((r.status_code, r.usage_source, r.output_tokens), (0, UsageSource::Tiktoken, 0));
    assert!(r.input_tokens > 0);

    // Gone mid-stream: the visible text so far is counted.
    let (mut ex, s, _) = gw.send(BODY);
    *s.response_headers.borrow_mut() =
        vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
    ex.on_response_headers(&s);
    let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n";
    *s.response_body.borrow_mut() = chunk.to_vec();
    ex.on_response_body(&s, chunk.len(), false);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("exactly one record") };
    assert_eq!((r.status_code, r.output_tokens, r.usage_source), (200, 2, UsageSource::Tiktoken));
}

#[test]
fn streamed_requests_hide_the_usage_event_they_did_not_ask_for() {
    let mut gw = Gateway::new(json!({}));
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let (mut ex, s, _) = gw.send(body);
    let sent: Value = serde_json::from_slice(&s.request_body.borrow()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    *s.response_headers.borrow_mut() =
        vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
    ex.on_response_headers(&s);
    assert!(s.response_headers.borrow().iter().any(|(k, _)| k == "x-bridge-request-id"));
    let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"yo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    *s.response_body.borrow_mut() = chunk.to_vec();
    ex.on_response_body(&s, chunk.len(), true);
    let out = String::from_utf8(s.response_body.borrow().clone()).unwrap();
    assert!(out.contains("yo") && out.contains("[DONE]") && !out.contains("usage"), "{out}");
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert_eq!((r.input_tokens, r.output_tokens, r.stream), (4, 1, true));
}

#[test]
fn a_reasoning_model_cut_short_without_usage_pays_its_hold() {
    let mut gw = Gateway::new(json!({}));
    assert!(gw.root.config.reasons(), "gpt-5-nano reasons");
    let (mut ex, s, _) = gw.send(BODY);
    let reserved = gw.world.calls_to(LEASE_PATH)[0].body["min"].as_i64().unwrap();
    gw.answer(&mut ex, &s, "200", grant(100_000));
    *s.response_headers.borrow_mut() =
        vec![(":status".into(), "200".into()), ("content-type".into(), "text/event-stream".into())];
    ex.on_response_headers(&s);
    let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n";
    *s.response_body.borrow_mut() = chunk.to_vec();
    ex.on_response_body(&s, chunk.len(), false);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert_eq!((r.usage_source, r.input_tokens + r.output_tokens), (UsageSource::Estimate, reserved));
    // With usage it pays exactly what the upstream reported, reasoning or not.
    let (mut ex, s, _) = gw.send(BODY);
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert_eq!((r.usage_source, r.input_tokens, r.output_tokens), (UsageSource::Upstream, 7, 3));
}

#[test]
fn a_keys_controls_ride_with_its_lease_and_refuse_without_a_call() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    let policy = json!({"allowed_models": ["gpt-5-nano"], "expires_at_ms": gw.world.now.get() + 5_000});
    gw.answer(
        &mut ex,
        &s,
        "200",
        json!({"verdict": "grant", "tokens": 100_000, "balance_tokens": 0, "policy": policy}),
    );
    assert_eq!(s.resumed.get(), 1);
    let calls = gw.world.calls().len();
    // Another model: 403 model_not_allowed from the lease, no call, nothing drawn.
    let other = br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":64}"#;
    let (_, s2, _) = gw.send(other);
    assert_eq!(s2.replied(), Some(403));
    assert!(String::from_utf8_lossy(&s2.replies.borrow()[0].1).contains("model_not_allowed"));
    assert_eq!(gw.world.calls().len(), calls);
    let Some(Slot::Live(l)) = gw.slot() else { panic!("no lease") };
    assert_eq!(l.drawn_n, 1);
    // The allowed model draws as before.
    let (_, s3, flow) = gw.send(BODY);
    assert_eq!((flow, s3.replied()), (Flow::Continue, None));
    // Past the key's expiry (within the lease's window): 401 from the lease.
    let mut gw = Gateway::new(json!({"lease_ms": 60_000}));
    let (mut ex, s, _) = gw.send(BODY);
    let policy = json!({"expires_at_ms": gw.world.now.get() + 1_000});
    gw.answer(
        &mut ex,
        &s,
        "200",
        json!({"verdict": "grant", "tokens": 100_000, "balance_tokens": 0, "policy": policy}),
    );
    gw.world.advance(1_000);
    let (_, s2, _) = gw.send(BODY);
    assert_eq!(s2.replied(), Some(401));
    assert!(String::from_utf8_lossy(&s2.replies.borrow()[0].1).contains("expired"));

    // A lease fetch refused for its model is not cached for the key's other requests.
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(other);
    gw.answer(&mut ex, &s, "200", refuse(403, "model_not_allowed"));
    assert_eq!(s.replied(), Some(403));
    assert_eq!(gw.slot(), None, "not cached: the key's allowed models still serve");
}

#[test]
fn a_keys_rate_limits_refuse_429_rate_limit_exceeded_once_its_minute_is_full() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    let policy = json!({"rpm_limit": 3});
    gw.answer(
        &mut ex,
        &s,
        "200",
        json!({"verdict": "grant", "tokens": 100_000, "balance_tokens": 0, "policy": policy}),
    );
    // The fetcher was admitted before the limit was known (one a lease fetch,
    // beyond the limit); three more fill the minute.
    let flows: Vec<Option<u32>> = (0..4).map(|_| gw.send(BODY).1.replied()).collect();
    assert_eq!(flows, [None, None, None, Some(429)]);
    let (_, s5, _) = gw.send(BODY);
    assert_eq!(s5.replied(), Some(429));
    let body = String::from_utf8_lossy(&s5.replies.borrow()[0].1).to_string();
    assert!(body.contains("rate_limit_exceeded") && !body.contains("insufficient_quota"), "{body}");
    assert!(s5.reply_headers().iter().any(|(k, v)| k == "retry-after" && v == "60"), "{:?}", s5.reply_headers());
    let Some(Slot::Live(l)) = gw.slot() else { panic!("no lease") };
    assert_eq!(l.drawn_n, 4, "refused requests draw nothing");
    // A minute later the key is served again (its lease renewed meanwhile).
    gw.world.advance(60_000);
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(
        &mut ex,
        &s,
        "200",
        json!({"verdict": "grant", "tokens": 100_000, "balance_tokens": 0, "policy": policy}),
    );
    assert_eq!(gw.send(BODY).1.replied(), None);
}

#[test]
fn without_leases_the_limits_a_reservation_reply_gives_count_the_keys_next_requests() {
    let mut gw = Gateway::new(json!({"lease_tokens": 0}));
    let admit = |policy: Value| json!({"verdict": "admit", "balance_tokens": 0, "policy": policy});
    // Requests of a key with rpm 2: the first teaches the limit (and counts),
    // the second is counted before it reserves, the third is refused here.
    for _ in 0..2 {
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, "200", admit(json!({"rpm_limit": 2})));
        assert_eq!(s.resumed.get(), 1);
    }
    let calls = gw.world.calls_to(RESERVE_PATH).len();
    let (_, s, _) = gw.send(BODY);
    assert_eq!(s.replied(), Some(429));
    let body = String::from_utf8_lossy(&s.replies.borrow()[0].1).to_string();
    assert!(body.contains("rate_limit_exceeded") && !body.contains("insufficient_quota"), "{body}");
    assert!(s.reply_headers().iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(gw.world.calls_to(RESERVE_PATH).len(), calls, "refused without a reservation");
    // A minute later the key reserves again; a reply without limits (the
    // admin cleared them) stops the counting.
    gw.world.advance(60_000);
    for _ in 0..2 {
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, "200", admit(json!({"rpm_limit": 2})));
    }
    assert_eq!(gw.send(BODY).1.replied(), Some(429));
    gw.world.advance(60_000);
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", admit(json!({})));
    for _ in 0..3 {
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, "200", admit(json!({})));
        assert_eq!(s.resumed.get(), 1, "no limit any more");
    }
}

#[test]
fn a_settlement_names_the_endpoint_the_deployment_and_the_upstream_that_answered() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    *s.upstream.borrow_mut() = Some("10.1.2.3:443".into());
    respond(&mut ex, &s, "200", br#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}"#);
    ex.on_log(&s);
    let [r] = &gw.records()[..] else { panic!("one record") };
    assert_eq!(
        (r.detail.endpoint.as_deref(), r.detail.deployment.as_deref(), r.detail.upstream.as_deref()),
        (Some("chat"), Some("gpt-5-nano"), Some("10.1.2.3:443"))
    );
    assert_eq!(
        (r.detail.cached_tokens, r.detail.charged_tokens, r.detail.response_id.as_deref()),
        (3, None, None),
        "unpriced: no charged_tokens of its own"
    );
}

#[test]
fn a_stored_response_goes_on_only_for_its_owner_and_only_after_asking() {
    let mut gw = Gateway::new(json!({}));
    let lookup = |gw: &mut Gateway, method: &str, path: &str| {
        let mut ex = gw.exchange();
        let auth = format!("Bearer {KEY}");
        let s = Stream::new(&gw.world, &[(":method", method), (":path", path), ("authorization", &auth)]);
        assert_eq!(ex.on_request_headers(&s, true), Flow::Pause);
        (ex, s)
    };
    // The owner: on to the model's upstream with its key, unbilled.
    let (mut ex, s) = lookup(&mut gw, "GET", "/v1/responses/resp_1/input_items?limit=2");
    let call = gw.world.calls_to(bridge_protocol::OWNER_PATH).pop().unwrap();
    assert_eq!(call.body["response_id"], "resp_1");
    assert_eq!(s.header("authorization"), None, "the client's key is gone before anything goes on");
    assert!(ex.is_pending());
    gw.answer(&mut ex, &s, "200", json!({"model": "gpt-5-nano"}));
    assert_eq!(s.resumed.get(), 1);
    assert_eq!(s.header(":path").unwrap(), "/openai/v1/responses/resp_1/input_items?limit=2");
    assert_eq!(s.header("api-key").as_deref(), Some("upstream-secret"));
    assert_eq!(s.header("x-openclaw-bridge-route").as_deref(), Some("upstream"));
    ex.on_log(&s);
    // Anyone else: 404, nothing goes on.
    let (mut ex, s) = lookup(&mut gw, "DELETE", "/v1/responses/resp_1");
    gw.answer(&mut ex, &s, "200", json!({"model": null}));
    assert_eq!((s.replied(), s.resumed.get()), (Some(404), 0));
    assert_eq!(s.header("x-openclaw-bridge-route"), None);
    // The sidecar failing: 503, never 401 or 404.
    let (mut ex, s) = lookup(&mut gw, "GET", "/v1/responses/resp_1");
    gw.answer(&mut ex, &s, "503", json!(null));
    assert_eq!(s.replied(), Some(503));
    assert!(gw.queued().is_empty(), "none of it is billed");
}

fn error_of(s: &Stream) -> Value {
    serde_json::from_slice(&s.replies.borrow().last().unwrap().1).unwrap()
}

#[test]
fn a_previous_response_of_another_key_is_a_404_that_never_reaches_admission_or_the_upstream() {
    let mut gw = Gateway::new(json!({}));
    let body = br#"{"model":"gpt-5-nano","input":"and then?","previous_response_id":"resp_theirs"}"#;
    let (mut ex, s, flow) = gw.post(KEY, "/v1/responses", &[], body);
    assert_eq!(flow, Flow::Pause);
    let ask = gw.world.calls_to(bridge_protocol::OWNER_PATH).pop().expect("asked whose it is");
    assert_eq!(
        (ask.body["response_id"].as_str(), ask.body["key_hash"].as_str()),
        (Some("resp_theirs"), Some(bridge_protocol::key_hash(KEY).as_str()))
    );
    assert!(ex.is_pending());
    // A trailer while it is asked holds, as during admission.
    assert_eq!(ex.on_request_trailers(&s), Flow::Pause);
    gw.answer(&mut ex, &s, "200", json!({"model": null}));
    assert_eq!((s.replied(), s.resumed.get()), (Some(404), 0));
    let e = error_of(&s);
    assert_eq!(
        (e["error"]["param"].as_str(), e["error"]["code"].as_str()),
        (Some("previous_response_id"), Some("previous_response_not_found"))
    );
    assert!(gw.world.calls_to(LEASE_PATH).is_empty() && gw.world.calls_to(RESERVE_PATH).is_empty(), "nothing held");
    ex.on_log(&s);
    assert!(gw.queued().is_empty(), "nothing to settle");

    // The key's own: on to admission (a lease fetched), then upstream.
    let (mut ex, s, _) = gw.post(KEY, "/v1/responses", &[], body);
    gw.answer(&mut ex, &s, "200", json!({"model": "gpt-5-nano"}));
    assert_eq!(s.resumed.get(), 0, "not before admission");
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 1);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    assert_eq!(s.resumed.get(), 1);
    // The sidecar failing, or the client leaving while it is asked: 503, or nothing owed.
    let (mut ex, s, _) = gw.post(KEY, "/v1/responses", &[], body);
    gw.answer(&mut ex, &s, "503", json!(null));
    assert_eq!(s.replied(), Some(503));
    let (mut ex, s, _) = gw.post(KEY, "/v1/responses", &[], body);
    ex.on_log(&s);
    assert!(ex.is_settled());
}

#[test]
fn a_response_just_made_is_its_makers_at_once_and_no_one_elses_before_it_settles() {
    let mut gw = Gateway::new(json!({}));
    let other = "sk-someone-else-0002";
    let (mut ex, s, _) = gw.post(KEY, "/v1/responses", &[], br#"{"model":"gpt-5-nano","input":"remember 7"}"#);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    respond(
        &mut ex,
        &s,
        "200",
        br#"{"id":"resp_made_now","object":"response","usage":{"input_tokens":5,"output_tokens":2}}"#,
    );
    // Not yet settled (on_log has not run): the sidecar knows nothing of it.
    let asked = gw.world.calls_to(bridge_protocol::OWNER_PATH).len();
    let follow = br#"{"model":"gpt-5-nano","input":"which number?","previous_response_id":"resp_made_now"}"#;
    let (_ex2, s2, flow) = gw.post(KEY, "/v1/responses", &[], follow);
    assert_eq!((flow, s2.replied()), (Flow::Continue, None), "drawn from the key's lease at once");
    let read = |gw: &mut Gateway, key: &str| {
        let mut ex = gw.exchange();
        let auth = format!("Bearer {key}");
        let s = Stream::new(
            &gw.world,
            &[(":method", "GET"), (":path", "/v1/responses/resp_made_now"), ("authorization", &auth)],
        );
        let flow = ex.on_request_headers(&s, true);
        (ex, flow, s)
    };
    let (_e4, flow, s4) = read(&mut gw, KEY);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(s4.header(":path").as_deref(), Some("/openai/v1/responses/resp_made_now"));
    assert_eq!(gw.world.calls_to(bridge_protocol::OWNER_PATH).len(), asked, "none of it asked the sidecar");
    // Another key with a live lease of its own: 404 at once, for either.
    let (mut exo, so, _) = gw.post(other, "/v1/chat/completions", &[], BODY);
    gw.answer(&mut exo, &so, "200", grant(100_000));
    let (_ex3, s3, _) = gw.post(other, "/v1/responses", &[], follow);
    assert_eq!(s3.replied(), Some(404));
    let (_e5, _, s5) = read(&mut gw, other);
    assert_eq!(s5.replied(), Some(404));
    assert_eq!(gw.world.calls_to(bridge_protocol::OWNER_PATH).len(), asked);
    // A key nothing vouches for (made up, say) is the sidecar's to answer: 401 as elsewhere.
    let (mut ex6, _, s6) = read(&mut gw, "sk-made-up-key-0003");
    let refused = json!({"model": null, "refused": {"status": 401, "error": {"message": "Incorrect API key provided.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}});
    gw.answer(&mut ex6, &s6, "200", refused.clone());
    assert_eq!((s6.replied(), error_of(&s6)["error"]["code"].as_str()), (Some(401), Some("invalid_api_key")));
    let (mut ex7, s7, _) = gw.post("sk-made-up-key-0003", "/v1/responses", &[], follow);
    gw.answer(&mut ex7, &s7, "200", refused);
    assert_eq!((s7.replied(), s7.resumed.get()), (Some(401), 0));
    ex.on_log(&s);
    assert_eq!(
        gw.records()[0].detail.response_id.as_deref(),
        Some("resp_made_now"),
        "and the sidecar is told with the settlement"
    );
}

#[test]
fn refused_fields_and_account_headers_never_reach_the_upstream() {
    let mut gw = Gateway::new(json!({}));
    let (_ex, s, _) = gw.post(
        KEY,
        "/v1/chat/completions",
        &[("openai-organization", "org-operator"), ("openai-project", "proj_x")],
        BODY,
    );
    assert_eq!((s.header("openai-organization"), s.header("openai-project")), (None, None));
    for (path, body, param) in [
        ("/v1/responses", &br#"{"input":"x","background":true}"#[..], "background"),
        ("/v1/responses", br#"{"input":"x","tools":[{"type":"web_search"}]}"#, "tools[0].type"),
        (
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"service_tier":"priority"}"#,
            "service_tier",
        ),
    ] {
        let before = gw.world.calls().len();
        let (_ex, s, _) = gw.post(KEY, path, &[], body);
        assert_eq!((s.replied(), s.resumed.get()), (Some(400), 0));
        assert_eq!(error_of(&s)["error"]["param"], param);
        assert_eq!(gw.world.calls().len(), before, "refused before any call");
    }
}

#[test]
fn a_plain_answer_cut_without_its_usage_is_charged_its_hold_not_a_count_of_its_fragment() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    let text = "word ".repeat(crate::response::MAX_PLAIN_COPY / 5 + 1000);
    let body = format!(r#"{{"choices":[{{"message":{{"role":"assistant","content":"{text}"}}}}]}}"#);
    respond(&mut ex, &s, "200", body.as_bytes());
    ex.on_log(&s);
    let r = &gw.records()[0];
    assert_eq!(r.usage_source, UsageSource::Estimate);
    assert_eq!(r.input_tokens + r.output_tokens, r.reserved, "the hold, whatever the fragment would count");
}

#[test]
fn bodies_held_before_admission_are_bounded_per_vm_and_freed_when_admitted_answered_or_gone() {
    let mut gw = Gateway::new(json!({"max_body_bytes": 1_000, "unadmitted_bytes_max": 2_500}));
    // Made-up keys sending large bodies slowly: two fit, the third is 503 with Retry-After.
    let mut slow = Vec::new();
    for i in 0..3 {
        let (mut ex, s) = gw.headers(&format!("sk-made-up-key-{i:04}"));
        let flow = ex.on_request_body(&s, 900, false);
        slow.push((ex, s, flow));
    }
    assert_eq!(slow.iter().map(|(_, s, _)| s.replied()).collect::<Vec<_>>(), [None, None, Some(503)]);
    assert!(slow[2].1.reply_headers().iter().any(|(k, _)| k == "retry-after"));
    assert_eq!(gw.root.vm.unadmitted_bytes(), 1_800);
    // One leaves: its bytes are freed, and a real request fits again.
    let (mut gone, s, _) = slow.remove(0);
    gone.on_log(&s);
    assert_eq!(gw.root.vm.unadmitted_bytes(), 900);
    let (mut ex, s, flow) = gw.send(BODY);
    assert_eq!((flow, s.replied()), (Flow::Pause, None), "counted while its lease is fetched");
    assert_eq!(gw.root.vm.unadmitted_bytes(), 900 + BODY.len());
    gw.answer(&mut ex, &s, "200", grant(100_000));
    assert_eq!(gw.root.vm.unadmitted_bytes(), 900, "admitted: no longer counted");
    // An answered one (refused, here) frees its bytes too.
    let (mut ex, s) = gw.headers("sk-made-up-key-0001");
    *s.request_body.borrow_mut() = b"{not json".to_vec();
    ex.on_request_body(&s, 9, true);
    assert_eq!((s.replied(), gw.root.vm.unadmitted_bytes()), (Some(400), 900));
}

#[test]
fn a_key_reserving_alone_beside_another_keys_lease_is_still_held_to_its_rate_limit() {
    // One lease slot: another key's live lease sits in it, so this key's requests reserve alone.
    let mut gw = Gateway::new(json!({"lease_slots": 1}));
    let other = "sk-someone-else-0002";
    let (mut ex, s, _) = gw.post(other, "/v1/chat/completions", &[], BODY);
    gw.answer(
        &mut ex,
        &s,
        "200",
        json!({"verdict": "grant", "tokens": 100_000, "balance_tokens": 0, "policy": {"rpm_limit": 1}}),
    );
    let admit = json!({"verdict": "admit", "balance_tokens": 0, "policy": {"rpm_limit": 2}});
    for _ in 0..2 {
        let (mut ex, s, _) = gw.send(BODY);
        assert_eq!(gw.world.calls().last().unwrap().path, RESERVE_PATH, "reserves alone");
        gw.answer(&mut ex, &s, "200", admit.clone());
        assert_eq!(s.resumed.get(), 1);
    }
    let calls = gw.world.calls().len();
    let (_, s, _) = gw.send(BODY);
    assert_eq!(s.replied(), Some(429), "its third in the minute");
    assert_eq!(gw.world.calls().len(), calls, "refused without a call");
    // The other key's own limit is its own window's: one request counted (the fetcher, before it was known), then 429.
    assert_eq!(gw.post(other, "/v1/chat/completions", &[], BODY).1.replied(), None);
    assert_eq!(gw.post(other, "/v1/chat/completions", &[], BODY).1.replied(), Some(429));
}

#[test]
fn a_priced_service_tier_is_charged_at_its_multiplier() {
    let models = json!([{"name": "gpt-5-nano", "deployment": "gpt-5-nano", "upstream_key": "k",
        "service_tiers": {"priority": 2.0}}]);
    let mut gw = Gateway::new(json!({"models": models}));
    let body = br#"{"model":"gpt-5-nano","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":64,"service_tier":"priority"}"#;
    let (mut ex, s, _) = gw.post(KEY, "/v1/chat/completions", &[], body);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    assert_eq!(s.resumed.get(), 1);
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    let r = &gw.records()[0];
    assert_eq!((r.input_tokens, r.output_tokens, r.detail.charged_tokens), (7, 3, Some(20)), "twice 7 + 3");
}

#[test]
fn a_reservation_asked_again_after_retry_counts_once_in_the_keys_minute() {
    let mut gw = Gateway::new(json!({"lease_tokens": 0}));
    let admit = json!({"verdict": "admit", "balance_tokens": 0, "policy": {"rpm_limit": 2}});
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", admit.clone());
    assert_eq!(s.resumed.get(), 1, "the first in the minute; the limit is taught");
    // The second: not now (the balance is in recalled leases), twice, then admitted.
    let (mut ex, s, _) = gw.send(BODY);
    for asked in 2..4 {
        gw.answer(&mut ex, &s, "200", json!({"verdict": "retry"}));
        gw.world.advance(200);
        gw.root.on_tick(&*gw.world);
        gw.run_woken(&mut [(&mut ex, &s)]);
        assert_eq!(s.replied(), None, "the second in the minute, however often it asks: not 429");
        assert_eq!(gw.world.calls_to(RESERVE_PATH).len(), asked + 1, "asked again");
    }
    gw.answer(&mut ex, &s, "200", admit);
    assert_eq!((s.replied(), s.resumed.get()), (None, 1));
    let (_, s, _) = gw.send(BODY);
    assert_eq!(s.replied(), Some(429), "the third is over the limit");
}

#[test]
fn a_request_waiting_for_the_keys_next_lease_counts_once_in_its_minute() {
    let mut gw = Gateway::new(json!({}));
    let limited =
        |tokens: i64| json!({"verdict": "grant", "tokens": tokens, "balance_tokens": 0, "policy": {"rpm_limit": 2}});
    // A live lease with room for exactly one request, under a limit of two a minute.
    let (mut ex, s, _) = gw.send(BODY);
    let estimate = gw.world.calls_to(LEASE_PATH)[0].body["min"].as_i64().unwrap();
    gw.answer(&mut ex, &s, "200", limited(estimate));
    assert_eq!(s.resumed.get(), 1, "the fetcher, before the limit was known: not counted");
    // The second is counted and fetches the next lease; the third waits for it.
    let (mut fetcher, fs, _) = gw.send(BODY);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2, "the second fetches the next lease");
    let (mut waiter, ws, _) = gw.send(BODY);
    assert!(waiter.is_waiting() && ws.replied().is_none());
    gw.answer(&mut fetcher, &fs, "200", limited(100_000));
    assert_eq!(fs.resumed.get(), 1);
    for _ in 0..3 {
        gw.world.advance(100);
        gw.root.on_tick(&*gw.world);
        gw.run_woken(&mut [(&mut waiter, &ws)]);
    }
    assert_eq!((ws.replied(), ws.resumed.get()), (None, 1), "the second counted, drawn once woken: not 429");
    let (_, s, _) = gw.send(BODY);
    assert_eq!(s.replied(), Some(429), "the fourth is over the limit");
}
