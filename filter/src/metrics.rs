//! The filter's own metrics, shown by Envoy under `wasmcustom.` (in
//! `/stats/prometheus` as `envoy_wasmcustom_openclaw_bridge_...`): what the
//! leases do, so that an operator sees waits, fallbacks and fetch times.
//! Counters and histograms are per Envoy (summed over its VMs); none has a
//! per-key label.

/// One of the filter's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Leases asked for by a request that waits for them.
    LeaseFetches,
    /// Leases asked for in the background, before the current one runs out.
    LeaseRenewals,
    /// Tokens granted into leases.
    LeaseTokensGranted,
    /// Leases recalled by the sidecar (another gateway needed the balance).
    LeaseRecalls,
    /// Requests that waited for their key's lease.
    LeaseWaits,
    /// Requests answered 503 because the gateway shed load (waited too long,
    /// too many waiting, too many admission calls in flight, settlement
    /// too far behind).
    Shed,
    /// Requests reserved on their own (leases off, a slot another key holds,
    /// a lost compare-and-swap).
    Reservations,
    /// Histogram: tokens of each lease granted.
    LeaseSize,
    /// Histogram: milliseconds from a lease ask to its answer.
    LeaseFetchMs,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::LeaseFetches,
        Metric::LeaseRenewals,
        Metric::LeaseTokensGranted,
        Metric::LeaseRecalls,
        Metric::LeaseWaits,
        Metric::Shed,
        Metric::Reservations,
        Metric::LeaseSize,
        Metric::LeaseFetchMs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::LeaseFetches => "openclaw_bridge_lease_fetches",
            Metric::LeaseRenewals => "openclaw_bridge_lease_renewals",
            Metric::LeaseTokensGranted => "openclaw_bridge_lease_tokens_granted",
            Metric::LeaseRecalls => "openclaw_bridge_lease_recalls",
            Metric::LeaseWaits => "openclaw_bridge_lease_waits",
            Metric::Shed => "openclaw_bridge_shed",
            Metric::Reservations => "openclaw_bridge_reservations",
            Metric::LeaseSize => "openclaw_bridge_lease_size_tokens",
            Metric::LeaseFetchMs => "openclaw_bridge_lease_fetch_ms",
        }
    }

    pub fn is_histogram(self) -> bool {
        matches!(self, Metric::LeaseSize | Metric::LeaseFetchMs)
    }

    pub fn index(self) -> usize {
        Metric::ALL.iter().position(|m| *m == self).unwrap_or(0)
    }
}

/// One of the filter's gauges, each a sum over the Envoy's VMs (one per
/// worker): a VM adds the change of its own value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Gauge {
    /// Records and lease closes not yet settled, plus live leases (each a
    /// close still to send): 0 when an Envoy can stop without loss.
    Pending,
    /// Records not yet settled: the backlog `settle_backlog_max` bounds.
    Backlog,
    /// Milliseconds the oldest unsettled record has waited (with several
    /// workers, the sum of each VM's oldest: at most workers times the oldest).
    OldestMs,
}

impl Gauge {
    pub const ALL: [Gauge; 3] = [Gauge::Pending, Gauge::Backlog, Gauge::OldestMs];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::Pending => "openclaw_bridge_pending_settlements",
            Gauge::Backlog => "openclaw_bridge_settle_backlog",
            Gauge::OldestMs => "openclaw_bridge_settle_oldest_ms",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A lease of `tokens` granted `took_ms` after it was asked for.
pub fn granted(host: &impl crate::host::Host, tokens: i64, took_ms: u64) {
    let tokens = u64::try_from(tokens).unwrap_or(0);
    host.metric(Metric::LeaseTokensGranted, tokens);
    host.metric(Metric::LeaseSize, tokens);
    host.metric(Metric::LeaseFetchMs, took_ms);
}
