//! The one compare-and-swap loop over a key's lease slot in Envoy shared data.
//!
//! Every change to a slot (a draw, a fetch marker, an install, a renewal, a
//! sweep, clearing a marker) reads it, decides with a pure function of
//! `lease`, and writes back only if no other worker wrote meanwhile; a lost
//! race reads again. After `CAS_TRIES` losses the caller's own fallback
//! applies: each says what giving up costs.

use crate::host::Host;
use crate::lease::Slot;

/// What a shared-data entry holds, encoded: a key's lease slot, or its rate window.
pub trait Stored: Sized {
    /// An empty or unreadable value reads as nothing.
    fn decode(bytes: &[u8]) -> Option<Self>;
    fn encode(&self) -> Vec<u8>;
}

impl Stored for Slot {
    fn decode(bytes: &[u8]) -> Option<Slot> {
        Slot::decode(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        Slot::encode(self)
    }
}

/// Compare-and-swap attempts on a slot before giving up on it.
pub const CAS_TRIES: usize = 8;

/// What the decision on a slot as read says to do.
pub enum Step<T, S = Slot> {
    /// Write this (`None` empties the slot), then return the value.
    Write(Option<S>, T),
    /// Leave the slot as it is and return the value.
    Keep(T),
}

/// Reads the slot, lets `decide` choose from it and the current time, and
/// writes what it chose if nobody wrote since the read; `None` when every try
/// lost its race. A key seen for the first time has no token to check: two
/// first writers can both succeed, which costs one lease fetched too many
/// (closed by its fetcher), never a draw beyond a grant.
pub fn update<T, S: Stored>(
    host: &impl Host,
    key: &str,
    mut decide: impl FnMut(Option<&S>, u64) -> Step<T, S>,
) -> Option<T> {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host.shared_get(key);
        let slot = bytes.as_deref().and_then(S::decode);
        match decide(slot.as_ref(), host.now_ms()) {
            Step::Keep(value) => return Some(value),
            Step::Write(next, value) => {
                let bytes = next.as_ref().map(S::encode).unwrap_or_default();
                if host.shared_set(key, &bytes, cas) {
                    return Some(value);
                }
            }
        }
    }
    None
}
