//! Per-key rate limits (`rpm_limit`, `tpm_limit`), counted per Envoy in a
//! one-minute window in shared data next to the key's lease slot, by the
//! requests' estimates. Only keys whose lease carries a limit are counted, so
//! unlimited keys pay nothing for it. Pure logic over the slot as read.

use serde::{Deserialize, Serialize};

use crate::slot::Stored;

/// Prefix of the shared-data key of a rate window; the lease slot's number follows.
pub const RATE_PREFIX: &str = "openclaw_bridge_rate:";

pub const WINDOW_MS: u64 = 60_000;

/// A key's requests and tokens in the current minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub key_hash: String,
    pub since_ms: u64,
    pub requests: i64,
    pub tokens: i64,
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
    let fresh = Rate { key_hash: key_hash.to_owned(), since_ms: now_ms, requests: 0, tokens: 0 };
    let mut rate = match current {
        Some(r) if now_ms.saturating_sub(r.since_ms) >= WINDOW_MS => fresh,
        Some(r) if r.key_hash != key_hash => return None,
        Some(r) => r.clone(),
        None => fresh,
    };
    let over = rpm.is_some_and(|l| rate.requests + 1 > l) || tpm.is_some_and(|l| rate.tokens + estimate > l);
    if over {
        let left_ms = WINDOW_MS.saturating_sub(now_ms.saturating_sub(rate.since_ms));
        return Some(Count::Over(left_ms.div_ceil(1_000).max(1)));
    }
    rate.requests += 1;
    rate.tokens += estimate;
    Some(Count::Counted(rate))
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
}
