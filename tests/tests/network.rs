//! Faults across the network, under load from several clients: MongoDB,
//! the sidecar and Envoy on addresses of their own (network namespaces this
//! test makes, `tests/src/net.rs`), every link between them through the
//! test, and the link cut, healed or slowed while the load runs; three
//! gateways upgraded one by one; the disk under `app.log` full. After each
//! scenario a history checker proves, from every client request and its
//! outcome, every audit row and every balance: per key the audit rows add up
//! to exactly what left the balance; every request the clients saw admitted
//! has exactly one row; no balance went below zero; no `401`, `403` or `429`
//! was answered; every `503` carried `Retry-After`; and once the fault heals
//! the gateway answers again within `RECOVERY`. Each scenario prints one
//! line of figures (also appended to `target/test-logs/network-summary.txt`),
//! the rows of RELIABILITY.md's table.
//!
//! Where namespaces cannot be made here (no root, no `ip`), the test says so
//! and the same scenarios run on loopback through the same links.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_tests::net::{command_in, Host, Link};
use bridge_tests::stack::{SidecarPlace, Stack, StackOptions};
use bridge_tests::{free_port, log_dir, unique_db, Proc};
use futures::StreamExt;
use serde_json::json;

/// Keys the load is spread over, each with a large balance.
const KEYS: usize = 24;
const BALANCE: i64 = 1_000_000_000;
/// Clients sending at once.
const CLIENTS: usize = 8;
/// Within this long after a fault heals, a new request is answered 200
/// again. What it takes: TCP's retransmission backoff after a partition
/// (the next try comes seconds after the link is back), then the backlog
/// the cut left in Envoy settles before new requests are admitted (the
/// backpressure bound), at the test database's few hundred records a second.
const RECOVERY: Duration = Duration::from_secs(30);
/// Load before the fault, and after the gateway has recovered.
const CALM: Duration = Duration::from_secs(4);
/// The port the sidecar and MongoDB listen on in their own namespaces.
const SIDECAR_PORT: u16 = 8001;
const MONGO_PORT: u16 = 27017;

/// Scenarios share two cores: one at a time, so their figures mean something.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn key(i: usize) -> String {
    format!("sk-net-user-{i:04}")
}

/// The parts of one gateway placed on hosts of their own where namespaces
/// can be made: MongoDB on one, the sidecar on another, Envoy (and the mock
/// upstream, and the clients) in the test's. The sidecar reaches MongoDB,
/// and Envoy the sidecar, only through a link of the test's.
struct Placed {
    mode: &'static str,
    db_host: Option<Host>,
    _sidecar_host: Option<Host>,
    _mongo: Proc,
    db_link: Link,
    envoy_link: Link,
    stack: Stack,
}

fn mongo_server() -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mongo.sh");
    let out = std::process::Command::new(script).arg("server").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn wait_mongo(uri: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let uri = format!("{uri}&serverSelectionTimeoutMS=300");
        if let Ok(client) = mongodb::Client::with_uri_str(&uri).await {
            if client.database("admin").run_command(mongodb::bson::doc! {"ping": 1}).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "MongoDB at {uri} did not answer within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Placed {
    async fn start(label: &str) -> Placed {
        let (db_host, sidecar_host) = match (Host::create("db"), Host::create("sc")) {
            (Some(d), Some(s)) => (Some(d), Some(s)),
            _ => {
                println!("network: this machine cannot make network namespaces; {label} runs on loopback proxies");
                (None, None)
            }
        };
        let mode = if db_host.is_some() { "namespaces" } else { "loopback" };
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (mongo_ip, mongo_port) = match &db_host {
            Some(h) => (IpAddr::V4(h.addr), MONGO_PORT),
            None => (loopback, free_port()),
        };
        let mut cmd = command_in(db_host.as_ref().map(|h| h.name.as_str()), mongo_server());
        let bind = if db_host.is_some() { "0.0.0.0".to_owned() } else { mongo_ip.to_string() };
        cmd.args(["--host", &bind, "--port", &mongo_port.to_string(), "--storage-path", ":memory:"]);
        cmd.args(["--log-level", "WARNING"]);
        let mongo = Proc::spawn(&format!("mongo-{label}"), cmd);
        // directConnection: the server names itself by the address it binds
        // (0.0.0.0 in its namespace); the others reach it through links.
        let direct =
            format!("mongodb://{}/?retryWrites=false&directConnection=true", SocketAddr::new(mongo_ip, mongo_port));
        wait_mongo(&direct).await;

        // The sidecar reaches MongoDB through the test's end of its own pair.
        let db_link_ip = sidecar_host.as_ref().map_or(loopback, |h| IpAddr::V4(h.peer));
        let db_link = Link::start(db_link_ip, SocketAddr::new(mongo_ip, mongo_port)).await;
        let (listen_ip, listen_port) = match &sidecar_host {
            Some(h) => (IpAddr::V4(h.addr), SIDECAR_PORT),
            None => (loopback, free_port()),
        };
        let listen = SocketAddr::new(listen_ip, listen_port);
        let envoy_link = Link::start(loopback, listen).await;
        let place = SidecarPlace {
            netns: sidecar_host.as_ref().map(|h| h.name.clone()),
            listen: listen.to_string(),
            reached_at: envoy_link.addr.to_string(),
            // A database that does not answer fails an operation in 2 s, not 30.
            mongo_uri: format!(
                "mongodb://{}/?retryWrites=false&directConnection=true&serverSelectionTimeoutMS=2000",
                db_link.addr
            ),
        };
        let stack = Stack::start(StackOptions {
            mongo_uri: Some(direct),
            sidecar_place: Some(place),
            ..StackOptions::default()
        })
        .await;
        for i in 0..KEYS {
            stack.create_key(&key(i), BALANCE).await;
        }
        Placed { mode, db_host, _sidecar_host: sidecar_host, _mongo: mongo, db_link, envoy_link, stack }
    }

    /// MongoDB's host cut off from everyone (its link down), or where there
    /// are no namespaces the sidecar's link to it.
    fn partition_db(&self) {
        match &self.db_host {
            Some(h) => h.partition(),
            None => self.db_link.cut(),
        }
    }

    fn heal_db(&self) {
        match &self.db_host {
            Some(h) => h.heal(),
            None => self.db_link.heal(),
        }
    }
}

/// One client request and what came of it.
struct Shot {
    gateway: usize,
    sent: Instant,
    status: Option<u16>,
    request_id: Option<String>,
    retry_after: bool,
}

/// Which gateways a load balancer sends to (an upgrade takes one out first).
type Rotation = Arc<Vec<AtomicBool>>;

fn all_in_rotation(n: usize) -> Rotation {
    Arc::new((0..n).map(|_| AtomicBool::new(true)).collect())
}

/// Clients sending to `bases` until `stop`: chat requests over the keys,
/// plain and streamed, capped and capless, round robin over the gateways in
/// rotation (as behind a load balancer). A client that gets `503` or no
/// answer waits 500 ms.
fn start_load(bases: Vec<String>, rotation: Rotation, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Shot>> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let shots = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (http, shots, next, stop, bases, rotation) =
                    (http.clone(), shots.clone(), next.clone(), stop.clone(), bases.clone(), rotation.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        // Round robin over the gateways in rotation.
                        let mut gateway = (i + c) % bases.len();
                        while !rotation[gateway].load(Ordering::Relaxed) {
                            gateway = (gateway + 1) % bases.len();
                        }
                        let stream = i % 3 == 0;
                        let mut body = json!({"model": "gpt-5-nano", "stream": stream,
                            "messages": [{"role": "user", "content": format!("request {i}")}]});
                        if i % 2 == 0 {
                            body["max_completion_tokens"] = json!(100);
                        }
                        let sent = Instant::now();
                        let result = http
                            .post(format!("{}/v1/chat/completions", bases[gateway]))
                            .bearer_auth(key(i % KEYS))
                            .header("x-mock-words", "5")
                            .json(&body)
                            .send()
                            .await;
                        let mut shot = Shot { gateway, sent, status: None, request_id: None, retry_after: false };
                        let back_off = match result {
                            Ok(resp) => {
                                shot.status = Some(resp.status().as_u16());
                                shot.request_id =
                                    resp.headers().get("x-bridge-request-id").map(|v| v.to_str().unwrap().to_owned());
                                shot.retry_after = resp.headers().contains_key("retry-after");
                                let unavailable = resp.status() == 503;
                                let mut body = resp.bytes_stream();
                                while let Some(chunk) = body.next().await {
                                    if chunk.is_err() {
                                        break;
                                    }
                                }
                                unavailable
                            }
                            Err(_) => true,
                        };
                        shots.lock().unwrap().push(shot);
                        if back_off {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        let shots = std::mem::take(&mut *shots.lock().unwrap());
        shots
    })
}

/// A probe of the test's own beside the load, every 250 ms from `healed`:
/// how long until one is answered 200, or the last answer when none was
/// within `RECOVERY`.
async fn probe_until_served(stack: &Stack, healed: Instant) -> Result<Duration, String> {
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "are you back?"}]});
    let mut last = String::new();
    while healed.elapsed() < RECOVERY {
        let sent = Instant::now();
        match stack.chat(&key(0), &body).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status() == 200 => return Ok(sent - healed),
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250).saturating_sub(sent.elapsed())).await;
    }
    Err(last)
}

/// How long after `healed` the first request sent after it was answered 200.
fn recovery(shots: &[Shot], healed: Instant) -> Option<Duration> {
    shots.iter().filter(|s| s.sent >= healed && s.status == Some(200)).map(|s| s.sent - healed).min()
}

/// What the history checker found, as one line of the table.
struct Findings {
    outcomes: BTreeMap<String, usize>,
    admitted: usize,
    rows: usize,
    estimated: usize,
}

/// The history checker: waits until nothing is held any more, then checks
/// every invariant over every key, every client-seen request and every row.
async fn check(stacks: &[&Stack], shots: &[Shot]) -> Findings {
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let ledger = stacks[0].settled_ledger(stacks, &keys, BALANCE, Duration::from_secs(120)).await;
    let rows_by_id = &ledger.rows_by_id;
    let mut outcomes = BTreeMap::new();
    let mut admitted = 0;
    let mut wrong = Vec::new();
    for s in shots {
        let label = s.status.map_or_else(|| "no answer".to_owned(), |c| c.to_string());
        *outcomes.entry(label).or_default() += 1;
        if let Some(c) = s.status {
            assert!(!matches!(c, 401 | 403 | 429), "a fault of ours was answered {c} (gateway {})", s.gateway);
            assert!(c != 503 || s.retry_after, "a 503 without Retry-After (gateway {})", s.gateway);
        }
        if let Some(id) = &s.request_id {
            admitted += 1;
            let n = rows_by_id.get(id).copied().unwrap_or(0);
            if n != 1 {
                wrong.push(format!("{id} answered {:?} has {n} audit rows", s.status));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {admitted} admitted requests without exactly one audit row ({} rows in all), the first: {:?}",
        wrong.len(),
        rows_by_id.len(),
        &wrong[..wrong.len().min(5)]
    );
    Findings { outcomes, admitted, rows: rows_by_id.len(), estimated: ledger.estimated() }
}

/// Prints the scenario's row of figures and keeps it in the summary file.
fn report(scenario: &str, mode: &str, shots: &[Shot], held: Duration, f: &Findings, recovered: Option<Duration>) {
    let recovered =
        recovered.map_or_else(String::new, |d| format!("; answered 200 again {:.1} s after the heal", d.as_secs_f64()));
    let line = format!(
        "network: {scenario} ({mode}): {} requests from {CLIENTS} clients over {KEYS} keys in {:.0} s; outcomes {:?}; \
         {} admitted, {} audit rows, {} charged at estimate; invariants held{recovered}",
        shots.len(),
        held.as_secs_f64(),
        f.outcomes,
        f.admitted,
        f.rows,
        f.estimated,
    );
    println!("{line}");
    use std::io::Write;
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(log_dir().join("network-summary.txt")).unwrap();
    writeln!(file, "{line}").unwrap();
}

/// Load on one placed gateway, `fault` for `lasting`, then `heal`; load
/// until the gateway answers again and a calm after; the checker; the row.
async fn fault_under_load(scenario: &str, lasting: Duration, fault: impl Fn(&Placed), heal: impl Fn(&Placed)) {
    let _one = ONE_AT_A_TIME.lock().await;
    let placed = Placed::start(scenario).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = start_load(vec![placed.stack.base.clone()], all_in_rotation(1), stop.clone());
    tokio::time::sleep(CALM).await;
    fault(&placed);
    tokio::time::sleep(lasting).await;
    heal(&placed);
    let healed = Instant::now();
    let recovered = probe_until_served(&placed.stack, healed).await;
    tokio::time::sleep(CALM).await;
    stop.store(true, Ordering::Relaxed);
    let shots = load.await.unwrap();
    let held = started.elapsed();
    let findings = check(&[&placed.stack], &shots).await;
    report(scenario, placed.mode, &shots, held, &findings, recovered.as_ref().ok().copied());
    if let Err(last) = recovered {
        panic!("{scenario}: not answered 200 within {RECOVERY:?} of the heal; the last answer: {last}");
    }
    assert!(findings.outcomes.contains_key("200"), "{scenario}: nothing got through: {:?}", findings.outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_partitioned_for_ten_seconds_under_load_loses_no_token() {
    fault_under_load("MongoDB partitioned 10 s", Duration::from_secs(10), Placed::partition_db, Placed::heal_db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_cut_off_from_envoy_for_five_seconds_under_load_loses_no_token() {
    fault_under_load(
        "Envoy <-> sidecar cut 5 s",
        Duration::from_secs(5),
        |p| p.envoy_link.cut(),
        |p| p.envoy_link.heal(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_to_mongodb_under_load_loses_no_token() {
    fault_under_load(
        "sidecar <-> MongoDB +100 ms each way 10 s",
        Duration::from_secs(10),
        |p| p.db_link.slow(Duration::from_millis(100)),
        |p| p.db_link.slow(Duration::ZERO),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_upgraded_one_by_one_under_load_lose_no_token() {
    let _one = ONE_AT_A_TIME.lock().await;
    let db_name = unique_db("rolling");
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let opts = StackOptions { db_name: Some(db_name.clone()), ..StackOptions::default() };
        gateways.push(Stack::start(opts).await);
    }
    for i in 0..KEYS {
        gateways[0].create_key(&key(i), BALANCE).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let rotation = all_in_rotation(gateways.len());
    let load = start_load(gateways.iter().map(|g| g.base.clone()).collect(), rotation.clone(), stop.clone());
    tokio::time::sleep(CALM).await;
    for (n, g) in gateways.iter_mut().enumerate() {
        // Out of the load balancer's rotation first (its health check), then
        // the README's upgrade: drain, wait for the gauge to reach 0, stop.
        rotation[n].store(false, Ordering::Relaxed);
        g.upgrade(Duration::from_secs(60)).await;
        rotation[n].store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let upgraded = Instant::now();
    tokio::time::sleep(CALM).await;
    stop.store(true, Ordering::Relaxed);
    let shots = load.await.unwrap();
    let held = started.elapsed();
    let findings = check(&gateways.iter().collect::<Vec<_>>(), &shots).await;
    report("rolling upgrade of 3 gateways", "loopback", &shots, held, &findings, recovery(&shots, upgraded));
    // Every gateway served after its upgrade.
    for (n, _) in gateways.iter().enumerate() {
        assert!(
            shots.iter().any(|s| s.gateway == n && s.sent >= upgraded && s.status == Some(200)),
            "gateway {n} served nothing after the upgrade"
        );
    }
}

/// A small filesystem of the test's own for `app.log` (tmpfs), or `None`
/// where this machine cannot mount one.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(bytes: usize) -> Option<SmallDisk> {
        let dir = log_dir().join(unique_db("small-disk"));
        std::fs::create_dir_all(&dir).unwrap();
        let size = format!("size={bytes}");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(&dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(SmallDisk(dir))
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_app_log_stops_no_request_and_no_settlement() {
    let _one = ONE_AT_A_TIME.lock().await;
    let disk = SmallDisk::mount(1 << 20);
    // Where no filesystem can be mounted: /dev/full, a disk that is always full.
    let (log_file, mode) = match &disk {
        Some(d) => (d.0.join("app.log"), "tmpfs of 1 MiB"),
        None => {
            println!("network: this machine cannot mount a tmpfs; app.log goes to /dev/full");
            (std::path::PathBuf::from("/dev/full"), "/dev/full")
        }
    };
    let stack = Stack::start(StackOptions {
        sidecar_env: vec![("LOG_FILE".into(), log_file.to_string_lossy().into_owned())],
        ..StackOptions::default()
    })
    .await;
    for i in 0..KEYS {
        stack.create_key(&key(i), BALANCE).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = start_load(vec![stack.base.clone()], all_in_rotation(1), stop.clone());
    tokio::time::sleep(CALM).await;
    if let Some(d) = &disk {
        d.fill();
    }
    let full = Instant::now();
    tokio::time::sleep(CALM * 2).await;
    let logged_while_full = std::fs::metadata(&log_file).map(|m| m.len()).unwrap_or(0);
    if let Some(d) = &disk {
        d.free();
    }
    tokio::time::sleep(CALM).await;
    stop.store(true, Ordering::Relaxed);
    let shots = load.await.unwrap();
    let held = started.elapsed();
    let findings = check(&[&stack], &shots).await;
    report(&format!("disk under app.log full 8 s ({mode})"), "loopback", &shots, held, &findings, None);
    let served_while_full = shots.iter().filter(|s| s.sent >= full && s.status == Some(200)).count();
    assert!(served_while_full > 0, "nothing was served while the disk was full: {:?}", findings.outcomes);
    if disk.is_some() {
        // Logging carries on once there is room again.
        stack.create_key("sk-net-after-the-disk", 1).await;
        bridge_tests::eventually("app.log grows again once the disk has room", Duration::from_secs(10), || async {
            std::fs::read_to_string(&log_file)
                .is_ok_and(|log| log.len() as u64 > logged_while_full && log.contains("admin created key"))
        })
        .await;
    }
}

/// libfaketime, which `make test` installs (scripts/deps.sh): a process
/// started with it in `LD_PRELOAD` reads a clock `FAKETIME` off.
fn faketime_lib() -> std::path::PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("libfaketime is missing: run `make test` (scripts/deps.sh --browser installs it)"))
}

/// The time of the first line of a log (`2026-12-07T21:02:05.353673Z ...`), in
/// seconds since the epoch.
fn first_log_time(path: &std::path::Path) -> i64 {
    let log = std::fs::read_to_string(path).unwrap();
    let stamp = log.lines().next().and_then(|l| l.split_whitespace().next()).unwrap().to_owned();
    mongodb::bson::DateTime::parse_rfc3339_str(&stamp).unwrap().timestamp_millis() / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_clock_runs_ahead_takes_no_live_lease_for_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Ahead by three times LEASE_LOST_SECS (30): judged by its own clock,
    // every lease of the other gateway would look lost at once.
    let skew = "+90s";
    let db_name = unique_db("skew");
    let mut gateways = Vec::new();
    for sidecar_env in [
        vec![],
        vec![
            ("LD_PRELOAD".to_owned(), faketime_lib().to_string_lossy().into_owned()),
            ("FAKETIME".to_owned(), skew.to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ],
    ] {
        let opts = StackOptions { db_name: Some(db_name.clone()), sidecar_env, ..StackOptions::default() };
        gateways.push(Stack::start(opts).await);
    }
    let now = mongodb::bson::DateTime::now().timestamp_millis() / 1000;
    let ahead = first_log_time(&gateways[1].sidecar_log) - now;
    assert!(ahead >= 60, "the second sidecar's clock is not ahead ({ahead} s): libfaketime did not take");
    for i in 0..KEYS {
        gateways[0].create_key(&key(i), BALANCE).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = start_load(gateways.iter().map(|g| g.base.clone()).collect(), all_in_rotation(2), stop.clone());
    // Longer than LEASE_LOST_SECS, so a lease judged by the skewed clock
    // would have been taken for lost within the run.
    tokio::time::sleep(Duration::from_secs(35)).await;
    stop.store(true, Ordering::Relaxed);
    let shots = load.await.unwrap();
    let held = started.elapsed();
    let findings = check(&gateways.iter().collect::<Vec<_>>(), &shots).await;
    report(&format!("one of 2 sidecars' clocks {skew} for 35 s"), "loopback", &shots, held, &findings, None);
    assert_eq!(findings.estimated, 0, "live leases were taken for lost and charged at estimates");
    for (n, _) in gateways.iter().enumerate() {
        assert!(shots.iter().any(|s| s.gateway == n && s.status == Some(200)), "gateway {n} served nothing");
    }
}
