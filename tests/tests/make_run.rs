//! `make run`'s script on a fresh state directory: it starts the MongoDB-wire
//! server, the mock upstream, the sidecar and Envoy with local defaults, serves
//! the seed's flow, and stops everything it started on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bridge_tests::{free_port, Proc};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn alive(pid: &str) -> bool {
    Command::new("kill").args(["-0", pid.trim()]).status().is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_starts_the_stack_with_local_defaults_and_stops_it() {
    let state = bridge_tests::log_dir().join(bridge_tests::unique_db("run"));
    let port = free_port();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/run.sh"))
        .current_dir(repo_root())
        .env_remove("MONGODB_URI")
        .env_remove("LLM_ENDPOINT")
        .env_remove("LLM_API_KEY")
        .env_remove("ADMIN_TOKEN")
        .env("RUN_DIR", &state)
        .env("GATEWAY_PORT", port.to_string())
        .env("LOG_FILE", state.join("app.log"))
        .env("BUILD_PROFILE", "debug")
        .env("SKIP_BUILD", "1")
        .env("ENVOY_CONCURRENCY", "1");
    let mut run = Proc::spawn("make-run", cmd);
    run.wait_for("answers come from the MOCK upstream", Duration::from_secs(60));
    run.wait_for("openclaw-llm-bridge is up", Duration::from_secs(120));

    let admin = std::fs::read_to_string(state.join("admin_token")).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/admin/keys"))
        .bearer_auth(admin.trim())
        .json(
            &json!({"api_key": "sk-my-user-key-001", "user_name": "张三", "balance_tokens": 10000, "status": "active"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-my-user-key-001")
        .json(&json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let used = body["usage"]["total_tokens"].as_i64().unwrap();
    bridge_tests::eventually("the request is billed", Duration::from_secs(20), || {
        let http = http.clone();
        let base = base.clone();
        let admin = admin.clone();
        async move {
            let list: Value = http
                .get(format!("{base}/admin/keys"))
                .bearer_auth(admin.trim())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["data"][0]["balance_tokens"].as_i64() == Some(10_000 - used) && list["data"][0]["held_tokens"] == 0
        }
    })
    .await;
    let mongo_pid = std::fs::read_to_string(state.join("mongo/pid")).unwrap();
    assert!(alive(&mongo_pid));
    let status = run.stop(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!alive(&mongo_pid), "the MongoDB-wire server it started is stopped");
    assert!(http.get(format!("{base}/healthz")).send().await.is_err(), "Envoy is stopped");
    // The sidecar's log (flushed on its graceful exit) has the settlement.
    let log = std::fs::read_to_string(state.join("app.log")).unwrap();
    assert!(log.contains("settlement batch") && log.contains("sidecar stopped"), "{log}");
}
