//! The gateway's Envoy filter. Everything that decides something lives in
//! plain Rust modules that build and test natively; `plugin` (wasm only) is the
//! thin layer that talks to Envoy through `proxy-wasm` host calls.

pub mod background;
pub mod body;
pub mod catalog;
pub mod config;
pub mod exchange;
pub mod host;
pub mod itemise;
pub mod lease;
pub mod metrics;
pub mod owners;
pub mod policy;
pub mod rate;
pub mod reply;
pub mod request;
pub mod response;
pub mod route;
pub mod settle;
pub mod slot;
pub mod sse;
pub mod tokens;

#[cfg(test)]
mod fake;

// Not in test builds: a wasm test binary runs under plain WASI, without Envoy.
#[cfg(all(target_arch = "wasm32", not(test)))]
mod plugin;

use bridge_protocol::UsageSource;

use crate::config::Encoding;
use crate::response::ResponseMeter;

/// Name of the Envoy shared queue that carries background lease requests from
/// requests (which may be gone before a reply) to the root contexts.
pub const LEASE_QUEUE: &str = "openclaw_bridge_lease_requests";

/// Tokens to charge for a forwarded request, and where the numbers came from:
/// the upstream's `usage` when it sent one; nothing for an upstream HTTP error
/// without usage (the upstream bills no failed request); otherwise tiktoken over
/// the prompt and whatever output reached the filter (a client abort, a
/// truncated stream, an upstream that never reports usage).
pub fn charge(
    meter: Option<&ResponseMeter>,
    status: u32,
    request_body: &[u8],
    encoding: Encoding,
) -> (i64, i64, UsageSource) {
    if let Some(u) = meter.and_then(ResponseMeter::usage) {
        return (u.input, u.output, UsageSource::Upstream);
    }
    if status >= 400 {
        return (0, 0, UsageSource::Upstream);
    }
    let output = meter.map_or(0, |m| m.output_tokens(encoding));
    (tokens::count_prompt(encoding, request_body), output, UsageSource::Tiktoken)
}

/// What a request is charged, by the policy that never charges less than the
/// upstream bills: as [`charge`], except that a model that reasons
/// (`reasoning_hold` is its hold) pays its hold when no usage arrived. Its
/// reasoning tokens are billed but never streamed, so tiktoken would count
/// them as 0; the hold bounds what it can bill, since its output is capped by
/// the hold. The input stays tiktoken's count, the output is the rest of the
/// hold (never less than the text seen), and the source says `estimate`.
pub fn charge_without_usage(
    meter: Option<&ResponseMeter>,
    status: u32,
    request_body: &[u8],
    encoding: Encoding,
    reasoning_hold: Option<i64>,
) -> (i64, i64, UsageSource) {
    match (charge(meter, status, request_body, encoding), reasoning_hold) {
        ((input, output, UsageSource::Tiktoken), Some(hold)) => {
            (input, hold.saturating_sub(input).max(output), UsageSource::Estimate)
        }
        (decided, _) => decided,
    }
}

/// Random bytes drawn from the host at a time: one host call for 64 ids.
const RANDOM_POOL: usize = 64 * 16;

thread_local! {
    static POOL: std::cell::RefCell<([u8; RANDOM_POOL], usize)> =
        const { std::cell::RefCell::new(([0; RANDOM_POOL], RANDOM_POOL)) };
}

/// A request id nobody can choose: 128 random bits in hex. Client-supplied ids
/// (`x-request-id`) are not trusted, as they key the audit rows. The bits
/// come from a pool the host fills 64 ids at a time.
pub fn new_request_id() -> Option<String> {
    let bytes: [u8; 16] = POOL.with(|pool| {
        let (pool, used) = &mut *pool.borrow_mut();
        if *used == RANDOM_POOL {
            getrandom::fill(pool).ok()?;
            *used = 0;
        }
        let id = pool[*used..*used + 16].try_into().ok()?;
        // Used bits are not kept.
        pool[*used..*used + 16].fill(0);
        *used += 16;
        Some(id)
    })?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in bytes {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::Forward;

    const BODY: &[u8] = br#"{"messages":[{"role":"user","content":"hello world"}]}"#;

    #[test]
    fn upstream_usage_wins() {
        let mut m = ResponseMeter::new(false, false);
        assert_eq!(
            m.on_chunk(br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#),
            Forward::Unchanged
        );
        m.on_end();
        assert_eq!(charge(Some(&m), 200, BODY, Encoding::Cl100kBase), (5, 9, UsageSource::Upstream));
    }

    #[test]
    fn an_upstream_error_without_usage_costs_nothing() {
        let mut m = ResponseMeter::new(false, false);
        m.on_chunk(br#"{"error":{"message":"bad"}}"#);
        m.on_end();
        assert_eq!(charge(Some(&m), 400, BODY, Encoding::Cl100kBase), (0, 0, UsageSource::Upstream));
    }

    #[test]
    fn without_usage_tiktoken_counts_prompt_and_output() {
        let mut m = ResponseMeter::new(true, true);
        m.on_chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n");
        let (input, output, source) = charge(Some(&m), 200, BODY, Encoding::Cl100kBase);
        assert_eq!(source, UsageSource::Tiktoken);
        assert_eq!(input, tokens::count_prompt(Encoding::Cl100kBase, BODY));
        assert_eq!(output, 2);
        // A client that left before any answer still pays for the prompt.
        assert_eq!(charge(None, 0, BODY, Encoding::Cl100kBase).0, input);
    }

    #[test]
    fn a_model_that_reasons_pays_its_hold_when_no_usage_arrives() {
        let mut m = ResponseMeter::new(true, true);
        m.on_chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n");
        let (input, output, source) = charge_without_usage(Some(&m), 200, BODY, Encoding::Cl100kBase, Some(5_000));
        assert_eq!(source, UsageSource::Estimate);
        assert_eq!((input, input + output), (tokens::count_prompt(Encoding::Cl100kBase, BODY), 5_000));
        // Never less than what was seen, even past a (too small) hold.
        let (_, output, _) = charge_without_usage(Some(&m), 200, BODY, Encoding::Cl100kBase, Some(1));
        assert_eq!(output, 2);
        // Usage, or an upstream error, decide as before; so does a model that does not reason.
        let mut exact = ResponseMeter::new(false, false);
        exact.on_chunk(br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#);
        exact.on_end();
        assert_eq!(
            charge_without_usage(Some(&exact), 200, BODY, Encoding::Cl100kBase, Some(5_000)),
            (5, 9, UsageSource::Upstream)
        );
        assert_eq!(
            charge_without_usage(None, 502, BODY, Encoding::Cl100kBase, Some(5_000)),
            (0, 0, UsageSource::Upstream)
        );
        assert_eq!(
            charge_without_usage(Some(&m), 200, BODY, Encoding::Cl100kBase, None),
            charge(Some(&m), 200, BODY, Encoding::Cl100kBase)
        );
    }

    #[test]
    fn request_ids_are_random_hex() {
        let a = new_request_id().unwrap();
        assert_eq!(a.len(), 32);
        assert!(bridge_protocol::valid_request_id(&a));
        assert_ne!(Some(a), new_request_id());
        // Past one pool's worth, still all different.
        let ids: std::collections::HashSet<String> = (0..300).filter_map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 300);
    }
}
