//! The models the gateway serves: each with its upstream (an Envoy cluster,
//! the path style, deployment and key), the endpoints it serves, its
//! tokenizer and output reservations. From the plugin configuration's
//! `models` (rendered by `envoy/render.py` from `MODELS_FILE`), or, without
//! one, a single model from the top-level settings, as the seed had it.

use bridge_protocol::Secret;
use serde::Deserialize;

use crate::config::{Encoding, UpstreamStyle};

/// The billed endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

fn default_cluster() -> String {
    "llm_upstream".into()
}
fn default_style() -> UpstreamStyle {
    UpstreamStyle::Azure
}
fn default_endpoints() -> Vec<Endpoint> {
    vec![Endpoint::Chat, Endpoint::Responses]
}

/// Price weights of a model's token kinds: the charge is the weighted sum,
/// rounded up. All 1 (the default) charges what the seed charges.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Input tokens not read from the cache.
    #[serde(default = "one")]
    pub input: f64,
    /// Input tokens read from the prompt cache.
    #[serde(default = "one")]
    pub cached_input: f64,
    /// Output tokens, reasoning included.
    #[serde(default = "one")]
    pub output: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for Prices {
    fn default() -> Self {
        Prices { input: 1.0, cached_input: 1.0, output: 1.0 }
    }
}

impl Prices {
    /// Every weight times `by` (a service tier's multiplier).
    pub fn scaled(&self, by: f64) -> Prices {
        Prices { input: self.input * by, cached_input: self.cached_input * by, output: self.output * by }
    }

    /// What `input` tokens (`cached` of them cached) and `output` tokens
    /// charge. Exact integers when every weight is 1.
    pub fn charge(&self, input: i64, cached: i64, output: i64) -> i64 {
        if *self == Prices::default() {
            return input.saturating_add(output);
        }
        let cached = cached.clamp(0, input.max(0));
        let sum =
            self.input * (input - cached) as f64 + self.cached_input * cached as f64 + self.output * output as f64;
        // A hair below an integer is that integer (float noise), not one more.
        (sum - 1e-9).ceil().max(0.0) as i64
    }

    /// The hold's ceiling for `input` estimated tokens (cached or not: the
    /// dearer weight) and `output` reserved.
    pub fn hold(&self, input: i64, output: i64) -> i64 {
        let dearer = Prices { input: self.input.max(self.cached_input), cached_input: 0.0, output: self.output };
        if dearer.input == 1.0 && dearer.output == 1.0 {
            return input.saturating_add(output);
        }
        dearer.charge(input, 0, output)
    }
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The name clients send as `model`.
    pub name: String,
    /// The Envoy cluster of its upstream.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// `:authority` for its upstream (its host); unset: the route's.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_style")]
    pub upstream: UpstreamStyle,
    /// Azure deployment (required for both Azure styles).
    #[serde(default)]
    pub deployment: Option<String>,
    /// The `model` sent to an OpenAI-style upstream (default: `name`).
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Azure's `api-version` (legacy style only); unset: the plugin's.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Its upstream's key. Stays in Envoy's configuration; never logged.
    pub upstream_key: Secret,
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<Endpoint>,
    /// Unset: the plugin's `tiktoken_encoding`.
    #[serde(default)]
    pub tiktoken_encoding: Option<Encoding>,
    /// Output held (and the cap) when a request names no maximum; unset: the plugin's.
    #[serde(default)]
    pub default_output_reservation: Option<i64>,
    /// The largest maximum a request may name (larger: 400); unset: any.
    #[serde(default)]
    pub max_output_reservation: Option<i64>,
    /// Whether it reasons; unset: by its name.
    #[serde(default)]
    pub reasoning: Option<bool>,
    /// Price weights of its token kinds (default: all 1).
    #[serde(default)]
    pub prices: Prices,
    /// Service tiers a request may name beyond `auto` and `default`, each
    /// with the multiplier of every price weight (`{"priority": 2, "flex":
    /// 0.5}`); a tier not named here is refused.
    #[serde(default)]
    pub service_tiers: std::collections::BTreeMap<String, f64>,
    /// The one model of a configuration without a catalog, with no model
    /// configured: the client's `model` goes upstream as sent.
    #[serde(skip)]
    pub keeps_client_model: bool,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

impl Model {
    /// Its prices for a request naming `tier` (`None`, `auto` and `default`:
    /// its own); `None` for a tier it does not price.
    pub fn prices_for(&self, tier: Option<&str>) -> Option<Prices> {
        match tier {
            None | Some("auto" | "default") => Some(self.prices),
            Some(t) => self.service_tiers.get(t).map(|by| self.prices.scaled(*by)),
        }
    }

    pub(crate) fn validate(&self, at: &str) -> Result<(), String> {
        let fail = |field: &str, why: &str| Err(format!("plugin configuration: {at}.{field} {why}"));
        if !valid_name(&self.name) {
            return fail("name", "must be 1 to 128 characters of [A-Za-z0-9._:/-]");
        }
        if self.cluster.trim().is_empty() {
            return fail("cluster", "must name an Envoy cluster");
        }
        if self.upstream_key.expose().trim().is_empty() {
            return fail("upstream_key", "must not be empty");
        }
        if self.upstream != UpstreamStyle::Openai {
            match &self.deployment {
                Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) => {}
                _ => return fail("deployment", "is required for azure and may hold only [A-Za-z0-9._-]"),
            }
        }
        if let Some(v) = &self.api_version {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return fail("api_version", "may hold only [A-Za-z0-9-]");
            }
        }
        if let Some(a) = &self.authority {
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
                return fail("authority", "must be a host[:port]");
            }
        }
        if self.endpoints.is_empty() {
            return fail("endpoints", "must name at least one of chat, responses, embeddings");
        }
        if self.default_output_reservation.is_some_and(|n| n < 1) {
            return fail("default_output_reservation", "must be >= 1");
        }
        if self.max_output_reservation.is_some_and(|n| n < 1) {
            return fail("max_output_reservation", "must be >= 1");
        }
        let p = self.prices;
        if [p.input, p.cached_input, p.output].iter().any(|w| !w.is_finite() || !(0.0..=1_000.0).contains(w)) {
            return fail("prices", "weights must be 0 to 1000");
        }
        Ok(())
    }

    pub fn serves(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }

    /// Whether it reasons: as configured (the catalog, or resolved at load).
    pub fn reasons(&self) -> bool {
        self.reasoning.unwrap_or_else(|| reasons_by_name(&self.name))
    }

    /// The upstream's `:path` for an endpoint.
    pub fn path(&self, endpoint: Endpoint, default_api_version: &str) -> String {
        let dep = self.deployment.as_deref().unwrap_or_default();
        let version = self.api_version.as_deref().unwrap_or(default_api_version);
        let tail = match endpoint {
            Endpoint::Chat => "chat/completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        };
        match (self.upstream, endpoint) {
            // Azure's Responses API is only the v1 API's.
            (UpstreamStyle::Azure, Endpoint::Responses) | (UpstreamStyle::AzureV1, _) => format!("/openai/v1/{tail}"),
            (UpstreamStyle::Azure, _) => format!("/openai/deployments/{dep}/{tail}?api-version={version}"),
            (UpstreamStyle::Openai, _) => format!("/v1/{tail}"),
        }
    }

    /// The `model` the upstream must see in the body, if it reads one: the
    /// deployment on Azure's v1 paths, the upstream model on an OpenAI-style
    /// upstream; none where the deployment is in the path.
    pub fn body_model(&self, endpoint: Endpoint) -> Option<&str> {
        match (self.upstream, endpoint) {
            (UpstreamStyle::Azure, Endpoint::Responses) | (UpstreamStyle::AzureV1, _) => self.deployment.as_deref(),
            (UpstreamStyle::Azure, _) => None,
            (UpstreamStyle::Openai, _) if self.keeps_client_model => None,
            (UpstreamStyle::Openai, _) => Some(self.upstream_model.as_deref().unwrap_or(&self.name)),
        }
    }

    /// The header carrying the upstream key: (name, value).
    pub fn auth(&self) -> (&'static str, String) {
        match self.upstream {
            UpstreamStyle::Azure | UpstreamStyle::AzureV1 => ("api-key", self.upstream_key.expose().to_owned()),
            UpstreamStyle::Openai => ("authorization", format!("Bearer {}", self.upstream_key.expose())),
        }
    }
}

/// The o-series, gpt-5 and anything called a reasoner reason.
pub fn reasons_by_name(name: &str) -> bool {
    let m = name.to_ascii_lowercase();
    ["o1", "o3", "o4", "gpt-5"].iter().any(|p| m.starts_with(p)) || m.contains("reason")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> Model {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn each_style_has_its_paths_body_model_and_key_header() {
        let legacy = model(r#"{"name":"chat","deployment":"dep-1","upstream_key":"k"}"#);
        assert_eq!(legacy.path(Endpoint::Chat, "v1x"), "/openai/deployments/dep-1/chat/completions?api-version=v1x");
        assert_eq!(legacy.path(Endpoint::Embeddings, "v1x"), "/openai/deployments/dep-1/embeddings?api-version=v1x");
        assert_eq!(legacy.path(Endpoint::Responses, "v1x"), "/openai/v1/responses");
        assert_eq!((legacy.body_model(Endpoint::Chat), legacy.body_model(Endpoint::Responses)), (None, Some("dep-1")));
        assert_eq!(legacy.auth(), ("api-key", "k".to_owned()));
        let v1 = model(r#"{"name":"chat","upstream":"azure_v1","deployment":"dep-2","upstream_key":"k"}"#);
        assert_eq!(v1.path(Endpoint::Chat, "x"), "/openai/v1/chat/completions");
        assert_eq!(v1.body_model(Endpoint::Embeddings), Some("dep-2"));
        let openai = model(
            r#"{"name":"small","upstream":"openai","upstream_model":"text-embedding-3-small","upstream_key":"k","endpoints":["embeddings"]}"#,
        );
        assert_eq!(openai.path(Endpoint::Embeddings, "x"), "/v1/embeddings");
        assert_eq!(openai.body_model(Endpoint::Embeddings), Some("text-embedding-3-small"));
        assert_eq!(openai.auth(), ("authorization", "Bearer k".to_owned()));
        assert!(openai.serves(Endpoint::Embeddings) && !openai.serves(Endpoint::Chat));
        assert!(
            legacy.serves(Endpoint::Chat) && legacy.serves(Endpoint::Responses) && !legacy.serves(Endpoint::Embeddings)
        );
    }

    #[test]
    fn prices_weigh_each_token_kind_and_round_up() {
        let unit = Prices::default();
        assert_eq!((unit.charge(100, 40, 7), unit.hold(100, 7)), (107, 107), "weights of 1 charge the seed's sum");
        let p = Prices { input: 1.0, cached_input: 0.1, output: 4.0 };
        assert_eq!(p.charge(100, 40, 7), 60 + 4 + 28);
        assert_eq!(p.charge(3, 1, 0), 3, "2 + 0.1, rounded up");
        assert_eq!(p.charge(10, 10, 0), 1, "exact tenths are not one more");
        assert_eq!(p.hold(100, 7), 128, "the hold weighs input at the dearer weight");
        let cheap_cache_dear = Prices { input: 0.5, cached_input: 2.0, output: 1.0 };
        assert_eq!(cheap_cache_dear.hold(10, 0), 20);
    }

    #[test]
    fn a_bad_entry_is_named() {
        for (json, field) in [
            (r#"{"name":"","deployment":"d","upstream_key":"k"}"#, "name"),
            (r#"{"name":"m","upstream_key":"k"}"#, "deployment"),
            (r#"{"name":"m","deployment":"d/../x","upstream_key":"k"}"#, "deployment"),
            (r#"{"name":"m","deployment":"d","upstream_key":" "}"#, "upstream_key"),
            (r#"{"name":"m","deployment":"d","upstream_key":"k","endpoints":[]}"#, "endpoints"),
            (r#"{"name":"m","deployment":"d","upstream_key":"k","authority":"a b"}"#, "authority"),
            (r#"{"name":"m","deployment":"d","upstream_key":"k","prices":{"output":-1}}"#, "prices"),
        ] {
            let err = model(json).validate("models[0]").unwrap_err();
            assert!(err.contains(&format!("models[0].{field}")), "{json}: {err}");
        }
    }
}
