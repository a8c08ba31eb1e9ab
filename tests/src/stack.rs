//! The whole gateway on loopback for a test: the mock upstream (in process),
//! the sidecar binary, and Envoy with the built `.wasm`, each on its own
//! ports, with the test's own database.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use crate::{free_port, log_dir, mongo_uri, unique_db, workspace_bin, Proc};

pub const ADMIN_TOKEN: &str = "stack-admin-token-0123456789abcdef";
pub const UPSTREAM_KEY: &str = "upstream-secret-key-0123";

/// Options a test may change.
#[derive(Clone, Debug)]
pub struct StackOptions {
    pub provider: &'static str,
    pub failure_mode: &'static str,
    pub max_body_bytes: Option<usize>,
    pub hold_ttl_secs: Option<u64>,
    /// A MongoDB of the test's own (fault tests restart it); else `MONGODB_URI`.
    pub mongo_uri: Option<String>,
    /// Settings of the plugin (rendered into Envoy's configuration).
    pub extra_env: Vec<(String, String)>,
    /// Settings of the sidecar.
    pub sidecar_env: Vec<(String, String)>,
    /// A database shared with other stacks (several gateways on one
    /// MongoDB); else one of its own.
    pub db_name: Option<String>,
    /// A model catalog (`MODELS_FILE`), in which `{mock}` stands for the
    /// stack's mock upstream; its keys' variables go in `extra_env`.
    pub models: Option<Value>,
    /// The sidecar elsewhere than on loopback beside Envoy (the network
    /// fault tests); else on a free loopback port.
    pub sidecar_place: Option<SidecarPlace>,
}

/// Where the sidecar runs and how the others reach it.
#[derive(Clone, Debug)]
pub struct SidecarPlace {
    /// The network namespace it runs in (`net::Host`), if any.
    pub netns: Option<String>,
    /// The address it listens on (beyond loopback it needs an internal
    /// token, which the stack sets on both sides).
    pub listen: String,
    /// The address Envoy is given for it (a `net::Link` in between).
    pub reached_at: String,
    /// The MongoDB URI it is given (a `net::Link` in between); the stack's
    /// own reads use `mongo_uri`.
    pub mongo_uri: String,
}

/// The internal token of a stack whose sidecar listens beyond loopback.
const INTERNAL_TOKEN: &str = "stack-internal-token-0123456789";

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            provider: "azure",
            failure_mode: "deny",
            max_body_bytes: None,
            hold_ttl_secs: None,
            mongo_uri: None,
            extra_env: vec![],
            sidecar_env: vec![],
            db_name: None,
            models: None,
            sidecar_place: None,
        }
    }
}

pub struct Stack {
    pub base: String,
    pub mock: String,
    pub sidecar_addr: String,
    pub db_name: String,
    pub db: mongodb::Database,
    pub http: reqwest::Client,
    pub envoy: Proc,
    pub sidecar: Option<Proc>,
    pub sidecar_log: PathBuf,
    envoy_config: PathBuf,
    pub envoy_admin: String,
    mongo: String,
    opts: StackOptions,
}

/// What Envoy prints once its listeners take connections.
const ENVOY_READY: &str = "starting main dispatch loop";
/// Envoy with the .wasm is ready in 2-7 s here; a loaded CI machine is given more.
const ENVOY_START: Duration = Duration::from_secs(120);
/// What a process that could not bind its port prints (the OS's error).
const ADDR_IN_USE: &str = "in use";
/// How often a stack is started on fresh ports before the test fails.
const START_TRIES: usize = 5;

/// Envoy's configuration for this stack, rendered by `envoy/render.py` as
/// `make run` renders it.
fn render_config(
    opts: &StackOptions,
    config: &std::path::Path,
    mock: &str,
    sidecar_addr: &str,
    gateway_port: u16,
    admin_port: u16,
) {
    let mut render = Command::new("python3");
    render
        .arg(repo_root().join("envoy/render.py"))
        .arg(config)
        .env("LLM_ENDPOINT", mock)
        .env("LLM_API_KEY", UPSTREAM_KEY)
        .env("LLM_PROVIDER", opts.provider)
        .env("LLM_MODEL", "gpt-5-nano")
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GATEWAY_PORT", gateway_port.to_string())
        .env("ENVOY_ADMIN_PORT", admin_port.to_string())
        .env("SIDECAR_ADDR", sidecar_addr)
        .env("WASM_PATH", wasm_path())
        .env("FAILURE_MODE", opts.failure_mode)
        .env("SETTLE_INTERVAL_MS", "100")
        .env("RETRY_AFTER_SECS", "3");
    if let Some(n) = opts.max_body_bytes {
        render.env("MAX_BODY_BYTES", n.to_string());
    }
    if opts.sidecar_place.is_some() {
        render.env("INTERNAL_TOKEN", INTERNAL_TOKEN);
    }
    for (k, v) in &opts.extra_env {
        render.env(k, v);
    }
    if let Some(models) = &opts.models {
        let file = config.with_extension("models.json");
        std::fs::write(&file, models.to_string().replace("{mock}", mock)).unwrap();
        render.env("MODELS_FILE", &file);
    }
    let out = render.output().unwrap();
    assert!(out.status.success(), "render failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn spawn_envoy(config: &std::path::Path) -> Proc {
    let mut cmd = Command::new("envoy");
    cmd.arg("-c").arg(config).args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "info"]);
    Proc::spawn("envoy", cmd)
}

pub fn wasm_path() -> PathBuf {
    let p = crate::target_dir().join("wasm32-wasip1/release/openclaw_filter.wasm");
    assert!(p.exists(), "{} is missing: run `make test` (it builds the .wasm first)", p.display());
    p
}

fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        let db_name = opts.db_name.clone().unwrap_or_else(|| unique_db("stack"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = format!("http://{}", listener.local_addr().unwrap());
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, crate::mock::app(UPSTREAM_KEY)).await });

        let mongo = opts.mongo_uri.clone().unwrap_or_else(mongo_uri);
        let db = mongodb::Client::with_uri_str(&mongo).await.unwrap().database(&db_name);
        // The ports are picked free, then bound by other processes: another
        // socket may take one in between. A process that could not bind is
        // started again on other ports.
        let mut tries = 0;
        loop {
            tries += 1;
            let (sidecar_addr, envoy_sees) = match &opts.sidecar_place {
                Some(place) => (place.listen.clone(), place.reached_at.clone()),
                None => {
                    let addr = format!("127.0.0.1:{}", free_port());
                    (addr.clone(), addr)
                }
            };
            let sidecar_log = log_dir().join(format!("{db_name}-{}-app.log", free_port()));
            let gateway_port = free_port();
            let admin_port = free_port();
            let config = log_dir().join(format!("{db_name}-{gateway_port}-envoy.json"));
            render_config(&opts, &config, &mock, &envoy_sees, gateway_port, admin_port);
            let mut stack = Stack {
                base: format!("http://127.0.0.1:{gateway_port}"),
                mock: mock.clone(),
                sidecar_addr,
                db: db.clone(),
                db_name: db_name.clone(),
                http: reqwest::Client::new(),
                envoy: spawn_envoy(&config),
                sidecar: None,
                sidecar_log,
                envoy_config: config,
                envoy_admin: format!("http://127.0.0.1:{admin_port}"),
                mongo: mongo.clone(),
                opts: opts.clone(),
            };
            let sidecar = stack.spawn_sidecar();
            if let Err(ended) = sidecar.try_wait_for(crate::SIDECAR_LISTENING, Duration::from_secs(30)) {
                assert!(
                    tries < START_TRIES && sidecar.logged(ADDR_IN_USE),
                    "{}",
                    sidecar.report("sidecar listening", ended)
                );
                continue;
            }
            stack.sidecar = Some(sidecar);
            if let Err(ended) = stack.envoy.try_wait_for(ENVOY_READY, ENVOY_START) {
                assert!(
                    tries < START_TRIES && stack.envoy.logged(ADDR_IN_USE),
                    "{}",
                    stack.envoy.report(ENVOY_READY, ended)
                );
                continue;
            }
            crate::wait_http_ok(&format!("{}/healthz", stack.base), Duration::from_secs(30)).await;
            return stack;
        }
    }

    /// Settlement records Envoy's VMs hold that the sidecar has not taken yet
    /// (the filter's gauge), or `None` if Envoy does not answer.
    pub async fn pending_settlements(&self) -> Option<i64> {
        let url = format!("{}/stats?filter=openclaw_bridge_pending_settlements", self.envoy_admin);
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.rsplit(": ").next()?.trim().parse().ok())
    }

    /// Envoy's `/stats/prometheus` text.
    pub async fn prometheus(&self) -> String {
        let url = format!("{}/stats/prometheus", self.envoy_admin);
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// Restarts Envoy as the README says to: drain the listeners, wait until
    /// every queued settlement is taken (at most `wait`), stop, start again.
    pub async fn restart_envoy_gracefully(&mut self, wait: Duration) {
        let _ = self.http.post(format!("{}/drain_listeners?graceful", self.envoy_admin)).send().await;
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if self.pending_settlements().await == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.restart_envoy().await;
    }

    /// Upgrades this gateway in place, as a rolling upgrade does one gateway
    /// at a time once the load balancer sends it nothing more: drain Envoy's
    /// listeners, wait until the filter's gauge (queued records and open
    /// leases) reaches 0 (the test fails if not within `wait`), stop Envoy,
    /// stop the sidecar (SIGTERM), start the sidecar, start Envoy.
    pub async fn upgrade(&mut self, wait: Duration) {
        let _ = self.http.post(format!("{}/drain_listeners?graceful", self.envoy_admin)).send().await;
        let deadline = std::time::Instant::now() + wait;
        while self.pending_settlements().await != Some(0) {
            assert!(std::time::Instant::now() < deadline, "{}: the gauge did not reach 0 within {wait:?}", self.base);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.envoy.stop(Duration::from_secs(15));
        self.stop_sidecar();
        self.start_sidecar();
        self.start_envoy().await;
    }

    /// Kills Envoy at once (SIGKILL) and starts it again: what its VMs had
    /// queued is lost, as in a crash.
    pub async fn crash_envoy(&mut self) {
        self.envoy.kill();
        self.restart_envoy().await;
    }

    /// Stops Envoy (SIGTERM) and starts it again on the same ports; what its VMs
    /// still had queued is lost.
    pub async fn restart_envoy(&mut self) {
        self.envoy.stop(Duration::from_secs(15));
        self.start_envoy().await;
    }

    /// Starts Envoy on this stack's configuration and waits until it serves.
    async fn start_envoy(&mut self) {
        self.envoy = spawn_envoy(&self.envoy_config);
        self.envoy.wait_for(ENVOY_READY, ENVOY_START);
        crate::wait_http_ok(&format!("{}/healthz", self.base), Duration::from_secs(30)).await;
    }

    /// (Re)starts the sidecar on its fixed address (Envoy's cluster points there).
    pub fn start_sidecar(&mut self) {
        let sidecar = self.spawn_sidecar();
        sidecar.wait_for(crate::SIDECAR_LISTENING, Duration::from_secs(30));
        self.sidecar = Some(sidecar);
    }

    fn spawn_sidecar(&self) -> Proc {
        let log = self.sidecar_log.to_string_lossy().into_owned();
        let ttl = self.opts.hold_ttl_secs.map(|t| t.to_string());
        let place = self.opts.sidecar_place.as_ref();
        let mongo = place.map_or(self.mongo.as_str(), |p| p.mongo_uri.as_str());
        let mut env = vec![
            ("MONGODB_URI", mongo),
            ("SIDECAR_ADDR", self.sidecar_addr.as_str()),
            ("LOG_FILE", log.as_str()),
            ("SWEEP_INTERVAL_SECS", "1"),
        ];
        if place.is_some() {
            env.push(("INTERNAL_TOKEN", INTERNAL_TOKEN));
        }
        if let Some(ttl) = &ttl {
            env.push(("HOLD_TTL_SECS", ttl.as_str()));
        }
        env.extend(self.opts.sidecar_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let netns = place.and_then(|p| p.netns.as_deref());
        crate::spawn_sidecar_on(netns, &workspace_bin("openclaw-sidecar"), &self.db_name, ADMIN_TOKEN, &env)
    }

    /// Kills this gateway hard (SIGKILL to Envoy and its sidecar), for good:
    /// what its VMs held (queued records, open leases) is lost, as in a
    /// machine that died.
    pub fn kill(&mut self) {
        self.envoy.kill();
        if let Some(mut p) = self.sidecar.take() {
            p.kill();
        }
    }

    pub fn stop_sidecar(&mut self) {
        if let Some(mut p) = self.sidecar.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    pub async fn create_key(&self, key: &str, balance: i64) {
        let resp = self
            .http
            .post(format!("{}/admin/keys", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"api_key": key, "user_name": "tester", "balance_tokens": balance, "status": "active"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap_or_default());
    }

    pub async fn patch_key(&self, key: &str, body: Value) {
        let resp = self
            .http
            .patch(format!("{}/admin/keys/{key}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap_or_default());
    }

    /// The key's document straight from MongoDB.
    pub async fn key_doc(&self, key: &str) -> Document {
        self.db
            .collection::<Document>("api_keys")
            .find_one(doc! {"_id": bridge_protocol::key_hash(key)})
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no key document for {key}"))
    }

    pub async fn balance(&self, key: &str) -> i64 {
        self.key_doc(key).await.get_i64("balance_tokens").unwrap()
    }

    /// The balance once nothing is held for the key any more: every hold
    /// settled, every lease closed (within `LEASE_MS` and a settlement tick)
    /// and every request drawn from it settled, and every audit row of those
    /// debits out of the key's outbox and in `audit_logs` (a debit and its row
    /// are one write to the key, the row's insert comes just after).
    pub async fn settled_balance(&self, key: &str) -> i64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let d = self.key_doc(key).await;
            if pending_in(&d) == 0 {
                return d.get_i64("balance_tokens").unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "{key} still holds tokens: {d:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The history checker's ledger side, shared by the soak and the network
    /// scenarios: waits (up to `within`) until no key of `keys` holds, leases
    /// or has an audit row pending and no Envoy of `envoys` holds a record,
    /// then proves for each key that its balance never went below zero and
    /// that what left it (from `balance`) is exactly its audit rows' sum.
    /// Returns the rows of all the keys, for the per-request checks.
    pub async fn settled_ledger(&self, envoys: &[&Stack], keys: &[String], balance: i64, within: Duration) -> Ledger {
        let deadline = std::time::Instant::now() + within;
        loop {
            let mut open = 0;
            for s in envoys {
                open += s.pending_settlements().await.unwrap_or(0);
            }
            for key in keys {
                let d = self.key_doc(key).await;
                open += pending_in(&d);
            }
            if open == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{open} holds, leases or audit rows still pending after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut ledger = Ledger::default();
        for key in keys {
            let rows = self.audit_rows(key).await;
            let audited: i64 = rows.iter().map(|r| r.get_i64("total_tokens").unwrap()).sum();
            let left = self.balance(key).await;
            assert!(left >= 0, "{key} went below zero");
            assert_eq!(balance - left, audited, "{key}: what left the balance and its audit rows disagree");
            for r in rows {
                *ledger.rows_by_id.entry(r.get_str("request_id").unwrap().to_owned()).or_default() += 1;
                ledger.rows.push(r);
            }
        }
        ledger
    }

    /// Number of leases still open on the key.
    pub async fn open_leases(&self, key: &str) -> i64 {
        self.key_doc(key).await.get_i64("leases_n").unwrap_or(0)
    }

    /// Number of holds still open on the key.
    pub async fn open_holds(&self, key: &str) -> i64 {
        self.key_doc(key).await.get_i64("holds_n").unwrap_or(0)
    }

    pub async fn audit_rows(&self, key: &str) -> Vec<Document> {
        use futures::TryStreamExt;
        self.db
            .collection::<Document>("audit_logs")
            .find(doc! {"key_id": bridge_protocol::key_hash(key)})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    pub async fn audit_row(&self, request_id: &str) -> Option<Document> {
        self.db.collection::<Document>("audit_logs").find_one(doc! {"request_id": request_id}).await.unwrap()
    }

    /// Waits until the request's audit row exists, then returns it.
    pub async fn settled_row(&self, request_id: &str) -> Document {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(row) = self.audit_row(request_id).await {
                return row;
            }
            assert!(std::time::Instant::now() < deadline, "request {request_id} was never settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the mock upstream served, oldest first.
    pub async fn served(&self) -> Vec<crate::mock::Seen> {
        self.http.get(format!("{}/mock/requests", self.mock)).send().await.unwrap().json().await.unwrap()
    }

    pub fn chat(&self, key: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http.post(format!("{}/v1/chat/completions", self.base)).bearer_auth(key).json(body)
    }
}

/// What a key document still holds open: holds, leases, and audit rows in
/// its outbox (0 only when each count is 0).
fn pending_in(key: &Document) -> i64 {
    ["holds_n", "leases_n", "outbox_n"].iter().map(|c| key.get_i64(c).unwrap_or(0).abs()).sum()
}

/// Every audit row of the keys a [`Stack::settled_ledger`] checked, and how
/// many rows each request id has.
#[derive(Debug, Default)]
pub struct Ledger {
    pub rows: Vec<Document>,
    pub rows_by_id: std::collections::HashMap<String, usize>,
}

impl Ledger {
    /// Rows charged at an estimate (no usage from the upstream).
    pub fn estimated(&self) -> usize {
        self.rows.iter().filter(|r| r.get_str("usage_source") == Ok("estimate")).count()
    }
}
