//! The admin console (`/admin/ui/`) in a real browser: headless Chromium
//! driven through ChromeDriver, against the whole stack (Envoy with the
//! .wasm, the sidecar, the mock upstream). `make test` installs Chromium
//! (`scripts/deps.sh --browser`); where it cannot, it says so and sets
//! `BROWSER_TESTS=unavailable`, the one case this test passes without a
//! browser, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bridge_tests::browser::{self, Browser};
use bridge_tests::stack::{Stack, StackOptions, ADMIN_TOKEN};
use serde_json::json;

const KEY: &str = "sk-console-test-key-0001";
const USER: &str = "console 用户";

/// Where the screenshots go: `CONSOLE_SCREENSHOTS` (the README's are made
/// with `CONSOLE_SCREENSHOTS=docs/console`), else the test logs.
fn shot_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("CONSOLE_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| bridge_tests::log_dir().join("console"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_creates_and_tops_up_a_key_and_sees_its_usage_in_the_chart() {
    let Some((chromium, chromedriver)) = browser::installed() else {
        let why = "no Chromium or ChromeDriver on this machine (scripts/deps.sh --browser installs them)";
        assert_eq!(std::env::var("BROWSER_TESTS").as_deref(), Ok("unavailable"), "{why}");
        eprintln!("\n!!!!!!!! SKIPPED the browser test of the admin console: {why} !!!!!!!!\n");
        return;
    };
    let s = Stack::start(StackOptions::default()).await;
    let b = Browser::start(&chromium, &chromedriver).await;
    let shots = shot_dir();

    // A token the API refuses keeps the console signed out, and is not kept.
    b.goto(&format!("{}/admin/ui", s.base)).await;
    b.type_into("#token", "not-the-admin-token").await;
    b.click("#signin").await;
    b.wait("the refusal", "return document.querySelector('#notice').textContent.includes('not accepted');", json!([]))
        .await;
    assert_eq!(b.eval("return sessionStorage.length;", json!([])).await, json!(0));
    assert_eq!(b.eval("return document.querySelector('#keys-view').hidden;", json!([])).await, json!(true));

    // Signed in: the token is in this tab's session storage and nowhere else.
    b.type_into("#token", ADMIN_TOKEN).await;
    b.click("#signin").await;
    b.wait("the keys view", "return !document.querySelector('#keys-view').hidden;", json!([])).await;
    let kept = b
        .eval(
            "return [sessionStorage.getItem('openclaw_admin_token'), localStorage.length, document.cookie];",
            json!([]),
        )
        .await;
    assert_eq!(kept, json!([ADMIN_TOKEN, 0, ""]));

    // Create a key with a limit, then top it up from its row.
    b.type_into("#create-form [name=user_name]", USER).await;
    b.type_into("#create-form [name=balance_tokens]", "100000").await;
    b.type_into("#create-form [name=api_key]", KEY).await;
    b.type_into("#create-form [name=rpm_limit]", "600").await;
    b.click("#create").await;
    let key_id = b
        .wait("the new key's row", "const r = [...document.querySelectorAll('#keys tbody tr')].find(r => r.textContent.includes(arguments[0])); return r && r.dataset.keyId;", json!([USER]))
        .await;
    let key_id = key_id.as_str().unwrap().to_owned();
    let doc = s.key_doc(KEY).await;
    assert_eq!(doc.get_i64("balance_tokens").unwrap(), 100_000);
    assert_eq!(&bridge_protocol::key_hash(KEY)[..16], key_id);
    let row = format!("#keys tr[data-key-id=\"{key_id}\"]");
    assert_eq!(b.text(&format!("{row} td:nth-child(9)")).await, "600", "the row shows the rpm limit");
    assert!(!b.text(&row).await.contains(KEY), "the full key is never shown again");

    b.type_into(&format!("{row} .topup-amount"), "500").await;
    b.click(&format!("{row} .topup")).await;
    b.wait(
        "the topped-up balance",
        "const c = document.querySelector(arguments[0]); return c && c.textContent === '100,500';",
        json!([format!("{row} .balance")]),
    )
    .await;
    assert_eq!(s.balance(KEY).await, 100_500);
    b.screenshot(&shots.join("keys.png")).await;

    // A request through the gateway; its usage appears in the chart per key
    // and per model, and its row in the audit log.
    let resp = s
        .chat(KEY, &json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "hello console"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-bridge-request-id"].to_str().unwrap().to_owned();
    let audit = s.settled_row(&request_id).await;
    let total = audit.get_i64("charged_tokens").unwrap();
    assert!(total > 0);

    b.click(".tab[data-view=usage]").await;
    let bars = "const bars = [...document.querySelectorAll('#chart rect.bar')].filter(r => r.dataset.series === arguments[0]); \
                return bars.length ? bars.reduce((s, r) => s + Number(r.dataset.tokens), 0) : null;";
    let charted = loop {
        // The chart reads the audit rows: refresh until the settled row is in.
        b.click("#usage-refresh").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = b.eval(bars, json!([key_id])).await;
        if !v.is_null() {
            break v;
        }
    };
    assert_eq!(charted, json!(total), "the key's bars add up to what its audit row charged");
    let totals = b.text(&format!("#usage-totals tr[data-series=\"{key_id}\"]")).await;
    assert!(totals.contains(USER) && totals.contains(&total.to_string()), "{totals}");
    b.screenshot(&shots.join("usage.png")).await;

    b.select("#usage-by", "model").await;
    let per_model = b.wait("the model's bars", bars, json!(["gpt-5-nano"])).await;
    assert_eq!(per_model, json!(total));

    b.click(".tab[data-view=audit]").await;
    b.type_into("#audit-form [name=key_id]", &key_id).await;
    b.click("#audit-search").await;
    let audit_row = format!("#audit tr[data-request-id=\"{request_id}\"]");
    assert_eq!(b.text(&format!("{audit_row} .charged")).await, total.to_string());
    assert_eq!(b.text(&format!("{audit_row} .total")).await, audit.get_i64("total_tokens").unwrap().to_string());
    assert_eq!(b.eval("return document.querySelectorAll('#audit tbody tr').length;", json!([])).await, json!(1));
    b.screenshot(&shots.join("audit.png")).await;

    // Freezing from the console stops the key at the gateway.
    b.click(".tab[data-view=keys]").await;
    b.click(&format!("{row} .freeze")).await;
    b.wait(
        "the frozen status",
        "const c = document.querySelector(arguments[0]); return c && c.textContent === 'frozen';",
        json!([format!("{row} .status")]),
    )
    .await;
    assert_eq!(s.key_doc(KEY).await.get_str("status").unwrap(), "frozen");
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "still there?"}]});
    bridge_tests::eventually("the frozen key is refused at the gateway", Duration::from_secs(15), || async {
        s.chat(KEY, &body).send().await.unwrap().status() == 403
    })
    .await;

    // Signing out forgets the token.
    b.click("#signout").await;
    assert_eq!(b.eval("return sessionStorage.length;", json!([])).await, json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_static_files_with_a_strict_policy_and_the_api_still_wants_the_token() {
    let s = Stack::start(StackOptions::default()).await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = http.get(format!("{}/admin/ui", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/admin/ui/");
    for (path, kind) in [
        ("/admin/ui/", "text/html"),
        ("/admin/ui/console.js", "text/javascript"),
        ("/admin/ui/console.css", "text/css"),
    ] {
        let r = http.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        let body = r.text().await.unwrap().replace("http://www.w3.org/2000/svg", "");
        assert!(!body.contains("http://") && !body.contains("https://"), "{path} loads nothing from elsewhere");
    }
    // The page is public; what it calls is not.
    let r = http.get(format!("{}/admin/keys", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{}/admin/ui/nothing.js", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
