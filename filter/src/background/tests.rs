//! The root's work in the middle tier: background lease asks, batches and
//! their retries, the sweep, shutdown.

use bridge_protocol::{LEASE_PATH, SETTLE_PATH};
use serde_json::{json, Value};

use crate::exchange::harness::*;
use crate::host::Flow;
use crate::lease::Slot;
use crate::settle::Item;

#[test]
fn half_way_through_a_lease_the_root_fetches_the_next_in_the_background() {
    let mut gw = Gateway::new(json!({}));
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
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    respond(&mut ex, &s, "200", USAGE);
    ex.on_log(&s);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.gauge.get(), 2, "one record and one live lease pending");
    let first = gw.world.calls_to(SETTLE_PATH);
    assert_eq!(first[0].body["records"].as_array().unwrap().len(), 1);
    // The sidecar fails: the batch is kept and sent again after the backoff.
    let n = gw.world.reply_with("503", &json!(null));
    gw.root.on_call_response(&*gw.world, first[0].token, n);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.calls_to(SETTLE_PATH).len(), 1, "backing off");
    gw.world.advance(1_000);
    gw.root.on_tick(&*gw.world);
    // The lease expired meanwhile: swept and closed in the same batch.
    assert_eq!(gw.slot(), None);
    let again = gw.world.calls_to(SETTLE_PATH).pop().unwrap();
    assert_eq!(again.body["records"][0]["request_id"], first[0].body["records"][0]["request_id"]);
    assert_eq!(again.body["closes"][0]["drawn_n"], 1);
    let n = gw.world.reply_with("200", &json!({"results": [], "closes": []}));
    gw.root.on_call_response(&*gw.world, again.token, n);
    assert_eq!(gw.world.gauge.get(), 0, "nothing pending");
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

/// A key's lease half way through its window, and the background ask for the
/// next one the root sent.
fn renewing() -> (Gateway, crate::fake::Call) {
    let mut gw = Gateway::new(json!({}));
    let (mut ex, s, _) = gw.send(BODY);
    gw.answer(&mut ex, &s, "200", grant(100_000));
    gw.world.advance(600);
    gw.send(BODY);
    gw.root.on_tick(&*gw.world);
    let ask = gw.world.calls_to(LEASE_PATH).pop().unwrap();
    (gw, ask)
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
    let mut gw = Gateway::new(json!({"lease_ms": 60_000}));
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
    // Nothing moved: nothing sent, until the heartbeat is due.
    gw.world.advance(200);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.calls_to(SETTLE_PATH).len(), 1);
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
fn a_closed_lease_is_heartbeaten_while_requests_drawn_from_it_are_in_flight() {
    let mut gw = Gateway::new(json!({}));
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
    gw.world.advance(super::PROGRESS_HEARTBEAT_MS);
    gw.root.on_tick(&*gw.world);
    assert_eq!(gw.world.calls_to(SETTLE_PATH).last().unwrap().token, last.token, "nothing more to say");
}
