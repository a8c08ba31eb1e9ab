//! Soak with faults: mixed traffic (plain, streamed, streams the client aborts,
//! upstream errors, an upstream without usage) at concurrency 50 across several
//! keys, while the sidecar is killed and restarted, MongoDB is stopped and
//! restarted, Envoy is restarted gracefully (drained first) and then killed. Afterwards every token is accounted for:
//! per key, the audit rows add up to exactly what left the balance, every request
//! the client saw admitted has one row, no balance is negative and no hold is
//! left. While a component is down clients get 503 with Retry-After, never 401,
//! 403 or 429.
//!
//! `make test` runs a short soak (SOAK_REQUESTS, 600 by default); the long one:
//! `SOAK_REQUESTS=10000 scripts/with-mongo.sh cargo test -p bridge-tests --test soak -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_tests::stack::{Stack, StackOptions};
use bridge_tests::{free_port, log_dir, unique_db};
use futures::StreamExt;
use serde_json::json;

const KEYS: [&str; 4] = ["sk-soak-user-0001", "sk-soak-user-0002", "sk-soak-user-0003", "sk-soak-user-0004"];
const BALANCE: i64 = 1_000_000_000;

/// A MongoDB-wire server of this test's own, so it can be stopped and started
/// again on the same port and data.
struct Mongo {
    dir: std::path::PathBuf,
    port: u16,
}

impl Mongo {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mongo.sh")
    }
    fn start(&self) -> String {
        let out = Command::new(Self::script())
            .arg("start")
            .arg(&self.dir)
            .env("MONGO_PORT", self.port.to_string())
            // Acknowledged writes must survive the restart, as with real MongoDB's journal.
            .env("MONGO_ARGS", "--sync-on-commit")
            .env_remove("MONGO_STORAGE")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
    fn stop(&self) {
        Command::new(Self::script()).arg("stop").arg(&self.dir).status().unwrap();
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Default)]
struct Outcomes {
    statuses: BTreeMap<String, usize>,
    admitted_ids: Vec<String>,
    retry_after_missing: usize,
    forbidden: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_loses_no_token() {
    let total: usize = std::env::var("SOAK_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let concurrency: usize = std::env::var("SOAK_CONCURRENCY").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let mongo = Mongo { dir: log_dir().join(unique_db("soak-mongo")), port: free_port() };
    // Short server selection: a stopped database fails requests in 2 s, not 30.
    let uri = format!("{}&serverSelectionTimeoutMS=2000", mongo.start());
    let mut stack = Stack::start(StackOptions {
        hold_ttl_secs: Some(10),
        mongo_uri: Some(uri),
        // The MongoDB-wire server here answers a few hundred operations a second:
        // at concurrency 50 reservations queue, and should wait rather than fail.
        extra_env: vec![("SIDECAR_TIMEOUT_MS".into(), "10000".into())],
        ..StackOptions::default()
    })
    .await;
    for key in KEYS {
        stack.create_key(key, BALANCE).await;
    }

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let base = stack.base.clone();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, done, outcomes, base, http) =
                (next.clone(), done.clone(), outcomes.clone(), base.clone(), http.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let key = KEYS[i % KEYS.len()];
                    let (scenario, stream, abort) = match i % 10 {
                        0..=3 => ("", false, false),
                        4..=5 => ("", true, false),
                        6 => ("slow", true, true),
                        7 => ("error_500", false, false),
                        8 => ("no_usage", true, false),
                        _ => ("error_400", true, false),
                    };
                    let body = json!({"model": "gpt-5-nano", "stream": stream, "max_completion_tokens": 100,
                        "messages": [{"role": "user", "content": format!("request {i}")}]});
                    let result = http
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(key)
                        .header("x-mock-scenario", scenario)
                        .header("x-mock-words", if abort { "40" } else { "5" })
                        .json(&body)
                        .send()
                        .await;
                    let label = match result {
                        Err(_) => "connection error".to_owned(),
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let id = resp.headers().get("x-bridge-request-id").map(|v| v.to_str().unwrap().to_owned());
                            let retry_after = resp.headers().contains_key("retry-after");
                            let finished = if abort {
                                let mut s = resp.bytes_stream();
                                let _ = s.next().await; // one chunk, then the client leaves
                                true
                            } else {
                                resp.bytes().await.is_ok()
                            };
                            let mut o = outcomes.lock().unwrap();
                            if let Some(id) = id {
                                o.admitted_ids.push(id);
                            }
                            if status == 503 && !retry_after {
                                o.retry_after_missing += 1;
                            }

                            if matches!(status, 401 | 403 | 429) {
                                o.forbidden.push(format!("request {i}: {status}"));
                            }
                            format!("{status}{}", if finished { "" } else { " (body cut)" })
                        }
                    };
                    let unavailable = label == "503" || label == "connection error";
                    *outcomes.lock().unwrap().statuses.entry(label).or_default() += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                    if unavailable {
                        // As a well-behaved client: back off before the next request.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            })
        })
        .collect();

    // Faults at fixed points of progress.
    let wait_progress = |fraction: f64| {
        let done = done.clone();
        async move {
            while (done.load(Ordering::Relaxed) as f64) < fraction * total as f64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_progress(0.2).await;
    if let Some(mut sidecar) = stack.sidecar.take() {
        sidecar.kill(); // a crash, not a graceful stop
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.start_sidecar();
    wait_progress(0.45).await;
    mongo.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    mongo.start();
    // The sidecar's health check pings MongoDB: wait until it has reconnected.
    bridge_tests::wait_http_ok(&format!("http://{}/healthz", stack.sidecar_addr), Duration::from_secs(60)).await;
    wait_progress(0.65).await;
    stack.restart_envoy_gracefully(Duration::from_secs(60)).await;
    wait_progress(0.85).await;
    stack.crash_envoy().await;
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();

    // Everything settles or expires: no hold and no pending audit row anywhere.
    let keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
    let ledger = stack.settled_ledger(&[], &keys, BALANCE, Duration::from_secs(120)).await;
    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    let rows_by_id = &ledger.rows_by_id;
    let lost = |r: &&mongodb::bson::Document| r.get_bool("expired_hold").unwrap_or(false);
    let expired = ledger.rows.iter().filter(lost).count();
    // The row of a lease whose drawn requests never settled (Envoy was
    // killed with their records queued) carries the lease's id.
    let expired_leases = ledger
        .rows
        .iter()
        .filter(lost)
        .filter(|r| r.get_str("lease_id").is_ok_and(|l| r.get_str("request_id") == Ok(l)))
        .count();
    let mut charged_by_lease = 0;
    for id in &o.admitted_ids {
        match rows_by_id.get(id) {
            Some(n) => assert_eq!(*n, 1, "admitted request {id} has {n} audit rows"),
            // Only the hard kill loses records; what their requests held is
            // charged with the row of their expired lease.
            None => {
                assert!(expired_leases > 0, "admitted request {id} has no audit row and no expired lease covers it");
                charged_by_lease += 1;
            }
        }
    }
    assert!(o.forbidden.is_empty(), "faults of ours answered as the client's: {:?}", o.forbidden);
    assert_eq!(o.retry_after_missing, 0, "a 503 without Retry-After");
    let summary = format!(
        "soak: {total} requests at concurrency {concurrency} in {:.1} s; outcomes {:?}; {} admitted seen by clients, \
         {} audit rows ({} expired holds or leases charged, covering {} requests without a row of their own)",
        elapsed.as_secs_f64(),
        o.statuses,
        o.admitted_ids.len(),
        rows_by_id.len(),
        expired,
        charged_by_lease
    );
    println!("{summary}");
    std::fs::write(log_dir().join("soak-summary.txt"), summary).unwrap();
    // Outages answer fast, so much of the traffic meets one; enough must get through.
    assert!(o.admitted_ids.len() > total / 6, "too little traffic got through to mean anything");
    for path in ["200", "500"] {
        assert!(o.statuses.contains_key(path), "no {path} in the soak: {:?}", o.statuses);
    }
    stack.stop_sidecar();
}
