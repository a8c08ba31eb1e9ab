//! The root context's settlement queue: records arrive from finished requests
//! (in the same VM), leave in batches, and come back after a
//! failed send with exponential backoff. Pure logic; the plugin does the I/O.

use std::collections::VecDeque;

use bridge_protocol::{LeaseClose, SettleBatch, SettleRecord};
use serde::{Deserialize, Serialize};

/// What a VM's settlement queue holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Item {
    Settle(SettleRecord),
    Close(LeaseClose),
}

impl Item {
    /// Request id or lease id, for logs.
    pub fn id(&self) -> &str {
        match self {
            Item::Settle(r) => &r.request_id,
            Item::Close(c) => &c.lease_id,
        }
    }
}

/// Splits queued items into the batch the sidecar takes.
pub fn batch_of(items: &[Item]) -> SettleBatch {
    let mut batch = SettleBatch { records: Vec::new(), closes: Vec::new(), progress: Vec::new() };
    for item in items {
        match item {
            Item::Settle(r) => batch.records.push(r.clone()),
            Item::Close(c) => batch.closes.push(c.clone()),
        }
    }
    batch
}

/// Records kept at most while the sidecar is unreachable (about 100 MB). Past
/// that the oldest are dropped; their holds expire and are charged in full.
pub const MAX_PENDING: usize = 200_000;
const MIN_BACKOFF_MS: u64 = 250;
const MAX_BACKOFF_MS: u64 = 30_000;

#[derive(Debug)]
pub struct Settler {
    pending: VecDeque<Item>,
    in_flight: Option<Vec<Item>>,
    batch_max: usize,
    backoff_ms: u64,
    next_attempt_ms: u64,
    /// Set while a batch the sidecar refused is being split: batches are at
    /// most this size until the record it could not take is found alone.
    probe: Option<usize>,
}

impl Settler {
    pub fn new(batch_max: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            in_flight: None,
            batch_max: batch_max.max(1),
            backoff_ms: 0,
            next_attempt_ms: 0,
            probe: None,
        }
    }

    /// Queues a record; returns the oldest one if it had to make room for it.
    pub fn push(&mut self, record: Item) -> Option<Item> {
        let dropped = if self.pending.len() >= MAX_PENDING { self.pending.pop_front() } else { None };
        self.pending.push_back(record);
        dropped
    }

    pub fn pending(&self) -> usize {
        self.pending.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    /// The next batch to send, if one is due and none is in flight.
    pub fn next_batch(&mut self, now_ms: u64) -> Option<&[Item]> {
        if self.in_flight.is_some() || self.pending.is_empty() || now_ms < self.next_attempt_ms {
            return None;
        }
        let n = self.pending.len().min(self.batch_max).min(self.probe.unwrap_or(usize::MAX));
        self.in_flight = Some(self.pending.drain(..n).collect());
        self.in_flight.as_deref()
    }

    /// Whether a failed send's backoff still runs.
    pub fn backing_off(&self, now_ms: u64) -> bool {
        now_ms < self.next_attempt_ms
    }

    /// Everything not yet settled, in flight or waiting: the last send when the
    /// VM shuts down.
    pub fn take_all(&mut self) -> Vec<Item> {
        let mut all = self.in_flight.take().unwrap_or_default();
        all.extend(self.pending.drain(..));
        all
    }

    /// The sidecar answered the batch: every record's outcome is final.
    pub fn sent(&mut self) {
        self.in_flight = None;
        self.backoff_ms = 0;
        self.next_attempt_ms = 0;
    }

    /// The sidecar refused the batch itself (400, 413, 422): sent again it
    /// would be refused again, forever. A batch of one is given up and
    /// returned, for the log (its hold or lease is charged at expiry, as for
    /// any record that never arrives); a larger one goes back first in line
    /// and leaves in halves, at once, until the record it cannot take is alone.
    pub fn rejected(&mut self) -> Option<Item> {
        let batch = self.in_flight.take()?;
        if batch.len() == 1 {
            self.probe = None;
            return batch.into_iter().next();
        }
        self.probe = Some(batch.len() / 2);
        for r in batch.into_iter().rev() {
            self.pending.push_front(r);
        }
        None
    }

    /// Ids of what is waiting, oldest first (tests).
    #[cfg(test)]
    pub fn pending_ids(&self) -> Vec<String> {
        self.pending.iter().map(|i| i.id().to_owned()).collect()
    }

    /// The send failed (no answer, not 200): keep the batch first in line and wait.
    pub fn failed(&mut self, now_ms: u64) {
        if let Some(batch) = self.in_flight.take() {
            for r in batch.into_iter().rev() {
                self.pending.push_front(r);
            }
        }
        self.backoff_ms = (self.backoff_ms * 2).clamp(MIN_BACKOFF_MS, MAX_BACKOFF_MS);
        self.next_attempt_ms = now_ms + self.backoff_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_protocol::UsageSource;

    fn rec(i: usize) -> Item {
        Item::Settle(SettleRecord {
            request_id: format!("r{i}"),
            key_hash: bridge_protocol::key_hash("k"),
            model: "m".into(),
            reserved: 10,
            input_tokens: 1,
            output_tokens: 1,
            usage_source: UsageSource::Upstream,
            duration_ms: 1,
            status_code: 200,
            stream: false,
            unreserved: false,
            release: false,
            lease_id: None,
            detail: bridge_protocol::RecordDetail::default(),
        })
    }

    #[test]
    fn batches_are_bounded_and_one_at_a_time() {
        let mut s = Settler::new(2);
        for i in 0..5 {
            s.push(rec(i));
        }
        assert_eq!(s.next_batch(0).map(<[_]>::len), Some(2));
        assert!(s.next_batch(0).is_none(), "one batch in flight");
        s.sent();
        assert_eq!(s.next_batch(0).unwrap()[0].id(), "r2");
    }

    #[test]
    fn a_failed_batch_is_retried_first_after_backoff() {
        let mut s = Settler::new(3);
        for i in 0..4 {
            s.push(rec(i));
        }
        s.next_batch(1_000);
        s.failed(1_000);
        assert!(s.next_batch(1_100).is_none(), "backing off");
        let batch: Vec<String> = s.next_batch(1_250).unwrap().iter().map(|r| r.id().to_owned()).collect();
        assert_eq!(batch, ["r0", "r1", "r2"]);
        s.failed(1_250);
        assert!(s.next_batch(1_700).is_none(), "backoff doubled to 500 ms");
        assert!(s.next_batch(1_750).is_some());
        assert_eq!(s.pending(), 4, "nothing lost while failing");
        s.sent();
        assert_eq!(s.pending(), 1);
    }

    #[test]
    fn take_all_returns_in_flight_and_waiting_records() {
        let mut s = Settler::new(2);
        for i in 0..3 {
            s.push(rec(i));
        }
        s.next_batch(0);
        let all: Vec<String> = s.take_all().iter().map(|r| r.id().to_owned()).collect();
        assert_eq!(all, ["r0", "r1", "r2"]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_full_queue_gives_up_its_oldest_record() {
        let mut s = Settler::new(1);
        for i in 0..MAX_PENDING {
            assert!(s.push(rec(i)).is_none());
        }
        assert_eq!(s.push(rec(MAX_PENDING)).map(|r| r.id().to_owned()), Some("r0".to_owned()));
        assert_eq!(s.pending(), MAX_PENDING);
    }

    #[test]
    fn a_batch_carries_records_and_closes_apart() {
        let close =
            LeaseClose { key_hash: "k".into(), lease_id: "L1".into(), tokens: Some(9), drawn_tokens: 3, drawn_n: 1 };
        let items = [rec(0), Item::Close(close.clone()), rec(1)];
        let batch = batch_of(&items);
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.closes, [close]);
        let text = serde_json::to_string(&items[1]).unwrap();
        assert_eq!(serde_json::from_str::<Item>(&text).unwrap(), items[1]);
    }

    #[test]
    fn a_rejected_batch_is_split_until_the_bad_record_is_alone_and_dropped() {
        let mut s = Settler::new(8);
        for i in 0..8 {
            s.push(rec(i));
        }
        let bad = "r5";
        let mut sent = Vec::new();
        let mut dropped = Vec::new();
        for _ in 0..20 {
            let Some(batch) = s.next_batch(0) else { break };
            let ids: Vec<String> = batch.iter().map(|r| r.id().to_owned()).collect();
            if ids.iter().any(|id| id == bad) {
                // Rejected as a whole, no backoff: it is the batch, not the sidecar.
                dropped.extend(s.rejected().map(|r| r.id().to_owned()));
            } else {
                s.sent();
                sent.extend(ids);
            }
        }
        assert_eq!(dropped, [bad]);
        assert_eq!(sent.len(), 7, "every other record was sent: {sent:?}");
        assert_eq!(s.pending(), 0);
        // Back to full batches afterwards.
        for i in 0..8 {
            s.push(rec(i));
        }
        assert_eq!(s.next_batch(0).map(<[_]>::len), Some(8));
    }

    #[test]
    fn backoff_is_capped() {
        let mut s = Settler::new(1);
        s.push(rec(0));
        let mut now = 0;
        for _ in 0..20 {
            s.next_batch(now);
            s.failed(now);
            now += MAX_BACKOFF_MS;
        }
        assert!(s.next_batch(now).is_some());
    }
}
