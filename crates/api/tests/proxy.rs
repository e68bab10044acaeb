//! Guest ports through the daemon, on real VMs: `GET …/ports` lists a
//! server started in the guest (never the agent's port); the authenticated
//! proxy carries HTTP GET and POST (busybox httpd on `tiny`,
//! `fixtures/echo_server.py` on `minimal`), a WebSocket echo and server-sent
//! events as they are sent, strips the API key, wakes a cold sandbox, and
//! answers a closed port with 502, another user with 404 and no key with
//! 401; the raw tunnel carries bytes both ways with a half-close.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

const ECHO_SERVER: &str = include_str!("fixtures/echo_server.py");

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ports(c: &Client, sandbox: &str) -> Vec<(u64, String, String)> {
    let (s, v) = c
        .json(Method::GET, &format!("/sandboxes/{sandbox}/ports"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    v["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no ports array: {v}"))
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["address"].as_str().unwrap().to_string(),
                p["protocol"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn wait_for_port(c: &Client, sandbox: &str, port: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if ports(c, sandbox).await.iter().any(|p| p.0 == port) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "port {port} never listened in {sandbox}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ws_connect(
    d: &TestDaemon,
    key: Option<&str>,
    path: &str,
) -> Result<WsStream, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{}{path}", d.addr)
        .into_client_request()
        .unwrap();
    if let Some(key) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// The status and `{"error"}` of a refused WebSocket handshake.
fn refusal(e: tokio_tungstenite::tungstenite::Error) -> (u16, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("non-JSON refusal: {body:?}"));
            (
                resp.status().as_u16(),
                v["error"].as_str().unwrap_or_default().to_string(),
            )
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// Watches `sandboxes` (which never wakes them) for three idle periods
/// (`warm_after_secs = 2`): each must stay hot all along.
async fn stays_hot(c: &Client, sandboxes: &[&str]) {
    let end = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < end {
        for sb in sandboxes {
            let (s, v) = c.json(Method::GET, &format!("/sandboxes/{sb}"), None).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(
                v["thermal"], "hot",
                "{sb} was paused under open traffic: {v}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn ports_proxy_websocket_sse_tunnel_and_refusals() {
    in_netns("api-proxy", || async {
        let data = data_dir();
        testkit::images(image::Tier::Minimal);
        // Sandboxes idle for 2 s are paused: long-lived proxied traffic
        // has to keep them hot.
        let d = TestDaemon::start(config(data.path(), "[thermal]\nwarm_after_secs = 2\n")).await;
        let key = d.user("alice", 5);
        let alice = d.client(&key);
        let bob = d.client(&d.user("bob", 5));
        alice.create("web").await;
        let (s, v) = alice
            .json(
                Method::POST,
                "/sandboxes",
                Some(serde_json::json!({"name": "py", "image": "minimal", "memory_mb": 512})),
            )
            .await;
        assert_eq!(s, 201, "{v}");

        // busybox httpd on tiny, with a CGI script that echoes POST bodies.
        sh(
            &alice,
            "web",
            "mkdir -p /tmp/www/cgi-bin && echo hello-tiny > /tmp/www/index.html && \
             printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\ncat\\n' > /tmp/www/cgi-bin/echo && \
             chmod +x /tmp/www/cgi-bin/echo && httpd -p 8080 -h /tmp/www && \
             (setsid nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &)",
        )
        .await;
        // echo_server.py on minimal, put in with the files API, detached.
        let resp = alice
            .req(Method::PUT, "/sandboxes/py/files?path=/tmp/echo_server.py")
            .body(ECHO_SERVER)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        sh(
            &alice,
            "py",
            "setsid python3 /tmp/echo_server.py 8000 </dev/null >/tmp/echo.log 2>&1 &",
        )
        .await;

        // Ports: the servers, never the agent.
        wait_for_port(&alice, "py", 8000).await;
        let listed = ports(&alice, "py").await;
        assert!(
            listed.contains(&(8000, "0.0.0.0".into(), "tcp".into())),
            "{listed:?}"
        );
        assert!(!listed.iter().any(|p| p.0 == 1024), "{listed:?}");
        let listed = ports(&alice, "web").await;
        assert!(listed.iter().any(|p| p.0 == 8080), "{listed:?}");
        assert!(!listed.iter().any(|p| p.0 == 1024), "{listed:?}");

        // HTTP on tiny: GET (with and without the trailing path) and POST.
        for path in [
            "/sandboxes/web/proxy/8080/index.html",
            "/sandboxes/web/proxy/8080/",
        ] {
            let resp = alice.req(Method::GET, path).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(resp.text().await.unwrap(), "hello-tiny\n", "{path}");
        }
        let resp = alice
            .req(Method::POST, "/sandboxes/web/proxy/8080/cgi-bin/echo")
            .body("posted to busybox")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "posted to busybox");

        // HTTP on minimal: GET, and a POST bigger than the JSON limit.
        let resp = alice
            .req(Method::GET, "/sandboxes/py/proxy/8000")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "hello from echo_server\n");
        let big: Vec<u8> = (0..3 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let resp = alice
            .req(Method::POST, "/sandboxes/py/proxy/8000/echo")
            .header("content-type", "application/x-test")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-test");
        assert!(resp.bytes().await.unwrap() == big, "echoed body differs");

        // What the guest server sees: no API key, X-Forwarded-*, the Host.
        let (s, v) = alice
            .json(Method::GET, "/sandboxes/py/proxy/8000/headers", None)
            .await;
        assert_eq!(s, 200, "{v}");
        assert!(v.get("authorization").is_none(), "{v}");
        assert!(!v.to_string().contains(&key), "{v}");
        assert_eq!(v["x-forwarded-for"], "127.0.0.1", "{v}");
        assert_eq!(v["x-forwarded-proto"], "http", "{v}");
        assert_eq!(v["host"], d.addr.to_string(), "{v}");
        assert_eq!(v["x-forwarded-host"], d.addr.to_string(), "{v}");

        // WebSocket echo through the proxy: text and binary.
        let mut ws = ws_connect(&d, Some(&key), "/sandboxes/py/proxy/8000/ws")
            .await
            .expect("websocket through the proxy");
        ws.send(Ws::text("héllo over the proxy")).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Ws::Text(t) => assert_eq!(t.as_str(), "héllo over the proxy"),
            other => panic!("expected text, got {other:?}"),
        }
        let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
        ws.send(Ws::binary(blob.clone())).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Ws::Binary(b) => assert!(b[..] == blob[..], "binary echo differs"),
            other => panic!("expected binary, got {other:?}"),
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }

        // Server-sent events arrive one by one: event 2 is only sent after
        // this test has seen event 1 and asked for the next.
        let resp = alice
            .req(Method::GET, "/sandboxes/py/proxy/8000/sse?n=3&gate=1")
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
            let r = alice
                .req(Method::POST, "/sandboxes/py/proxy/8000/sse/next")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            read_until(&mut events, &mut seen, &format!("data: event {next}\n\n")).await;
        }
        assert!(
            events.next().await.is_none(),
            "the stream ends after 3 events"
        );

        // Refusals: nothing listening (502 with a reason), bad ports (400),
        // another user's sandbox (404), no key (401).
        let (s, v) = alice
            .json(Method::GET, "/sandboxes/py/proxy/9999/x", None)
            .await;
        assert_eq!(s, 502, "{v}");
        assert_eq!(
            v["error"], "nothing is listening on port 9999 in sandbox 'py'",
            "{v}"
        );
        for bad in ["0", "http", "70000"] {
            let (s, v) = alice
                .json(Method::GET, &format!("/sandboxes/py/proxy/{bad}/"), None)
                .await;
            assert_eq!(s, 400, "{bad}: {v}");
            assert!(v["error"].as_str().unwrap().contains("port"), "{v}");
        }
        for path in ["/sandboxes/web/tunnel/8080", "/sandboxes/%FF/proxy/80/x"] {
            let (s, v) = alice.json(Method::GET, path, None).await;
            assert_eq!(s, 400, "{path}: {v}");
        }
        for path in [
            "/sandboxes/py/proxy/8000/",
            "/sandboxes/py/ports",
            "/sandboxes/web/proxy/8080/index.html",
        ] {
            let (s, v) = bob.json(Method::GET, path, None).await;
            assert_eq!(s, 404, "{path}: {v}");
        }
        let resp = reqwest::get(format!("{}/sandboxes/py/proxy/8000/", d.url))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let (s, _) = refusal(
            ws_connect(&d, None, "/sandboxes/web/tunnel/8080")
                .await
                .expect_err("no key, no tunnel"),
        );
        assert_eq!(s, 401);

        // The raw tunnel: an HTTP/1.0 exchange with busybox httpd, our side
        // half-closed with an empty binary frame.
        let mut t = ws_connect(&d, Some(&key), "/sandboxes/web/tunnel/8080")
            .await
            .expect("tunnel websocket");
        t.send(Ws::binary(b"GET /index.html HTTP/1.0\r\n\r\n".to_vec()))
            .await
            .unwrap();
        t.send(Ws::binary(Vec::new())).await.unwrap();
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), t.next())
                .await
                .expect("tunnel answer within 60s")
            {
                Some(Ok(Ws::Binary(b))) if b.is_empty() => break,
                Some(Ok(Ws::Binary(b))) => got.extend_from_slice(&b),
                other => panic!("expected tunnel bytes, got {other:?}"),
            }
        }
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.") && got.ends_with("hello-tiny\n"),
            "{got}"
        );
        let _ = t.close(None).await;
        let (s, e) = refusal(
            ws_connect(&d, Some(&key), "/sandboxes/web/tunnel/9999")
                .await
                .expect_err("a closed port is refused before the upgrade"),
        );
        assert_eq!(s, 502, "{e}");
        assert!(e.contains("nothing is listening on port 9999"), "{e}");
        let (s, _) = refusal(
            ws_connect(&d, Some(&bob.key), "/sandboxes/web/tunnel/8080")
                .await
                .expect_err("another user's sandbox is refused"),
        );
        assert_eq!(s, 404);

        // Long-lived traffic keeps its sandbox hot: a server-sent event
        // stream (py) and a raw tunnel (web) held open across several idle
        // periods, then a WebSocket through the proxy (py) likewise; each
        // still carries data afterwards.
        wait_for_port(&alice, "web", 7000).await;
        let resp = alice
            .req(Method::GET, "/sandboxes/py/proxy/8000/sse?n=2&gate=1")
            .send()
            .await
            .unwrap();
        let mut events = resp.bytes_stream();
        let mut seen = String::new();
        read_until(&mut events, &mut seen, "data: event 1\n\n").await;
        let mut t = ws_connect(&d, Some(&key), "/sandboxes/web/tunnel/7000")
            .await
            .expect("tunnel to nc");
        stays_hot(&alice, &["py", "web"]).await;
        t.send(Ws::binary(b"still there?\n".to_vec()))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(60), t.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => assert_eq!(&b[..], b"still there?\n"),
            other => panic!("no echo through the held tunnel: {other:?}"),
        }
        let _ = t.close(None).await;
        let r = alice
            .req(Method::POST, "/sandboxes/py/proxy/8000/sse/next")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read_until(&mut events, &mut seen, "data: event 2\n\n").await;
        drop(events);
        let mut ws = ws_connect(&d, Some(&key), "/sandboxes/py/proxy/8000/ws")
            .await
            .expect("websocket through the proxy");
        ws.send(Ws::text("one")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Ws::text("one"));
        stays_hot(&alice, &["py"]).await;
        ws.send(Ws::text("two")).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(m))) => assert_eq!(m, Ws::text("two")),
            other => panic!("no echo through the held websocket: {other:?}"),
        }
        let _ = ws.close(None).await;

        // A server that does not speak HTTP (nc echoing the request back
        // as its "response"): 502 saying the exchange broke.
        let (s, v) = alice
            .json(Method::GET, "/sandboxes/web/proxy/7000/", None)
            .await;
        assert_eq!(s, 502, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .starts_with("the server on port 7000 in sandbox 'web' broke the HTTP exchange"),
            "{v}"
        );

        // A cold sandbox wakes for a proxied request, its server intact.
        let (s, v) = alice.json(Method::POST, "/sandboxes/web/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let resp = alice
            .req(Method::GET, "/sandboxes/web/proxy/8080/index.html")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "hello-tiny\n");

        d.stop().await;
    });
}
