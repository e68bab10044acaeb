//! Publishing on real VMs: a published port answers through the public
//! proxy (its own socket, no API key) by path route (host routes, and the
//! public proxy's hardening, are shown on the fake engine in
//! `public_hardening.rs`) —
//! busybox httpd on `tiny`, `fixtures/echo_server.py` on `minimal` with a
//! WebSocket echo and server-sent events that arrive one by one; a cold
//! sandbox wakes on the first request and a burst of first requests costs
//! one restore; a published port nobody listens on is a 502 with a reason;
//! bad, reserved and taken aliases are refused; another user's sandbox is a
//! 404; unpublish and destroy take the URL away. Without VMs: the public
//! proxy's own rate limit, and publishing turned off.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as Ws;

const ECHO_SERVER: &str = include_str!("fixtures/echo_server.py");

/// A client for the public proxy: no key, no redirects followed.
fn public_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn publish(c: &Client, sandbox: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    c.json(
        Method::POST,
        &format!("/sandboxes/{sandbox}/publish"),
        Some(body),
    )
    .await
}

/// GET on the public proxy: status and body text.
async fn get(http: &reqwest::Client, public: SocketAddr, path: &str) -> (u16, String) {
    let resp = http
        .get(format!("http://{public}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn error_of(text: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|_| panic!("non-JSON error: {text}"));
    v["error"].as_str().unwrap_or_default().to_string()
}

/// (restores from cold, cold transitions) recorded for a sandbox.
fn thermal_counts(d: &TestDaemon, user: &str, sid: &str) -> (usize, usize) {
    let store = store::Store::open(&d.data.join("bhatti.db")).unwrap();
    let uid = store.user_by_name(user).unwrap().unwrap().id;
    let events = store.events_of(&uid, sid).unwrap();
    let restores = events
        .iter()
        .filter(|e| e.kind == "hot" && e.detail["from"] == "cold")
        .count();
    let colds = events.iter().filter(|e| e.kind == "cold").count();
    (restores, colds)
}

async fn stop_cold(c: &Client, sandbox: &str) {
    let (s, v) = c
        .json(Method::POST, &format!("/sandboxes/{sandbox}/stop"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["thermal"], "cold", "{v}");
}

#[test]
fn published_ports_answer_publicly_wake_cold_sandboxes_and_go_away() {
    in_netns("api-pub", || async {
        let data = data_dir();
        testkit::images(image::Tier::Minimal);
        // No domain: path routes (host routes, which turn path routes off,
        // are shown on the fake engine in public_hardening.rs).
        let tweak = "[publish]\nlisten = \"127.0.0.1:0\"\n".to_string();
        let d = TestDaemon::start(config(data.path(), &tweak)).await;
        let public = d.public.expect("the public proxy is on");
        let http = public_client();
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));

        // --- busybox httpd on tiny ---------------------------------------
        let web = alice.create("web").await;
        let web_id = web["id"].as_str().unwrap().to_string();
        sh(
            &alice,
            "web",
            "mkdir -p /tmp/www && echo hello-tiny > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
        )
        .await;
        let (s, p) = publish(&alice, "web", json!({"port": 8080})).await;
        assert_eq!(s, 201, "{p}");
        assert_eq!(p["alias"], "web-8080", "the default alias: {p}");
        assert_eq!(p["port"], 8080);
        assert_eq!(p["url"], format!("http://{public}/web-8080/"), "{p}");
        assert_eq!(p["listening"], true, "{p}");

        // Path route: the guest sees the rest of the path.
        assert_eq!(
            get(&http, public, "/web-8080/index.html").await,
            (200, "hello-tiny\n".into())
        );
        assert_eq!(
            get(&http, public, "/WEB-8080/").await,
            (200, "hello-tiny\n".into())
        );
        let resp = http
            .get(format!("http://{public}/web-8080?x=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 308);
        assert_eq!(resp.headers()["location"], "/web-8080/?x=1");
        // Nothing else is reachable: unknown aliases, the root, a reserved
        // name.
        for path in ["/nobody-here/", "/", "/api/sandboxes", "/web-8081/"] {
            let (s, text) = get(&http, public, path).await;
            assert_eq!(s, 404, "{path}: {text}");
            assert!(!error_of(&text).is_empty(), "{path}: {text}");
        }

        // Inspect and list show it; bob sees nothing of it.
        let (s, v) = alice.json(Method::GET, "/sandboxes/web", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["published"][0]["alias"], "web-8080", "{v}");
        assert_eq!(v["published"][0]["port"], 8080, "{v}");
        assert_eq!(v["published"][0]["url"], p["url"], "{v}");
        assert!(v["published"][0].get("listening").is_none(), "{v}");
        let (_, list) = alice.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list[0]["published"][0]["alias"], "web-8080", "{list}");

        // The same port again: the same publication (200); another alias
        // for it: 409.
        let (s, again) = publish(&alice, "web", json!({"port": 8080})).await;
        assert_eq!((s, &again["alias"]), (200, &json!("web-8080")), "{again}");
        let (s, v) = publish(&alice, "web", json!({"port": 8080, "alias": "other-name"})).await;
        assert_eq!(s, 409, "{v}");

        // Refusals.
        for (body, status, says) in [
            (json!({"port": 8081, "alias": "ab"}), 400, "3-63"),
            (json!({"port": 8081, "alias": "my_app"}), 400, "a-z"),
            (json!({"port": 8081, "alias": "-app"}), 400, "start and end"),
            (json!({"port": 8081, "alias": "xn--app"}), 400, "punycode"),
            (json!({"port": 8081, "alias": "api"}), 400, "reserved"),
            (json!({"port": 8081, "alias": "Admin"}), 400, "reserved"),
            (json!({"port": 0}), 400, "port"),
            (json!({"port": 70000}), 400, "70000"),
            (json!({"port": 8081, "alias": "WEB-8080"}), 409, "taken"),
            (json!({"port": 8081, "bogus": 1}), 400, "bogus"),
        ] {
            let (s, v) = publish(&alice, "web", body.clone()).await;
            assert_eq!(s, status, "{body}: {v}");
            let e = v["error"].as_str().unwrap_or_default();
            assert!(e.contains(says), "{body}: {e}");
        }
        let (s, v) = publish(&bob, "web", json!({"port": 8080})).await;
        assert_eq!(s, 404, "bob publishing alice's sandbox: {v}");
        let (s, v) = publish(&bob, &web_id, json!({"port": 8080, "alias": "bobs"})).await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = bob
            .json(Method::DELETE, "/sandboxes/web/publish/8080", None)
            .await;
        assert_eq!(s, 404, "{v}");

        // A published port nobody listens on: publishing works (and says
        // so), the request is a 502 with a reason.
        let (s, v) = publish(&alice, "web", json!({"port": 9999, "alias": "Nobody-Home"})).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["alias"], "nobody-home");
        assert_eq!(v["listening"], false, "{v}");
        let (s, text) = get(&http, public, "/nobody-home/").await;
        assert_eq!(s, 502, "{text}");
        assert!(
            error_of(&text).contains("nothing is listening on port 9999"),
            "{text}"
        );

        // --- a cold sandbox wakes on the first request; a burst of first
        // requests causes one restore -----------------------------------
        stop_cold(&alice, "web").await;
        let (restores_before, colds_before) = thermal_counts(&d, "alice", &web_id);
        let burst = (0..6).map(|_| {
            let http = http.clone();
            async move { get(&http, public, "/web-8080/index.html").await }
        });
        let started = std::time::Instant::now();
        let answers = futures_util::future::join_all(burst).await;
        // For the record only (never asserted): a cold wake + first answer.
        eprintln!(
            "6 concurrent first requests to a cold sandbox: {:?}",
            started.elapsed()
        );
        for answer in answers {
            assert_eq!(answer, (200, "hello-tiny\n".into()));
        }
        let (_, v) = alice.json(Method::GET, "/sandboxes/web", None).await;
        assert_eq!(v["thermal"], "hot", "{v}");
        // Another cold after the burst: once its event is recorded, every
        // restore of the burst (recorded before it) is too.
        stop_cold(&alice, "web").await;
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        while thermal_counts(&d, "alice", &web_id).1 == colds_before {
            assert!(
                tokio::time::Instant::now() < end,
                "the cold event was never recorded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (restores, _) = thermal_counts(&d, "alice", &web_id);
        assert_eq!(restores - restores_before, 1, "one restore for the burst");

        // --- echo_server.py on minimal ------------------------------------
        let (s, v) = alice
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "py", "image": "minimal", "memory_mb": 512})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let resp = alice
            .req(Method::PUT, "/sandboxes/py/files?path=/tmp/echo_server.py")
            .body(ECHO_SERVER)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        // Published before the server starts: allowed.
        let (s, v) = publish(&alice, "py", json!({"port": 8000, "alias": "py-echo"})).await;
        assert_eq!(s, 201, "{v}");
        sh(
            &alice,
            "py",
            "setsid python3 /tmp/echo_server.py 8000 </dev/null >/tmp/echo.log 2>&1 &",
        )
        .await;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (s, text) = get(&http, public, "/py-echo/").await;
            if s == 200 {
                assert_eq!(text, "hello from echo_server\n");
                break;
            }
            assert_eq!(s, 502, "{text}");
            assert!(
                tokio::time::Instant::now() < end,
                "echo_server never answered: {text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let resp = http
            .post(format!("http://{public}/py-echo/echo"))
            .header("content-type", "application/x-test")
            .body("posted publicly")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-test");
        assert_eq!(resp.text().await.unwrap(), "posted publicly");

        // What the guest sees: where its paths are for the caller (never
        // the caller's word for it), who asked.
        let seen: serde_json::Value = http
            .get(format!("http://{public}/py-echo/headers"))
            .header("x-forwarded-prefix", "/spoofed")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["x-forwarded-prefix"], "/py-echo", "{seen}");
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
        assert_eq!(seen["host"], public.to_string(), "{seen}");

        // WebSocket echo through the public proxy.
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{public}/py-echo/ws"))
            .await
            .expect("public websocket");
        ws.send(Ws::text("héllo in public")).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Ws::Text(t) => assert_eq!(t.as_str(), "héllo in public"),
            other => panic!("expected text, got {other:?}"),
        }
        ws.send(Ws::binary(vec![1u8, 2, 3, 0, 255])).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Ws::Binary(b) => assert_eq!(&b[..], &[1u8, 2, 3, 0, 255]),
            other => panic!("expected binary, got {other:?}"),
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }

        // Server-sent events one by one: event k+1 is only sent after this
        // test has read event k and released the next.
        let resp = http
            .get(format!("http://{public}/py-echo/sse?n=3&gate=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut events = resp.bytes_stream();
        let mut seen = String::new();
        read_until(&mut events, &mut seen, "data: event 1\n\n").await;
        assert!(!seen.contains("event 2"), "{seen:?}");
        for next in 2..=3 {
            let r = http
                .post(format!("http://{public}/py-echo/sse/next"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            read_until(&mut events, &mut seen, &format!("data: event {next}\n\n")).await;
            assert!(!seen.contains(&format!("event {}", next + 1)), "{seen:?}");
        }
        assert!(
            events.next().await.is_none(),
            "the stream ends after 3 events"
        );

        // --- unpublish and destroy take the URL away ------------------------
        let (s, v) = alice
            .json(Method::DELETE, "/sandboxes/py/publish/8000", None)
            .await;
        assert_eq!(s, 204, "{v}");
        assert_eq!(get(&http, public, "/py-echo/").await.0, 404);
        let (s, v) = alice
            .json(Method::DELETE, "/sandboxes/py/publish/8000", None)
            .await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = alice
            .json(Method::DELETE, "/sandboxes/py/publish/0", None)
            .await;
        assert_eq!(s, 400, "{v}");
        let (_, v) = alice.json(Method::GET, "/sandboxes/py", None).await;
        assert_eq!(v["published"], json!([]), "{v}");

        let (s, v) = alice.json(Method::DELETE, "/sandboxes/web", None).await;
        assert_eq!(s, 204, "{v}");
        assert_eq!(get(&http, public, "/web-8080/").await.0, 404);
        assert_eq!(get(&http, public, "/nobody-home/").await.0, 404);
        // Its aliases are free again.
        let (s, v) = publish(&alice, "py", json!({"port": 8000, "alias": "web-8080"})).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(
            get(&http, public, "/web-8080/").await,
            (200, "hello from echo_server\n".into())
        );

        // A restart: publications are kept, and the first request wakes the
        // sandbox the new daemon adopted cold.
        d.stop().await;
        let d = TestDaemon::start(config(data.path(), &tweak)).await;
        let public = d.public.expect("the public proxy is on");
        assert_eq!(
            get(&http, public, "/web-8080/").await,
            (200, "hello from echo_server\n".into())
        );
        d.stop().await;
    });
}

/// Uses `sandbox` now, then waits until the thermal manager has paused it
/// for being idle: whatever was idle since before has been idle longer.
async fn wait_warm_after_use(c: &Client, sandbox: &str) {
    sh(c, sandbox, "true").await;
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = c
            .json(Method::GET, &format!("/sandboxes/{sandbox}"), None)
            .await;
        if v["thermal"] == "warm" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{sandbox} never went warm: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn public_streams_and_websockets_keep_their_sandbox_hot() {
    in_netns("api-pub-hot", || async {
        let data = data_dir();
        testkit::images(image::Tier::Minimal);
        let tweak = "[thermal]\nwarm_after_secs = 1\ncold_after_secs = 3600\n";
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let public = d.public.expect("the public proxy is on");
        let http = public_client();
        let alice = d.client(&d.user("alice", 5));
        let (s, v) = alice
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "py", "image": "minimal", "memory_mb": 512})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        alice.create("ctl").await;
        let resp = alice
            .req(Method::PUT, "/sandboxes/py/files?path=/tmp/echo_server.py")
            .body(ECHO_SERVER)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        sh(
            &alice,
            "py",
            "setsid python3 /tmp/echo_server.py 8000 </dev/null >/tmp/echo.log 2>&1 &",
        )
        .await;
        let (s, v) = publish(&alice, "py", json!({"port": 8000})).await;
        assert_eq!(s, 201, "{v}");
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while get(&http, public, "/py-8000/").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < end,
                "echo_server never answered"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let resp = http
            .get(format!("http://{public}/py-8000/sse?n=2&gate=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = resp.bytes_stream();
        let mut seen = String::new();
        read_until(&mut events, &mut seen, "data: event 1\n\n").await;
        // A sandbox used after the stream began goes warm when idle; by
        // then the streaming one has had no request for longer, and is hot
        // only because its response is still streaming.
        wait_warm_after_use(&alice, "ctl").await;
        let (_, v) = alice.json(Method::GET, "/sandboxes/py", None).await;
        assert_eq!(
            v["thermal"], "hot",
            "paused under a streaming response: {v}"
        );
        let r = http
            .post(format!("http://{public}/py-8000/sse/next"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_until(&mut events, &mut seen, "data: event 2\n\n").await;
        assert!(events.next().await.is_none());

        // The same for a WebSocket held open without traffic.
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{public}/py-8000/ws"))
            .await
            .expect("public websocket");
        ws.send(Ws::text("before")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Ws::text("before"));
        wait_warm_after_use(&alice, "ctl").await;
        let (_, v) = alice.json(Method::GET, "/sandboxes/py", None).await;
        assert_eq!(v["thermal"], "hot", "paused under an open WebSocket: {v}");
        ws.send(Ws::text("after")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Ws::text("after"));
        ws.close(None).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
        // The connection (and with it the keep-hot mark) ends when both
        // sides have closed it.
        drop(ws);

        // With the traffic over, it cools like any other.
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, v) = alice.json(Method::GET, "/sandboxes/py", None).await;
            if v["thermal"] == "warm" {
                break;
            }
            assert!(tokio::time::Instant::now() < end, "py never went warm: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d.stop().await;
    });
}

#[test]
fn the_public_proxy_has_its_own_rate_limit() {
    in_netns("api-pub-rl", || async {
        let data = data_dir();
        let tweak = "[publish]\nrequests_per_min = 3\n";
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let public = d.public.expect("the public proxy is on");
        let http = public_client();
        for _ in 0..3 {
            assert_eq!(get(&http, public, "/no-such-alias/").await.0, 404);
        }
        let resp = http
            .get(format!("http://{public}/no-such-alias/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().contains_key("retry-after"));
        assert!(error_of(&resp.text().await.unwrap()).contains("rate limit"));
        // The API's own limits are separate.
        let alice = d.client(&d.user("alice", 1));
        let (s, v) = alice.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(s, 200, "{v}");
        d.stop().await;
    });
}

#[test]
fn publishing_can_be_turned_off() {
    in_netns("api-pub-off", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "[publish]\nlisten = \"\"\n")).await;
        assert!(d.public.is_none());
        let alice = d.client(&d.user("alice", 1));
        let (s, v) = publish(&alice, "anything", json!({"port": 80})).await;
        assert_eq!(s, 403, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("publishing is off"),
            "{v}"
        );
        d.stop().await;
    });
}
