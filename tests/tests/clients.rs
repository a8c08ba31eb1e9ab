//! Real clients through the whole stack: the official OpenAI Python SDK and a
//! real OpenClaw agent turn with a tool call. Billing must be exact for each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use tokio::process::Command;

use bridge_tests::stack::{Stack, StackOptions, ADMIN_TOKEN, UPSTREAM_KEY};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A stack, a key of 200,000 tokens and what the Python script `script`
/// (in `tests/`) printed after driving the gateway with it.
async fn run_sdk_script(script: &str, key: &str) -> (Stack, Value) {
    let s = Stack::start(StackOptions::default()).await;
    s.create_key(key, 200_000).await;
    let out = Command::new("python3")
        .arg(repo_root().join("tests").join(script))
        .arg(format!("{}/v1", s.base))
        .arg(key)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(UPSTREAM_KEY), "the upstream key reached a client");
    (s, serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_is_billed_exactly() {
    let key = "sk-python-sdk-user-1";
    let (s, r) = run_sdk_script("sdk_client.py", key).await;

    let plain = s.settled_row(r["plain"]["request_id"].as_str().unwrap()).await;
    assert_eq!(plain.get_i64("total_tokens").unwrap(), r["plain"]["usage"]["total_tokens"].as_i64().unwrap());
    assert_eq!(r["plain"]["content"], "word0 word1 word2 word3 word4 ");

    assert_eq!(r["stream"]["content"], "word0 word1 word2 word3 word4 ");
    assert_eq!(r["stream"]["saw_usage"], false, "the SDK did not ask for usage and must not get it");
    let stream = s.settled_row(r["stream"]["request_id"].as_str().unwrap()).await;
    assert_eq!(stream.get_str("usage_source"), Ok("upstream"));

    assert_eq!(
        (r["tool"]["name"].as_str(), r["tool"]["arguments"]["path"].as_str()),
        (Some("read"), Some("hello.txt"))
    );
    let tool = s.settled_row(r["tool"]["request_id"].as_str().unwrap()).await;

    assert_eq!(r["bad_key"]["status"], 401);
    assert_eq!(r["bad_key"]["code"], "invalid_api_key");

    // Exact: every request the upstream served is one audit row with its tokens.
    let served = s.served().await;
    assert_eq!(served.len(), 3);
    let served_total: i64 = served.iter().map(|x| x.prompt_tokens + x.completion_tokens).sum();
    let rows = s.audit_rows(key).await;
    assert_eq!(rows.len(), 3);
    let billed: i64 = [&plain, &stream, &tool].iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(billed, served_total);
    assert_eq!(s.settled_balance(key).await, 200_000 - served_total);

    // No secret in an audit row: keys appear masked or hashed only.
    let rows_text = format!("{rows:?}");
    assert!(!rows_text.contains(UPSTREAM_KEY) && !rows_text.contains(key), "{rows_text}");

    // app.log is written, and no secret reaches a log.
    let app_log = std::fs::read_to_string(&s.sidecar_log).unwrap();
    assert!(app_log.contains("settlement batch"), "{app_log}");
    let envoy_log = std::fs::read_to_string(&s.envoy.log_path).unwrap();
    for log in [&app_log, &envoy_log] {
        assert!(!log.contains(UPSTREAM_KEY) && !log.contains(key) && !log.contains(ADMIN_TOKEN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdks_responses_and_embeddings_are_billed_exactly() {
    let key = "sk-python-sdk-user-2";
    let (s, mut r) = run_sdk_script("sdk_responses.py", key).await;
    assert_eq!(r["plain"]["text"], "word0 word1 word2 word3 word4 ");
    assert_eq!(
        (r["tool"]["name"].as_str(), r["tool"]["arguments"]["path"].as_str()),
        (Some("read"), Some("hello.txt"))
    );
    assert_eq!(r["stream"]["text"], "the file says 42");
    assert_eq!((r["embeddings"]["vectors"].as_i64(), r["embeddings"]["dimensions"].as_i64()), (Some(2), Some(4)));
    // responses.retrieve right after responses.create, and a continuation: the maker's, at once.
    assert_eq!(r["retrieved"]["id"], r["retrieved"]["made"]);
    r["continued"] = json!({"request_id": r["retrieved"]["continued"], "usage": r["retrieved"]["continued_usage"]});
    for call in ["plain", "continued", "tool", "stream", "embeddings"] {
        let row = s.settled_row(r[call]["request_id"].as_str().unwrap()).await;
        assert_eq!(row.get_str("usage_source"), Ok("upstream"), "{call}");
        if let Some(usage) = r[call].get("usage").filter(|u| !u.is_null()) {
            assert_eq!(row.get_i64("input_tokens").unwrap(), usage["input_tokens"].as_i64().unwrap(), "{call}");
            assert_eq!(row.get_i64("output_tokens").unwrap(), usage["output_tokens"].as_i64().unwrap(), "{call}");
        }
    }
    let served = s.served().await;
    assert_eq!(served.len(), 6, "create, retrieve, continue, tool, stream, embeddings");
    assert!(served[1].path.ends_with(r["retrieved"]["id"].as_str().unwrap()), "{}", served[1].path);
    assert!(served[5].path.ends_with("/embeddings"), "{}", served[5].path);
    let served_total: i64 = served.iter().map(|x| x.prompt_tokens + x.completion_tokens).sum();
    assert_eq!(s.settled_balance(key).await, 200_000 - served_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_openclaw_tool_turn_is_billed_exactly() {
    openclaw_tool_turn("openai-completions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_openclaw_tool_turn_in_its_responses_mode_is_billed_exactly() {
    openclaw_tool_turn("openai-responses").await;
}

/// `drive_openclaw.sh` installs Node and OpenClaw into one directory on first
/// use. Two turns at once on a fresh machine install into it together and
/// break it (npm's `ENOTEMPTY`, then a package that does not start): one turn
/// at a time.
static OPENCLAW_INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The script's exit code for "install failed".
const INSTALL_FAILED: i32 = 3;

/// Where the script installs: `DRIVE_DIR` if set, else its default.
fn drive_dir() -> PathBuf {
    match std::env::var_os("DRIVE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/drive_openclaw"),
    }
}

/// The OpenClaw version the turn runs: `OPENCLAW_VERSION` if set, else the
/// one the script was tested with.
fn openclaw_version() -> String {
    std::env::var("OPENCLAW_VERSION").unwrap_or_else(|_| "2026.9.6".to_owned())
}

/// One OpenClaw turn with a tool round trip in its `api` mode.
async fn openclaw_tool_turn(api: &str) {
    let script = repo_root().join("../shared/clients/drive_openclaw.sh");
    assert!(script.exists(), "{} is missing", script.display());
    let s = Stack::start(StackOptions::default()).await;
    let key = "sk-openclaw-agent-01";
    s.create_key(key, 5_000_000).await;
    let out = {
        let _one_at_a_time = OPENCLAW_INSTALL.lock().await;
        let (dir, version) = (drive_dir(), openclaw_version());
        let turn = || {
            Command::new("bash")
                .arg(&script)
                .env("BASE_URL", format!("{}/v1", s.base))
                .env("API_KEY", key)
                .env("TOOL_TURN", "1")
                .env("API", api)
                .env("TURN_TIMEOUT", "240")
                .env("DRIVE_DIR", &dir)
                .env("OPENCLAW_VERSION", &version)
                .output()
        };
        let out = turn().await.unwrap();
        if out.status.code() == Some(INSTALL_FAILED) {
            // An install an earlier run left half done (killed, or two at once
            // before this lock) stays broken: the script sees the binary and
            // does not install again. Start that install over, once.
            eprintln!("OpenClaw install unusable, installing again:\n{}", String::from_utf8_lossy(&out.stderr));
            for install in [dir.join("node"), dir.join(format!("openclaw-{version}"))] {
                let _ = std::fs::remove_dir_all(install);
            }
            turn().await.unwrap()
        } else {
            out
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "OpenClaw turn failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let served = s.served().await;
    let path = if api == "openai-responses" { "/openai/v1/responses" } else { "/openai/deployments/" };
    assert!(served.iter().all(|x| x.path.starts_with(path)), "{api} reached {path}");
    assert!(served.len() >= 2, "a tool round trip is at least two model requests: {}", served.len());
    assert!(served.iter().all(|x| x.stream && x.include_usage), "OpenClaw streams; the filter asks for usage");
    let served_total: i64 = served.iter().map(|x| x.prompt_tokens + x.completion_tokens).sum();
    // Settlement is asynchronous: wait until every served request has its row.
    bridge_tests::eventually("every OpenClaw request settled", std::time::Duration::from_secs(30), || async {
        s.audit_rows(key).await.len() == served.len()
    })
    .await;
    let rows = s.audit_rows(key).await;
    let billed: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
    assert_eq!(billed, served_total);
    assert_eq!(s.settled_balance(key).await, 5_000_000 - served_total);
    assert!(rows.iter().all(|r| r.get_str("usage_source") == Ok("upstream")));
}
