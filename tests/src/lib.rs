//! Test harness shared by the sidecar's and the gateway's integration tests:
//! real processes on loopback, each test with its own database, readiness
//! waited for instead of slept for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod browser;
pub mod mock;
pub mod net;
pub mod stack;

/// The MongoDB-wire server the test run started (`make test` exports it).
pub fn mongo_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| {
        panic!("MONGODB_URI is not set: run the tests with `make test`, which starts a MongoDB-wire server")
    })
}

/// A database name no other test uses.
pub fn unique_db(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t_{prefix}_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A port free right now on loopback (for programs that cannot report the port they bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

/// Directory for the logs of processes a test starts.
pub fn log_dir() -> PathBuf {
    let dir = target_dir().join("test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How a wait for a line ended without the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Exited,
    TimedOut,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped. Its
/// stdout and stderr go to a log file; lines are also offered to `wait_for`.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    pub log_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log_path = log_dir().join(format!("{name}-{}.log", unique_db("p")));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, rx) = mpsc::channel();
        let file = std::sync::Arc::new(std::sync::Mutex::new(std::fs::File::create(&log_path).unwrap()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
            let tx = tx.clone();
            let file = file.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(file.lock().unwrap(), "{line}");
                    let _ = tx.send(line);
                }
            });
        }
        Proc { name: name.to_owned(), child: Some(child), lines: rx, log_path }
    }

    /// Waits until a line containing `needle` is printed; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for(needle, timeout).unwrap_or_else(|ended| panic!("{}", self.report(needle, ended)))
    }

    /// As `wait_for`, but says how the wait ended instead of failing the test:
    /// the process exited first, or `timeout` passed.
    pub fn try_wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Ended> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Ended::Exited),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(Ended::TimedOut),
            }
        }
    }

    /// Whether the log so far holds `text` (e.g. why the process exited).
    pub fn logged(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log_path).is_ok_and(|log| log.contains(text))
    }

    /// Why a wait failed, with the end of the log (where the reason is) and
    /// without Envoy's list of its extensions.
    pub fn report(&self, needle: &str, ended: Ended) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> =
            log.lines().filter(|l| !l.contains("statically linked") && !l.contains("]   envoy.")).collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let how = match ended {
            Ended::Exited => "exited before it printed".to_owned(),
            Ended::TimedOut => "did not print in time".to_owned(),
        };
        format!("{} {how} {needle:?}; log: {}; its last lines:\n{tail}", self.name, self.log_path.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the exit; SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Kills at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The address in a log line such as `sidecar listening addr=127.0.0.1:4242`.
pub fn addr_in(line: &str) -> String {
    let start = line.find("addr=").map(|i| i + 5).unwrap_or_else(|| panic!("no addr= in {line:?}"));
    line[start..].split_whitespace().next().unwrap().to_owned()
}

/// Polls `url` until it answers 200.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} not ready within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls an async condition until it holds; fails the test with `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Path of a binary built by this workspace (`cargo build` ran before the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    assert!(path.exists(), "{} is missing: run `make test` (it builds every binary first)", path.display());
    path
}

/// What the sidecar prints once it listens (with `addr=`).
pub const SIDECAR_LISTENING: &str = "sidecar listening";

/// Starts the sidecar binary on a port it picks itself and waits until it listens.
/// Returns the process and its base URL. `extra_env` comes last, so it may
/// override any default here (address, database URI, log file).
pub fn start_sidecar(bin: &Path, db: &str, admin_token: &str, extra_env: &[(&str, &str)]) -> (Proc, String) {
    let proc = spawn_sidecar(bin, db, admin_token, extra_env);
    let line = proc.wait_for(SIDECAR_LISTENING, Duration::from_secs(30));
    let url = format!("http://{}", addr_in(&line));
    (proc, url)
}

/// Starts the sidecar binary without waiting for it (see `start_sidecar`).
pub fn spawn_sidecar(bin: &Path, db: &str, admin_token: &str, extra_env: &[(&str, &str)]) -> Proc {
    spawn_sidecar_on(None, bin, db, admin_token, extra_env)
}

/// As `spawn_sidecar`, in the named network namespace where one is given
/// (a `net::Host`).
pub fn spawn_sidecar_on(
    netns: Option<&str>,
    bin: &Path,
    db: &str,
    admin_token: &str,
    extra_env: &[(&str, &str)],
) -> Proc {
    let mut cmd = net::command_in(netns, bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MONGODB_URI", mongo_uri())
        .env("MONGODB_DB", db)
        .env("ADMIN_TOKEN", admin_token)
        .env("SIDECAR_ADDR", "127.0.0.1:0")
        .env("LOG_FILE", log_dir().join(format!("{db}-app.log")))
        .current_dir(log_dir());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Proc::spawn("sidecar", cmd)
}
