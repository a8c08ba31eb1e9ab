//! `GET /admin/metrics`: the sidecar's metrics in the Prometheus text format
//! (admin token). Token usage is named after the OpenTelemetry `gen_ai`
//! conventions (`gen_ai_client_token_usage`, by `gen_ai_request_model` and
//! `gen_ai_token_type`); no label names a key (per key is `/admin/usage`'s).
//! A client picks the `model` it sends, so at most [`MAX_MODELS`] model
//! labels are kept; the rest count as `other`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Model label values kept; later ones are `other`.
pub const MAX_MODELS: usize = 64;

/// Upper bounds (seconds) of the ledger latency histogram.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// (model, token type) -> tokens.
    tokens: BTreeMap<(String, &'static str), u64>,
    /// (model, status code) -> requests settled.
    requests: BTreeMap<(String, u16), u64>,
    /// reason -> refusals.
    refusals: BTreeMap<&'static str, u64>,
    /// outcome -> settlement records.
    outcomes: BTreeMap<&'static str, u64>,
    batches: u64,
    /// operation -> latency.
    ledger: BTreeMap<&'static str, Histogram>,
    expired_charged: u64,
    models: usize,
}

/// The sidecar's counters, shared by its handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// A settled request of `model` that ended with `status` and used these tokens.
    pub fn settled(&self, model: &str, status: u16, input: i64, output: i64) {
        self.with(|m| {
            let model = m.model_label(model);
            *m.tokens.entry((model.clone(), "input")).or_default() += u64::try_from(input).unwrap_or(0);
            *m.tokens.entry((model.clone(), "output")).or_default() += u64::try_from(output).unwrap_or(0);
            *m.requests.entry((model, status)).or_default() += 1;
        });
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.with(|m| *m.outcomes.entry(outcome).or_default() += 1);
    }

    pub fn batch(&self) {
        self.with(|m| m.batches += 1);
    }

    pub fn refused(&self, reason: &'static str) {
        self.with(|m| *m.refusals.entry(reason).or_default() += 1);
    }

    pub fn ledger(&self, op: &'static str, took: Duration) {
        let secs = took.as_secs_f64();
        self.with(|m| {
            let h = m.ledger.entry(op).or_default();
            for (i, bound) in BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    h.counts[i] += 1;
                }
            }
            h.sum += secs;
            h.n += 1;
        });
    }

    pub fn expired(&self, n: usize) {
        self.with(|m| m.expired_charged += n as u64);
    }

    /// The text format, with the gauges read at scrape time (open leases and holds).
    pub fn render(&self, open_leases: i64, open_holds: i64) -> String {
        self.with(|m| {
            let mut out = String::new();
            family(
                &mut out,
                "gen_ai_client_token_usage",
                "counter",
                "Tokens of settled requests, by model and token type.",
            );
            for ((model, kind), n) in &m.tokens {
                let _ = writeln!(
                    out,
                    "gen_ai_client_token_usage_total{{gen_ai_request_model=\"{}\",gen_ai_token_type=\"{kind}\"}} {n}",
                    escape(model)
                );
            }
            family(&mut out, "openclaw_bridge_requests", "counter", "Settled requests, by model and HTTP status.");
            for ((model, status), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "openclaw_bridge_requests_total{{gen_ai_request_model=\"{}\",status_code=\"{status}\"}} {n}",
                    escape(model)
                );
            }
            family(&mut out, "openclaw_bridge_refusals", "counter", "Reservations and leases refused, by reason.");
            for (reason, n) in &m.refusals {
                let _ = writeln!(out, "openclaw_bridge_refusals_total{{reason=\"{reason}\"}} {n}");
            }
            family(&mut out, "openclaw_bridge_settlement_batches", "counter", "Settlement batches taken.");
            let _ = writeln!(out, "openclaw_bridge_settlement_batches_total {}", m.batches);
            family(&mut out, "openclaw_bridge_settlement_records", "counter", "Settlement records, by outcome.");
            for (outcome, n) in &m.outcomes {
                let _ = writeln!(out, "openclaw_bridge_settlement_records_total{{outcome=\"{outcome}\"}} {n}");
            }
            family(&mut out, "openclaw_bridge_ledger_seconds", "histogram", "Latency of ledger operations.");
            for (op, h) in &m.ledger {
                for (bound, count) in BUCKETS.iter().zip(h.counts) {
                    let _ =
                        writeln!(out, "openclaw_bridge_ledger_seconds_bucket{{op=\"{op}\",le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "openclaw_bridge_ledger_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {}", h.n);
                let _ = writeln!(out, "openclaw_bridge_ledger_seconds_sum{{op=\"{op}\"}} {}", h.sum);
                let _ = writeln!(out, "openclaw_bridge_ledger_seconds_count{{op=\"{op}\"}} {}", h.n);
            }
            family(&mut out, "openclaw_bridge_expired_charged", "counter", "Holds and leases charged at expiry.");
            let _ = writeln!(out, "openclaw_bridge_expired_charged_total {}", m.expired_charged);
            family(&mut out, "openclaw_bridge_open_leases", "gauge", "Leases open in the ledger.");
            let _ = writeln!(out, "openclaw_bridge_open_leases {open_leases}");
            family(&mut out, "openclaw_bridge_open_holds", "gauge", "Reservations held in the ledger.");
            let _ = writeln!(out, "openclaw_bridge_open_holds {open_holds}");
            out
        })
    }
}

impl Inner {
    fn model_label(&mut self, model: &str) -> String {
        let known = self.tokens.keys().any(|(m, _)| m == model);
        if known {
            return model.to_owned();
        }
        if self.models >= MAX_MODELS {
            return "other".to_owned();
        }
        self.models += 1;
        model.to_owned()
    }
}

/// A metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded_and_escaped() {
        let m = Metrics::default();
        for i in 0..(MAX_MODELS + 10) {
            m.settled(&format!("model-{i}"), 200, 1, 1);
        }
        m.settled("we\"ird", 200, 1, 1);
        let text = m.render(0, 0);
        let models: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_client_token_usage_total"))
            .filter_map(|l| l.split("gen_ai_request_model=\"").nth(1)?.split("\",").next())
            .collect();
        assert_eq!(models.len(), MAX_MODELS + 1, "the first {MAX_MODELS} and other");
        assert!(text.contains("gen_ai_request_model=\"other\",gen_ai_token_type=\"input\"} 11"), "{text}");
    }
}
