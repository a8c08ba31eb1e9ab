//! The root context's settlement queues: records arrive from finished
//! requests (in the same VM) and lease closes from the root; each leaves in
//! batches on its own lane and comes back after a failed send with
//! exponential backoff. Closes never wait behind records (a close that
//! waits lets its lease be taken for lost), and records the sidecar cannot
//! settle yet wait a moment and go again. Pure logic; the plugin does the I/O.

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
    let mut batch = SettleBatch { records: Vec::new(), closes: Vec::new(), progress: Vec::new(), changes_since: None };
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
/// Admission stops long before this (`settle_backlog_max`); this bounds
/// what `failure_mode: allow` keeps while the sidecar is down.
pub const MAX_PENDING: usize = 200_000;
const MIN_BACKOFF_MS: u64 = 250;
const MAX_BACKOFF_MS: u64 = 30_000;
/// A record the sidecar answered `Later` (its lease is being taken for lost
/// right now) goes again this long after.
pub const LATER_MS: u64 = 1_000;

/// One queue of batches with one in flight: what waits, what was sent, and
/// the backoff of failed sends.
#[derive(Debug)]
struct Lane<T> {
    pending: VecDeque<T>,
    in_flight: Option<Vec<T>>,
    batch_max: usize,
    backoff_ms: u64,
    next_attempt_ms: u64,
    /// Set while a batch the sidecar refused is being split: batches are at
    /// most this size until the item it could not take is found alone.
    probe: Option<usize>,
}

impl<T> Lane<T> {
    fn new(batch_max: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            in_flight: None,
            batch_max: batch_max.max(1),
            backoff_ms: 0,
            next_attempt_ms: 0,
            probe: None,
        }
    }

    fn len(&self) -> usize {
        self.pending.len() + self.in_flight.as_ref().map_or(0, Vec::len)
    }

    fn backing_off(&self, now_ms: u64) -> bool {
        now_ms < self.next_attempt_ms
    }

    /// The next batch, if one is due and none is in flight; an empty one
    /// when `empty_ok` and nothing waits.
    fn next(&mut self, now_ms: u64, empty_ok: bool) -> Option<&[T]> {
        if self.in_flight.is_some() || self.backing_off(now_ms) || (self.pending.is_empty() && !empty_ok) {
            return None;
        }
        let n = self.pending.len().min(self.batch_max).min(self.probe.unwrap_or(usize::MAX));
        self.in_flight = Some(self.pending.drain(..n).collect());
        self.in_flight.as_deref()
    }

    fn sent(&mut self) -> Vec<T> {
        self.backoff_ms = 0;
        self.next_attempt_ms = 0;
        self.in_flight.take().unwrap_or_default()
    }

    fn rejected(&mut self) -> Option<T> {
        let batch = self.in_flight.take()?;
        if batch.len() <= 1 {
            self.probe = None;
            return batch.into_iter().next();
        }
        self.probe = Some(batch.len() / 2);
        for r in batch.into_iter().rev() {
            self.pending.push_front(r);
        }
        None
    }

    fn failed(&mut self, now_ms: u64) {
        if let Some(batch) = self.in_flight.take() {
            for r in batch.into_iter().rev() {
                self.pending.push_front(r);
            }
        }
        self.backoff_ms = (self.backoff_ms * 2).clamp(MIN_BACKOFF_MS, MAX_BACKOFF_MS);
        self.next_attempt_ms = now_ms + self.backoff_ms;
    }

    fn take_all(&mut self) -> Vec<T> {
        let mut all = self.in_flight.take().unwrap_or_default();
        all.extend(self.pending.drain(..));
        all
    }
}

/// A record waiting for its settlement, and since when.
#[derive(Debug, Clone)]
struct Queued {
    record: SettleRecord,
    since_ms: u64,
}

/// Which lane a call carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKind {
    /// Lease closes and progress reports.
    Control,
    Records,
}

/// A VM's settlement queues: the records lane and the control lane (lease
/// closes; the root adds progress reports to its calls).
#[derive(Debug)]
pub struct Settler {
    records: Lane<Queued>,
    closes: Lane<LeaseClose>,
    /// Records answered `Later`, with when they go again.
    later: Vec<(Queued, u64)>,
    /// When the records batch in flight went.
    sent_ms: u64,
    /// Records the sidecar settles a millisecond, as its recent batches of
    /// at least half the most a batch holds went (a moving average); `None`
    /// until one was answered.
    rate_per_ms: Option<f64>,
}

/// How far behind the records lane is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Records not yet settled: waiting, in flight or to go again.
    pub records: usize,
    /// Milliseconds the oldest of them has waited.
    pub oldest_ms: u64,
    /// Milliseconds they would take to settle at the rate the sidecar has
    /// been settling them (`None` before its first answer).
    pub drain_ms: Option<u64>,
}

impl Settler {
    pub fn new(batch_max: usize) -> Self {
        Self {
            records: Lane::new(batch_max),
            closes: Lane::new(batch_max),
            later: Vec::new(),
            sent_ms: 0,
            rate_per_ms: None,
        }
    }

    /// Queues an item at `now_ms`; returns the oldest record if it had to
    /// make room for it.
    pub fn push(&mut self, item: Item, now_ms: u64) -> Option<Item> {
        match item {
            Item::Close(c) => {
                self.closes.pending.push_back(c);
                None
            }
            Item::Settle(record) => {
                let full = self.records.pending.len() >= MAX_PENDING;
                let dropped = if full { self.records.pending.pop_front() } else { None };
                self.records.pending.push_back(Queued { record, since_ms: now_ms });
                dropped.map(|q| Item::Settle(q.record))
            }
        }
    }

    /// Everything not yet settled: records and closes.
    pub fn pending(&self) -> usize {
        self.records.len() + self.later.len() + self.closes.len()
    }

    /// The records lane's backlog at `now_ms`.
    pub fn backlog(&self, now_ms: u64) -> Backlog {
        let oldest = [self.records.in_flight.as_ref().and_then(|b| b.first()), self.records.pending.front()]
            .into_iter()
            .flatten()
            .map(|q| q.since_ms)
            .chain(self.later.iter().map(|(q, _)| q.since_ms))
            .min();
        let records = self.records.len() + self.later.len();
        Backlog {
            records,
            oldest_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
            drain_ms: self.rate_per_ms.filter(|_| records > 0).map(|r| (records as f64 / r.max(1e-6)) as u64),
        }
    }

    /// The next batch of records, if one is due and none is in flight.
    /// Records answered `Later` whose wait is over go first.
    pub fn next_records(&mut self, now_ms: u64) -> Option<Vec<SettleRecord>> {
        if self.records.in_flight.is_none() && !self.later.is_empty() {
            let (due, wait): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.later).into_iter().partition(|(_, at)| *at <= now_ms);
            self.later = wait;
            for (q, _) in due.into_iter().rev() {
                self.records.pending.push_front(q);
            }
        }
        let batch = self.records.next(now_ms, false)?;
        self.sent_ms = now_ms;
        Some(batch.iter().map(|q| q.record.clone()).collect())
    }

    /// The next batch of closes, if one is due and none is in flight; an
    /// empty one when `empty_ok` (progress reports to carry).
    pub fn next_closes(&mut self, now_ms: u64, empty_ok: bool) -> Option<Vec<LeaseClose>> {
        self.closes.next(now_ms, empty_ok).map(<[_]>::to_vec)
    }

    /// Whether a lane's failed send's backoff still runs.
    pub fn backing_off(&self, lane: LaneKind, now_ms: u64) -> bool {
        match lane {
            LaneKind::Control => self.closes.backing_off(now_ms),
            LaneKind::Records => self.records.backing_off(now_ms),
        }
    }

    /// The sidecar answered the records batch: those it named in `later` go
    /// again after [`LATER_MS`]; the others are settled, and returned.
    pub fn records_sent(&mut self, later: &[&str], now_ms: u64) -> Vec<SettleRecord> {
        let n = self.records.in_flight.as_ref().map_or(0, Vec::len);
        // This batch's rate, into the average. A batch under half the most
        // a batch holds is left out: its time is mostly the call's, and the
        // backlog it would judge leaves in full batches.
        if n > 0 && 2 * n >= self.records.batch_max {
            let sample = n as f64 / now_ms.saturating_sub(self.sent_ms).max(1) as f64;
            let weight = (n as f64 / self.records.batch_max as f64).min(1.0) * 0.3;
            self.rate_per_ms = Some(match self.rate_per_ms {
                None => sample,
                Some(r) => r * (1.0 - weight) + sample * weight,
            });
        }
        let mut done = Vec::new();
        for q in self.records.sent() {
            if later.contains(&q.record.request_id.as_str()) {
                self.later.push((q, now_ms + LATER_MS));
            } else {
                done.push(q.record);
            }
        }
        done
    }

    /// The sidecar answered the closes batch.
    pub fn closes_sent(&mut self) {
        self.closes.sent();
    }

    /// The sidecar refused a lane's batch itself (400, 413, 422): sent again
    /// it would be refused again, forever. A batch of one is given up and
    /// returned, for the log (its hold or lease is charged at expiry, as for
    /// any record that never arrives); a larger one goes back first in line
    /// and leaves in halves, at once, until the item it cannot take is alone.
    pub fn rejected(&mut self, lane: LaneKind) -> Option<Item> {
        match lane {
            LaneKind::Control => self.closes.rejected().map(Item::Close),
            LaneKind::Records => self.records.rejected().map(|q| Item::Settle(q.record)),
        }
    }

    /// A lane's send failed (no answer, not 200): its batch stays first in
    /// line and the lane waits.
    pub fn failed(&mut self, lane: LaneKind, now_ms: u64) {
        match lane {
            LaneKind::Control => self.closes.failed(now_ms),
            LaneKind::Records => self.records.failed(now_ms),
        }
    }

    /// Everything not yet settled, in flight or waiting, closes first: the
    /// last send when the VM shuts down.
    pub fn take_all(&mut self) -> Vec<Item> {
        let mut all: Vec<Item> = self.closes.take_all().into_iter().map(Item::Close).collect();
        all.extend(self.records.take_all().into_iter().map(|q| Item::Settle(q.record)));
        all.extend(std::mem::take(&mut self.later).into_iter().map(|(q, _)| Item::Settle(q.record)));
        all
    }

    /// Ids of what is waiting, closes then records, oldest first (tests).
    #[cfg(test)]
    pub fn pending_ids(&self) -> Vec<String> {
        let closes = self.closes.pending.iter().map(|c| c.lease_id.clone());
        closes.chain(self.records.pending.iter().map(|q| q.record.request_id.clone())).collect()
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

    fn close(i: usize) -> Item {
        Item::Close(LeaseClose {
            key_hash: "k".into(),
            lease_id: format!("L{i}"),
            tokens: Some(9),
            drawn_tokens: 3,
            drawn_n: 1,
        })
    }

    fn ids(batch: &[SettleRecord]) -> Vec<&str> {
        batch.iter().map(|r| r.request_id.as_str()).collect()
    }

    #[test]
    fn batches_are_bounded_and_one_at_a_time() {
        let mut s = Settler::new(2);
        for i in 0..5 {
            s.push(rec(i), 0);
        }
        assert_eq!(s.next_records(0).map(|b| b.len()), Some(2));
        assert!(s.next_records(0).is_none(), "one batch in flight");
        s.records_sent(&[], 0);
        assert_eq!(s.next_records(0).unwrap()[0].request_id, "r2");
    }

    #[test]
    fn closes_leave_on_their_own_lane_while_records_are_in_flight_or_backing_off() {
        let mut s = Settler::new(2);
        for i in 0..4 {
            s.push(rec(i), 0);
        }
        s.next_records(0).unwrap();
        s.push(close(0), 10);
        let closes = s.next_closes(10, false).unwrap();
        assert_eq!(closes[0].lease_id, "L0", "not behind the records in flight");
        s.closes_sent();
        s.failed(LaneKind::Records, 20);
        s.push(close(1), 30);
        assert!(s.next_records(30).is_none(), "records back off");
        assert_eq!(s.next_closes(30, false).unwrap()[0].lease_id, "L1", "closes do not");
        assert!(s.next_closes(30, true).is_none(), "one closes batch in flight");
        s.closes_sent();
        assert_eq!(s.next_closes(30, true).map(|b| b.len()), Some(0), "an empty one carries progress");
    }

    #[test]
    fn a_failed_batch_is_retried_first_after_backoff() {
        let mut s = Settler::new(3);
        for i in 0..4 {
            s.push(rec(i), 1_000);
        }
        s.next_records(1_000);
        s.failed(LaneKind::Records, 1_000);
        assert!(s.next_records(1_100).is_none(), "backing off");
        assert_eq!(ids(&s.next_records(1_250).unwrap()), ["r0", "r1", "r2"]);
        s.failed(LaneKind::Records, 1_250);
        assert!(s.next_records(1_700).is_none(), "backoff doubled to 500 ms");
        assert!(s.next_records(1_750).is_some());
        assert_eq!(s.pending(), 4, "nothing lost while failing");
        assert_eq!(s.records_sent(&[], 1_750).len(), 3);
        assert_eq!(s.pending(), 1);
    }

    #[test]
    fn records_answered_later_go_again_first_after_a_pause_and_count_in_the_backlog() {
        let mut s = Settler::new(2);
        for i in 0..3 {
            s.push(rec(i), 0);
        }
        s.next_records(100).unwrap();
        let done = s.records_sent(&["r1"], 100);
        assert_eq!(ids(&done), ["r0"]);
        let b = s.backlog(600);
        assert_eq!((b.records, b.oldest_ms), (2, 600), "r1 still waits, since 0");
        assert_eq!(ids(&s.next_records(600).unwrap()), ["r2"], "r1 waits out its pause");
        s.records_sent(&[], 600);
        assert!(s.next_records(1_000).is_none(), "not yet");
        assert_eq!(ids(&s.next_records(1_100).unwrap()), ["r1"]);
        assert_eq!(ids(&s.records_sent(&[], 1_100)), ["r1"]);
        assert_eq!((s.pending(), s.backlog(2_000)), (0, Backlog::default()));
    }

    #[test]
    fn the_backlog_says_how_long_it_would_take_at_the_rate_batches_have_been_settling() {
        let mut s = Settler::new(100);
        for i in 0..1_000 {
            s.push(rec(i), 0);
        }
        assert_eq!(s.backlog(0).drain_ms, None, "no rate before an answer");
        // Full batches settled in 500 ms each: 0.2 records a millisecond.
        let mut now = 0;
        for _ in 0..5 {
            s.next_records(now).unwrap();
            now += 500;
            s.records_sent(&[], now);
        }
        let b = s.backlog(now);
        assert_eq!(b.records, 500);
        assert_eq!(b.drain_ms, Some(2_500), "500 records at 0.2 a millisecond");
        // A faster sidecar moves the average towards its rate.
        for _ in 0..10 {
            s.next_records(now).unwrap();
            now += 100;
            s.records_sent(&[], now);
            s.push(rec(9_999), now);
        }
        assert!(s.backlog(now).drain_ms.unwrap() < 1_000, "{:?}", s.backlog(now));
    }

    #[test]
    fn a_batch_of_a_few_records_says_nothing_of_the_rate_the_sidecar_can_settle() {
        // A quiet lane sends batches of one: their time is the call's, not
        // the records'. The burst behind them is not refused on their rate.
        let mut s = Settler::new(100);
        s.push(rec(0), 0);
        s.next_records(0).unwrap();
        s.records_sent(&[], 40);
        for i in 1..=300 {
            s.push(rec(i), 40);
        }
        assert_eq!(s.backlog(40).drain_ms, None, "one record in 40 ms is no rate for 300");
        s.next_records(40).unwrap();
        s.records_sent(&[], 240);
        assert_eq!(s.backlog(240).drain_ms, Some(400), "200 records at a full batch's 0.5 a millisecond");
    }

    #[test]
    fn the_backlog_counts_records_not_closes_and_ages_from_the_oldest() {
        let mut s = Settler::new(10);
        s.push(close(0), 0);
        assert_eq!(s.backlog(5_000), Backlog::default());
        s.push(rec(0), 1_000);
        s.push(rec(1), 2_000);
        s.next_records(2_000);
        assert_eq!(s.backlog(4_000), Backlog { records: 2, oldest_ms: 3_000, drain_ms: None }, "in flight counts");
        s.records_sent(&[], 4_000);
        assert_eq!(s.backlog(4_000).records, 0);
    }

    #[test]
    fn take_all_returns_closes_and_records_in_flight_waiting_and_later() {
        let mut s = Settler::new(2);
        for i in 0..3 {
            s.push(rec(i), 0);
        }
        s.push(close(0), 0);
        s.next_records(0);
        s.records_sent(&["r0"], 0);
        s.next_records(0);
        let all: Vec<String> = s.take_all().iter().map(|r| r.id().to_owned()).collect();
        assert_eq!(all, ["L0", "r2", "r0"]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_full_queue_gives_up_its_oldest_record() {
        let mut s = Settler::new(1);
        for i in 0..MAX_PENDING {
            assert!(s.push(rec(i), 0).is_none());
        }
        assert_eq!(s.push(rec(MAX_PENDING), 0).map(|r| r.id().to_owned()), Some("r0".to_owned()));
        assert_eq!(s.pending(), MAX_PENDING);
    }

    #[test]
    fn a_batch_carries_records_and_closes_apart() {
        let items = [rec(0), close(1), rec(1)];
        let batch = batch_of(&items);
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.closes.len(), 1);
        let text = serde_json::to_string(&items[1]).unwrap();
        assert_eq!(serde_json::from_str::<Item>(&text).unwrap(), items[1]);
    }

    #[test]
    fn a_rejected_batch_is_split_until_the_bad_record_is_alone_and_dropped() {
        let mut s = Settler::new(8);
        for i in 0..8 {
            s.push(rec(i), 0);
        }
        let bad = "r5";
        let mut sent = Vec::new();
        let mut dropped = Vec::new();
        for _ in 0..20 {
            let Some(batch) = s.next_records(0) else { break };
            if ids(&batch).contains(&bad) {
                // Rejected as a whole, no backoff: it is the batch, not the sidecar.
                dropped.extend(s.rejected(LaneKind::Records).map(|r| r.id().to_owned()));
            } else {
                sent.extend(s.records_sent(&[], 0).into_iter().map(|r| r.request_id));
            }
        }
        assert_eq!(dropped, [bad]);
        assert_eq!(sent.len(), 7, "every other record was sent: {sent:?}");
        assert_eq!(s.pending(), 0);
        // Back to full batches afterwards.
        for i in 0..8 {
            s.push(rec(i), 0);
        }
        assert_eq!(s.next_records(0).map(|b| b.len()), Some(8));
    }

    #[test]
    fn backoff_is_capped() {
        let mut s = Settler::new(1);
        s.push(rec(0), 0);
        let mut now = 0;
        for _ in 0..20 {
            s.next_records(now);
            s.failed(LaneKind::Records, now);
            now += MAX_BACKOFF_MS;
        }
        assert!(s.next_records(now).is_some());
    }
}
