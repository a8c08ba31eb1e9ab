//! Per-key token leases: the precheck without a callout.
//!
//! A lease is a slice of a key's balance that the sidecar took out of it in
//! one guarded update. Envoy shared data holds one slot per key, shared by all
//! worker VMs; a request draws its estimate from the live lease with a
//! compare-and-swap and goes ahead at once. A lease lives while its key is
//! active: up to its window (`LEASE_MS`, 30 s by default; a freeze, a
//! top-up or new controls end it within a settlement tick, pushed by the
//! sidecar), and its root closes it sooner once nothing drew from it for
//! `LEASE_IDLE_MS` (2 s), so a quiet key holds nothing and costs no writes.
//! Then it is closed with what was drawn, and the sidecar returns the rest
//! to the balance. Before that, once half its time or half its tokens are
//! gone, the draw that notices asks for the next lease in the background
//! (through a root context, which always gets the reply), so a busy key's
//! requests never wait for one. The sum of the estimates drawn
//! never exceeds what the sidecar granted, so nothing is spent that the
//! balance did not hold; each drawn request still settles its actual usage.
//!
//! Pure logic: the plugin reads and writes the slot and makes the calls.

use bridge_protocol::{KeyPolicy, LeaseClose};
use serde::{Deserialize, Serialize};

/// Prefix of the shared-data key of a slot; the slot's number follows.
pub const SLOT_PREFIX: &str = "openclaw_bridge_lease:";

/// The slot of a key: one of `slots`, by its hash. Envoy never deletes shared
/// data, so a slot per key would let every made-up key grow Envoy's memory for
/// good; a fixed number of slots bounds it. Each slot names the key it holds,
/// so keys sharing a slot never draw from each other's leases: while one holds
/// a live lease there, the other reserves per request.
pub fn slot_key(key_hash: &str, slots: u32) -> String {
    let n = key_hash.get(..8).and_then(|h| u32::from_str_radix(h, 16).ok()).unwrap_or(0);
    format!("{SLOT_PREFIX}{:x}", n % slots.max(1))
}

/// A lease the filter is drawing from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub key_hash: String,
    /// What the sidecar granted.
    pub tokens: i64,
    pub drawn_tokens: i64,
    pub drawn_n: i64,
    /// No draws at or after this time (ms since the epoch).
    pub expires_ms: u64,
    /// The next lease, asked for in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Refresh>,
    /// The key's controls, as the grant carried them: every draw obeys them.
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: KeyPolicy,
}

fn is_default(p: &KeyPolicy) -> bool {
    *p == KeyPolicy::default()
}

/// A background request for the lease that will replace this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    pub id: String,
    pub since_ms: u64,
    /// Answered without a grant (refused, or not now): no more asks until it
    /// goes stale, and nobody waits for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answered: bool,
}

impl Lease {
    /// A lease as granted: `granted` tokens under the key's controls, with
    /// `drawn` (tokens, requests) already taken from it.
    pub fn granted(id: &str, key_hash: &str, granted: (i64, &KeyPolicy), drawn: (i64, i64), expires_ms: u64) -> Lease {
        Lease {
            id: id.to_owned(),
            key_hash: key_hash.to_owned(),
            tokens: granted.0,
            drawn_tokens: drawn.0,
            drawn_n: drawn.1,
            expires_ms,
            refresh: None,
            policy: granted.1.clone(),
        }
    }

    fn refresh_answered(&self) -> bool {
        self.refresh.as_ref().is_some_and(|r| r.answered)
    }

    pub fn close(&self) -> LeaseClose {
        LeaseClose {
            key_hash: self.key_hash.clone(),
            lease_id: self.id.clone(),
            tokens: Some(self.tokens),
            drawn_tokens: self.drawn_tokens,
            drawn_n: self.drawn_n,
        }
    }
}

/// The shared-data slot of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Slot {
    /// A worker is asking the sidecar for lease `id` of key `key_hash`; the
    /// key's other requests wait for it, another key's reserve alone (a
    /// made-up key's fetch never holds up a real key sharing its slot).
    Fetching {
        id: String,
        since_ms: u64,
        /// Empty in a marker written by an older build: then everyone waits.
        #[serde(default)]
        key_hash: String,
    },
    Live(Lease),
    /// The sidecar refused this key (unknown, frozen, no balance): its
    /// requests get the same answer without a call until `until_ms`.
    Refused {
        key_hash: String,
        until_ms: u64,
        status: u16,
        error: bridge_protocol::ErrorBody,
    },
}

/// First byte of a live lease in the compact form (JSON starts with `{`).
const COMPACT: u8 = 0xb1;

impl Slot {
    /// An empty or unreadable value is an empty slot: the worst that follows is
    /// one lease fetched too many, which its fetcher closes (also what a VM of
    /// an older build makes of the compact form during an upgrade).
    pub fn decode(bytes: &[u8]) -> Option<Slot> {
        match bytes.first() {
            Some(&COMPACT) => decode_compact(&bytes[1..]).map(Slot::Live),
            _ => serde_json::from_slice(bytes).ok(),
        }
    }

    /// A live lease without key controls, the slot every draw reads and
    /// writes, in a compact binary form; anything else as JSON.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Slot::Live(lease) if lease.policy == KeyPolicy::default() => {
                encode_compact(lease).unwrap_or_else(|| serde_json::to_vec(self).unwrap_or_default())
            }
            _ => serde_json::to_vec(self).unwrap_or_default(),
        }
    }
}

/// `COMPACT`, then tokens, drawn tokens, drawn requests, expiry (8 bytes
/// each, little-endian), a flags byte (1: a refresh, 2: it was answered), the
/// refresh's `since_ms` if any, and the lease id, key hash and refresh id,
/// each a length byte and its bytes. `None` if a string is over 255 bytes.
fn encode_compact(lease: &Lease) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.push(COMPACT);
    for n in [lease.tokens, lease.drawn_tokens, lease.drawn_n] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&lease.expires_ms.to_le_bytes());
    let refresh = lease.refresh.as_ref();
    out.push(match refresh {
        None => 0,
        Some(r) => 1 | if r.answered { 2 } else { 0 },
    });
    if let Some(r) = refresh {
        out.extend_from_slice(&r.since_ms.to_le_bytes());
    }
    for text in [Some(&lease.id), Some(&lease.key_hash), refresh.map(|r| &r.id)].into_iter().flatten() {
        out.push(u8::try_from(text.len()).ok()?);
        out.extend_from_slice(text.as_bytes());
    }
    Some(out)
}

fn decode_compact(mut bytes: &[u8]) -> Option<Lease> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        bytes = rest;
        Some(head)
    };
    let mut int = || -> Option<[u8; 8]> { take(8)?.try_into().ok() };
    let (tokens, drawn_tokens, drawn_n) =
        (i64::from_le_bytes(int()?), i64::from_le_bytes(int()?), i64::from_le_bytes(int()?));
    let expires_ms = u64::from_le_bytes(int()?);
    let flags = *take(1)?.first()?;
    let since_ms = match flags & 1 {
        0 => None,
        _ => Some(u64::from_le_bytes(take(8)?.try_into().ok()?)),
    };
    let mut text = || -> Option<String> {
        let len = usize::from(*take(1)?.first()?);
        String::from_utf8(take(len)?.to_vec()).ok()
    };
    let (id, key_hash) = (text()?, text()?);
    let refresh = match since_ms {
        None => None,
        Some(since_ms) => Some(Refresh { id: text()?, since_ms, answered: flags & 2 != 0 }),
    };
    Some(Lease { id, key_hash, tokens, drawn_tokens, drawn_n, expires_ms, refresh, policy: KeyPolicy::default() })
}

/// How leases are sized and when a fetch is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A fetch marker older than this is its fetcher gone: replaced.
    pub stale_ms: u64,
    /// How long a lease is drawn from at most.
    pub window_ms: u64,
    /// The most tokens one lease asks for (`LEASE_TOKENS`).
    pub ceiling: i64,
}

/// A key's first lease, with no draw rate to go by, asks for this many
/// requests' estimates (within the ceiling), and no lease asks for fewer.
/// With 16, a key sending a request every second renewed its lease after
/// eight: at 1,000 keys the grants took the ledger's time and the gateway
/// answered a third fewer requests (BENCHMARKS.md). The sidecar's share of the
/// balance bounds what this holds of a small balance.
pub const FIRST_LEASE_REQUESTS: i64 = 64;

/// A lease is sized to hold twice its key's draws over this long (or its
/// window, if shorter): a long-lived lease of a busy key is renewed when
/// half of it is drawn, not sized to hold its whole window's draws out of
/// the balance that other gateways may need.
pub const SIZED_FOR_MS: u64 = 10_000;

impl Policy {
    /// Tokens a lease fetched after `prev` (the key's last lease, if it is
    /// still in the slot) asks for, by a request of `estimate`: twice the key's
    /// draw over a window, at least [`FIRST_LEASE_REQUESTS`] estimates, at most
    /// the ceiling, and never less than this request's estimate.
    pub fn want(&self, prev: Option<&Lease>, now_ms: u64, estimate: i64) -> i64 {
        let by_rate = prev.map_or(0, |l| next_want(l, now_ms, self.window_ms));
        let wanted = by_rate.max(estimate.saturating_mul(FIRST_LEASE_REQUESTS));
        wanted.min(self.ceiling).max(estimate)
    }
}

/// What a request does about its estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Draw {
    /// Taken from lease `lease_id`: write `slot` (compare-and-swap), then
    /// forward; if `refresh` is set, ask for that lease (id, tokens wanted) in
    /// the background.
    Drawn { slot: Slot, lease_id: String, refresh: Option<(String, i64)> },
    /// Write `slot` (our fetch marker), then ask the sidecar for a lease of
    /// `want` tokens; the lease it replaces, if any, is closed with what was
    /// drawn from it (in the fetch if it is this key's, else on its own).
    Fetch { slot: Slot, close: Option<LeaseClose>, want: i64 },
    /// The key's next lease is on its way (a fetch or a renewal): wait for it
    /// rather than reserve alone.
    Wait,
    /// The slot holds another key's live lease: reserve this request on its own.
    Reserve,
    /// The key was refused a moment ago: answer this, without a call.
    Refused { status: u16, error: bridge_protocol::ErrorBody },
}

/// A request of `model` for `key_hash`: what the key's live lease says of it,
/// if the key's controls refuse it (its model is not allowed, the key has
/// expired): the status and error, answered without a call.
pub fn controls_refuse(
    current: Option<&Slot>,
    key_hash: &str,
    model: &str,
    now_ms: u64,
) -> Option<(u16, bridge_protocol::ErrorBody)> {
    let Some(Slot::Live(lease)) = current else { return None };
    if lease.key_hash != key_hash || now_ms >= lease.expires_ms {
        return None;
    }
    if lease.policy.expired(now_ms) {
        return Some((401, crate::reply::key_expired_error()));
    }
    if !lease.policy.allows(model) {
        return Some((
            403,
            crate::reply::model_not_allowed_error(model, lease.policy.allowed_models.as_deref().unwrap_or(&[])),
        ));
    }
    None
}

/// The rate limits (rpm, tpm) of `key_hash`'s live lease, if it carries any.
pub fn rate_limits(current: Option<&Slot>, key_hash: &str, now_ms: u64) -> Option<(Option<i64>, Option<i64>)> {
    match current {
        Some(Slot::Live(l)) if l.key_hash == key_hash && now_ms < l.expires_ms => {
            let limits = (l.policy.rpm_limit, l.policy.tpm_limit);
            (limits != (None, None)).then_some(limits)
        }
        _ => None,
    }
}

/// Decides a request's draw from the slot as read. `new_id` names a lease to
/// fetch.
pub fn draw(current: Option<&Slot>, key_hash: &str, now_ms: u64, estimate: i64, new_id: &str, policy: &Policy) -> Draw {
    let in_flight =
        |lease: &Lease| lease.refresh.as_ref().is_some_and(|r| now_ms.saturating_sub(r.since_ms) < policy.stale_ms);
    // The lease replaced, if any, is closed (another key's, expired, by its
    // own close; ours in the fetch); only ours tells this key's draw rate.
    let fetch = |prev: Option<&Lease>| Draw::Fetch {
        slot: Slot::Fetching { id: new_id.to_owned(), since_ms: now_ms, key_hash: key_hash.to_owned() },
        close: prev.map(Lease::close),
        want: policy.want(prev.filter(|l| l.key_hash == key_hash), now_ms, estimate),
    };
    if let Some(mut lease) = take(current, key_hash, now_ms, estimate) {
        let lease_id = lease.id.clone();
        let half_time = now_ms.saturating_add(policy.window_ms / 2) >= lease.expires_ms;
        let half_drawn = lease.drawn_tokens * 2 >= lease.tokens;
        let refresh = if (half_time || half_drawn) && !in_flight(&lease) {
            let want = policy.want(Some(&lease), now_ms, estimate);
            lease.refresh = Some(Refresh { id: new_id.to_owned(), since_ms: now_ms, answered: false });
            Some((new_id.to_owned(), want))
        } else {
            None
        };
        return Draw::Drawn { slot: Slot::Live(lease), lease_id, refresh };
    }
    match current {
        None => fetch(None),
        Some(Slot::Fetching { since_ms, key_hash: fetching, .. })
            if now_ms.saturating_sub(*since_ms) < policy.stale_ms =>
        {
            match fetching.is_empty() || fetching == key_hash {
                true => Draw::Wait,
                false => Draw::Reserve,
            }
        }
        Some(Slot::Fetching { .. }) => fetch(None),
        // Another key's live lease shares this slot: leave it be.
        Some(Slot::Live(lease)) if lease.key_hash != key_hash && now_ms < lease.expires_ms => Draw::Reserve,
        // Expired, or too little left, with its successor asked for: that one
        // is on its way, and the requests wait for it.
        Some(Slot::Live(lease)) if lease.key_hash == key_hash && in_flight(lease) && !lease.refresh_answered() => {
            Draw::Wait
        }
        // Expired, or too little left for this request: a new lease replaces it
        // (a renewal still on its way finds the slot moved on and gives its
        // lease back). Not reserving alone: the balance may be all in this lease.
        Some(Slot::Live(lease)) => fetch(Some(lease)),
        Some(Slot::Refused { key_hash: refused, until_ms, status, error })
            if refused == key_hash && now_ms < *until_ms =>
        {
            Draw::Refused { status: *status, error: error.clone() }
        }
        Some(Slot::Refused { .. }) => fetch(None),
    }
}

/// This request's estimate taken from the live lease, if it is not expired
/// and has enough left: the lease as it is to be written back.
pub fn take(current: Option<&Slot>, key_hash: &str, now_ms: u64, estimate: i64) -> Option<Lease> {
    match current {
        Some(Slot::Live(lease))
            if lease.key_hash == key_hash
                && now_ms < lease.expires_ms
                && lease.tokens - lease.drawn_tokens >= estimate =>
        {
            let mut lease = lease.clone();
            lease.drawn_tokens += estimate;
            lease.drawn_n += 1;
            Some(lease)
        }
        _ => None,
    }
}

/// Tokens the next lease should ask for: twice what this one was drawn at,
/// over [`SIZED_FOR_MS`] (or the window, if shorter), so a busy key's lease
/// is renewed in the background before it runs out rather than sending
/// requests to reserve alone. The plugin takes at least its configured size.
pub fn next_want(lease: &Lease, now_ms: u64, window_ms: u64) -> i64 {
    let granted_ms = lease.expires_ms.saturating_sub(window_ms);
    let sized_for = window_ms.min(SIZED_FOR_MS);
    // A burst just after the grant says little of a rate: at least a tenth of its span.
    let elapsed = now_ms.saturating_sub(granted_ms).max(sized_for / 10).max(1);
    let per_span = i128::from(lease.drawn_tokens) * i128::from(sized_for) / i128::from(elapsed);
    i64::try_from(per_span.saturating_mul(2)).unwrap_or(i64::MAX)
}

/// What to do with a lease the sidecar granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// Write `slot` (compare-and-swap): the lease is live, this request drawn from it.
    Live(Slot),
    /// Our marker is gone (replaced as stale): the lease serves this request
    /// only and is closed at once.
    Orphan(LeaseClose),
}

/// `granted` tokens arrived for lease `id`, fetched by a request of
/// `estimate`; `current` is the slot as read now.
pub fn install(
    current: Option<&Slot>,
    id: &str,
    key_hash: &str,
    granted: (i64, &KeyPolicy),
    estimate: i64,
    now_ms: u64,
    lease_ms: u64,
) -> Install {
    let lease = Lease::granted(id, key_hash, granted, (estimate, 1), now_ms + lease_ms);
    match current {
        Some(Slot::Fetching { id: marker, .. }) if marker == id => Install::Live(Slot::Live(lease)),
        _ => Install::Orphan(lease.close()),
    }
}

/// What to do with a lease granted to a background refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renew {
    /// Write `slot` (compare-and-swap); close the lease it replaces, if any.
    Live { slot: Slot, close: Option<LeaseClose> },
    /// The slot moved on without it: give it back at once.
    Orphan(LeaseClose),
}

/// `granted` tokens arrived for refresh `id`; `current` is the slot as read now.
pub fn renew(
    current: Option<&Slot>,
    id: &str,
    key_hash: &str,
    granted: (i64, &KeyPolicy),
    now_ms: u64,
    lease_ms: u64,
) -> Renew {
    let lease = Lease::granted(id, key_hash, granted, (0, 0), now_ms + lease_ms);
    match current {
        Some(Slot::Live(old)) if old.refresh.as_ref().is_some_and(|r| r.id == id) => {
            Renew::Live { slot: Slot::Live(lease), close: Some(old.close()) }
        }
        // The old one expired and was closed meanwhile: the new one takes its place.
        None => Renew::Live { slot: Slot::Live(lease), close: None },
        _ => Renew::Orphan(lease.close()),
    }
}

/// Whether background ask `id`, waiting in the queue, is still wanted: the
/// live lease it is to replace still names it, or the slot is empty. Else a
/// later ask (this one gone stale) or a fetch took its place, and a grant
/// for it would only be given back.
pub fn still_asked(current: Option<&Slot>, id: &str) -> bool {
    match current {
        Some(Slot::Live(old)) => old.refresh.as_ref().is_some_and(|r| r.id == id),
        None => true,
        _ => false,
    }
}

/// A background ask answered without a grant: the live lease it was to
/// replace, marked so that requests stop waiting for it (the next that finds
/// the lease short fetches in the foreground and gets the answer itself).
pub fn unanswered(current: Option<&Slot>, id: &str) -> Option<Slot> {
    match current {
        Some(Slot::Live(lease)) if lease.refresh.as_ref().is_some_and(|r| r.id == id) => {
            let mut lease = lease.clone();
            if let Some(r) = &mut lease.refresh {
                r.answered = true;
            }
            Some(Slot::Live(lease))
        }
        _ => None,
    }
}

/// The refusal our fetch got, cached in the slot in place of our marker.
pub fn refuse(
    current: Option<&Slot>,
    id: &str,
    key_hash: &str,
    status: u16,
    error: &bridge_protocol::ErrorBody,
    until_ms: u64,
) -> Option<Slot> {
    is_our_marker(current, id).then(|| Slot::Refused {
        key_hash: key_hash.to_owned(),
        until_ms,
        status,
        error: error.clone(),
    })
}

/// Whether the slot still carries our fetch marker (to be cleared when the
/// fetch fails or is refused).
pub fn is_our_marker(current: Option<&Slot>, id: &str) -> bool {
    matches!(current, Some(Slot::Fetching { id: marker, .. }) if marker == id)
}

/// The root's sweep: an expired live lease is taken out of its slot (written
/// empty) and closed. `force` closes it even before it expires (shutdown).
pub fn expire(current: Option<&Slot>, now_ms: u64, force: bool) -> Option<LeaseClose> {
    match current {
        Some(Slot::Live(lease)) if force || now_ms >= lease.expires_ms => Some(lease.close()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
