//! `envoy/render.py` restates none of the filter's defaults: with an empty
//! environment it writes only what is required, and that parses to exactly
//! the configuration the filter defaults to; each variable that is set shows
//! up as the field it names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use openclaw_filter::config::PluginConfig;
use serde_json::{json, Value};

fn render(env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/render.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LLM_ENDPOINT", "http://127.0.0.1:9")
        .env("LLM_API_KEY", "upstream-secret");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The plugin configuration inside a rendered bootstrap, and the listener's buffer limit.
fn plugin_of(bootstrap: &Value) -> (Value, u64) {
    fn find(v: &Value) -> Option<Value> {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(s)) = m.get("value") {
                    if let Ok(cfg @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                        if cfg.get("sidecar_cluster").is_some() {
                            return Some(cfg);
                        }
                    }
                }
                m.values().find_map(find)
            }
            Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    let limit = bootstrap["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"].as_u64().unwrap();
    (find(bootstrap).expect("no plugin configuration in the bootstrap"), limit)
}

#[test]
fn an_empty_environment_renders_only_what_is_required_and_the_filter_defaults_the_rest() {
    let (plugin, buffer_limit) = plugin_of(&render(&[]));
    let mut keys: Vec<&str> = plugin.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["deployment", "model", "route_header", "sidecar_cluster", "upstream_key"]);
    let rendered = PluginConfig::from_json(plugin.to_string().as_bytes()).unwrap();
    let required = json!({
        "sidecar_cluster": plugin["sidecar_cluster"],
        "upstream_key": "upstream-secret",
        "deployment": plugin["deployment"],
        "model": plugin["model"],
    });
    let defaults = PluginConfig::from_json(required.to_string().as_bytes()).unwrap();
    assert_eq!(rendered, defaults, "the route marker too is the filter's default");
    // Envoy's buffer must hold the largest body the filter accepts.
    assert!(buffer_limit >= defaults.max_body_bytes as u64, "{buffer_limit} < {}", defaults.max_body_bytes);
}

#[test]
fn each_variable_that_is_set_reaches_its_field() {
    let env = [
        ("SIDECAR_TIMEOUT_MS", "1500"),
        ("RETRY_AFTER_SECS", "9"),
        ("MAX_BODY_BYTES", "1000"),
        ("DEFAULT_OUTPUT_RESERVATION", "77"),
        ("SETTLE_INTERVAL_MS", "50"),
        ("LEASE_TOKENS", "0"),
        ("LEASE_MS", "20"),
        ("LEASE_SLOTS", "64"),
        ("FAILURE_MODE", "allow"),
        ("TIKTOKEN_ENCODING", "o200k_base"),
        ("LLM_API_VERSION", "2025-01-01"),
        ("INTERNAL_TOKEN", "shh"),
        ("CAP_OUTPUT", "0"),
        ("LLM_REASONING", "0"),
    ];
    let (plugin, buffer_limit) = plugin_of(&render(&env));
    let c = PluginConfig::from_json(plugin.to_string().as_bytes()).unwrap();
    assert_eq!((c.sidecar_timeout_ms, c.retry_after_secs, c.max_body_bytes), (1500, 9, 1000));
    assert_eq!((c.default_output_reservation, c.settle_interval_ms, c.lease_tokens, c.lease_ms), (77, 50, 0, 20));
    assert_eq!(c.failure_mode, openclaw_filter::config::FailureMode::Allow);
    assert_eq!(c.tiktoken_encoding, openclaw_filter::config::Encoding::O200kBase);
    assert_eq!((c.api_version.as_str(), c.internal_token.as_deref()), ("2025-01-01", Some("shh")));
    assert!(buffer_limit >= 1000);
    assert!(!c.cap_output);
    assert_eq!(c.reasoning, Some(false));
    assert_eq!(c.lease_slots, 64);
    // OpenAI-style upstreams name no deployment.
    let (plugin, _) = plugin_of(&render(&[("LLM_PROVIDER", "openai")]));
    assert_eq!((plugin["upstream"].as_str(), plugin.get("deployment")), (Some("openai"), None));
    // A bad value is refused at render time, naming the variable.
    let out = Command::new("python3")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/render.py"))
        .env("LLM_ENDPOINT", "http://127.0.0.1:9")
        .env("LLM_API_KEY", "k")
        .env("LEASE_MS", "5")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("LEASE_MS"));
}

#[test]
fn the_bare_benchmark_route_rewrites_to_the_filters_own_default_path() {
    // `make bench`'s bare Envoy (no filter) writes the upstream path the filter would.
    let bare = render(&[("BRIDGE_FILTER", "0")]).to_string();
    let cfg = PluginConfig::from_json(
        br#"{"sidecar_cluster":"sidecar","upstream_key":"upstream-secret","deployment":"gpt-5-nano"}"#,
    )
    .unwrap();
    let chat = cfg.upstream_path(openclaw_filter::request::Endpoint::Chat);
    assert!(bare.contains(&chat), "{chat} not in the bare route");
    assert!(!bare.contains("openclaw_filter"), "the bare bootstrap loads no filter");
}
