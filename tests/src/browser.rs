//! A real browser for UI tests: Debian's headless Chromium driven through
//! ChromeDriver's W3C WebDriver API (plain HTTP and JSON, so no client
//! library). `scripts/deps.sh --browser` installs both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{free_port, Proc};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .chain([Path::new("/usr/bin").join(name)])
            .find(|p| p.is_file())
    })
}

/// Chromium and ChromeDriver, if this machine has them.
pub fn installed() -> Option<(PathBuf, PathBuf)> {
    Some((find_binary(&["chromium", "chromium-browser"])?, find_binary(&["chromedriver"])?))
}

/// One browser session; the browser and its driver end when it is dropped.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Proc,
    _profile: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium with an empty profile.
    pub async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let http = reqwest::Client::new();
        let mut tries = 0;
        let (driver, base) = loop {
            tries += 1;
            let port = free_port();
            let mut cmd = Command::new(chromedriver);
            cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
            let driver = Proc::spawn("chromedriver", cmd);
            match driver.try_wait_for("started successfully", Duration::from_secs(30)) {
                Ok(_) => break (driver, format!("http://127.0.0.1:{port}")),
                Err(ended) => assert!(tries < 5, "{}", driver.report("started successfully", ended)),
            }
        };
        // ChromeDriver finds the browser's DevTools port in a file of the
        // profile and does not find it under a path with `..` in it.
        let profile = crate::log_dir().join(crate::unique_db("chromium-profile"));
        std::fs::create_dir_all(&profile).unwrap();
        let profile = profile.canonicalize().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1360,900",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let resp: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("ChromeDriver made no session: {resp}"))
            .to_owned();
        Browser { http, session: format!("{base}/session/{session}"), _driver: driver, _profile: profile }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let request = self.http.request(method.clone(), &url);
        let request = if method == reqwest::Method::GET { request } else { request.json(&body) };
        let resp: Value = request.send().await.unwrap().json().await.unwrap();
        if let Some(error) = resp["value"]["error"].as_str() {
            panic!("WebDriver {path}: {error}: {}", resp["value"]["message"]);
        }
        resp["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": args})).await
    }

    /// Waits until the page's `script` returns something truthy; returns it.
    pub async fn wait(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.eval(script, args.clone()).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting in the browser for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let script = "return document.querySelector(arguments[0]);";
        let v = self.wait(&format!("an element {css}"), script, json!([css])).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: not an element: {v}")).to_owned()
    }

    /// Clicks the element `css` names, as a user would (WebDriver's click).
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }

    /// Clears the field `css` names and types `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/clear"), json!({})).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), json!({"text": text})).await;
    }

    /// Picks the option whose value is `value` in the select `css` names.
    pub async fn select(&self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]")).await;
    }

    /// The visible text of `css`.
    pub async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), Value::Null).await.as_str().unwrap().to_owned()
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session, and with it Chromium (the driver itself is
        // stopped by its Proc): one plain HTTP/1.1 DELETE, as Drop cannot await.
        use std::io::{Read, Write};
        let Some(rest) = self.session.strip_prefix("http://") else { return };
        let Some((host, path)) = rest.split_once('/') else { return };
        if let Ok(mut tcp) = std::net::TcpStream::connect(host) {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = tcp.write_all(request.as_bytes());
            let _ = tcp.read_to_end(&mut Vec::new());
        }
    }
}
