//! The plugin configuration: JSON in Envoy's `configuration` field, parsed once
//! in the root context. Unknown fields are refused so a typo does not silently
//! fall back to a default.

use bridge_protocol::Secret;
use serde::Deserialize;

/// How the upstream expects to be addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamStyle {
    /// `/openai/deployments/{deployment}/chat/completions?api-version=...`, header `api-key`.
    Azure,
    /// Azure's v1 API: `/openai/v1/chat/completions`, the deployment as `model`, header `api-key`.
    AzureV1,
    /// `/v1/chat/completions`, header `Authorization: Bearer`.
    Openai,
}

/// What to do when the sidecar cannot be reached or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Answer 503 with `Retry-After` (never 401 or 429: clients lock keys out after those).
    Deny,
    /// Forward without a hold and settle afterwards; the key may overdraw.
    Allow,
}

/// Tokenizer for the fallback count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Encoding {
    #[serde(rename = "cl100k_base")]
    Cl100kBase,
    #[serde(rename = "o200k_base")]
    O200kBase,
}

fn default_sidecar_authority() -> String {
    "openclaw-sidecar".into()
}
fn default_sidecar_timeout_ms() -> u64 {
    2_000
}
fn default_api_version() -> String {
    "2024-12-01-preview".into()
}
fn default_upstream() -> UpstreamStyle {
    UpstreamStyle::Azure
}
fn default_encoding() -> Encoding {
    Encoding::Cl100kBase
}
fn default_failure_mode() -> FailureMode {
    FailureMode::Deny
}
fn default_retry_after_secs() -> u32 {
    5
}
fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_output_reservation() -> i64 {
    4_096
}
fn default_true() -> bool {
    true
}
fn default_bytes_per_token() -> u32 {
    2
}
fn default_settle_interval_ms() -> u64 {
    200
}
fn default_settle_timeout_ms() -> u64 {
    30_000
}
fn default_settle_batch() -> usize {
    200
}
fn default_unadmitted_bytes_max() -> usize {
    128 * 1024 * 1024
}
fn default_settle_backlog_max() -> usize {
    20_000
}
fn default_settle_backlog_age_ms() -> u64 {
    3_000
}
fn default_lease_tokens() -> i64 {
    10_000_000
}
fn default_lease_wait_ms() -> u64 {
    2_000
}
fn default_lease_waiters_max() -> usize {
    1_024
}
fn default_admission_calls_max() -> usize {
    128
}
fn default_lease_ms() -> u64 {
    30_000
}
/// At most this long a refusal is answered from the key's slot.
pub const REFUSAL_CACHED_MS: u64 = 1_000;
fn default_lease_idle_ms() -> u64 {
    2_000
}
fn default_lease_slots() -> u32 {
    65_536
}
fn default_cluster_header() -> String {
    "x-openclaw-bridge-cluster".into()
}
fn default_route_header() -> String {
    "x-openclaw-bridge-route".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Envoy cluster of the sidecar (`dispatch_http_call` takes a cluster, not host:port).
    pub sidecar_cluster: String,
    /// `:authority` of calls to the sidecar.
    #[serde(default = "default_sidecar_authority")]
    pub sidecar_authority: String,
    #[serde(default = "default_sidecar_timeout_ms")]
    pub sidecar_timeout_ms: u64,
    /// Shared secret for the sidecar's internal API, if it requires one.
    #[serde(default)]
    pub internal_token: Option<Secret>,
    #[serde(default = "default_upstream")]
    pub upstream: UpstreamStyle,
    /// Azure deployment name (required for `azure`).
    #[serde(default)]
    pub deployment: Option<String>,
    /// Model name: listed by `/v1/models`; for `openai` it replaces the client's `model`.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// The upstream's key. Stays in Envoy's configuration; never logged.
    /// Required unless `models` is given (each model has its own).
    #[serde(default)]
    pub upstream_key: Option<Secret>,
    /// The model catalog (`envoy/render.py` renders it from `MODELS_FILE`);
    /// empty: one model from the settings above.
    #[serde(default)]
    pub models: Vec<crate::catalog::Model>,
    /// Header naming the chosen model's Envoy cluster, set on admitted
    /// requests only; the upstream route picks its cluster by it.
    #[serde(default = "default_cluster_header")]
    pub cluster_header: String,
    /// The models served, resolved at load: `models` with the defaults above
    /// filled in, or the one model of the settings.
    #[serde(skip)]
    pub catalog: Vec<crate::catalog::Model>,
    #[serde(default = "default_encoding")]
    pub tiktoken_encoding: Encoding,
    #[serde(default = "default_failure_mode")]
    pub failure_mode: FailureMode,
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u32,
    /// Largest request body accepted; larger gets 413. Envoy's
    /// `per_connection_buffer_limit_bytes` must be at least this.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Bytes of request bodies one VM holds for requests not yet admitted
    /// (buffering, or waiting for their key's lease or the sidecar's
    /// answer): past it, `503` + Retry-After. Bounds what made-up keys (or
    /// any flood) cost in memory before their key is known.
    #[serde(default = "default_unadmitted_bytes_max")]
    pub unadmitted_bytes_max: usize,
    /// Output tokens held when the request sets neither `max_completion_tokens` nor `max_tokens`.
    #[serde(default = "default_output_reservation")]
    pub default_output_reservation: i64,
    /// The served model reasons (its reasoning tokens are billed but never
    /// streamed): a request of it without upstream usage pays its hold.
    /// Unset: inferred from the model's name (`reasons`).
    #[serde(default)]
    pub reasoning: Option<bool>,
    /// A request naming no maximum is sent on with `max_completion_tokens`
    /// set to `default_output_reservation`, so its output cannot outgrow its
    /// hold. Off, such a request may spend past its hold (and the balance).
    #[serde(default = "default_true")]
    pub cap_output: bool,
    /// Request bytes per token assumed by the input estimate. Low values over-hold
    /// (refunded at settlement); 2 stays above the true count even for CJK text.
    #[serde(default = "default_bytes_per_token")]
    pub estimate_bytes_per_token: u32,
    /// How often the root context sends queued settlements.
    #[serde(default = "default_settle_interval_ms")]
    pub settle_interval_ms: u64,
    #[serde(default = "default_settle_batch")]
    pub settle_batch_max: usize,
    /// Timeout of a settlement call. Generous: nothing waits on it, and a batch
    /// cut short by it is sent again (idempotent, but work done twice).
    #[serde(default = "default_settle_timeout_ms")]
    pub settle_timeout_ms: u64,
    /// Records one VM keeps unsettled at most: past it, new requests are
    /// answered 503 `gateway_overloaded` with Retry-After, so admission
    /// never outruns what the ledger writes by more than this (and Envoy's
    /// memory stays flat under any load).
    #[serde(default = "default_settle_backlog_max")]
    pub settle_backlog_max: usize,
    /// How long the oldest unsettled record of a VM may wait: past it, new
    /// requests are answered as past `settle_backlog_max`. Bounds how long
    /// after its answer a request's audit row is written. Not applied with
    /// `failure_mode: allow`, whose requests go on while the sidecar is down.
    #[serde(default = "default_settle_backlog_age_ms")]
    pub settle_backlog_age_ms: u64,
    /// The most tokens one lease asks for: a lease is sized from its key's
    /// draw rate (twice a window's draws, at least 16 requests' estimates)
    /// up to this (one request larger than it leases its own estimate). The
    /// sidecar grants at most its share of the balance (`LEASE_SHARE`).
    /// 0 turns leases off: every request then reserves with a call of its own.
    #[serde(default = "default_lease_tokens")]
    pub lease_tokens: i64,
    /// How long a request waits for its key's lease being fetched (or
    /// renewed) by another request before it is answered 503 with Retry-After.
    #[serde(default = "default_lease_wait_ms")]
    pub lease_wait_ms: u64,
    /// Requests one VM lets wait for leases; past it, 503 with Retry-After.
    #[serde(default = "default_lease_waiters_max")]
    pub lease_waiters_max: usize,
    /// Admission calls (lease fetches, reservations) one VM has in flight at
    /// most; a request that would need one more is answered 503 with
    /// Retry-After at once: load is shed early instead of queueing on a slow
    /// database until every call times out.
    #[serde(default = "default_admission_calls_max")]
    pub admission_calls_max: usize,
    /// How long a lease can be drawn from at most (an admin's change to the
    /// key ends it within a settlement tick, pushed by the sidecar).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// A lease nothing drew from for this long is closed by its root (a
    /// quiet key holds no balance and costs no writes); past `lease_ms`
    /// it expires anyway.
    #[serde(default = "default_lease_idle_ms")]
    pub lease_idle_ms: u64,
    /// Lease slots in Envoy shared data, shared by keys by hash: Envoy never
    /// frees shared data, so this bounds what made-up keys can make it hold
    /// (a few hundred bytes a slot).
    #[serde(default = "default_lease_slots")]
    pub lease_slots: u32,
    /// Header the filter sets on admitted requests only; the upstream routes
    /// require it, so nothing unadmitted reaches the upstream.
    #[serde(default = "default_route_header")]
    pub route_header: String,
}

impl PluginConfig {
    /// How long a refusal is answered from its key's slot without a call
    /// (a change to the key drops it sooner).
    pub fn refusal_ms(&self) -> u64 {
        self.lease_ms.min(REFUSAL_CACHED_MS)
    }

    /// How this VM sizes leases and gives up on fetches.
    pub fn lease_policy(&self) -> crate::lease::Policy {
        crate::lease::Policy {
            stale_ms: self.sidecar_timeout_ms + 1_000,
            window_ms: self.lease_ms,
            ceiling: self.lease_tokens,
        }
    }

    /// Parses and validates; the error says which field is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let mut cfg: PluginConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| format!("plugin configuration: {}: {}", e.path(), e.inner()))?;
        cfg.validate()?;
        // Decided once here, not on every request's settlement.
        cfg.reasoning = Some(cfg.reasons());
        cfg.catalog = cfg.resolve_catalog()?;
        Ok(cfg)
    }

    /// The catalog with every default filled in: reservations, tokenizer and
    /// reasoning are per model from here on.
    fn resolve_catalog(&self) -> Result<Vec<crate::catalog::Model>, String> {
        use crate::catalog::{Endpoint, Model};
        if self.models.is_empty() {
            return Ok(vec![Model {
                name: self.served_model().to_owned(),
                cluster: "llm_upstream".into(),
                authority: None,
                upstream: self.upstream,
                deployment: self.deployment.clone(),
                // As the seed had it: the client's model goes on unless one is configured.
                upstream_model: self.model.clone(),
                api_version: Some(self.api_version.clone()),
                upstream_key: self.upstream_key.clone().unwrap_or_default(),
                endpoints: vec![Endpoint::Chat, Endpoint::Responses, Endpoint::Embeddings],
                tiktoken_encoding: Some(self.tiktoken_encoding),
                default_output_reservation: Some(self.default_output_reservation),
                max_output_reservation: None,
                reasoning: self.reasoning,
                prices: crate::catalog::Prices::default(),
                service_tiers: Default::default(),
                keeps_client_model: self.model.is_none(),
            }]);
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.models.len());
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}]");
            m.validate(&at)?;
            if !seen.insert(m.name.as_str()) {
                return Err(format!("plugin configuration: {at}.name {:?} is listed twice", m.name));
            }
            let mut m = m.clone();
            m.tiktoken_encoding = Some(m.tiktoken_encoding.unwrap_or(self.tiktoken_encoding));
            m.default_output_reservation =
                Some(m.default_output_reservation.unwrap_or(self.default_output_reservation));
            m.reasoning = Some(m.reasons());
            out.push(m);
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), String> {
        let fail = |field: &str, why: &str| Err(format!("plugin configuration: {field} {why}"));
        if self.sidecar_cluster.trim().is_empty() {
            return fail("sidecar_cluster", "must name an Envoy cluster");
        }
        if self.models.is_empty() && self.upstream_key.as_ref().is_none_or(|k| k.expose().trim().is_empty()) {
            return fail("upstream_key", "must not be empty (or give models, each with its key)");
        }
        if self.models.is_empty() && self.upstream != UpstreamStyle::Openai {
            match &self.deployment {
                Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) => {}
                _ => return fail("deployment", "is required for azure and may hold only [A-Za-z0-9._-]"),
            }
            if !self.api_version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return fail("api_version", "may hold only [A-Za-z0-9-]");
            }
        }
        if self.sidecar_timeout_ms == 0 {
            return fail("sidecar_timeout_ms", "must be > 0");
        }
        if self.max_body_bytes == 0 {
            return fail("max_body_bytes", "must be > 0");
        }
        if self.default_output_reservation < 1 {
            return fail("default_output_reservation", "must be >= 1");
        }
        if self.estimate_bytes_per_token == 0 {
            return fail("estimate_bytes_per_token", "must be >= 1");
        }
        if self.unadmitted_bytes_max < self.max_body_bytes {
            return fail("unadmitted_bytes_max", "must be at least max_body_bytes");
        }
        if self.settle_backlog_max == 0 {
            return fail("settle_backlog_max", "must be > 0");
        }
        if self.settle_backlog_age_ms == 0 {
            return fail("settle_backlog_age_ms", "must be > 0");
        }
        if self.settle_timeout_ms == 0 {
            return fail("settle_timeout_ms", "must be > 0");
        }
        if self.settle_interval_ms == 0 {
            return fail("settle_interval_ms", "must be > 0");
        }
        if self.settle_batch_max == 0 || self.settle_batch_max > bridge_protocol::MAX_SETTLE_BATCH {
            return fail("settle_batch_max", "must be 1 to 500");
        }
        if self.lease_tokens < 0 {
            return fail("lease_tokens", "must be >= 0 (0 turns leases off)");
        }
        if self.lease_tokens > 0 && !(10..=60_000).contains(&self.lease_ms) {
            return fail("lease_ms", "must be 10 to 60000");
        }
        if self.lease_tokens > 0 && !(10..=60_000).contains(&self.lease_idle_ms) {
            return fail("lease_idle_ms", "must be 10 to 60000");
        }
        if self.lease_waiters_max == 0 {
            return fail("lease_waiters_max", "must be >= 1");
        }
        if self.admission_calls_max == 0 {
            return fail("admission_calls_max", "must be >= 1");
        }
        if self.lease_slots == 0 {
            return fail("lease_slots", "must be >= 1");
        }
        for (field, header) in [("route_header", &self.route_header), ("cluster_header", &self.cluster_header)] {
            if header.is_empty() || !header.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
                return fail(field, "must be a lower-case header name");
            }
        }
        Ok(())
    }

    /// The model the gateway serves, for `/v1/models` and audit rows.
    pub fn served_model(&self) -> &str {
        self.model.as_deref().or(self.deployment.as_deref()).unwrap_or("default")
    }

    /// Whether the served model reasons: as configured, else by its name.
    pub fn reasons(&self) -> bool {
        self.reasoning.unwrap_or_else(|| crate::catalog::reasons_by_name(self.served_model()))
    }

    /// The model a request names (`None`: it named none). With a catalog an
    /// unknown name is `None`; without one, every name is the one model, as
    /// the seed had it.
    pub fn model(&self, name: Option<&str>) -> Option<&crate::catalog::Model> {
        self.model_index(name).and_then(|i| self.catalog.get(i))
    }

    /// Where in `catalog` the model a request names is (as [`Self::model`]).
    pub fn model_index(&self, name: Option<&str>) -> Option<usize> {
        match (name, self.models.is_empty()) {
            (_, true) | (None, false) if self.catalog.len() == 1 => Some(0),
            (Some(n), false) => self.catalog.iter().position(|m| m.name == n),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"sidecar_cluster":"sidecar","upstream_key":"k","deployment":"gpt-5-nano"}"#;

    /// Every field the filter accepts, as serde names them in its answer to
    /// an unknown one ("expected one of ...").
    fn accepted_fields() -> Vec<String> {
        let err = serde_json::from_str::<PluginConfig>(r#"{"no such field":1}"#).unwrap_err().to_string();
        let list = err.split("expected one of").nth(1).expect("serde lists the fields");
        list.split('`').skip(1).step_by(2).map(str::to_owned).collect()
    }

    #[test]
    fn the_readme_lists_every_plugin_setting_and_no_other() {
        let readme = include_str!("../../README.md");
        let section = readme.split("The filter's plugin configuration").nth(1).expect("the README's plugin settings");
        let table = section.split("| field | default | meaning |").nth(1).expect("its table");
        let listed: Vec<&str> =
            table.lines().skip(2).take_while(|l| l.starts_with("| `")).filter_map(|l| l.split('`').nth(1)).collect();
        let accepted = accepted_fields();
        assert!(accepted.len() > 20, "{accepted:?}");
        let missing: Vec<_> = accepted.iter().filter(|f| !listed.contains(&f.as_str())).collect();
        let unknown: Vec<_> = listed.iter().filter(|f| !accepted.iter().any(|a| a == *f)).collect();
        assert!(missing.is_empty() && unknown.is_empty(), "not in the README: {missing:?}; not a field: {unknown:?}");
    }

    #[test]
    fn secrets_never_print_in_debug() {
        let json = r#"{"sidecar_cluster":"s","upstream_key":"upstream-secret-1","internal_token":"internal-secret-2",
            "models":[{"name":"m","deployment":"d","upstream_key":"model-secret-3"}]}"#;
        let c = PluginConfig::from_json(json.as_bytes()).unwrap();
        let printed = format!("{c:?} {:?}", c.model(Some("m")));
        for secret in ["upstream-secret-1", "internal-secret-2", "model-secret-3"] {
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert_eq!(c.model(Some("m")).unwrap().auth(), ("api-key", "model-secret-3".to_owned()));
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = PluginConfig::from_json(MIN.as_bytes()).unwrap();
        assert_eq!(c.upstream, UpstreamStyle::Azure);
        assert_eq!(c.tiktoken_encoding, Encoding::Cl100kBase);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        let m = c.model(Some("anything")).unwrap();
        assert_eq!(
            m.path(crate::catalog::Endpoint::Chat, &c.api_version),
            "/openai/deployments/gpt-5-nano/chat/completions?api-version=2024-12-01-preview"
        );
        assert_eq!((m.name.as_str(), m.cluster.as_str()), ("gpt-5-nano", "llm_upstream"));
        assert_eq!(m.auth(), ("api-key", "k".to_owned()));
        assert_eq!(c.model(None), Some(m), "one model: whatever a request names");
    }

    #[test]
    fn reasoning_is_inferred_from_the_model_unless_set() {
        let with = |extra: &str| {
            let json = format!(r#"{{"sidecar_cluster":"s","upstream_key":"k","deployment":"gpt-5-nano"{extra}}}"#);
            PluginConfig::from_json(json.as_bytes()).unwrap()
        };
        assert!(with("").reasons(), "gpt-5 models reason");
        assert!(!with(r#","reasoning":false"#).reasons());
        assert!(!with(r#","model":"gpt-4o-mini""#).reasons());
        assert!(with(r#","model":"o4-mini""#).reasons());
        assert!(with(r#","model":"gpt-4o-mini","reasoning":true"#).reasons());
    }

    #[test]
    fn openai_style_uses_bearer() {
        let c = PluginConfig::from_json(
            br#"{"sidecar_cluster":"s","upstream_key":"k","upstream":"openai","tiktoken_encoding":"o200k_base"}"#,
        )
        .unwrap();
        let m = c.model(Some("x")).unwrap();
        assert_eq!(m.path(crate::catalog::Endpoint::Chat, &c.api_version), "/v1/chat/completions");
        assert_eq!(m.auth(), ("authorization", "Bearer k".to_owned()));
        assert_eq!(m.body_model(crate::catalog::Endpoint::Chat), None, "no model configured: the client's goes on");
        assert_eq!(c.tiktoken_encoding, Encoding::O200kBase);
    }

    #[test]
    fn a_catalog_resolves_each_models_defaults_and_finds_models_by_name() {
        let c = PluginConfig::from_json(
            br#"{"sidecar_cluster":"s","default_output_reservation":100,"tiktoken_encoding":"o200k_base","models":[
                {"name":"chat","cluster":"m0","deployment":"d0","upstream_key":"k0"},
                {"name":"emb","cluster":"m1","upstream":"openai","upstream_key":"k1","endpoints":["embeddings"],
                 "tiktoken_encoding":"cl100k_base","default_output_reservation":1,"reasoning":true}]}"#,
        )
        .unwrap();
        let chat = c.model(Some("chat")).unwrap();
        assert_eq!((chat.default_output_reservation, chat.tiktoken_encoding), (Some(100), Some(Encoding::O200kBase)));
        assert_eq!(chat.reasoning, Some(false));
        let emb = c.model(Some("emb")).unwrap();
        assert_eq!(
            (emb.cluster.as_str(), emb.tiktoken_encoding, emb.reasoning),
            ("m1", Some(Encoding::Cl100kBase), Some(true))
        );
        assert_eq!(c.model(Some("other")), None, "an unknown model");
        assert_eq!(c.model(None), None, "several models: a request must name one");
        let twice = br#"{"sidecar_cluster":"s","models":[{"name":"a","deployment":"d","upstream_key":"k"},{"name":"a","deployment":"d","upstream_key":"k"}]}"#;
        assert!(PluginConfig::from_json(twice).unwrap_err().contains("models[1].name"));
    }

    #[test]
    fn bad_configurations_name_the_field() {
        for (json, field) in [
            (r#"{"upstream_key":"k","deployment":"d"}"#, "sidecar_cluster"),
            (r#"{"sidecar_cluster":"s","upstream_key":"","deployment":"d"}"#, "upstream_key"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k"}"#, "deployment"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"a/b"}"#, "deployment"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","failure_mode":"maybe"}"#, "failure_mode"),
            (
                r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","tiktoken_encoding":"p50k"}"#,
                "tiktoken_encoding",
            ),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","colour":1}"#, "colour"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","settle_batch_max":0}"#, "settle_batch_max"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","lease_tokens":-1}"#, "lease_tokens"),
            (r#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"d","lease_ms":0}"#, "lease_ms"),
        ] {
            let err = PluginConfig::from_json(json.as_bytes()).unwrap_err();
            assert!(err.contains(field), "{json}: {err}");
        }
    }
}
