//! The public proxy against hostile internet clients, on the fake engine
//! (`vmm::fake`: the "guest" is a `lohar serve` process on the host, in the
//! test's network namespace, so its tunnel to `127.0.0.1:PORT` reaches a
//! server this test runs there): a slow-loris connection and an idle
//! keep-alive one are cut after the header-read timeout while other
//! connections are served; connections over the cap are refused without
//! the daemon's descriptors growing, and served again once others close;
//! per-address connection caps; per-client rate limits keyed on the real
//! client behind a trusted proxy, and a spoofed `X-Forwarded-For` from an
//! untrusted peer escaping nothing; what the guest is told in
//! `X-Forwarded-*`; on path routes the guest's cookies confined to its
//! prefix and `Service-Worker-Allowed` dropped; with a domain, path routes
//! answer 404.
//!
//! Needs root (namespaces, TAPs) and the host build of lohar (`cargo
//! build -p lohar`; see `testkit::host_lohar`).

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use common::{Client, TestDaemon};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use vmm::fake::FakeEngine;

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    testkit::placeholder_images(&data);
    Setup { _dir: dir, data }
}

/// A daemon on the fake engine with `[publish]` settings `publish`.
async fn daemon(s: &Setup, publish: &str) -> (TestDaemon, SocketAddr) {
    let config = common::config(
        &s.data,
        &format!("[thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n[publish]\nlisten = \"127.0.0.1:0\"\n{publish}"),
    );
    let d = TestDaemon::start_with_engine(config, FakeEngine::new(testkit::host_lohar())).await;
    let public = d.public.expect("the public proxy is on");
    (d, public)
}

/// A client of the public proxy from `local` (a loopback address).
fn public_client(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(local.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A TCP connection to `to` from `local`.
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    sock.connect(to).await.unwrap()
}

async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !cond().await {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the peer closes (or resets) the connection, or `deadline`
/// passes: what was read, and whether it was closed.
async fn read_until_closed(tcp: &mut TcpStream, deadline: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(end, tcp.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The daemon's own sockets of connections accepted on `port`: sockets in
/// this process's descriptor table whose local port is `port`, listener
/// excepted. (The daemon runs in the test process; the test's client
/// sockets have `port` as their remote port, so they do not count.)
fn accepted_sockets(port: u16) -> usize {
    let mut inodes = HashSet::new();
    // The runtime's threads live in the test's namespace; the process's
    // first thread does not.
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f[3] != "0A" && f[9] != "0" {
                inodes.insert(f[9].to_string());
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .filter(|i| inodes.contains(i))
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn status_of(http: &reqwest::Client, url: String) -> u16 {
    http.get(url).send().await.unwrap().status().as_u16()
}

#[test]
fn slow_loris_and_idle_connections_are_cut_while_others_are_served() {
    common::in_netns("pubh-loris", || async {
        let s = setup();
        let (d, public) = daemon(&s, "header_read_timeout_secs = 2\n").await;
        let http = public_client("127.0.0.1");
        // A response that streams for longer than the timeout: only request
        // heads are timed, never answers.
        let gate = Arc::new(Notify::new());
        let port = guest_server(gate.clone()).await;
        let alice = d.client(&d.user("alice", 2));
        alice.create("app").await;
        publish(&alice, "app", port, "myapp").await;
        let resp = http
            .get(format!("http://{public}/myapp/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut streamed = resp.bytes_stream();
        let mut seen = String::new();
        common::read_until(&mut streamed, &mut seen, "one\n").await;

        // A client that never finishes its request head: a header line
        // every 300 ms, forever.
        let mut loris = connect_from("127.0.0.1", public).await;
        loris
            .write_all(b"GET /nobody-home/ HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let dribble = async {
            for i in 0.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if loris
                    .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return i;
                }
                // A reset shows on a read before the next write fails.
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(1), loris.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return i,
                    _ => {}
                }
                assert!(i < 200, "still open after 200 header lines (60 s)");
            }
            unreachable!()
        };
        // One that never sends a byte, and one left idle after an answer.
        let mut silent = connect_from("127.0.0.1", public).await;
        let mut idle = connect_from("127.0.0.1", public).await;
        idle.write_all(b"GET /nobody-home/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        idle.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 404", "a complete request is answered");

        // Meanwhile other connections are served (positive control).
        let control = async {
            for _ in 0..5 {
                let st = status_of(&http, format!("http://{public}/nobody-home/")).await;
                assert_eq!(st, 404);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let (lines, ()) = tokio::join!(dribble, control);
        assert!(lines >= 1, "the slow client did send header lines first");
        let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(60)).await;
        assert!(closed, "a silent connection is closed");
        let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(60)).await;
        assert!(closed, "an idle keep-alive connection is closed");
        // The timeout has passed (both were cut); the stream goes on.
        gate.notify_one();
        common::read_until(&mut streamed, &mut seen, "two\n").await;
        assert_eq!(seen, "one\ntwo\n");
        assert!(futures_util::StreamExt::next(&mut streamed).await.is_none());
        // And still serving.
        assert_eq!(
            status_of(&http, format!("http://{public}/nobody-home/")).await,
            404
        );
        d.stop().await;
    });
}

#[test]
fn connections_over_the_cap_are_refused_without_descriptors_growing() {
    common::in_netns("pubh-cap", || async {
        let s = setup();
        let (d, public) = daemon(
            &s,
            "header_read_timeout_secs = 600\nmax_connections = 8\nmax_connections_per_ip = 8\n",
        )
        .await;
        let http = public_client("127.0.0.1");
        assert_eq!(
            status_of(&http, format!("http://{public}/nobody-home/")).await,
            404
        );
        drop(http);
        wait_for(
            "the control connection is gone",
            Duration::from_secs(30),
            || async { accepted_sockets(public.port()) == 0 },
        )
        .await;

        // Eight connections that hold their slots (silent, well within the
        // header timeout).
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(connect_from("127.0.0.1", public).await);
        }
        wait_for(
            "8 connections accepted",
            Duration::from_secs(30),
            || async { accepted_sockets(public.port()) == 8 },
        )
        .await;
        let fds_before = open_fds();

        // 200 more: each is answered 503 (or reset) and closed at once.
        let mut extra = Vec::new();
        for _ in 0..200 {
            extra.push(connect_from("127.0.0.1", public).await);
        }
        let answers = futures_util::future::join_all(
            extra
                .iter_mut()
                .map(|c| async { read_until_closed(c, Duration::from_secs(30)).await }),
        )
        .await;
        let mut refusals = 0;
        for (got, closed) in &answers {
            assert!(closed, "a connection over the cap was left open");
            if !got.is_empty() {
                assert!(
                    got.starts_with(b"HTTP/1.1 503"),
                    "{}",
                    String::from_utf8_lossy(got)
                );
                refusals += 1;
            }
        }
        eprintln!("{refusals} of 200 refused connections read the 503 before the close");
        // The daemon holds no more than its cap; the process holds the
        // test's 200 client sockets and little else.
        assert_eq!(accepted_sockets(public.port()), 8);
        let fds_after = open_fds();
        assert!(
            fds_after <= fds_before + 200 + 16,
            "descriptors grew from {fds_before} to {fds_after} for 200 client sockets"
        );
        drop(extra);

        // Once the held ones close, new connections are served again.
        drop(held);
        wait_for(
            "the held connections are gone",
            Duration::from_secs(30),
            || async { accepted_sockets(public.port()) == 0 },
        )
        .await;
        let http = public_client("127.0.0.1");
        for _ in 0..3 {
            assert_eq!(
                status_of(&http, format!("http://{public}/nobody-home/")).await,
                404
            );
        }
        d.stop().await;
    });
}

#[test]
fn one_address_cannot_take_every_connection_but_a_trusted_proxy_can_take_more() {
    common::in_netns("pubh-perip", || async {
        let s = setup();
        let (d, public) = daemon(
            &s,
            "header_read_timeout_secs = 600\nmax_connections = 16\nmax_connections_per_ip = 3\ntrusted_proxies = [\"127.0.0.9\"]\n",
        )
        .await;
        let mut greedy = Vec::new();
        for _ in 0..3 {
            greedy.push(connect_from("127.0.0.2", public).await);
        }
        wait_for(
            "3 connections accepted",
            Duration::from_secs(30),
            || async { accepted_sockets(public.port()) == 3 },
        )
        .await;
        let mut fourth = connect_from("127.0.0.2", public).await;
        let (got, closed) = read_until_closed(&mut fourth, Duration::from_secs(30)).await;
        assert!(closed, "a fourth connection from one address is closed");
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 503"));
        // Another address is served (positive control).
        assert_eq!(
            status_of(
                &public_client("127.0.0.3"),
                format!("http://{public}/nobody-home/")
            )
            .await,
            404
        );
        // A trusted proxy may hold more than 3 (its clients are many).
        let proxy = public_client("127.0.0.9");
        let mut proxied = Vec::new();
        for _ in 0..5 {
            proxied.push(connect_from("127.0.0.9", public).await);
        }
        for c in proxied.iter_mut() {
            c.write_all(b"GET /nobody-home/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            c.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"HTTP/1.1 404");
        }
        assert_eq!(
            status_of(&proxy, format!("http://{public}/nobody-home/")).await,
            404
        );
        drop(greedy);
        d.stop().await;
    });
}

/// GET through the public proxy from `http` with `X-Forwarded-For: xff`.
async fn get_as(http: &reqwest::Client, public: SocketAddr, xff: Option<&str>) -> u16 {
    let mut r = http.get(format!("http://{public}/nobody-home/"));
    if let Some(x) = xff {
        r = r.header("x-forwarded-for", x);
    }
    r.send().await.unwrap().status().as_u16()
}

#[test]
fn rate_limits_follow_the_real_client_behind_trusted_proxies_only() {
    common::in_netns("pubh-xff", || async {
        let s = setup();
        let (d, public) = daemon(
            &s,
            "requests_per_min = 3\ntrusted_proxies = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\n",
        )
        .await;
        let proxy = public_client("127.0.0.2");
        // Two clients behind one trusted proxy: limited separately.
        for _ in 0..3 {
            assert_eq!(get_as(&proxy, public, Some("198.51.100.1")).await, 404);
        }
        assert_eq!(get_as(&proxy, public, Some("198.51.100.1")).await, 429);
        for _ in 0..3 {
            assert_eq!(get_as(&proxy, public, Some("198.51.100.2")).await, 404);
        }
        assert_eq!(get_as(&proxy, public, Some("198.51.100.2")).await, 429);
        // A client that prepends addresses of its own is still itself (the
        // right-most untrusted one); trusted hops after it are skipped.
        assert_eq!(
            get_as(&proxy, public, Some("203.0.113.50, 198.51.100.1")).await,
            429
        );
        assert_eq!(
            get_as(&proxy, public, Some("198.51.100.1, 10.1.1.1")).await,
            429
        );
        assert_eq!(
            get_as(&proxy, public, Some("198.51.100.3, 10.1.1.1")).await,
            404
        );
        // An untrusted peer's X-Forwarded-For is ignored: new "clients"
        // every request, one bucket.
        let direct = public_client("127.0.0.1");
        for i in 0..3 {
            let xff = format!("192.0.2.{i}");
            assert_eq!(get_as(&direct, public, Some(&xff)).await, 404);
        }
        assert_eq!(get_as(&direct, public, Some("192.0.2.200")).await, 429);
        assert_eq!(get_as(&direct, public, None).await, 429);
        // Nor does it spend the bucket of the client it names.
        assert_eq!(
            get_as(&public_client("127.0.0.3"), public, Some("198.51.100.2")).await,
            404
        );
        d.stop().await;
    });
}

/// A server standing in for the guest's: answers every request with the
/// headers it got (JSON) and sets cookies and a service-worker scope;
/// `/stream` sends `one`, waits for `gate`, then sends `two` and ends.
async fn guest_server(gate: Arc<Notify>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stream = move || {
        let gate = gate.clone();
        async move {
            let one = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"one\n"))
            });
            let two = futures_util::stream::once(async move {
                gate.notified().await;
                Ok(axum::body::Bytes::from_static(b"two\n"))
            });
            axum::body::Body::from_stream(futures_util::StreamExt::chain(one, two))
        }
    };
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(stream))
        .fallback(|req: axum::extract::Request| async move {
            let seen: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        Value::from(v.to_str().unwrap_or_default()),
                    )
                })
                .chain([("path".to_string(), Value::from(req.uri().to_string()))])
                .collect();
            let mut h = HeaderMap::new();
            for c in [
                "sid=1; Path=/; HttpOnly",
                "pref=dark; Path=/settings; Domain=127.0.0.1",
                "plain=1",
                "aware=1; Path=/myapp/x",
            ] {
                h.append("set-cookie", HeaderValue::from_static(c));
            }
            h.insert("service-worker-allowed", HeaderValue::from_static("/"));
            h.insert("clear-site-data", HeaderValue::from_static("\"cookies\""));
            (h, axum::Json(Value::Object(seen)))
        });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

async fn publish(c: &Client, sandbox: &str, port: u16, alias: &str) {
    let (s, v) = c
        .json(
            Method::POST,
            &format!("/sandboxes/{sandbox}/publish"),
            Some(json!({"port": port, "alias": alias})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

fn cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[test]
fn path_routes_confine_cookies_and_service_workers() {
    common::in_netns("pubh-path", || async {
        let s = setup();
        let (d, public) = daemon(&s, "trusted_proxies = [\"127.0.0.2\"]\n").await;
        let port = guest_server(Arc::default()).await;
        let alice = d.client(&d.user("alice", 2));
        alice.create("app").await;
        publish(&alice, "app", port, "myapp").await;

        let http = public_client("127.0.0.1");
        let r = http
            .get(format!("http://{public}/myapp/page?q=1"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            cookies(&r),
            [
                "sid=1; Path=/myapp/; HttpOnly",
                "pref=dark; Path=/myapp/settings",
                "plain=1",
                "aware=1; Path=/myapp/x",
            ]
        );
        assert!(!r.headers().contains_key("service-worker-allowed"));
        assert!(!r.headers().contains_key("clear-site-data"));
        // The guest heard who asked from this proxy, not from the client.
        let seen: Value = r.json().await.unwrap();
        assert_eq!(seen["path"], "/page?q=1", "{seen}");
        assert_eq!(seen["x-forwarded-prefix"], "/myapp", "{seen}");
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
        assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
        assert_eq!(seen["x-forwarded-host"], public.to_string(), "{seen}");

        // From a trusted proxy: its chain, with the peer appended, and its
        // word for the scheme and host.
        let seen: Value = public_client("127.0.0.2")
            .get(format!("http://{public}/myapp/"))
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "pv.example.com")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["x-forwarded-for"], "198.51.100.1, 127.0.0.2", "{seen}");
        assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
        assert_eq!(seen["x-forwarded-host"], "pv.example.com", "{seen}");
        d.stop().await;
    });
}

#[test]
fn with_a_domain_only_host_routes_answer() {
    common::in_netns("pubh-host", || async {
        let s = setup();
        let (d, public) = daemon(&s, "domain = \"pv.test\"\n").await;
        let port = guest_server(Arc::default()).await;
        let alice = d.client(&d.user("alice", 2));
        alice.create("app").await;
        publish(&alice, "app", port, "myapp").await;
        let http = public_client("127.0.0.1");

        // Its host answers (positive control), with the path unchanged.
        let r = http
            .get(format!("http://{public}/myapp/x"))
            .header("host", "myapp.pv.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // Its own origin: paths as the guest set them; no Domain (which
        // would hand the cookie to every other publication); the
        // service-worker header is its own business.
        assert_eq!(
            cookies(&r),
            [
                "sid=1; Path=/; HttpOnly",
                "pref=dark; Path=/settings",
                "plain=1",
                "aware=1; Path=/myapp/x",
            ]
        );
        assert_eq!(r.headers()["service-worker-allowed"], "/");
        let seen: Value = r.json().await.unwrap();
        assert_eq!(seen["path"], "/myapp/x", "{seen}");
        assert!(seen.get("x-forwarded-prefix").is_none(), "{seen}");

        // The same publication by path, on the domain or an address: 404.
        for host in ["pv.test", &public.to_string(), "other.example"] {
            for path in ["/myapp/", "/myapp/x", "/myapp"] {
                let r = http
                    .get(format!("http://{public}{path}"))
                    .header("host", host)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 404, "{host}{path}");
                let v: Value = r.json().await.unwrap();
                assert!(v["error"].is_string(), "{v}");
            }
        }
        d.stop().await;
    });
}
