//! What the root context and the requests of one VM share: the settlement
//! queue, the leases it installed, the wait list, the admission calls in
//! flight and who made them, and the requests drawn from each lease.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use bridge_protocol::SettleRecord;
use log::error;

use crate::settle::{Item, Settler};

/// What the root and the requests of one VM share. They run on one thread,
/// so plain shared values serve: an Envoy shared queue would cost a copy, a
/// serialization and a cross-thread wake-up per request.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Records and lease closes waiting to be sent.
    pub settler: Rc<RefCell<Settler>>,
    /// Slots of the leases this VM installed, for the root's sweep.
    pub leases: Rc<RefCell<BTreeSet<String>>>,
    /// Requests waiting for their key's lease, and who is to look again.
    pub waits: Rc<RefCell<Waits>>,
    /// Admission calls in flight (see [`CallPermit`]).
    calls: Rc<Cell<usize>>,
    /// Which request made each admission call in flight, by callout token.
    /// The SDK hands a reply to the context whose callback made the call,
    /// which for a request woken from its wait is the root: the root passes
    /// the reply on to the request by this.
    callers: Rc<RefCell<HashMap<u32, u32>>>,
    /// Requests drawn from each lease not yet settled (in flight, or their
    /// records queued): lease id -> (key hash, count).
    in_flight: Rc<RefCell<HashMap<String, (String, i64)>>>,
    /// Bytes of bodies held for requests not yet admitted (see [`BodyBytes`]).
    unadmitted: Rc<Cell<usize>>,
}

/// The body bytes one request holds before its admission, counted in its
/// VM's total while it lives.
#[derive(Debug)]
pub struct BodyBytes {
    total: Rc<Cell<usize>>,
    n: usize,
}

impl BodyBytes {
    /// The request now holds `n` bytes: `false` (and nothing counted) when
    /// that would take the VM's total past `max`.
    pub fn grow_to(&mut self, n: usize, max: usize) -> bool {
        let others = self.total.get().saturating_sub(self.n);
        if n > self.n && others.saturating_add(n) > max {
            return false;
        }
        self.total.set(others + n);
        self.n = n;
        true
    }
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        self.total.set(self.total.get().saturating_sub(self.n));
    }
}

/// The requests of one VM waiting for a lease that another request (or the
/// root) is fetching: context id and the slot it waits on. A slot that
/// changes wakes its waiters; the root's tick wakes all of them, for a lease
/// another VM installed and for those that waited too long.
#[derive(Debug, Default)]
pub struct Waits {
    waiting: Vec<(u32, String)>,
    woken: Vec<u32>,
}

impl Waits {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn add(&mut self, context_id: u32, slot: String) {
        self.waiting.push((context_id, slot));
    }

    /// The request left while it waited.
    pub fn forget(&mut self, context_id: u32) {
        self.waiting.retain(|(id, _)| *id != context_id);
        self.woken.retain(|id| *id != context_id);
    }

    /// Wakes the requests waiting on `slot`.
    pub fn wake(&mut self, slot: &str) {
        let (woken, still): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(_, s)| s == slot);
        self.waiting = still;
        self.woken.extend(woken.into_iter().map(|(id, _)| id));
    }

    pub fn wake_all(&mut self) {
        let all = std::mem::take(&mut self.waiting);
        self.woken.extend(all.into_iter().map(|(id, _)| id));
    }

    pub fn has_woken(&self) -> bool {
        !self.woken.is_empty()
    }

    /// The requests to look at their slot again, taken out.
    pub fn take_woken(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.woken)
    }
}

/// One admission call in flight, counted while it lives.
#[derive(Debug)]
pub struct CallPermit(Rc<Cell<usize>>);

impl Drop for CallPermit {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl Vm {
    pub fn new(batch_max: usize) -> Self {
        Self {
            settler: Rc::new(RefCell::new(Settler::new(batch_max))),
            leases: Rc::default(),
            waits: Rc::default(),
            calls: Rc::default(),
            callers: Rc::default(),
            in_flight: Rc::default(),
            unadmitted: Rc::default(),
        }
    }

    /// A counter of one request's body bytes before admission.
    pub fn body_bytes(&self) -> BodyBytes {
        BodyBytes { total: self.unadmitted.clone(), n: 0 }
    }

    /// Bytes of bodies this VM holds for requests not yet admitted.
    pub fn unadmitted_bytes(&self) -> usize {
        self.unadmitted.get()
    }

    /// The leases (id, key hash) that requests in flight were drawn from.
    pub fn drawn_leases(&self) -> Vec<(String, String)> {
        self.in_flight.borrow().iter().map(|(id, (hash, _))| (id.clone(), hash.clone())).collect()
    }

    /// One more (`delta` 1) or one fewer (-1) request drawn from `lease_id` in flight.
    pub fn drawn_in_flight(&self, lease_id: &str, key_hash: &str, delta: i64) {
        let mut all = self.in_flight.borrow_mut();
        let n = {
            let entry = all.entry(lease_id.to_owned()).or_insert_with(|| (key_hash.to_owned(), 0));
            entry.1 += delta;
            entry.1
        };
        if n <= 0 {
            all.remove(lease_id);
        }
    }

    /// Request `context_id` made the call `token`.
    pub fn called(&self, token: u32, context_id: u32) {
        self.callers.borrow_mut().insert(token, context_id);
    }

    /// The request that made call `token`, if a request did; forgotten now
    /// (a reply comes once).
    pub fn caller_of(&self, token: u32) -> Option<u32> {
        self.callers.borrow_mut().remove(&token)
    }

    /// A permit for one more admission call, if fewer than `max` are in flight.
    pub fn call_permit(&self, max: usize) -> Option<CallPermit> {
        let n = self.calls.get();
        (n < max).then(|| {
            self.calls.set(n + 1);
            CallPermit(self.calls.clone())
        })
    }

    /// Wakes this VM's requests waiting on `slot`.
    pub fn wake(&self, slot: &str) {
        self.waits.borrow_mut().wake(slot);
    }

    /// Queues an item at `now_ms`; logs the oldest if it had to make room for it.
    pub fn keep(&self, item: Item, now_ms: u64, context_id: u32) {
        let dropped = self.settler.borrow_mut().push(item, now_ms);
        if let Some(old) = dropped {
            error!("[{context_id}] settlement queue full: {} dropped; its hold will be charged at expiry", old.id());
            if let Item::Settle(record) = &old {
                self.record_done(record);
            }
        }
    }

    /// `record` left the queue for good (settled, or given up): its lease,
    /// if it was drawn from one, no longer waits on it. Until then the root
    /// keeps reporting the lease, so the sidecar never takes it for lost
    /// while the record is on its way.
    pub fn record_done(&self, record: &SettleRecord) {
        if let Some(lease_id) = &record.lease_id {
            self.drawn_in_flight(lease_id, &record.key_hash, -1);
        }
    }

    /// Records not yet settled plus live leases (each a close still to send).
    pub fn pending(&self) -> usize {
        self.settler.borrow().pending() + self.leases.borrow().len()
    }
}
