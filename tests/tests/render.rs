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
    assert_eq!((c.api_version.as_str(), c.internal_token.as_ref().map(|t| t.expose())), ("2025-01-01", Some("shh")));
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
    let chat = cfg.catalog[0].path(openclaw_filter::request::Endpoint::Chat, &cfg.api_version);
    assert!(bare.contains(&chat), "{chat} not in the bare route");
    assert!(!bare.contains("openclaw_filter"), "the bare bootstrap loads no filter");
}

#[test]
fn a_models_file_renders_a_cluster_per_model_and_the_filters_catalog_with_keys_from_their_variables() {
    let dir = std::env::temp_dir().join(format!("render-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("models.json");
    let models = json!({"models": [
        {"name": "gpt-5-mini", "encoding": "o200k_base", "default_output_tokens": 2048, "max_output_tokens": 32768,
         "upstream": {"style": "azure", "base_url": "https://east.openai.azure.com", "deployment": "mini-east",
                      "api_key_env": "EAST_KEY", "api_version": "2025-01-01-preview"}},
        {"name": "embed", "endpoints": ["embeddings"],
         "upstream": {"style": "openai", "base_url": "http://10.0.0.5:8080/v1", "model": "bge-m3", "api_key_env": "LOCAL_KEY"}},
    ]});
    std::fs::write(&file, models.to_string()).unwrap();
    let path = file.to_str().unwrap();
    let bootstrap = render(&[("MODELS_FILE", path), ("EAST_KEY", "east-secret"), ("LOCAL_KEY", "local-secret")]);
    let (plugin, _) = plugin_of(&bootstrap);
    assert_eq!(plugin.get("upstream_key"), None, "each model has its own key");
    let c = PluginConfig::from_json(plugin.to_string().as_bytes()).unwrap();
    let mini = c.model(Some("gpt-5-mini")).unwrap();
    assert_eq!((mini.cluster.as_str(), mini.authority.as_deref()), ("model_0", Some("east.openai.azure.com")));
    assert_eq!((mini.upstream_key.expose(), mini.deployment.as_deref()), ("east-secret", Some("mini-east")));
    assert_eq!((mini.default_output_reservation, mini.max_output_reservation), (Some(2048), Some(32768)));
    assert_eq!(mini.tiktoken_encoding, Some(openclaw_filter::config::Encoding::O200kBase));
    let embed = c.model(Some("embed")).unwrap();
    assert_eq!((embed.authority.as_deref(), embed.upstream_model.as_deref()), (Some("10.0.0.5:8080"), Some("bge-m3")));
    assert_eq!(c.model(Some("gpt-4.1")), None);
    // One cluster each, TLS with SNI for https; no default upstream cluster.
    let clusters = bootstrap["static_resources"]["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sidecar", "model_0", "model_1"]);
    assert_eq!(clusters[1]["transport_socket"]["typed_config"]["sni"], "east.openai.azure.com");
    assert!(clusters[2].get("transport_socket").is_none());
    let text = bootstrap.to_string();
    assert!(text.contains("x-openclaw-bridge-cluster"), "the upstream routes pick the cluster by the filter's header");
    assert!(text.contains("gpt-5-mini,embed"), "/v1/models is told the catalog");
    // The file holds no key: a variable it names that is not set is an error naming it.
    let out = Command::new("python3")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/render.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MODELS_FILE", path)
        .env("EAST_KEY", "east-secret")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("LOCAL_KEY"));
    std::fs::remove_dir_all(&dir).unwrap();
}
