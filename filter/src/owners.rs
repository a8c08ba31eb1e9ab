//! Whose a response just made is, before the sidecar knows: the sidecar
//! records a response's owner with its request's settlement, a batch or more
//! after the answer, but a client continues a conversation
//! (`previous_response_id`) or reads the response (`GET
//! /v1/responses/{id}`) at once. The filter notes each response id it sees
//! in an answer in Envoy shared data (every worker of this Envoy reads it),
//! and looks there first; what is not there is asked of the sidecar.
//!
//! Bounded: `OWNER_SLOTS` entries of shared data, each holding the last
//! `PER_SLOT` ids that hash to it (a few MB at most, whatever the load). An
//! id pushed out is asked of the sidecar, which has it by then.

use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::slot::{self, Step, Stored};

pub const OWNER_PREFIX: &str = "openclaw_owner:";
pub const OWNER_SLOTS: u64 = 4096;
const PER_SLOT: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    id: String,
    key_hash: String,
    model: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Recent(Vec<Entry>);

impl Stored for Recent {
    fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What this Envoy knows of a response's owner.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    /// The asking key made it, on this model.
    Own(String),
    /// Another key made it.
    Other,
    /// Not noted here (made elsewhere, or long ago): ask the sidecar.
    Unknown,
}

fn slot_of(id: &str) -> String {
    // FNV-1a: stable across workers and restarts, no allocation.
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{OWNER_PREFIX}{}", h % OWNER_SLOTS)
}

/// Notes that `key_hash` made response `id` on `model`. Losing every race
/// only means the sidecar is asked.
pub fn note(host: &impl Host, id: &str, key_hash: &str, model: &str) {
    let entry = Entry { id: id.to_owned(), key_hash: key_hash.to_owned(), model: model.to_owned() };
    slot::update(host, &slot_of(id), |current: Option<&Recent>, _| {
        let mut recent: Vec<Entry> = current.map(|r| r.0.clone()).unwrap_or_default();
        if recent.first() == Some(&entry) {
            return Step::Keep(());
        }
        recent.retain(|e| e.id != entry.id);
        recent.insert(0, entry.clone());
        recent.truncate(PER_SLOT);
        Step::Write(Some(Recent(recent)), ())
    });
}

/// Whose response `id` is, as far as this Envoy noted.
pub fn known(host: &impl Host, id: &str, key_hash: &str) -> Known {
    let (bytes, _) = host.shared_get(&slot_of(id));
    let recent = bytes.as_deref().and_then(Recent::decode).unwrap_or_default();
    match recent.0.into_iter().find(|e| e.id == id) {
        Some(e) if e.key_hash == key_hash => Known::Own(e.model),
        Some(_) => Known::Other,
        None => Known::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    #[test]
    fn a_noted_response_is_its_makers_and_no_one_elses_and_old_ones_fall_back_to_the_sidecar() {
        let world = World::new();
        let host = &*world;
        assert_eq!(known(host, "resp_a", "ka"), Known::Unknown);
        note(host, "resp_a", "ka", "gpt-5-nano");
        assert_eq!(known(host, "resp_a", "ka"), Known::Own("gpt-5-nano".into()));
        assert_eq!(known(host, "resp_a", "kb"), Known::Other);
        // Many more responses: memory stays bounded, and what was pushed out is asked for.
        for i in 0..(OWNER_SLOTS as usize * PER_SLOT * 2) {
            note(host, &format!("resp_{i}"), "kc", "m");
        }
        assert!(host.shared_len() <= OWNER_SLOTS as usize, "{} entries", host.shared_len());
        assert!(matches!(known(host, "resp_a", "kb"), Known::Other | Known::Unknown));
        let last = format!("resp_{}", OWNER_SLOTS as usize * PER_SLOT * 2 - 1);
        assert_eq!(known(host, &last, "kc"), Known::Own("m".into()));
    }
}
