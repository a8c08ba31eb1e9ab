//! The contract between the Envoy filter and the billing sidecar.
//!
//! Both sides compile these types, so the JSON shapes of `/internal/reserve` and
//! `/internal/settle` are defined exactly once. The OpenAI error object lives here
//! too, because the sidecar writes refusals that the filter relays verbatim.
//!
//! Unknown fields are ignored, never refused: in a rolling upgrade a filter
//! one release ahead may send a field its sidecar does not know yet (and the
//! other way round), and a refused settlement batch would be retried forever.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Path of the reservation call (the balance precheck).
pub const RESERVE_PATH: &str = "/internal/reserve";
/// Path of the batched settlement call.
pub const SETTLE_PATH: &str = "/internal/settle";
/// Path of the lease call: tokens taken from a key's balance in advance, which
/// the filter hands out to that key's requests without a call each.
pub const LEASE_PATH: &str = "/internal/lease";
/// Which model a key's stored response was made on, if the key made it.
pub const OWNER_PATH: &str = "/internal/response_owner";

/// Whose is a response stored upstream: asked before a `GET`/`DELETE
/// /v1/responses/{id}` is let through, since every key's responses are
/// stored under the operator's one upstream key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRequest {
    pub key_hash: String,
    pub response_id: String,
}

/// The model the response was made on, or `None`: not this key's (or unknown).
/// `refused`: the key may not be used at all (unknown, frozen, expired) or
/// not on that model, with the status and words the client gets, as on
/// every other endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReply {
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<OwnerRefusal>,
}

/// A secret that never prints itself: `Debug` and `Display` show
/// `[redacted]`. Read from configuration as a plain string; `expose` is the
/// only way to the value, so its call sites are easy to audit.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRefusal {
    pub status: u16,
    pub error: ErrorBody,
}
/// Header carrying the optional shared secret of the internal API.
pub const INTERNAL_TOKEN_HEADER: &str = "x-bridge-internal-token";
/// Most records one settlement batch may carry; the filter never sends more.
pub const MAX_SETTLE_BATCH: usize = 500;
/// Longest `model` a request may name: it goes into every record of the
/// request, so the filter refuses longer ones at admission (a record of a
/// few hundred bytes keeps a full batch far below the sidecar's body limit).
pub const MAX_MODEL_LEN: usize = 256;

/// SHA-256 of a user key, lower-case hex. Keys are stored and looked up only by
/// this digest, so the plain key never leaves the filter.
pub fn key_hash(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

/// A request id becomes a field name inside the key's MongoDB document, so it is
/// limited to characters that cannot form an operator or a dotted path.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `true` when `s` looks like a SHA-256 hex digest as produced by [`key_hash`].
pub fn valid_key_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The OpenAI error object: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Envelope around [`ErrorBody`], exactly as OpenAI clients parse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

impl ErrorEnvelope {
    pub fn new(message: impl Into<String>, kind: &str, param: Option<&str>, code: Option<&str>) -> Self {
        Self {
            error: ErrorBody {
                message: message.into(),
                kind: kind.to_owned(),
                param: param.map(str::to_owned),
                code: code.map(str::to_owned),
            },
        }
    }

    /// Serialized form; a struct of strings always serializes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Hold `estimate` tokens of the key's balance for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    pub key_hash: String,
    pub request_id: String,
    pub model: String,
    pub estimate: i64,
}

/// The sidecar's answer to a reservation. A refusal is a normal 200 reply carrying
/// the status and error the client must see; any non-200 reply means the sidecar
/// failed, which the filter must never turn into a 401 or 429.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum ReserveReply {
    Admit {
        balance_tokens: i64,
        /// The key's controls: with reservations only (no leases), the
        /// filter counts the key's rate limits by these from then on.
        #[serde(default)]
        policy: KeyPolicy,
    },
    Refuse {
        status: u16,
        error: ErrorBody,
    },
    /// Not now: the balance the request needs is in other gateways' leases,
    /// which the sidecar recalled. The request waits a moment and asks again.
    Retry,
}

/// Take up to `want` tokens (at least `min`) of the key's balance into lease
/// `lease_id`. The filter draws request estimates from it for a short window
/// and then closes it with what was drawn; each drawn request still settles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub key_hash: String,
    pub lease_id: String,
    pub model: String,
    pub want: i64,
    pub min: i64,
    /// The expired or spent lease this one replaces, closed first: its undrawn
    /// tokens are back in the balance before the new lease is taken from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<LeaseClose>,
}

/// The sidecar's answer to a lease: `tokens` granted (between `min` and
/// `want`), or the refusal the client must see, as for a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum LeaseReply {
    Grant {
        tokens: i64,
        balance_tokens: i64,
        /// What the key may do, for the filter to check on every draw.
        #[serde(default)]
        policy: KeyPolicy,
    },
    Refuse {
        status: u16,
        error: ErrorBody,
    },
    /// No lease now (the balance the request needs is in other gateways'
    /// leases, which the sidecar recalled, or it moved under every attempt):
    /// the request waits a moment and asks again. Never a reason to refuse a
    /// client.
    Retry,
}

/// A key's controls that a lease's draws must obey: the models it may use
/// (`None`: any), when it expires (ms since the epoch; `None`: never) and its
/// rate limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// Requests a minute this gateway admits for the key at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm_limit: Option<i64>,
    /// Tokens a minute (at the requests' estimates) this gateway admits for the key at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_limit: Option<i64>,
}

impl KeyPolicy {
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|m| m.iter().any(|a| a == model))
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| i64::try_from(now_ms).unwrap_or(i64::MAX) >= at)
    }
}

/// The end of a lease's draw window: `drawn_tokens` of its `tokens` went to
/// `drawn_n` requests; the rest returns to the balance. `tokens: None` is a
/// release: the grant never reached the filter, so nothing was drawn, and a
/// grant still on its way must be refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseClose {
    pub key_hash: String,
    pub lease_id: String,
    pub tokens: Option<i64>,
    pub drawn_tokens: i64,
    pub drawn_n: i64,
}

impl LeaseClose {
    /// The release of a lease whose grant the filter never saw.
    pub fn release(key_hash: String, lease_id: String) -> Self {
        Self { key_hash, lease_id, tokens: None, drawn_tokens: 0, drawn_n: 0 }
    }
}

/// Where the token counts of a settlement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The `usage` object the upstream reported: exact, includes reasoning tokens.
    Upstream,
    /// Counted by the filter with tiktoken because no usage arrived.
    Tiktoken,
    /// The reserved estimate, charged when a hold expired unsettled.
    Estimate,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Tiktoken => "tiktoken",
            UsageSource::Estimate => "estimate",
        }
    }
}

/// What one admitted request consumed, sent by the filter after the request ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleRecord {
    pub request_id: String,
    pub key_hash: String,
    pub model: String,
    /// Tokens the reservation held; the sidecar refunds or debits the difference.
    pub reserved: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub usage_source: UsageSource,
    pub duration_ms: i64,
    pub status_code: u16,
    pub stream: bool,
    /// Admitted without a hold because the sidecar was unreachable and the
    /// plugin's failure mode is `allow`.
    #[serde(default)]
    pub unreserved: bool,
    /// The client was refused after a reservation whose reply never came: undo
    /// the hold if it was made, and refuse it if it is made later.
    #[serde(default)]
    pub release: bool,
    /// The lease the estimate was drawn from, instead of a hold of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// What a newer filter says of the usage and where it went.
    #[serde(flatten)]
    pub detail: RecordDetail,
}

/// The parts of a settlement record beyond the seed's counts (all optional
/// on the wire: an older filter sends none of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordDetail {
    /// Of `input_tokens`, those the upstream read from its prompt cache.
    #[serde(default)]
    pub cached_tokens: i64,
    /// Of `output_tokens`, those spent reasoning.
    #[serde(default)]
    pub reasoning_tokens: i64,
    /// What leaves the balance: the tokens weighted by the model's prices
    /// (`None`: unweighted, `input_tokens + output_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged_tokens: Option<i64>,
    /// `chat`, `responses` or `embeddings` (absent from older filters: chat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The id of the response the upstream stored (the Responses API), which
    /// only this key may read or delete afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    /// The deployment (or upstream model) the catalog sent it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The upstream host (address) that answered: which one of a pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl SettleRecord {
    /// What leaves the balance for this record.
    pub fn charge(&self) -> i64 {
        self.detail.charged_tokens.unwrap_or(self.input_tokens.saturating_add(self.output_tokens))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleBatch {
    pub records: Vec<SettleRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closes: Vec<LeaseClose>,
    /// The draws so far of the leases the gateway still draws from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<LeaseProgress>,
    /// The cursor of the last reply's key changes: the reply names the keys
    /// changed since (`SettleReply::changed`). `None`: only a cursor back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes_since: Option<i64>,
}

/// A key an admin changed (frozen, topped up, its controls edited) at
/// `at_ms`: what a gateway holds for it (a lease, a cached refusal) was
/// decided before and goes. `at_ms` is the key's own stamp, the same on
/// every reply that names this change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    pub key_hash: String,
    pub at_ms: i64,
    /// The key was only created: no lease can predate it, but a refusal
    /// cached for its hash (an agent that tried the key before the admin
    /// made it) can, and goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
}

/// Most key changes one reply names (the rest come with the next).
pub const MAX_CHANGES: usize = 1_000;

/// The most one record may charge (a bound against a filter's arithmetic gone wrong).
pub const MAX_CHARGED_TOKENS: i64 = 1 << 50;

/// Most progress reports in one batch.
pub const MAX_PROGRESS: usize = 1_000;

/// What a gateway has drawn so far from a lease it still draws from, sent
/// with every settlement tick whose draws moved: if the gateway dies, the
/// sidecar charges these draws (at their estimates) and returns the rest,
/// instead of charging the whole lease. Counts only grow (`$max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseProgress {
    pub key_hash: String,
    pub lease_id: String,
    pub drawn_tokens: i64,
    pub drawn_n: i64,
}

impl LeaseProgress {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_record_ids("lease_id", &self.lease_id, &self.key_hash)?;
        if self.drawn_tokens < 0 || self.drawn_n < 0 {
            return invalid("drawn_tokens", "drawn_tokens and drawn_n must not be negative");
        }
        Ok(())
    }
}

/// Fate of one settlement record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleOutcome {
    /// The hold was replaced by the actual usage and the audit row written.
    Settled,
    /// This request id was settled before; nothing changed.
    AlreadySettled,
    /// The hold had expired and was charged by the sidecar; nothing changed.
    Expired,
    /// No hold and no audit row for this id under this key.
    Unknown,
    /// The record itself is malformed (bad id, negative counts, wrong hold size).
    Invalid,
    /// Not now: what it settles against is being expired (its lease's rows
    /// are being summed, or the row that charged its estimate is not written
    /// yet). The filter sends it again shortly; nothing changed.
    Later,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleResult {
    pub request_id: String,
    pub outcome: SettleOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleReply {
    pub results: Vec<SettleResult>,
    /// One per lease close, `request_id` being the lease id.
    #[serde(default)]
    pub closes: Vec<SettleResult>,
    /// Leases of the progress reports to stop drawing from and close now:
    /// recalled (another gateway needs the balance they hold) or gone
    /// (expired as lost).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recalled: Vec<String>,
    /// Keys changed since the batch's `changes_since` (see [`KeyChange`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<KeyChange>,
    /// What the next batch sends as `changes_since`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
}

/// The key from `Authorization: Bearer <key>` (or Azure-style `api-key`).
/// `None` when missing or malformed; such requests get a 401 without a callout.
pub fn client_key<'a>(authorization: Option<&'a str>, api_key: Option<&'a str>) -> Option<&'a str> {
    let key = match authorization {
        Some(value) => {
            let (scheme, rest) = value.trim().split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            rest.trim()
        }
        None => api_key?.trim(),
    };
    let well_formed = (8..=256).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    well_formed.then_some(key)
}

/// Why a message of the internal API is not acceptable: the field at fault
/// and what is wrong with it. Both the sidecar's handlers and its ledger
/// check a message with its one `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid { param, message: message.into() })
}

fn check_model(model: &str) -> Result<(), Invalid> {
    if model.len() <= MAX_MODEL_LEN {
        return Ok(());
    }
    invalid("model", format!("model must be at most {MAX_MODEL_LEN} bytes"))
}

/// The id and key hash of a settlement record or a lease close.
fn check_record_ids(param: &'static str, id: &str, key_hash: &str) -> Result<(), Invalid> {
    if !valid_request_id(id) {
        return invalid(param, format!("{param} has characters outside [A-Za-z0-9_-] or is too long"));
    }
    if !valid_key_hash(key_hash) {
        return invalid("key_hash", "key_hash is not a SHA-256 hex digest");
    }
    Ok(())
}

fn check_key_hash(key_hash: &str) -> Result<(), Invalid> {
    if valid_key_hash(key_hash) {
        return Ok(());
    }
    invalid("key_hash", "key_hash must be a SHA-256 hex digest")
}

impl ReserveRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !valid_request_id(&self.request_id) {
            return invalid("request_id", "request_id must match [A-Za-z0-9_-]{1,128}");
        }
        check_key_hash(&self.key_hash)?;
        check_model(&self.model)?;
        if self.estimate < 1 {
            return invalid("estimate", "estimate must be >= 1");
        }
        Ok(())
    }
}

impl LeaseRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !valid_request_id(&self.lease_id) {
            return invalid("lease_id", "lease_id must match [A-Za-z0-9_-]{1,128}");
        }
        check_key_hash(&self.key_hash)?;
        check_model(&self.model)?;
        if self.replaces.as_ref().is_some_and(|c| c.key_hash != self.key_hash) {
            return invalid("replaces", "replaces must name a lease of the same key");
        }
        if self.min < 1 || self.want < self.min {
            return invalid("min", "need 1 <= min <= want");
        }
        Ok(())
    }
}

/// A settlement batch as the sidecar reads it: each record and close is
/// decoded on its own, so one it cannot read is answered `invalid` alone
/// instead of failing the batch (which the filter would send again).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSettleBatch {
    #[serde(default)]
    pub records: Vec<serde_json::Value>,
    #[serde(default)]
    pub closes: Vec<serde_json::Value>,
    #[serde(default)]
    pub progress: Vec<serde_json::Value>,
    #[serde(default)]
    pub changes_since: Option<i64>,
}

impl RawSettleBatch {
    /// The batch as a whole; each record and close is checked on its own.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.records.len() + self.closes.len() > MAX_SETTLE_BATCH {
            return invalid("records", format!("at most {MAX_SETTLE_BATCH} records per batch"));
        }
        if self.progress.len() > MAX_PROGRESS {
            return invalid("progress", format!("at most {MAX_PROGRESS} progress reports per batch"));
        }
        Ok(())
    }
}

impl SettleRecord {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_record_ids("request_id", &self.request_id, &self.key_hash)?;
        check_model(&self.model)?;
        if self.input_tokens < 0 || self.output_tokens < 0 || self.reserved < 0 || self.duration_ms < 0 {
            return invalid("input_tokens", "token counts and duration must not be negative");
        }
        if self.input_tokens.checked_add(self.output_tokens).is_none() {
            return invalid("input_tokens", "token counts overflow");
        }
        if self.detail.cached_tokens < 0 || self.detail.cached_tokens > self.input_tokens {
            return invalid("cached_tokens", "cached_tokens must be between 0 and input_tokens");
        }
        if self.detail.reasoning_tokens < 0 || self.detail.reasoning_tokens > self.output_tokens {
            return invalid("reasoning_tokens", "reasoning_tokens must be between 0 and output_tokens");
        }
        if self.detail.charged_tokens.is_some_and(|c| !(0..=MAX_CHARGED_TOKENS).contains(&c)) {
            return invalid("charged_tokens", format!("charged_tokens must be 0 to {MAX_CHARGED_TOKENS}"));
        }
        if self.detail.endpoint.as_deref().is_some_and(|e| !matches!(e, "chat" | "responses" | "embeddings")) {
            return invalid("endpoint", "endpoint must be chat, responses or embeddings");
        }
        let printable = |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic());
        if self.detail.deployment.as_deref().is_some_and(|d| !printable(d, MAX_MODEL_LEN)) {
            return invalid("deployment", "deployment must be printable ASCII, at most 256 bytes");
        }
        if self.detail.upstream.as_deref().is_some_and(|u| !printable(u, 256)) {
            return invalid("upstream", "upstream must be printable ASCII, at most 256 bytes");
        }
        if self.detail.response_id.as_deref().is_some_and(|id| !valid_request_id(id)) {
            return invalid("response_id", "response_id has characters outside [A-Za-z0-9_-] or is too long");
        }
        if self.lease_id.as_deref().is_some_and(|l| !valid_request_id(l)) {
            return invalid("lease_id", "lease_id has characters outside [A-Za-z0-9_-] or is too long");
        }
        Ok(())
    }
}

impl LeaseClose {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_record_ids("lease_id", &self.lease_id, &self.key_hash)?;
        if self.drawn_tokens < 0 || self.drawn_n < 0 || self.tokens.is_some_and(|t| t < self.drawn_tokens) {
            return invalid("drawn_tokens", "drawn_tokens and drawn_n must be between 0 and the lease's tokens");
        }
        if self.tokens.is_none() && (self.drawn_tokens != 0 || self.drawn_n != 0) {
            return invalid("tokens", "a release (no tokens) cannot have drawn anything");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_newer_peer_s_extra_fields_are_tolerated_and_models_are_bounded() {
        let hash = key_hash("k");
        let text = format!(
            r#"{{"request_id":"r","key_hash":"{hash}","model":"m","reserved":1,"input_tokens":1,"output_tokens":0,
            "usage_source":"upstream","duration_ms":1,"status_code":200,"stream":false,"weights":[3]}}"#
        );
        let r: SettleRecord = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.validate(), Ok(()));
        assert_eq!((&r.detail, r.charge()), (&RecordDetail::default(), 1), "an older filter's record");
        let long = SettleRecord { model: "m".repeat(MAX_MODEL_LEN + 1), ..r.clone() };
        assert_eq!(long.validate().map_err(|e| e.param), Err("model"));
        for (bad, param) in [
            (RecordDetail { cached_tokens: 2, ..RecordDetail::default() }, "cached_tokens"),
            (RecordDetail { reasoning_tokens: 1, ..RecordDetail::default() }, "reasoning_tokens"),
            (RecordDetail { charged_tokens: Some(-1), ..RecordDetail::default() }, "charged_tokens"),
            (RecordDetail { endpoint: Some("audio".into()), ..RecordDetail::default() }, "endpoint"),
        ] {
            let bad = SettleRecord { detail: bad, ..r.clone() };
            assert_eq!(bad.validate().map_err(|e| e.param), Err(param));
        }
        let priced = SettleRecord { detail: RecordDetail { charged_tokens: Some(9), ..RecordDetail::default() }, ..r };
        assert_eq!(priced.charge(), 9);
        // On the wire the detail is flat, as before.
        let text = serde_json::to_string(&priced).unwrap_or_default();
        assert!(text.contains(r#""charged_tokens":9"#) && !text.contains("detail"), "{text}");
    }

    #[test]
    fn each_message_validates_itself() {
        let hash = key_hash("k");
        let reserve =
            ReserveRequest { key_hash: hash.clone(), request_id: "r1".into(), model: "m".into(), estimate: 1 };
        assert_eq!(reserve.validate(), Ok(()));
        let bad = ReserveRequest { estimate: 0, ..reserve.clone() };
        assert_eq!(bad.validate().map_err(|e| e.param), Err("estimate"));
        let bad = ReserveRequest { request_id: "a.b".into(), ..reserve };
        assert_eq!(bad.validate().map_err(|e| e.param), Err("request_id"));
        let close =
            LeaseClose { key_hash: hash.clone(), lease_id: "L".into(), tokens: None, drawn_tokens: 1, drawn_n: 1 };
        assert_eq!(close.validate().map_err(|e| e.param), Err("tokens"));
        let lease =
            LeaseRequest { key_hash: hash, lease_id: "L".into(), model: "m".into(), want: 5, min: 9, replaces: None };
        assert_eq!(lease.validate().map_err(|e| e.param), Err("min"));
    }

    use super::*;

    #[test]
    fn key_hash_is_sha256_hex() {
        // sha256("abc") from FIPS 180-2.
        assert_eq!(key_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(valid_key_hash(&key_hash("sk-anything")));
        assert!(!valid_key_hash("ABC"));
    }

    #[test]
    fn request_ids_cannot_form_paths_or_operators() {
        assert!(valid_request_id("0f3a-9b_Z"));
        for bad in ["", "a.b", "$set", "a b", &"x".repeat(129)] {
            assert!(!valid_request_id(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn reserve_reply_is_tagged_by_verdict() {
        let admit: ReserveReply =
            serde_json::from_str(r#"{"verdict":"admit","balance_tokens":7}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(admit, ReserveReply::Admit { balance_tokens: 7, policy: KeyPolicy::default() });
        let refuse = ReserveReply::Refuse {
            status: 429,
            error: ErrorEnvelope::new("no", "insufficient_quota", None, Some("insufficient_quota")).error,
        };
        let text = serde_json::to_string(&refuse).unwrap_or_default();
        assert!(
            text.starts_with(r#"{"verdict":"refuse","status":429,"error":{"message":"no","type":"insufficient_quota""#),
            "{text}"
        );
    }

    #[test]
    fn error_envelope_has_all_four_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&ErrorEnvelope::new("m", "t", None, None).to_json()).unwrap_or_default();
        assert_eq!(v, serde_json::json!({"error":{"message":"m","type":"t","param":null,"code":null}}));
    }
}
