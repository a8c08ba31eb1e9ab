//! A database slowed on purpose (a TCP proxy in front of it delays every
//! reply) under sustained load, through the real Envoy: the gateway answers
//! no more than its settlement bound lets it (the rest `503` with
//! `Retry-After`, never 401 or 429), its backlog stays within the bound, and
//! nothing is dropped: every answered request has exactly one audit row with
//! its actual usage, and the rows add up to what left the balance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_tests::mongo_uri;
use bridge_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-slow-ledger-0001";
const BALANCE: i64 = 1_000_000_000;
/// What the proxy adds to every reply of the database.
const DELAY: Duration = Duration::from_millis(60);
const BACKLOG_MAX: i64 = 150;
const LOAD: Duration = Duration::from_secs(12);
const CLIENTS: usize = 32;

/// Forwards `127.0.0.1:<port>` to `upstream`, holding every chunk of the
/// server's replies back for `DELAY`.
async fn slow_proxy(upstream: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(DELAY).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// `host:port` of a `mongodb://host:port/...` URI, and the URI with `port` instead.
fn through(uri: &str, port: u16) -> (String, String) {
    let rest = uri.strip_prefix("mongodb://").unwrap();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = rest[..end].to_owned();
    (host, format!("mongodb://127.0.0.1:{port}{}", &rest[end..]))
}

#[derive(Default)]
struct Seen {
    statuses: BTreeMap<u16, usize>,
    answered: Vec<String>,
    bad_refusals: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_ledger_slows_the_gateway_down_and_drops_nothing() {
    let direct = mongo_uri();
    let (host, _) = through(&direct, 0);
    let port = slow_proxy(host).await;
    let (_, slow) = through(&direct, port);
    let stack = Stack::start(StackOptions {
        mongo_uri: Some(slow),
        extra_env: vec![
            ("SETTLE_BACKLOG_MAX".into(), BACKLOG_MAX.to_string()),
            ("SETTLE_BACKLOG_AGE_MS".into(), "1500".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    stack.create_key(KEY, BALANCE).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let peak = Arc::new(AtomicI64::new(0));
    let end = Instant::now() + LOAD;
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "Say hello."}]});
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, seen, body) =
            (stack.http.clone(), format!("{}/v1/chat/completions", stack.base), seen.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let resp = http.post(&url).bearer_auth(KEY).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                let id = resp.headers().get("x-bridge-request-id").map(|v| v.to_str().unwrap().to_owned());
                let retry_after = resp.headers().contains_key("retry-after");
                let text = resp.text().await.unwrap_or_default();
                let mut seen = seen.lock().unwrap();
                *seen.statuses.entry(status).or_default() += 1;
                match status {
                    200 => seen.answered.push(id.expect("an answered request names its id")),
                    503 => {
                        let code = serde_json::from_str::<Value>(&text).ok().map(|v| v["error"]["code"].clone());
                        if !retry_after || code != Some(json!("gateway_overloaded")) {
                            seen.bad_refusals.push(format!("{status} retry-after {retry_after}: {text}"));
                        }
                    }
                    _ => seen.bad_refusals.push(format!("{status}: {text}")),
                }
            }
        }));
    }
    let watcher = {
        let (http, admin, peak) = (stack.http.clone(), stack.envoy_admin.clone(), peak.clone());
        tokio::spawn(async move {
            while Instant::now() < end {
                let url = format!("{admin}/stats?filter=openclaw_bridge_settle_backlog");
                if let Ok(r) = http.get(&url).send().await {
                    let text = r.text().await.unwrap_or_default();
                    let n = text.rsplit(": ").next().and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(0);
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    watcher.await.unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!("statuses {:?}, backlog peak {}", seen.statuses, peak.load(Ordering::Relaxed));
    assert!(seen.bad_refusals.is_empty(), "{:?}", &seen.bad_refusals[..seen.bad_refusals.len().min(5)]);
    assert!(seen.statuses.get(&503).copied().unwrap_or(0) > 0, "the load outran the slow ledger: {:?}", seen.statuses);
    assert!(!seen.answered.is_empty());
    // The bound holds, give or take the requests already admitted when it was reached.
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= BACKLOG_MAX + CLIENTS as i64, "backlog peaked at {peak}");

    let balance = stack.settled_balance(KEY).await;
    let rows = stack.audit_rows(KEY).await;
    let charged: i64 = rows.iter().map(|r| r.get_i64("charged_tokens").unwrap()).sum();
    assert_eq!(BALANCE - balance, charged, "the rows add up to what left the balance");
    let estimated: Vec<_> = rows.iter().filter(|r| r.get_str("usage_source").unwrap() != "upstream").collect();
    assert!(estimated.is_empty(), "charged at estimates: {:?}", &estimated[..estimated.len().min(3)]);
    let ids: Vec<&str> = rows.iter().map(|r| r.get_str("request_id").unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "one row a request");
    let answered: HashSet<&str> = seen.answered.iter().map(String::as_str).collect();
    assert_eq!(unique, answered, "a row for every answered request, and none for a refused one");
}
