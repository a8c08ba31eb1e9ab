//! Per-key rate limits (`rpm_limit`, `tpm_limit`), counted per Envoy in a
//! one-minute window of the key's own in shared data, by the
//! requests' estimates. Only keys whose lease carries a limit are counted, so
//! unlimited keys pay nothing for it. Without leases (`lease_tokens: 0`) the
//! limits come with each reservation's reply and are kept in the window
//! (`learned`) for the key's next requests. Pure logic over the slot as read.

use serde::{Deserialize, Serialize};

use crate::slot::Stored;

/// Prefix of the shared-data key of a rate window; the key's hash follows.
pub const RATE_PREFIX: &str = "openclaw_bridge_rate:";

pub const WINDOW_MS: u64 = 60_000;

/// The shared-data key of `key_hash`'s window: one per key (never shared
/// with another key, whose requests would go uncounted while its window is
/// current). Only keys with limits have one.
pub fn window_key(key_hash: &str) -> String {
    format!("{RATE_PREFIX}{key_hash}")
}

/// A key's requests and tokens in the current minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub key_hash: String,
    pub since_ms: u64,
    pub requests: i64,
    pub tokens: i64,
    /// The key's limits as its last reservation reply gave them (only without
    /// leases), good for a minute after `at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<Learned>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub at_ms: u64,
}

impl Stored for Rate {
    fn decode(bytes: &[u8]) -> Option<Rate> {
        serde_json::from_slice(bytes).ok()
    }
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a request does about the key's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// Within them: write this window (compare-and-swap) and go on.
    Counted(Rate),
    /// Over one: refused `429 rate_limit_exceeded`, to retry after this many seconds.
    Over(u64),
}

/// A request of `estimate` tokens for `key_hash` under `rpm`/`tpm` (either
/// may be absent), against the window as read. The window another key holds
/// (keys sharing a slot) is taken over once it is a minute old; while it is
/// current this key goes uncounted, as keys sharing a lease slot reserve alone.
pub fn count(
    current: Option<&Rate>,
    key_hash: &str,
    now_ms: u64,
    estimate: i64,
    rpm: Option<i64>,
    tpm: Option<i64>,
) -> Option<Count> {
    let mut rate = window(current, key_hash, now_ms)?;
    let over = rpm.is_some_and(|l| rate.requests + 1 > l) || tpm.is_some_and(|l| rate.tokens + estimate > l);
    if over {
        let left_ms = WINDOW_MS.saturating_sub(now_ms.saturating_sub(rate.since_ms));
        return Some(Count::Over(left_ms.div_ceil(1_000).max(1)));
    }
    rate.requests += 1;
    rate.tokens += estimate;
    Some(Count::Counted(rate))
}

/// The key's current window: the one read if it is the key's and not a
/// minute old, a fresh one if the slot is free or its window old (keeping
/// what the key's replies taught), `None` while another key's is current.
fn window(current: Option<&Rate>, key_hash: &str, now_ms: u64) -> Option<Rate> {
    let mine = current.filter(|r| r.key_hash == key_hash);
    let fresh = Rate {
        key_hash: key_hash.to_owned(),
        since_ms: now_ms,
        requests: 0,
        tokens: 0,
        learned: mine.and_then(|r| r.learned),
    };
    match current {
        Some(r) if now_ms.saturating_sub(r.since_ms) >= WINDOW_MS => Some(fresh),
        Some(r) if r.key_hash != key_hash => None,
        Some(r) => Some(r.clone()),
        None => Some(fresh),
    }
}

/// The limits a reservation reply taught for the key, while good (a minute):
/// without leases, the key's requests are counted by these before reserving.
pub fn learned_limits(current: Option<&Rate>, key_hash: &str, now_ms: u64) -> Option<(Option<i64>, Option<i64>)> {
    let learned = current.filter(|r| r.key_hash == key_hash)?.learned?;
    (now_ms.saturating_sub(learned.at_ms) < WINDOW_MS).then_some((learned.rpm, learned.tpm))
}

/// The window once a reservation reply gave the key's limits (`rpm`, `tpm`):
/// they are kept for its next requests, and the admitted request is counted
/// unless it was already (by limits taught before). `None`: nothing to write
/// (no limits, none kept; or another key's window is current).
pub fn learn(
    current: Option<&Rate>,
    key_hash: &str,
    now_ms: u64,
    estimate: i64,
    limits: (Option<i64>, Option<i64>),
    counted: bool,
) -> Option<Rate> {
    let mut rate = window(current, key_hash, now_ms)?;
    if limits == (None, None) {
        // Limits cleared: the key's requests are no longer counted.
        return rate.learned.take().map(|_| rate);
    }
    if !counted {
        rate.requests += 1;
        rate.tokens += estimate;
    }
    rate.learned = Some(Learned { rpm: limits.0, tpm: limits.1, at_ms: now_ms });
    Some(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_admits_up_to_the_limits_and_says_when_to_come_back() {
        let mut current: Option<Rate> = None;
        for i in 0..3 {
            match count(current.as_ref(), "k", 1_000 + i, 10, Some(3), None) {
                Some(Count::Counted(r)) => current = Some(r),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(count(current.as_ref(), "k", 31_000, 10, Some(3), None), Some(Count::Over(30)));
        // A new minute starts afresh.
        assert!(
            matches!(count(current.as_ref(), "k", 61_000, 10, Some(3), None), Some(Count::Counted(r)) if r.requests == 1)
        );
        // Tokens a minute, by the estimates.
        assert_eq!(count(current.as_ref(), "k", 2_000, 100, None, Some(120)), Some(Count::Over(59)));
        // Another key's current window is left alone; an old one is taken over.
        assert_eq!(count(current.as_ref(), "other", 2_000, 1, Some(1), None), None);
        assert!(matches!(count(current.as_ref(), "other", 70_000, 1, Some(1), None), Some(Count::Counted(_))));
        assert_eq!(Rate::decode(&current.clone().unwrap().encode()), current);
    }

    #[test]
    fn limits_a_reservation_taught_count_the_keys_next_requests_for_a_minute() {
        // Nothing taught: nothing counted, nothing written for an unlimited key.
        assert_eq!(learned_limits(None, "k", 0), None);
        assert_eq!(learn(None, "k", 0, 10, (None, None), false), None);
        // The first reply teaches rpm 2 and counts its own request.
        let r = learn(None, "k", 1_000, 10, (Some(2), None), false).unwrap();
        assert_eq!((r.requests, r.tokens), (1, 10));
        assert_eq!(learned_limits(Some(&r), "k", 1_500), Some((Some(2), None)));
        assert_eq!(learned_limits(Some(&r), "other", 1_500), None);
        // The next request is counted before it reserves; its reply counts it no more.
        let Some(Count::Counted(r)) = count(Some(&r), "k", 2_000, 10, Some(2), None) else { panic!() };
        let r = learn(Some(&r), "k", 2_100, 10, (Some(2), None), true).unwrap();
        assert_eq!(r.requests, 2);
        assert_eq!(count(Some(&r), "k", 3_000, 10, Some(2), None), Some(Count::Over(58)));
        // A new minute keeps what was taught; taught limits go stale after a minute.
        let Some(Count::Counted(next)) = count(Some(&r), "k", 61_000, 10, Some(2), None) else { panic!() };
        assert_eq!((next.requests, next.learned), (1, r.learned));
        assert_eq!(learned_limits(Some(&r), "k", 62_100), None);
        // Limits cleared by the admin: forgotten at the next reply.
        let cleared = learn(Some(&r), "k", 4_000, 10, (None, None), true).unwrap();
        assert_eq!((cleared.learned, learned_limits(Some(&cleared), "k", 4_001)), (None, None));
        assert_eq!(Rate::decode(&r.encode()).as_ref(), Some(&r));
    }
}
