//! Share links and the browser terminal, on a real daemon over the fake
//! engine (its guest is a real `lohar serve`, so PTY sessions are real).
//!
//! * the API: wrong tokens 401, another user's sandbox 404, bad TTLs 400,
//!   the page's CSP, only a hash stored, revocation and expiry (an open
//!   terminal too), a read-only link's input dropped by the daemon (with
//!   a read-write positive control), the per-IP limit;
//! * the browser: Debian's Chromium driven by Playwright
//!   (`tests/fixtures/share_browser.py`, its Python from
//!   `BHATTI_PLAYWRIGHT_PYTHON`, set by scripts/test.sh) types into the
//!   page, resizes it, reopens it, and is refused on revoked and expired
//!   links; every request it makes goes to the daemon.
//!
//! Needs root (a network namespace), the host lohar, and for the browser
//! part Chromium and Playwright (`testkit::cannot_run` without them).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, TestDaemon};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The daemon's per-IP limit on token attempts in this test.
const ATTEMPTS_PER_MIN: u32 = 200;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn share_config(data: &Path) -> api::DaemonConfig {
    let mut c = common::config(
        data,
        &format!(
            "[thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n\
             [share]\nmax_ttl_secs = 86400\nattempts_per_min = {ATTEMPTS_PER_MIN}\n"
        ),
    );
    // Reads /metrics.
    c.admins = vec!["alice".into()];
    c
}

async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn share(c: &Client, sandbox: &str, body: Value) -> (u16, Value) {
    c.json(
        Method::POST,
        &format!("/sandboxes/{sandbox}/share"),
        Some(body),
    )
    .await
}

async fn make(c: &Client, sandbox: &str, body: Value) -> Value {
    let (s, v) = share(c, sandbox, body).await;
    assert_eq!(s, 201, "{v}");
    v
}

/// `GET /share/info` with this `Authorization` value (none if empty).
async fn info(d: &TestDaemon, auth: &str) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{}/share/info", d.url));
    if !auth.is_empty() {
        r = r.header("authorization", auth);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Opens `/share/ws` and sends `open`; the first message back.
async fn ws_open(d: &TestDaemon, open: Value) -> (Ws, Message) {
    let req = format!("ws://{}/share/ws", d.addr)
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    ws.send(Message::Text(open.to_string().into()))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), ws.next())
        .await
        .expect("an answer to the open message")
        .expect("a message")
        .expect("a message");
    (ws, first)
}

async fn send(ws: &mut Ws, m: Message) {
    ws.send(m).await.unwrap()
}

fn attached(m: &Message) -> bool {
    matches!(m, Message::Text(t) if t.contains("\"attached\""))
}

/// Reads until the socket closes; the close code (and what came before).
async fn close_code(ws: &mut Ws) -> (Option<u16>, String) {
    let mut seen = String::new();
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(Message::Text(t))) => seen.push_str(&t),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    };
    let code = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("the socket closes");
    (code, seen)
}

/// The Python with Playwright and the Chromium it drives, or why not.
fn browser() -> Result<PathBuf, String> {
    let py = std::env::var_os("BHATTI_PLAYWRIGHT_PYTHON")
        .map(PathBuf::from)
        .ok_or(
            "BHATTI_PLAYWRIGHT_PYTHON is not set (scripts/test.sh installs Playwright and sets it)",
        )?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import playwright.sync_api"])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
    if !ok.success() {
        return Err(format!("{} cannot import playwright", py.display()));
    }
    if !Path::new(CHROMIUM).exists() {
        return Err(format!("no {CHROMIUM} (apt package chromium)"));
    }
    Ok(py)
}

#[test]
fn share_links_and_the_browser_terminal() {
    if !testkit::is_root() {
        return testkit::cannot_run("the share test needs root (a network namespace)");
    }
    common::in_netns("share", || async {
        let dir = tempfile::tempdir().unwrap();
        testkit::placeholder_images(dir.path());
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let d = TestDaemon::start_with_engine(share_config(dir.path()), engine).await;
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        alice.create("dev").await;
        let root = common::sh(&alice, "dev", "pwd").await.trim().to_string();

        // The page and its files: no key, a strict policy, nothing else.
        for path in [
            "/share/",
            "/share/term.js",
            "/share/xterm.js",
            "/share/xterm.css",
        ] {
            let resp = reqwest::get(format!("{}{path}", d.url)).await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let csp = resp.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .to_string();
            for directive in [
                "default-src 'none'",
                "script-src 'self';",
                "connect-src 'self'",
                "frame-ancestors 'none'",
            ] {
                assert!(csp.contains(directive), "{path}: {csp}");
            }
            assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        }
        let page = reqwest::get(format!("{}/share/", d.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !page.contains("<script>") && !page.contains("style="),
            "no inline code: {page}"
        );
        let resp = reqwest::get(format!("{}/share/nope.js", d.url))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);

        // Bad TTLs and bodies: 400. Another user's sandbox: 404.
        for body in [
            json!({"ttl_secs": 0}),
            json!({"ttl_secs": 86401}),
            json!({"ttl": 5}),
        ] {
            let (s, v) = share(&alice, "dev", body.clone()).await;
            assert_eq!(s, 400, "{body}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
        let (s, v) = share(&bob, "dev", json!({})).await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = bob.json(Method::GET, "/sandboxes/dev/shares", None).await;
        assert_eq!(s, 404, "{v}");

        let rw = make(&alice, "dev", json!({"ttl_secs": 3600})).await;
        let ro = make(&alice, "dev", json!({"read_only": true})).await;
        let rw_token = rw["token"].as_str().unwrap().to_string();
        let ro_token = ro["token"].as_str().unwrap().to_string();
        assert!(rw_token.starts_with("bhs_") && rw_token.len() == 68, "{rw}");
        assert_eq!(rw["url"], format!("{}/share/#t={rw_token}", d.url), "{rw}");
        assert_eq!(rw["read_only"], false);
        assert_eq!(ro["read_only"], true);
        let (s, v) = bob
            .json(
                Method::DELETE,
                &format!("/sandboxes/dev/shares/{}", rw["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 404, "{v}");
        let (s, list) = alice.json(Method::GET, "/sandboxes/dev/shares", None).await;
        assert_eq!(s, 200, "{list}");
        assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
        assert!(
            !list.to_string().contains("bhs_"),
            "no tokens in a listing: {list}"
        );

        // Tokens: right ones open, wrong ones are 401 (a control first).
        let (s, v) = info(&d, &format!("Bearer {rw_token}")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["sandbox"], "dev");
        assert_eq!(v["read_only"], false);
        let wrong = format!("bhs_{}", "0".repeat(64));
        for auth in [
            "",
            "Bearer ",
            "Bearer bhs_x",
            &format!("Bearer {wrong}"),
            &format!("Bearer {}", d.user("carol", 1)),
        ] {
            let (s, v) = info(&d, auth).await;
            assert_eq!(s, 401, "{auth:?}: {v}");
        }
        let (mut ws, first) = ws_open(&d, json!({"token": wrong})).await;
        assert!(
            matches!(&first, Message::Text(t) if t.contains("error")),
            "{first:?}"
        );
        assert_eq!(close_code(&mut ws).await.0, Some(4401));
        // A malformed open message: refused (1008), the token not echoed.
        let (mut ws, first) = ws_open(&d, json!({"tokn": rw_token})).await;
        assert!(
            matches!(&first, Message::Text(t) if t.contains("bad open message") && !t.contains("bhs_")),
            "{first:?}"
        );
        assert_eq!(close_code(&mut ws).await.0, Some(1008));
        // An API key is no share token, nor a share token an API key.
        let (s, _) = d
            .client(&rw_token)
            .json(Method::GET, "/sandboxes", None)
            .await;
        assert_eq!(s, 401);

        // Only the hash is stored; the token is in no metrics.
        let mut db = std::fs::read(d.data.join("bhatti.db")).unwrap();
        db.extend(std::fs::read(d.data.join("bhatti.db-wal")).unwrap_or_default());
        let db = String::from_utf8_lossy(&db);
        assert!(!db.contains(&rw_token[4..]), "the token is in the database");
        assert!(
            db.contains(&api::share::hash_token(&rw_token)),
            "its hash is"
        );
        let metrics = alice
            .req(Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("/share/info"), "{metrics}");
        assert!(!metrics.contains("bhs_"), "{metrics}");

        // Read-only, enforced by the daemon: a raw client's keystrokes,
        // size and resizes on a read-only link never reach the session;
        // the same on a read-write link do (the positive control).
        let ro_probe = format!("{root}/ro-probe");
        let rw_probe = format!("{root}/rw-probe");
        let keys = |s: String| Message::Binary(s.into_bytes().into());
        let resize = |rows: u16, cols: u16| {
            Message::Text(
                json!({"type": "resize", "rows": rows, "cols": cols})
                    .to_string()
                    .into(),
            )
        };
        let probe = |want: &'static str| {
            let (alice, rw_probe) = (alice.clone(), rw_probe.clone());
            async move {
                wait_for(&format!("{want:?} in the probe file"), || async {
                    common::sh(
                        &alice,
                        "dev",
                        &format!("cat {rw_probe} 2>/dev/null || true"),
                    )
                    .await
                    .contains(want)
                })
                .await;
            }
        };
        // The session, 24x80, made on the read-write link.
        let (mut ws, first) = ws_open(
            &d,
            json!({"token": rw_token, "session": "probe", "rows": 24, "cols": 80}),
        )
        .await;
        assert!(attached(&first), "{first:?}");
        send(&mut ws, keys(format!("stty size > {rw_probe}\r"))).await;
        probe("24 80").await;
        ws.close(None).await.unwrap();
        drop(ws);
        // The read-only link attaches with another size, resizes, types.
        let (mut ws, first) = ws_open(
            &d,
            json!({"token": ro_token, "session": "probe", "steal": true, "rows": 10, "cols": 20}),
        )
        .await;
        assert!(attached(&first), "{first:?}");
        send(&mut ws, resize(12, 30)).await;
        send(
            &mut ws,
            keys(format!("touch {ro_probe}; stty size >> {rw_probe}\r")),
        )
        .await;
        ws.close(None).await.unwrap();
        drop(ws);
        // Back on the read-write link (no size given): still 24x80; its
        // own resize and keystrokes work.
        let (mut ws, first) = ws_open(
            &d,
            json!({"token": rw_token, "session": "probe", "steal": true}),
        )
        .await;
        assert!(attached(&first), "{first:?}");
        send(
            &mut ws,
            keys(format!("echo second; stty size >> {rw_probe}\r")),
        )
        .await;
        probe("24 80\n24 80\n").await;
        send(&mut ws, resize(11, 33)).await;
        send(&mut ws, keys(format!("stty size >> {rw_probe}\r"))).await;
        probe("11 33").await;
        let sizes = common::sh(&alice, "dev", &format!("cat {rw_probe}")).await;
        assert_eq!(
            sizes, "24 80\n24 80\n11 33\n",
            "the read-only link changed the size"
        );
        let ls = common::sh(&alice, "dev", &format!("ls {root}")).await;
        assert!(!ls.contains("ro-probe"), "a read-only link typed: {ls}");
        ws.close(None).await.unwrap();
        drop(ws);

        // Revoked: refused, and a terminal open on it is closed.
        let gone = make(&alice, "dev", json!({})).await;
        let gone_token = gone["token"].as_str().unwrap().to_string();
        let (mut open_ws, first) =
            ws_open(&d, json!({"token": gone_token, "session": "gone"})).await;
        assert!(attached(&first), "{first:?}");
        let (s, _) = alice
            .json(
                Method::DELETE,
                &format!("/sandboxes/dev/shares/{}", gone["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 204);
        assert_eq!(info(&d, &format!("Bearer {gone_token}")).await.0, 401);
        let (code, said) = close_code(&mut open_ws).await;
        assert_eq!(code, Some(4401), "{said}");
        assert!(said.contains("revoked"), "{said}");
        let (s, _) = alice
            .json(
                Method::DELETE,
                &format!("/sandboxes/dev/shares/{}", gone["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 404, "revoked twice");

        // Expired: a one-second link, refused once its second is over.
        let short = make(&alice, "dev", json!({"ttl_secs": 1})).await;
        let short_token = short["token"].as_str().unwrap().to_string();
        let expires_at = short["expires_at"].as_i64().unwrap();
        wait_for("the short link expired", || async {
            store::now_ms() > expires_at
        })
        .await;
        assert_eq!(info(&d, &format!("Bearer {short_token}")).await.0, 401);
        let (_, list) = alice.json(Method::GET, "/sandboxes/dev/shares", None).await;
        assert!(
            !list.to_string().contains(short["id"].as_str().unwrap()),
            "{list}"
        );

        // On the public proxy (`publish --shell`): the same page and
        // token checks, no key; a publication's path is not the terminal.
        let public = d.public.expect("the test daemon's public proxy");
        let pb = make(&alice, "dev", json!({"public": true})).await;
        let pb_token = pb["token"].as_str().unwrap().to_string();
        assert_eq!(
            pb["url"],
            format!("http://{public}/share/#t={pb_token}"),
            "{pb}"
        );
        let resp = reqwest::get(format!("http://{public}/share/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        let public_info = |auth: String| {
            let url = format!("http://{public}/share/info");
            async move {
                let resp = reqwest::Client::new()
                    .get(url)
                    .header("authorization", auth)
                    .send()
                    .await
                    .unwrap();
                resp.status().as_u16()
            }
        };
        assert_eq!(public_info(format!("Bearer {pb_token}")).await, 200);
        assert_eq!(public_info(format!("Bearer {wrong}")).await, 401);
        let resp = reqwest::Client::new()
            .post(format!("http://{public}/share/info"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        let (s, v) = alice
            .json(
                Method::POST,
                "/sandboxes/dev/publish",
                Some(json!({"port": 3000, "alias": "share"})),
            )
            .await;
        assert_eq!(s, 400, "the alias 'share' is reserved: {v}");

        // The browser.
        match browser() {
            Err(why) => testkit::cannot_run(&why),
            Ok(py) => {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/share_browser.py");
                let url = |t: &str| format!("{}/share/#t={t}", d.url);
                let run = tokio::process::Command::new(&py)
                    .arg(&script)
                    .args([
                        CHROMIUM,
                        &url(&rw_token),
                        &url(&ro_token),
                        &url(&gone_token),
                        &url(&short_token),
                        pb["url"].as_str().unwrap(),
                    ])
                    .kill_on_drop(true)
                    .output();
                let out = tokio::time::timeout(Duration::from_secs(300), run)
                    .await
                    .expect("the browser script finishes within 300 s")
                    .expect("the browser script runs");
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success(),
                    "browser script failed: {stdout}\n{stderr}"
                );
                let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
                println!("browser: {v}");
                assert_eq!(v["answer"], json!(["42"]), "{v}");
                assert_ne!(
                    v["size_before"], v["size_after"],
                    "resizing the window resizes the PTY: {v}"
                );
                assert_eq!(v["offline"][0], "reconnecting", "{v}");
                assert!(
                    v["offline"][1].as_str().unwrap().contains("reconnecting"),
                    "{v}"
                );
                assert_eq!(
                    v["still_offline"][0], "reconnecting",
                    "it keeps retrying: {v}"
                );
                assert!(
                    v["still_offline"][1]
                        .as_str()
                        .unwrap()
                        .contains("cannot reach"),
                    "{v}"
                );
                assert_eq!(v["after_reconnect"], json!(["again6"]), "{v}");
                assert!(
                    v["scrollback"].as_array().is_some_and(|a| !a.is_empty()),
                    "{v}"
                );
                assert_eq!(v["ro_badge"], true, "{v}");
                assert_eq!(v["reloaded"], json!(["42"]), "{v}");
                assert_eq!(v["busy"][0], "reconnecting", "{v}");
                assert_eq!(v["busy_offer"], "take over", "{v}");
                assert_eq!(v["taken_from"][0], "ended", "{v}");
                assert_eq!(v["taken_offer"], "take over", "{v}");
                assert_eq!(v["rw_typed"], json!(["rw122"]), "{v}");
                assert_eq!(v["public"], json!(["pub25"]), "{v}");
                assert_eq!(v["ro_typed"], json!([]), "the read-only page typed: {v}");
                assert_eq!(v["revoked"][0], "failed", "{v}");
                assert_eq!(v["expired"][0], "failed", "{v}");
                assert_eq!(v["foreign"], json!([]), "requests outside the daemon: {v}");
                assert_eq!(v["csp_violations"], json!([]), "{v}");
                let requests = v["requests"].as_array().unwrap();
                let requests: Vec<_> = requests
                    .iter()
                    .filter(|r| r.as_str().unwrap().starts_with(&d.url))
                    .collect();
                for file in [
                    "/share/",
                    "/share/xterm.js",
                    "/share/addon-fit.js",
                    "/share/term.js",
                    "/share/xterm.css",
                    "/share/term.css",
                    "/share/info",
                ] {
                    assert!(
                        requests
                            .iter()
                            .any(|r| r.as_str().is_some_and(|r| r.ends_with(file))),
                        "{file} was not loaded: {v}"
                    );
                }
                // Read-write (and its reconnection), reopened, read-only,
                // read-write again; none for the refused links.
                assert!(v["websockets"].as_u64().unwrap() >= 5, "{v}");
                // The token stayed in the fragment, and left the address bar.
                assert!(
                    !requests
                        .iter()
                        .any(|r| r.as_str().unwrap().contains("bhs_")),
                    "{v}"
                );
                assert!(!v["address_bar"].as_str().unwrap().contains("bhs_"), "{v}");
            }
        }

        // The per-IP limit on token attempts (last: it spends this
        // address's budget). A control above: attempts were answered.
        // The bucket refills continuously (ATTEMPTS_PER_MIN a minute), so a
        // slow machine needs a few more than ATTEMPTS_PER_MIN to drain it.
        let mut limited = None;
        for i in 0..=3 * ATTEMPTS_PER_MIN {
            let (s, _) = info(&d, &format!("Bearer {wrong}")).await;
            assert!(s == 401 || s == 429, "{s}");
            if s == 429 {
                limited = Some(i);
                break;
            }
        }
        assert!(
            limited.is_some(),
            "no 429 after {} attempts",
            3 * ATTEMPTS_PER_MIN
        );
        // The API itself is not limited by it.
        let (s, _) = alice.json(Method::GET, "/sandboxes/dev/shares", None).await;
        assert_eq!(s, 200);
        d.stop().await;
    });
}
