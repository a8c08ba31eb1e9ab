//! The plugin configuration and its model catalog from arbitrary bytes: never a
//! panic; a configuration it accepts resolves models by name without one, and
//! every model it resolves has an upstream path for each endpoint it serves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw_filter::catalog::Endpoint;
use openclaw_filter::config::PluginConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = PluginConfig::from_json(data) else { return };
    for name in [None, Some("gpt-5-nano"), Some(""), Some("x".repeat(300).as_str())] {
        if let Some(model) = cfg.model(name) {
            for endpoint in [Endpoint::Chat, Endpoint::Responses, Endpoint::Embeddings] {
                let path = model.path(endpoint, &cfg.api_version);
                assert!(path.starts_with('/'), "{path}");
            }
        }
    }
});
