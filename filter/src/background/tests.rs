//! The root's work in the middle tier: background lease asks, batches and
//! their retries, the sweep, shutdown.

use bridge_protocol::{LEASE_PATH, SETTLE_PATH};
use serde_json::{json, Value};

use crate::exchange::harness::*;
use crate::host::{Flow, Host};
use crate::lease::Slot;
use crate::metrics::Gauge;
use crate::settle::Item;

#[test]
fn half_way_through_a_lease_the_root_fetches_the_next_in_the_background() {
    let mut gw = Gateway::new(json!({"lease_ms": 1_000}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    gw.world.advance(600);
    let (_, _, flow) = gw.send(BODY);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(gw.world.lease_queue.borrow().len(), 1, "one background ask queued");
    gw.root.on_tick(&*gw.world);
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    assert_eq!(ask.body["replaces"], Value::Null);
    let n = gw.world.reply_with("200", &grant(50_000));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    let Some(Slot::Live(l)) = gw.slot() else { panic!("no lease") };
    assert_eq!((l.id.as_str(), l.tokens, l.drawn_n), (ask.body["lease_id"].as_str().unwrap(), 50_000, 0));
    // The renewed lease replaced the first, which closes with its two draws.
    let queued = gw.queued();
    let [Item::Close(old)] = &queued[..] else { panic!("{queued:?}") };
    assert_eq!((old.tokens, old.drawn_n), (Some(100_000), 2));
}

#[test]
fn the_root_sends_batches_retries_with_backoff_and_sweeps_expired_leases() {
    let mut gw = Gateway::new(json!({"lease_ms": 1_000}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.gauge(Gauge::Pending), 2, "one record and one live lease pending");
    let first = gw.settle_calls(true);
    assert_eq!(first[0].body["records"].as_array().unwrap().len(), 1);
    let report = gw.settle_calls(false).pop().unwrap();
    assert_eq!(report.body["progress"][0]["drawn_n"], 1, "the lease's progress on its own lane");
    gw.reply(report.token, "200", json!({"results": [], "closes": []}));
    // The sidecar fails the records: the batch is kept and sent again after the backoff.
    gw.reply(first[0].token, "503", json!(null));
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.settle_calls(true).len(), 1, "backing off");
    gw.world.advance(1_000);
    gw.root.on_tick(&*gw.world);
    // The lease expired meanwhile: swept and closed.
    assert_eq!(gw.slot(), None);
    let again = gw.settle_calls(true).pop().unwrap();
    assert_eq!(again.body["records"][0]["request_id"], first[0].body["records"][0]["request_id"]);
    let close = gw.settle_calls(false).pop().unwrap();
    assert_eq!(close.body["closes"][0]["drawn_n"], 1);
    gw.reply(close.token, "200", json!({"results": [], "closes": []}));
    gw.reply(again.token, "200", json!({"results": [], "closes": []}));
    assert_eq!(gw.world.gauge(Gauge::Pending), 0, "nothing pending");
}

#[test]
fn a_batch_the_sidecar_rejects_is_split_and_its_bad_record_dropped_alone() {
    let mut gw = Gateway::new(json!({"lease_tokens": 0}));
    for _ in 0..3 {
        let (mut ex, s, _) = gw.send(BODY);
        gw.answer(&mut ex, &s, "200", json!({"verdict": "admit", "balance_tokens": 1}));
        respond(&mut ex, &s, "200", USAGE);
        ex.on_log(&s);
    }
    let ids: Vec<Value> = gw.root.vm.settler.borrow().pending_ids().into_iter().map(Value::from).collect();
    let bad = ids[1].clone();
    gw.root.on_tick(&*gw.world);
    // The sidecar refuses any batch holding the bad record (as a 413 would), takes the rest.
    for _ in 0..10 {
        let Some(call) = gw.world.calls_to(SETTLE_PATH).pop() else { break };
        if gw.world.answered(call.token) {
            break;
        }
        let records = call.body["records"].as_array().cloned().unwrap_or_default();
        let n = if records.iter().any(|r| r["request_id"] == bad) {
            gw.world.reply_with("413", &json!(null))
        } else {
            gw.world.reply_with("200", &json!({"results": [], "closes": []}))
        };
        gw.world.mark_answered(call.token);
        gw.root.on_call_response(&*gw.world, call.token, n);
    }
    let taken: Vec<Value> = gw
        .world
        .calls_to(SETTLE_PATH)
        .iter()
        .filter(|c| !c.body["records"].as_array().unwrap().iter().any(|r| r["request_id"] == bad))
        .flat_map(|c| c.body["records"].as_array().cloned().unwrap())
        .map(|r| r["request_id"].clone())
        .collect();
    assert_eq!(taken, [ids[0].clone(), ids[2].clone()]);
    assert_eq!(gw.root.vm.pending(), 0, "nothing wedged: the bad record was dropped");
}

/// `n` keys (`sk-{name}-tenant-0000`...), each with a lease of `tokens` granted to its first request.
fn leased_keys(gw: &mut Gateway, name: &str, n: usize, tokens: i64) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("sk-{name}-tenant-{i:04}")).collect();
    for k in &keys {
        let (mut ex, s, _) = gw.post(k, "/v1/chat/completions", &[], BODY);
        gw.answer(&mut ex, &s, "200", grant(tokens));
    }
    keys
}

/// A key's lease half way through its window, and the background ask for the
/// next one the root sent.
fn renewing() -> (Gateway, crate::fake::Call) {
    let mut gw = Gateway::new(json!({"lease_ms": 1_000}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    gw.world.advance(600);
    gw.send(BODY);
    gw.root.on_tick(&*gw.world);
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    (gw, ask)
}

#[test]
fn renewals_due_together_go_a_few_at_a_time_and_each_answer_sends_the_next() {
    // Keys that became active together come to half their leases together:
    // a thousand renewals sent at once queued at the ledger ahead of the
    // records (a fifth of a second a grant), and the backlog grew.
    let mut gw = Gateway::new(json!({"lease_ms": 1_000}));
    let keys = leased_keys(&mut gw, "together", 100, 100_000);
    gw.world.advance(600);
    let before = gw.world.calls_to(LEASE_PATH).len();
    for k in &keys {
        gw.post(k, "/v1/chat/completions", &[], BODY);
    }
    assert_eq!(gw.world.lease_queue.borrow().len(), keys.len(), "every key asks for its next lease");
    gw.root.on_tick(&*gw.world);
    let sent = |gw: &Gateway| gw.world.calls_to(LEASE_PATH)[before..].to_vec();
    assert_eq!(sent(&gw).len(), super::LEASE_ASKS_IN_FLIGHT, "a few at a time");
    // Each answer sends the next at once, and every ask goes in the end.
    let mut answered = 0;
    while let Some(ask) = sent(&gw).into_iter().find(|c| !gw.world.answered(c.token)) {
        let open = sent(&gw).iter().filter(|c| !gw.world.answered(c.token)).count();
        assert!(open <= super::LEASE_ASKS_IN_FLIGHT, "{open} asks in flight");
        gw.reply(ask.token, "200", grant(50_000));
        answered += 1;
    }
    assert_eq!(answered, keys.len());
    assert!(gw.world.lease_queue.borrow().is_empty());
}

#[test]
fn an_ask_that_waited_until_a_later_one_replaced_it_is_dropped_not_sent() {
    // A slow sidecar: the asks queue behind the ones in flight, their markers
    // go stale, the keys' draws ask again. The first asks are then nobody's.
    let mut gw = Gateway::new(json!({"lease_ms": 60_000, "sidecar_timeout_ms": 1_000}));
    let keys = leased_keys(&mut gw, "slow", 40, 1_000_000);
    gw.world.advance(40_000);
    let before = gw.world.calls_to(LEASE_PATH).len();
    for k in &keys {
        gw.post(k, "/v1/chat/completions", &[], BODY);
    }
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len() - before, super::LEASE_ASKS_IN_FLIGHT);
    // Unanswered past their staleness: every key asks again.
    gw.world.advance(3_000);
    for k in &keys {
        gw.post(k, "/v1/chat/completions", &[], BODY);
    }
    assert_eq!(gw.world.lease_queue.borrow().len(), 2 * keys.len() - super::LEASE_ASKS_IN_FLIGHT);
    // The sidecar answers the first ones; what the queue then sends is the second asks alone.
    for call in gw.world.calls_to(LEASE_PATH)[before..].to_vec() {
        gw.reply(call.token, "503", json!(null));
    }
    while let Some(ask) = gw.world.calls_to(LEASE_PATH)[before..].iter().find(|c| !gw.world.answered(c.token)).cloned()
    {
        gw.reply(ask.token, "200", grant(50_000));
    }
    let sent = gw.world.calls_to(LEASE_PATH).len() - before;
    assert_eq!(sent, super::LEASE_ASKS_IN_FLIGHT + keys.len(), "the stale asks were sent too");
    assert!(gw.world.lease_queue.borrow().is_empty());
}

#[test]
fn shutdown_closes_live_leases_and_releases_asks_in_flight() {
    let (mut gw, _) = renewing();
    let before = gw.world.calls().len();
    gw.root.on_done(&*gw.world);
    let last = gw.world.calls();
    let [shutdown] = &last[before..] else { panic!("one last batch") };
    let closes = shutdown.body["closes"].as_array().unwrap();
    assert_eq!(closes.len(), 2, "the live lease and the unanswered renewal: {closes:?}");
    assert!(closes.iter().any(|c| c["tokens"].is_null()));
    assert_eq!(gw.slot(), None);
}

#[test]
fn a_background_ask_that_fails_is_released_and_a_renewal_the_slot_outgrew_given_back() {
    let (mut gw, ask) = renewing();
    // The reply is lost (a timeout shows as 504): whatever it granted goes back.
    let n = gw.world.reply_with("504", &json!(null));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    let queued = gw.queued();
    let [Item::Close(release)] = &queued[..] else { panic!("{queued:?}") };
    assert_eq!((release.lease_id.as_str(), release.tokens), (ask.body["lease_id"].as_str().unwrap(), None));

    // Another ask, which takes so long that it goes stale; meanwhile the lease
    // expires and a request replaces it.
    let (mut gw, ask) = renewing();
    gw.world.advance(gw.root.config.lease_policy().stale_ms);
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    let Some(Slot::Live(current)) = gw.slot() else { panic!("no lease") };
    gw.queued();
    let n = gw.world.reply_with("200", &grant(70_000));
    gw.root.on_call_response(&*gw.world, ask.token, n);
    let Some(Slot::Live(after)) = gw.slot() else { panic!("no lease") };
    assert_eq!(after.id, current.id, "the late renewal did not replace the new lease");
    let queued = gw.queued();
    let [Item::Close(orphan)] = &queued[..] else { panic!("{queued:?}") };
    assert_eq!((orphan.tokens, orphan.drawn_tokens), (Some(70_000), 0));
}

#[test]
fn each_tick_reports_the_draws_of_live_leases_and_a_recall_closes_one_at_once() {
    let mut gw = Gateway::new(json!({"lease_ms": 60_000, "lease_idle_ms": 60_000}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    let estimate = gw.world.calls_to(LEASE_PATH)[0].body["min"].as_i64().unwrap();
    gw.send(BODY);
    let settled = |gw: &mut Gateway, token: u32, body: Value| {
        let n = gw.world.reply_with("200", &body);
        gw.root.on_call_response(&*gw.world, token, n);
    };
    // Two draws so far: reported, with no record to settle.
    gw.root.on_tick(&*gw.world);
    let report = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    let lease_id = report.body["progress"][0]["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(report.body["progress"][0]["drawn_tokens"], 2 * estimate);
    assert_eq!(report.body["progress"][0]["drawn_n"], 2);
    settled(&mut gw, report.token, json!({"results": [], "closes": []}));
    // Nothing moved: no report (the tick's call carries none), until the heartbeat is due.
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    let quiet = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert!(quiet.body.get("progress").is_none(), "{}", quiet.body);
    settled(&mut gw, quiet.token, json!({"results": [], "closes": []}));
    gw.world.advance(super::PROGRESS_HEARTBEAT_MS);
    gw.root.on_tick(&*gw.world);
    let beat = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_eq!(beat.body["progress"][0]["drawn_n"], 2);

    // The sidecar recalls it: the lease leaves its slot and its close goes out now.
    settled(&mut gw, beat.token, json!({"results": [], "closes": [], "recalled": [lease_id]}));
    assert_eq!(gw.slot(), None);
    let close = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_eq!(close.body["closes"][0]["lease_id"], lease_id.as_str());
    assert_eq!(close.body["closes"][0]["drawn_tokens"], 2 * estimate);
    // The key's next request fetches a new lease.
    gw.send(BODY);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2);
}

#[test]
fn a_lease_lives_while_its_key_is_active_and_a_quiet_key_holds_none_and_costs_no_writes() {
    let mut gw = Gateway::new(json!({}));
    // A tick, its calls answered (every record settled): the control calls' bodies.
    let tick = |gw: &mut Gateway| -> Vec<Value> {
        gw.root.on_tick(&*gw.world);
        let records: Vec<_> = gw.settle_calls(true).into_iter().filter(|c| !gw.world.answered(c.token)).collect();
        for call in records {
            let ids: Vec<String> = call.body["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["request_id"].as_str().unwrap().to_owned())
                .collect();
            gw.reply(call.token, "200", settled(&ids.iter().map(String::as_str).collect::<Vec<_>>(), "settled"));
        }
        let open: Vec<_> = gw.settle_calls(false).into_iter().filter(|c| !gw.world.answered(c.token)).collect();
        for call in &open {
            gw.reply(call.token, "200", json!({"results": [], "closes": [], "cursor": 1}));
        }
        open.into_iter().map(|c| c.body).collect()
    };
    let done = |ex: &mut crate::exchange::Exchange, s: &crate::fake::Stream| {
        respond(ex, s, "200", USAGE);
        ex.on_log(s);
    };
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(1_000_000));
    done(&mut ex, &s);
    let Some(Slot::Live(first)) = gw.slot() else { panic!("no lease") };
    // A request every second for twelve seconds: one lease serves them all
    // (no fetch, no renewal: the default window is thirty seconds).
    for _ in 0..12 {
        gw.world.advance(1_000);
        tick(&mut gw);
        let (mut ex, s, flow) = gw.send(BODY);
        assert_eq!(flow, Flow::Continue);
        done(&mut ex, &s);
    }
    assert!(matches!(gw.slot(), Some(Slot::Live(l)) if l.id == first.id && l.drawn_n == 13));
    assert_eq!((gw.world.calls_to(LEASE_PATH).len(), gw.world.lease_queue.borrow().len()), (1, 0));
    // Then the key goes quiet: within LEASE_IDLE_MS (2 s) and a tick its
    // lease is closed with its thirteen draws (the rest back to the balance).
    let mut sent = Vec::new();
    for _ in 0..11 {
        gw.world.advance(200);
        sent.extend(tick(&mut gw));
    }
    assert_eq!(gw.slot(), None, "an idle lease is closed");
    let closes: Vec<&Value> = sent.iter().flat_map(|b| b["closes"].as_array().into_iter().flatten()).collect();
    assert_eq!(closes.len(), 1, "{sent:?}");
    assert_eq!((closes[0]["lease_id"].as_str(), closes[0]["drawn_n"].as_i64()), (Some(first.id.as_str()), Some(13)));
    // Idle from here on: the ticks' calls carry nothing of the key (no
    // progress, no heartbeat), for a minute.
    for _ in 0..300 {
        gw.world.advance(200);
        for body in tick(&mut gw) {
            assert!(body.get("progress").is_none() && body.get("closes").is_none(), "{body}");
        }
    }
    // Its next request fetches a lease again.
    gw.send(BODY);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2);
}

#[test]
fn a_closed_lease_is_heartbeaten_while_requests_drawn_from_it_are_in_flight() {
    let mut gw = Gateway::new(json!({"lease_ms": 1_000}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    let lease_id = match gw.slot() {
        Some(Slot::Live(l)) => l.id,
        other => panic!("{other:?}"),
    };
    let reply = |gw: &mut Gateway, token: u32| {
        let n = gw.world.reply_with("200", &json!({"results": [], "closes": []}));
        gw.root.on_call_response(&*gw.world, token, n);
    };
    // The window ends and the sweep closes the lease; the request is still streaming.
    gw.world.advance(1_000);
    gw.root.on_tick(&*gw.world);
    let sent = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_eq!(sent.body["closes"][0]["lease_id"], lease_id.as_str());
    assert_eq!(sent.body["progress"][0]["lease_id"], lease_id.as_str(), "a heartbeat with the close");
    assert_eq!(sent.body["progress"][0]["drawn_tokens"], 0);
    reply(&mut gw, sent.token);
    // A heartbeat later, still in flight: reported again.
    gw.world.advance(super::PROGRESS_HEARTBEAT_MS);
    gw.root.on_tick(&*gw.world);
    let beat = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_ne!(beat.token, sent.token);
    assert_eq!(beat.body["progress"][0]["lease_id"], lease_id.as_str());
    reply(&mut gw, beat.token);
    // It ends: its record goes, and no heartbeat after it.
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    gw.root.on_tick(&*gw.world);
    let last = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_eq!(last.body["records"][0]["lease_id"], lease_id.as_str());
    assert!(last.body.get("progress").is_none(), "{}", last.body);
    reply(&mut gw, last.token);
    for call in gw.settle_calls(false) {
        if !gw.world.answered(call.token) {
            reply(&mut gw, call.token);
        }
    }
    gw.world.advance(super::PROGRESS_HEARTBEAT_MS);
    gw.root.on_tick(&*gw.world);
    let after = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert!(after.body.get("progress").is_none(), "nothing more to say: {}", after.body);
}

/// The request id of the one record a records call carried.
fn record_id(call: &crate::fake::Call) -> String {
    call.body["records"][0]["request_id"].as_str().unwrap().to_owned()
}

fn settled(ids: &[&str], outcome: &str) -> Value {
    let results: Vec<Value> = ids.iter().map(|id| json!({"request_id": id, "outcome": outcome})).collect();
    json!({"results": results, "closes": []})
}

/// The sidecar's answer settling every record a records call carried.
fn all_settled(call: &crate::fake::Call) -> Value {
    let ids: Vec<&str> =
        call.body["records"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    settled(&ids, "settled")
}

#[test]
fn a_lease_is_heartbeaten_on_its_own_lane_until_its_records_are_settled_however_slow_settlement_is() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    let Some(Slot::Live(lease)) = gw.slot() else { panic!("no lease") };
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    gw.root.on_tick(&*gw.world);
    // The records batch goes and the database is slow: no answer for 40 s,
    // longer than the sidecar's LEASE_LOST_SECS (30 s).
    let slow = gw.settle_calls(true).pop().unwrap();
    let mut beats = Vec::new();
    let mut closed = false;
    for _ in 0..200 {
        for call in gw.settle_calls(false) {
            if gw.world.answered(call.token) {
                continue;
            }
            closed |= call.body["closes"].as_array().into_iter().flatten().any(|c| c["lease_id"] == lease.id.as_str());
            if call.body["progress"].as_array().is_some_and(|p| p.iter().any(|p| p["lease_id"] == lease.id.as_str())) {
                beats.push(gw.world.now_ms());
            }
            gw.reply(call.token, "200", json!({"results": [], "closes": []}));
        }
        gw.world.advance(200);
        gw.root.on_tick(&*gw.world);
    }
    assert!(closed, "the lease's window ended and its close went, not behind the records");
    assert_eq!(gw.settle_calls(true).len(), 1, "the records batch is still in flight");
    let gaps: Vec<u64> = beats.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(beats.len() >= 8 && gaps.iter().all(|g| *g <= super::PROGRESS_HEARTBEAT_MS), "{beats:?}");
    // The batch is answered at last: the lease has nothing more waiting on it.
    gw.reply(slow.token, "200", settled(&[&record_id(&slow)], "settled"));
    let before = gw.settle_calls(false).len();
    gw.world.advance(2 * super::PROGRESS_HEARTBEAT_MS);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.settle_calls(false).len(), before, "no heartbeat once its records are settled");
    assert_eq!(gw.world.gauge(Gauge::Pending), 0);
}

#[test]
fn records_the_sidecar_cannot_settle_yet_go_again_shortly_and_their_lease_stays_reported() {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    gw.root.on_tick(&*gw.world);
    let first = gw.settle_calls(true).pop().unwrap();
    let id = record_id(&first);
    // Its lease is being taken for lost at the sidecar right now: "later".
    gw.reply(first.token, "200", settled(&[&id], "later"));
    assert_eq!(gw.world.gauge(Gauge::Backlog), 1, "still unsettled");
    gw.world.advance(super::super::settle::LATER_MS - 200);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.settle_calls(true).len(), 1, "not at once");
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    let again = gw.settle_calls(true).pop().unwrap();
    assert_eq!((again.token != first.token, record_id(&again)), (true, id.clone()));
    // Meanwhile its lease was reported as still in use.
    let lease_id = first.body["records"][0]["lease_id"].as_str().unwrap();
    let reported = gw
        .settle_calls(false)
        .iter()
        .any(|c| c.body["progress"].as_array().is_some_and(|p| p.iter().any(|p| p["lease_id"] == lease_id)));
    assert!(reported);
    gw.reply(again.token, "200", settled(&[&id], "settled"));
    assert_eq!(gw.world.gauge(Gauge::Backlog), 0);
    assert_eq!(gw.root.vm.drawn_leases(), [], "nothing waits on the lease any more");
}

/// Sends one request through to its end and queues its record.
fn one_request(gw: &mut Gateway) -> (Flow, Option<u32>) {
    let (mut ex, s, flow) = gw.send(BODY);
    if flow == Flow::Pause && s.replied().is_none() {
        gw.answer(&mut ex, &s, "200", grant(100_000));
    }
    let replied = s.replied();
    if replied.is_none() {
        respond(&mut ex, &s, "200", USAGE);
    }
    ex.on_log(&s);
    (flow, replied)
}

#[test]
fn past_the_backlog_bound_new_requests_get_503_with_retry_after_until_settlement_catches_up() {
    let mut gw = Gateway::new(json!({"settle_backlog_max": 3}));
    for _ in 0..3 {
        assert_eq!(one_request(&mut gw).1, None, "admitted");
    }
    // Three records unsettled: the fourth request is refused before any upstream.
    let (mut ex, s, flow) = gw.send(BODY);
    assert_eq!((flow, s.replied()), (Flow::Pause, Some(503)));
    let body: Value = serde_json::from_slice(&s.replies.borrow()[0].1).unwrap();
    assert_eq!(body["error"]["code"], "gateway_overloaded");
    assert!(s.reply_headers().iter().any(|(k, v)| k == "retry-after" && v == "5"));
    assert_eq!(s.resumed.get(), 0, "its held headers never go upstream");
    // Shed before its body is read: one that would be a 400 is a 503 too.
    let (_, bad, _) = gw.send(b"{not json");
    assert_eq!(bad.replied(), Some(503), "the body was read before shedding");
    ex.on_log(&s);
    assert_eq!(gw.records().len(), 3, "the refused request settles nothing");
    assert_eq!(gw.world.counted(crate::metrics::Metric::Shed), 2);

    // The same again, then settlement catches up: admitted again.
    let mut gw = Gateway::new(json!({"settle_backlog_max": 3}));
    for _ in 0..3 {
        one_request(&mut gw);
    }
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.gauge(Gauge::Backlog), 3);
    assert_eq!(one_request(&mut gw).1, Some(503));
    let batch = gw.settle_calls(true).pop().unwrap();
    gw.reply(batch.token, "200", all_settled(&batch));
    assert_eq!(gw.world.gauge(Gauge::Backlog), 0);
    assert_eq!(one_request(&mut gw).1, None, "admitted once the backlog drained");
}

#[test]
fn a_record_waiting_past_the_age_bound_stops_admission_but_not_with_failure_mode_allow() {
    for (mode, refused) in [("deny", true), ("allow", false)] {
        let mut gw = Gateway::new(json!({"settle_backlog_age_ms": 2_000, "failure_mode": mode}));
        one_request(&mut gw);
        // The sidecar fails every records batch: the record stays, and ages.
        for _ in 0..20 {
            gw.root.on_tick(&*gw.world);
            for call in gw.world.calls_to(SETTLE_PATH) {
                if !gw.world.answered(call.token) {
                    gw.reply(call.token, "503", json!(null));
                }
            }
            gw.world.advance(100);
        }
        gw.root.on_tick(&*gw.world);
        assert!(gw.world.gauge(Gauge::OldestMs) >= 2_000, "{mode}");
        assert_eq!(gw.world.gauge(Gauge::Backlog), 1);
        let (_, replied) = one_request(&mut gw);
        assert_eq!(replied == Some(503), refused, "{mode}: {replied:?}");
    }
}

/// Answers the root's unanswered control calls with `body`; the last one's body.
fn answer_control(gw: &mut Gateway, body: Value) -> Option<Value> {
    let mut last = None;
    for call in gw.settle_calls(false) {
        if !gw.world.answered(call.token) {
            gw.reply(call.token, "200", body.clone());
            last = Some(call.body);
        }
    }
    last
}

#[test]
fn a_key_change_reaches_the_lease_within_a_tick_however_long_its_window_and_once() {
    let mut gw = Gateway::new(json!({"lease_ms": 60_000}));
    let hash = bridge_protocol::key_hash(KEY);
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    gw.send(BODY);
    // The first tick's call asks for a cursor; the next names it.
    gw.root.on_tick(&*gw.world);
    let first = answer_control(&mut gw, json!({"results": [], "cursor": 1_000})).unwrap();
    assert!(first.get("changes_since").is_none(), "{first}");
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    let change = json!({"results": [], "changed": [{"key_hash": hash, "at_ms": 1_500}], "cursor": 2_000});
    let second = answer_control(&mut gw, change.clone()).unwrap();
    assert_eq!(second["changes_since"], 1_000);
    // Frozen, say: the lease left its slot at once, its close with its two draws on its way.
    assert_eq!(gw.slot(), None);
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    let close = gw.settle_calls(false).pop().unwrap();
    assert_eq!(
        (close.body["closes"][0]["drawn_n"].as_i64(), close.body["changes_since"].as_i64()),
        (Some(2), Some(2_000))
    );
    // The key's next request asks the sidecar afresh (which refuses it, frozen).
    let (mut ex, s, _) = gw.send(BODY);
    assert_eq!(gw.world.calls_to(LEASE_PATH).len(), 2);
    gw.answer(&mut ex, &s, "200", grant(50_000));
    // The sidecar names the same change again (it looks a few seconds back): the new lease stays.
    answer_control(&mut gw, change);
    assert!(matches!(gw.slot(), Some(Slot::Live(l)) if l.tokens == 50_000));
    assert_eq!(gw.world.counted(crate::metrics::Metric::LeaseRecalls), 1);
}

#[test]
fn a_key_only_created_keeps_its_lease_but_drops_a_refusal_cached_before_it() {
    let mut gw = Gateway::new(json!({"lease_ms": 60_000}));
    let hash = bridge_protocol::key_hash(KEY);
    // Tried before the admin made it: unknown, cached.
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", refuse(401, "invalid_api_key"));
    gw.root.on_tick(&*gw.world);
    let created = json!({"results": [], "changed": [{"key_hash": hash, "at_ms": 7, "created": true}], "cursor": 9});
    answer_control(&mut gw, created.clone());
    assert_eq!(gw.slot(), None, "the refusal cached for the key's hash goes");
    // Its first lease, then the same creation named again: the lease stays.
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    let mut again = created;
    again["changed"][0]["at_ms"] = json!(8);
    answer_control(&mut gw, again);
    assert!(matches!(gw.slot(), Some(Slot::Live(l)) if l.tokens == 100_000));
    assert_eq!(gw.world.counted(crate::metrics::Metric::LeaseRecalls), 0);
    // Still this VM's lease: reported, and closed by its sweep when it ends
    // (a VM that forgot it left it to be taken for lost).
    let before = gw.settle_calls(false).len();
    gw.world.advance(5_000);
    gw.root.on_tick(&*gw.world);
    let reported: Vec<Value> = gw.settle_calls(false).into_iter().skip(before).map(|c| c.body).collect();
    assert!(reported.iter().any(|b| b["progress"].as_array().is_some_and(|p| !p.is_empty())), "{reported:?}");
    gw.world.advance(60_000);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.slot(), None);
    assert!(gw.queued().iter().any(|i| matches!(i, Item::Close(c) if c.tokens == Some(100_000))));
}

#[test]
fn a_key_change_clears_a_cached_refusal() {
    let mut gw = Gateway::new(json!({}));
    let hash = bridge_protocol::key_hash(KEY);
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", refuse(429, "insufficient_quota"));
    assert_eq!(s.replied(), Some(429));
    let (_, again, _) = gw.send(BODY);
    assert_eq!((again.replied(), gw.world.calls_to(LEASE_PATH).len()), (Some(429), 1), "cached");
    // Topped up: the refusal goes, and the next request asks again.
    gw.root.on_tick(&*gw.world);
    answer_control(&mut gw, json!({"results": [], "changed": [{"key_hash": hash, "at_ms": 7}], "cursor": 9}));
    assert_eq!(gw.slot(), None);
    let (_, asked, flow) = gw.send(BODY);
    assert_eq!((flow, asked.replied(), gw.world.calls_to(LEASE_PATH).len()), (Flow::Pause, None, 2));
}

#[test]
fn many_busy_leases_cost_the_ledger_a_report_a_second_each_and_every_one_is_reported_within_a_heartbeat() {
    let mut gw = Gateway::new(json!({"lease_ms": 60_000, "lease_idle_ms": 60_000}));
    let keys: Vec<String> = (0..200).map(|i| format!("sk-busy-tenant-{i:04}")).collect();
    let draw_all = |gw: &mut Gateway, first: bool| {
        for k in &keys {
            let (mut ex, s, _) = gw.post(k, "/v1/chat/completions", &[], BODY);
            if first {
                gw.answer(&mut ex, &s, "200", grant(100_000));
            }
        }
    };
    draw_all(&mut gw, true);
    let mut reported: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
    let mut per_tick = Vec::new();
    // Twenty seconds of ticks, every key drawing between each two.
    for _ in 0..100 {
        gw.root.on_tick(&*gw.world);
        let calls = gw.settle_calls(false);
        let call = calls.last().unwrap();
        let progress = call.body["progress"].as_array().cloned().unwrap_or_default();
        per_tick.push(progress.len());
        for p in &progress {
            reported.entry(p["lease_id"].as_str().unwrap().to_owned()).or_default().push(gw.world.now_ms());
        }
        gw.reply(call.token, "200", json!({"results": [], "closes": []}));
        gw.world.advance(200);
        draw_all(&mut gw, false);
    }
    assert!(per_tick.iter().all(|n| *n <= super::PROGRESS_PER_TICK), "{per_tick:?}");
    assert_eq!(reported.len(), keys.len(), "every lease reported");
    for (id, at) in &reported {
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g >= super::PROGRESS_MIN_MS), "{id} reported too often: {gaps:?}");
        assert!(gaps.iter().all(|g| *g <= super::PROGRESS_HEARTBEAT_MS), "{id} unreported too long: {gaps:?}");
    }
    let total: usize = per_tick.iter().sum();
    assert!(total <= keys.len() * 20 + keys.len(), "{total} reports for {} leases over 20 s", keys.len());
}

#[test]
fn however_fast_the_sidecar_answers_progress_goes_once_a_tick_and_closes_do_not_hold_it_back() {
    // Gathering progress reads every live lease's slot: with many keys, a
    // control lane that sent progress again with each reply ran back to back
    // (a tick's budget a call), reading all the slots each time.
    let mut gw = Gateway::new(json!({"lease_ms": 60_000, "lease_idle_ms": 60_000}));
    let keys = leased_keys(&mut gw, "quick", 200, 100_000);
    let mut reported: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
    let mut calls_with_progress_a_tick = Vec::new();
    let mut answered = 0;
    for tick in 0..50 {
        // A close waits on every tick: the lane always has something to send.
        gw.root.vm.keep(Item::Close(close_of(tick)), gw.world.now_ms(), gw.root.context_id);
        gw.root.on_tick(&*gw.world);
        let mut with_progress = 0;
        // The sidecar answers each call at once, which sends the lane's next.
        loop {
            let open: Vec<_> = gw.settle_calls(false).into_iter().filter(|c| !gw.world.answered(c.token)).collect();
            let Some(call) = open.first() else { break };
            let progress = call.body["progress"].as_array().cloned().unwrap_or_default();
            with_progress += usize::from(!progress.is_empty());
            for p in &progress {
                reported.entry(p["lease_id"].as_str().unwrap().to_owned()).or_default().push(gw.world.now_ms());
            }
            let closes: Vec<Value> = call.body["closes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|c| json!({"request_id": c["lease_id"], "outcome": "settled"}))
                .collect();
            gw.reply(call.token, "200", json!({"results": [], "closes": closes}));
            answered += 1;
            assert!(answered < 10_000, "the control lane never stops");
        }
        calls_with_progress_a_tick.push(with_progress);
        gw.world.advance(200);
        for k in &keys {
            gw.post(k, "/v1/chat/completions", &[], BODY);
        }
    }
    assert!(calls_with_progress_a_tick.iter().all(|n| *n <= 1), "{calls_with_progress_a_tick:?}");
    assert_eq!(reported.len(), keys.len(), "every lease reported");
    for (id, at) in &reported {
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g <= super::PROGRESS_HEARTBEAT_MS), "{id} unreported too long: {gaps:?}");
    }
}

/// A close of a lease of no key of the test's, `n`th of its kind.
fn close_of(n: usize) -> bridge_protocol::LeaseClose {
    bridge_protocol::LeaseClose {
        key_hash: bridge_protocol::key_hash("sk-elsewhere"),
        lease_id: format!("gone-{n}"),
        tokens: Some(10),
        drawn_tokens: 0,
        drawn_n: 0,
    }
}

#[test]
fn a_backlog_the_sidecar_would_take_longer_than_the_age_bound_to_settle_is_refused_before_it_ages() {
    let mut gw = Gateway::new(json!({"settle_batch_max": 10, "settle_backlog_age_ms": 3_000}));
    let mut sent = 0;
    // The sidecar settles a batch of ten in a second: one record every 100 ms.
    let settle_one_batch = |gw: &mut Gateway| {
        gw.root.on_tick(&*gw.world);
        let Some(batch) = gw.settle_calls(true).into_iter().find(|c| !gw.world.answered(c.token)) else { return };
        gw.world.advance(1_000);
        gw.reply(batch.token, "200", all_settled(&batch));
    };
    for _ in 0..12 {
        assert_eq!(one_request(&mut gw).1, None);
        sent += 1;
    }
    settle_one_batch(&mut gw);
    // Now it knows the rate: 0.01 records a millisecond. Twenty more records are two seconds of it.
    let mut refused_at = None;
    for i in 0..40 {
        if let (_, Some(503)) = one_request(&mut gw) {
            refused_at = Some(i);
            break;
        }
        sent += 1;
    }
    let backlog = gw.root.vm.settler.borrow().backlog(gw.world.now_ms());
    assert!(backlog.oldest_ms < 3_000, "refused before the oldest aged: {backlog:?}");
    let at = refused_at.expect("refused once the backlog would take 3 s to settle");
    assert!((28..=31).contains(&backlog.records), "{backlog:?} after {at} more ({sent} sent)");
    // As it settles, admission comes back.
    settle_one_batch(&mut gw);
    assert_eq!(one_request(&mut gw).1, None);
}
