//! What each step of a request costs inside the filter, for `make bench`'s
//! itemised table. Built only with the cargo feature `itemise`: each step is
//! timed with the monotonic clock and summed per VM; the root adds the sums
//! to Envoy counters (`wasmcustom.openclaw_bridge_step_<name>_ns` and `_n`)
//! on its tick. Without the feature [`time`] is the call itself.

/// A timed step. Steps nest where one calls the next (`Admit` holds `Reencode`);
/// the callbacks' totals hold every step within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `on_http_request_headers`, whole: route, key, its hash, the request id, header edits.
    RequestHeaders,
    /// `on_http_request_body`, whole (the call that ends the body).
    RequestBody,
    /// Copying the body out of Envoy.
    BodyCopy,
    /// Parsing and checking the body, the estimate and the rewrite.
    Admit,
    /// Of `Admit`: encoding the rewritten body.
    Reencode,
    /// Handing the rewritten body and the upstream's headers to Envoy.
    Upstream,
    /// The draw from the key's lease slot (read, decide, compare-and-swap).
    Draw,
    /// `on_http_response_headers`, whole.
    ResponseHeaders,
    /// `on_http_response_body`, whole: the copy of each chunk and the meter.
    ResponseBody,
    /// `on_log`, whole: the charge and the settlement record.
    Log,
    /// The root's tick and its replies, whole: batches, sweeps, renewals.
    Root,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::RequestHeaders,
        Step::RequestBody,
        Step::BodyCopy,
        Step::Admit,
        Step::Reencode,
        Step::Upstream,
        Step::Draw,
        Step::ResponseHeaders,
        Step::ResponseBody,
        Step::Log,
        Step::Root,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::RequestHeaders => "request_headers",
            Step::RequestBody => "request_body",
            Step::BodyCopy => "body_copy",
            Step::Admit => "admit",
            Step::Reencode => "reencode",
            Step::Upstream => "upstream",
            Step::Draw => "draw",
            Step::ResponseHeaders => "response_headers",
            Step::ResponseBody => "response_body",
            Step::Log => "log",
            Step::Root => "root",
        }
    }
}

#[cfg(feature = "itemise")]
mod on {
    use std::cell::RefCell;
    use std::time::Instant;

    use super::Step;

    thread_local! {
        static TOTALS: RefCell<[(u64, u64); Step::ALL.len()]> = const { RefCell::new([(0, 0); Step::ALL.len()]) };
    }

    pub fn time<T>(step: Step, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        TOTALS.with(|t| {
            let mut t = t.borrow_mut();
            let slot = &mut t[step as usize];
            slot.0 += ns;
            slot.1 += 1;
        });
        out
    }

    /// The sums since the last call: (step, nanoseconds, times), and resets them.
    pub fn take() -> Vec<(Step, u64, u64)> {
        TOTALS.with(|t| {
            let taken = std::mem::replace(&mut *t.borrow_mut(), [(0, 0); Step::ALL.len()]);
            Step::ALL.iter().map(|s| (*s, taken[*s as usize].0, taken[*s as usize].1)).collect()
        })
    }
}

#[cfg(feature = "itemise")]
pub use on::{take, time};

/// Without the feature: the step itself, nothing measured.
#[cfg(not(feature = "itemise"))]
#[inline(always)]
pub fn time<T>(_step: Step, f: impl FnOnce() -> T) -> T {
    f()
}

#[cfg(all(test, feature = "itemise"))]
mod tests {
    use super::*;

    #[test]
    fn a_timed_step_is_counted_once_with_its_time() {
        take();
        let v = time(Step::Admit, || {
            std::thread::sleep(std::time::Duration::from_millis(2));
            7
        });
        assert_eq!(v, 7);
        let sums = take();
        let (_, ns, n) = sums.iter().find(|(s, _, _)| *s == Step::Admit).copied().unwrap();
        assert_eq!(n, 1);
        assert!(ns >= 2_000_000, "{ns}");
        assert!(take().iter().all(|(_, ns, n)| *ns == 0 && *n == 0), "taken sums reset");
    }
}
