//! Request admission on arbitrary bodies, for each endpoint: never a panic;
//! what it admits holds a positive estimate and names a model of bounded length,
//! and a body it rewrites is still a JSON object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openclaw_filter::catalog::Endpoint;
use openclaw_filter::config::PluginConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let endpoint = [Endpoint::Chat, Endpoint::Responses, Endpoint::Embeddings][usize::from(which % 3)];
    let cfg = PluginConfig::from_json(br#"{"sidecar_cluster":"s","upstream_key":"k","deployment":"gpt-5-nano"}"#)
        .expect("a valid configuration");
    if let Ok(admission) = openclaw_filter::request::admit(body, &cfg, endpoint) {
        assert!(admission.estimate > 0, "admitted at {}", admission.estimate);
        assert!(admission.model.len() <= bridge_protocol::MAX_MODEL_LEN);
        if let Some(rewritten) = &admission.rewritten {
            let v: serde_json::Value = serde_json::from_slice(rewritten).expect("the rewritten body parses");
            assert!(v.is_object());
        }
    }
});
