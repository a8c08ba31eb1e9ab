//! Docker cannot run here, so the compose demo is checked by reading it: the
//! services, ports, settings and mounts that keep it parallel to `make run`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_yaml::Value;

fn compose() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-compose.yml");
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn env_of(service: &Value) -> &serde_yaml::Mapping {
    service["environment"].as_mapping().unwrap_or_else(|| panic!("no environment map in {service:?}"))
}

#[test]
fn compose_runs_the_official_images_and_our_sidecar() {
    let c = compose();
    let s = &c["services"];
    assert!(s["mongo"]["image"].as_str().unwrap().starts_with("mongo:"));
    assert!(s["envoy"]["image"].as_str().unwrap().starts_with("envoyproxy/envoy:v1.40"));
    assert_eq!(s["sidecar"]["build"]["dockerfile"].as_str(), Some("sidecar/Dockerfile"));
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sidecar/Dockerfile").exists());
    // MongoDB as a one-member replica set.
    let cmd: Vec<&str> = s["mongo"]["command"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(cmd.windows(2).any(|w| w == ["--replSet", "rs0"]), "{cmd:?}");
    let uri = env_of(&s["sidecar"])[&Value::from("MONGODB_URI")].as_str().unwrap();
    assert!(uri.contains("replicaSet=rs0"), "{uri}");
}

#[test]
fn compose_exposes_port_8000_and_mounts_the_built_wasm() {
    let c = compose();
    let envoy = &c["services"]["envoy"];
    let ports: Vec<&str> = envoy["ports"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(ports, ["${GATEWAY_PORT:-8000}:8000"]);
    let mounts: Vec<&str> = envoy["volumes"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(mounts.iter().any(|m| m.starts_with("./target/wasm32-wasip1/release/openclaw_filter.wasm:")), "{mounts:?}");
    // The rendered config's wasm path is where the file is mounted.
    let render = env_of(&c["services"]["envoy-config"]);
    let wasm = render[&Value::from("WASM_PATH")].as_str().unwrap();
    assert!(mounts.iter().any(|m| m.contains(&format!(":{wasm}:"))), "{wasm} not mounted: {mounts:?}");
    // The sidecar's internal API is not published.
    assert!(c["services"]["sidecar"]["ports"].is_null());
}

#[test]
fn compose_passes_every_seed_setting() {
    let c = compose();
    let render = env_of(&c["services"]["envoy-config"]);
    for var in ["LLM_PROVIDER", "LLM_ENDPOINT", "LLM_API_KEY", "LLM_MODEL", "LLM_API_VERSION", "TIKTOKEN_ENCODING"] {
        let merged = render.contains_key(var) || c["x-settings"].as_mapping().is_some_and(|m| m.contains_key(var));
        assert!(merged, "{var} missing from the envoy-config service");
    }
    let sidecar = env_of(&c["services"]["sidecar"]);
    for var in ["MONGODB_URI", "MONGODB_DB", "ADMIN_TOKEN", "LOG_FILE"] {
        assert!(sidecar.contains_key(var), "{var} missing from the sidecar");
    }
    assert_eq!(
        sidecar[&Value::from("ADMIN_TOKEN")].as_str(),
        Some("${ADMIN_TOKEN:?set ADMIN_TOKEN}"),
        "no default admin token"
    );
    // The sidecar listens on the compose network: its internal API needs a token, in both places.
    assert_eq!(sidecar[&Value::from("SIDECAR_ADDR")].as_str(), Some("0.0.0.0:8001"));
    for env in [&sidecar, &render] {
        assert_eq!(
            env[&Value::from("INTERNAL_TOKEN")].as_str(),
            Some("${INTERNAL_TOKEN:?set INTERNAL_TOKEN}"),
            "no empty internal token"
        );
    }
}
