use super::*;
use bridge_protocol::KeyPolicy;

const KEY: &str = "k";
const P: Policy = Policy { stale_ms: 5_000, window_ms: 1_000, ceiling: 1_000_000 };

fn live(tokens: i64, drawn: i64, expires_ms: u64) -> Slot {
    Slot::Live(Lease {
        id: "L1".into(),
        key_hash: KEY.into(),
        tokens,
        drawn_tokens: drawn,
        drawn_n: if drawn > 0 { 1 } else { 0 },
        expires_ms,
        refresh: None,
        policy: KeyPolicy::default(),
    })
}

#[test]
fn an_empty_slot_fetches_and_others_wait_meanwhile() {
    let Draw::Fetch { slot, close: None, want } = draw(None, KEY, 1_000, 10, "L2", &P) else { panic!("no fetch") };
    assert_eq!(slot, Slot::Fetching { id: "L2".into(), since_ms: 1_000, key_hash: KEY.into() });
    assert_eq!(want, 10 * FIRST_LEASE_REQUESTS, "no draw rate yet: 64 requests' estimates");
    assert_eq!(draw(Some(&slot), KEY, 1_100, 10, "L3", &P), Draw::Wait);
    // A fetcher that never came back is replaced.
    assert!(matches!(draw(Some(&slot), KEY, 6_000, 10, "L3", &P), Draw::Fetch { close: None, .. }));
}

#[test]
fn another_keys_fetch_in_a_shared_slot_holds_up_no_one_but_its_own_key() {
    // A made-up key fetching (to be refused) in the slot a real key shares: the real key reserves alone.
    let Draw::Fetch { slot, .. } = draw(None, "made-up", 1_000, 10, "L2", &P) else { panic!("no fetch") };
    assert_eq!(draw(Some(&slot), KEY, 1_100, 10, "L3", &P), Draw::Reserve);
    assert_eq!(draw(Some(&slot), "made-up", 1_100, 10, "L3", &P), Draw::Wait);
    // A marker of an older build names no key: everyone waits on it, as before.
    let old: Slot = serde_json::from_str(r#"{"state":"fetching","id":"L2","since_ms":1000}"#).unwrap();
    assert_eq!(draw(Some(&old), KEY, 1_100, 10, "L3", &P), Draw::Wait);
}

#[test]
fn draws_never_exceed_the_grant() {
    let mut slot = live(100, 0, 2_000);
    let mut drawn = 0;
    loop {
        // A new id each time: a refresh marker once set stays the same one.
        match draw(Some(&slot), KEY, 1_000, 30, &format!("R{drawn}"), &P) {
            Draw::Drawn { slot: next, lease_id, refresh } => {
                assert_eq!(lease_id, "L1");
                // 60 drawn in the first 0 ms (of a 1000 ms window ending at 2000 => granted
                // at 1000), taken as drawn in a tenth of the window.
                if let Some((_, want)) = &refresh {
                    assert_eq!(*want, (2 * 60 * 10).max(30 * FIRST_LEASE_REQUESTS));
                }
                drawn += 30;
                // Half the tokens gone (60 of 100): the next lease is asked for, once.
                assert_eq!(refresh.is_some(), drawn == 60, "drawn {drawn}: {refresh:?}");
                slot = next;
            }
            // Too little left, its successor asked for: wait for that one.
            Draw::Wait => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(drawn, 90);
    // Once the ask went unanswered (or stale), the next request replaces the lease itself.
    let Some(Slot::Live(mut lease)) = unanswered(Some(&slot), "R30") else { panic!("not our ask") };
    assert_eq!(unanswered(Some(&slot), "R0"), None, "another ask");
    let Draw::Fetch { close: Some(close), .. } = draw(Some(&Slot::Live(lease.clone())), KEY, 1_000, 30, "F", &P) else {
        panic!("waited for an answered ask")
    };
    assert_eq!((close.tokens, close.drawn_tokens, close.drawn_n), (Some(100), 90, 3));
    lease.refresh = Some(Refresh { id: "R30".into(), since_ms: 1_000, answered: false });
    assert!(matches!(draw(Some(&Slot::Live(lease)), KEY, 6_000, 30, "F", &P), Draw::Fetch { close: Some(_), .. }));
}

#[test]
fn leases_are_sized_by_the_draw_rate_within_the_ceiling() {
    let p = Policy { ceiling: 50_000, ..P };
    // Granted at 1000 for a window to 2000; 3000 drawn by 1100: 30,000 a window, asked for twice.
    let mut lease = match live(10_000, 3_000, 2_000) {
        Slot::Live(l) => l,
        _ => unreachable!(),
    };
    assert_eq!(p.want(Some(&lease), 1_100, 10), 50_000, "60,000 by rate, held to the ceiling");
    lease.drawn_tokens = 1_000;
    assert_eq!(p.want(Some(&lease), 1_100, 10), 20_000, "by rate");
    assert_eq!(p.want(Some(&lease), 1_100, 500), 500 * FIRST_LEASE_REQUESTS, "at least 64 of this request");
    assert_eq!(p.want(Some(&lease), 1_100, 2_000), 50_000, "64 of this request, held to the ceiling");
    assert_eq!(p.want(None, 0, 100_000), 100_000, "one request over the ceiling leases its own estimate");
}

#[test]
fn an_expired_lease_is_replaced_and_closed() {
    let slot = live(100, 40, 2_000);
    let Draw::Fetch { slot: marker, close: Some(close), .. } = draw(Some(&slot), KEY, 2_000, 1, "L2", &P) else {
        panic!("expired lease drawn from")
    };
    assert_eq!(close.lease_id, "L1");
    assert_eq!(close.drawn_tokens, 40);
    assert!(is_our_marker(Some(&marker), "L2"));
    assert!(!is_our_marker(Some(&marker), "L1"));
}

#[test]
fn a_grant_goes_live_only_over_its_own_marker() {
    let marker = Slot::Fetching { id: "L2".into(), since_ms: 0, key_hash: KEY.into() };
    let Install::Live(Slot::Live(lease)) =
        install(Some(&marker), "L2", KEY, (500, &KeyPolicy::default()), 20, 1_000, 1_000)
    else {
        panic!("not installed")
    };
    assert_eq!((lease.tokens, lease.drawn_tokens, lease.drawn_n, lease.expires_ms), (500, 20, 1, 2_000));
    let other = Slot::Fetching { id: "L9".into(), since_ms: 0, key_hash: KEY.into() };
    let Install::Orphan(close) = install(Some(&other), "L2", KEY, (500, &KeyPolicy::default()), 20, 1_000, 1_000)
    else {
        panic!("installed over another's marker")
    };
    assert_eq!((close.tokens, close.drawn_tokens, close.drawn_n), (Some(500), 20, 1));
    assert!(matches!(install(None, "L2", KEY, (500, &KeyPolicy::default()), 20, 0, 1), Install::Orphan(_)));
}

#[test]
fn half_way_through_its_window_a_lease_asks_for_the_next_and_the_grant_replaces_it() {
    let slot = live(1_000, 0, 2_000);
    let Draw::Drawn { refresh: None, .. } = draw(Some(&slot), KEY, 1_000, 1, "R1", &P) else {
        panic!("refreshed too early")
    };
    let Draw::Drawn { slot, refresh: Some(id), .. } = draw(Some(&slot), KEY, 1_500, 1, "R1", &P) else {
        panic!("no refresh at half time")
    };
    // By rate 2 * 1_000 / 500 = 4; 64 requests' estimates at least.
    assert_eq!(id, ("R1".to_owned(), FIRST_LEASE_REQUESTS));
    // Granted: the new lease replaces the old, which closes with its draws.
    let Renew::Live { slot: Slot::Live(new), close: Some(old) } =
        renew(Some(&slot), "R1", KEY, (700, &KeyPolicy::default()), 1_500, 1_000)
    else {
        panic!("not renewed")
    };
    assert_eq!((new.id.as_str(), new.tokens, new.drawn_tokens, new.expires_ms), ("R1", 700, 0, 2_500));
    assert_eq!((old.lease_id.as_str(), old.drawn_tokens, old.drawn_n), ("L1", 1, 1));
    // An empty slot takes it; a slot that moved on to another lease does not.
    assert!(matches!(renew(None, "R1", KEY, (700, &KeyPolicy::default()), 0, 1), Renew::Live { close: None, .. }));
    let Renew::Orphan(close) = renew(Some(&live(5, 0, 9)), "R1", KEY, (700, &KeyPolicy::default()), 0, 1) else {
        panic!("replaced")
    };
    assert_eq!((close.tokens, close.drawn_tokens), (Some(700), 0));
}

#[test]
fn take_draws_only_from_a_live_lease_with_enough_left() {
    let slot = live(100, 60, 2_000);
    assert_eq!(take(Some(&slot), KEY, 1_000, 40).map(|l| (l.drawn_tokens, l.drawn_n)), Some((100, 2)));
    assert_eq!(take(Some(&slot), KEY, 1_000, 41), None, "more than is left");
    assert_eq!(take(Some(&slot), KEY, 2_000, 1), None, "expired");
    assert_eq!(take(Some(&Slot::Fetching { id: "x".into(), since_ms: 0, key_hash: KEY.into() }), KEY, 0, 1), None);
    assert_eq!(take(Some(&slot), "another-key", 1_000, 1), None, "another key's lease");
}

#[test]
fn the_sweep_closes_expired_leases_and_all_at_shutdown() {
    let slot = live(100, 10, 2_000);
    assert_eq!(expire(Some(&slot), 1_999, false), None);
    assert_eq!(expire(Some(&slot), 2_000, false).map(|c| c.drawn_tokens), Some(10));
    assert!(expire(Some(&slot), 0, true).is_some());
    assert_eq!(expire(None, 5_000, true), None);
}

#[test]
fn slots_are_bounded_and_keys_sharing_one_never_draw_from_each_other() {
    let keys: std::collections::BTreeSet<String> =
        (0..10_000).map(|i| slot_key(&bridge_protocol::key_hash(&format!("sk-made-up-{i}")), 64)).collect();
    assert_eq!(keys.len(), 64, "10,000 keys, 64 slots");
    let theirs = live(100, 0, 2_000);
    // Their live lease: we reserve alone; once it expired, it is replaced and
    // closed, and its draws say nothing of our rate.
    assert_eq!(draw(Some(&theirs), "another-key", 1_000, 10, "L2", &P), Draw::Reserve);
    let Draw::Fetch { close: Some(close), want, .. } = draw(Some(&theirs), "another-key", 2_000, 10, "L2", &P) else {
        panic!("an expired lease of another key not replaced")
    };
    assert_eq!((close.key_hash.as_str(), want), (KEY, 10 * FIRST_LEASE_REQUESTS));
}

#[test]
fn a_refusal_is_cached_for_its_key_until_it_runs_out() {
    let error = bridge_protocol::ErrorEnvelope::new("no", "invalid_request_error", None, Some("invalid_api_key")).error;
    let marker = Slot::Fetching { id: "L2".into(), since_ms: 0, key_hash: KEY.into() };
    assert_eq!(refuse(Some(&marker), "L9", KEY, 401, &error, 2_000), None, "not our marker");
    let cached = refuse(Some(&marker), "L2", KEY, 401, &error, 2_000).unwrap();
    assert_eq!(draw(Some(&cached), KEY, 1_999, 1, "L3", &P), Draw::Refused { status: 401, error });
    assert!(matches!(draw(Some(&cached), KEY, 2_000, 1, "L3", &P), Draw::Fetch { close: None, .. }));
    assert!(matches!(draw(Some(&cached), "another-key", 0, 1, "L3", &P), Draw::Fetch { close: None, .. }));
    assert_eq!(Slot::decode(&cached.encode()), Some(cached));
}

#[test]
fn slots_round_trip_and_garbage_reads_as_empty() {
    let mut renewing = live(5, 1, 9);
    if let Slot::Live(l) = &mut renewing {
        l.refresh = Some(Refresh { id: "next".into(), since_ms: 77, answered: true });
    }
    let mut controlled = live(5, 1, 9);
    if let Slot::Live(l) = &mut controlled {
        l.policy.rpm_limit = Some(3);
    }
    for slot in [
        live(5, 1, 9),
        renewing.clone(),
        controlled.clone(),
        Slot::Fetching { id: "x".into(), since_ms: 3, key_hash: KEY.into() },
    ] {
        assert_eq!(Slot::decode(&slot.encode()), Some(slot));
    }
    // Every draw reads and writes a live lease: compact, not JSON; one with key controls stays JSON.
    let compact = renewing.encode();
    assert_eq!(compact[0], 0xb1);
    assert!(compact.len() < serde_json::to_vec(&renewing).unwrap().len() / 2, "{} bytes", compact.len());
    assert_eq!(controlled.encode()[0], b'{');
    // A JSON live slot (an older build's) still reads.
    assert_eq!(Slot::decode(&serde_json::to_vec(&renewing).unwrap()), Some(renewing));
    for cut in 1..compact.len() {
        assert_eq!(Slot::decode(&compact[..cut]), None, "cut at {cut}");
    }
    assert_eq!(Slot::decode(b""), None);
    assert_eq!(Slot::decode(b"{oops"), None);
}
