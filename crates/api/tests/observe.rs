//! Observability on the fake engine (`vmm::fake`: a real daemon whose
//! "VMs" are `lohar serve` processes on the host): `GET /events` (listed,
//! filtered, private to their user, all of them for an admin key, and
//! followed as NDJSON until shutdown), `GET /metrics` parsed by the
//! Prometheus project's own text parser (`prometheus_client`, PyPI) with
//! its series present and moving, and the request id and version headers.
//!
//! Needs root (namespaces, TAPs), the host build of lohar, and the
//! parser: `$BHATTI_PROMETHEUS_PYTHON` (scripts/test.sh installs it into
//! a venv and sets it).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Client, TestDaemon};
use reqwest::Method;
use serde_json::Value;
use vmm::fake::FakeEngine;

/// A fake-engine daemon config whose thermal timers never fire during a
/// test; `root` holds the admin key.
fn start_config(data: &Path) -> api::DaemonConfig {
    testkit::placeholder_images(data);
    let mut c = common::config(
        data,
        "[thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n[limits]\ncreates_per_min = 1000\nreads_per_min = 10000\n",
    );
    c.admins = vec!["root".into()];
    c
}

fn engine() -> FakeEngine {
    FakeEngine::new(testkit::host_lohar())
}

async fn events(c: &Client, query: &str) -> Vec<Value> {
    let (s, v) = c.json(Method::GET, &format!("/events{query}"), None).await;
    assert_eq!(s, 200, "{query}: {v}");
    v.as_array().expect("a list").clone()
}

fn field(list: &[Value], f: &str) -> Vec<String> {
    list.iter()
        .map(|e| e[f].as_str().unwrap_or("-").to_string())
        .collect()
}

#[test]
fn events_are_listed_filtered_private_and_followed() {
    common::in_netns("obs-events", || async {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDaemon::start_with_engine(start_config(dir.path()), engine()).await;
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        let root = d.client(&d.user("root", 5));
        let a_id = alice.create("box").await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let b_id = bob.create("box").await["id"].as_str().unwrap().to_string();

        // Alice's: hers only, with her sandbox's transitions.
        let mine = events(&alice, "").await;
        assert!(!mine.is_empty());
        assert!(
            field(&mine, "sandbox_id").iter().all(|s| *s == a_id),
            "{mine:?}"
        );
        assert!(
            field(&mine, "type").contains(&"running".to_string()),
            "{mine:?}"
        );
        let ids: Vec<i64> = mine.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
        // Bob's sandbox, by his id or by a name Alice also uses: none of his.
        assert!(events(&alice, &format!("?sandbox={b_id}")).await.is_empty());
        let by_name = events(&alice, "?sandbox=box").await;
        assert_eq!(by_name, mine, "by name: Alice's own box");
        // The admin sees both users' events; a name two users share is
        // ambiguous for it, an id is not.
        let all = events(&root, "").await;
        let sbs = field(&all, "sandbox_id");
        assert!(sbs.contains(&a_id) && sbs.contains(&b_id), "{all:?}");
        let (s, v) = root.json(Method::GET, "/events?sandbox=box", None).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("use its id"), "{v}");
        let bobs = events(&root, &format!("?sandbox={b_id}")).await;
        assert!(!bobs.is_empty() && field(&bobs, "sandbox_id").iter().all(|s| *s == b_id));

        // Filters: type, time, limit.
        alice.json(Method::POST, "/sandboxes/box/stop", None).await;
        let cold = events(&alice, "?type=cold").await;
        assert_eq!(field(&cold, "type"), ["cold"], "{cold:?}");
        assert!(cold[0]["detail"]["took_ms"].is_u64(), "{cold:?}");
        let all_mine = events(&alice, "").await;
        let last = all_mine.last().unwrap().clone();
        assert_eq!(last["type"], "cold", "{all_mine:?}");
        let at = last["at"].as_i64().unwrap();
        let since = events(&alice, &format!("?since={at}")).await;
        assert!(since.contains(&last), "{since:?}");
        assert!(since.iter().all(|e| e["at"].as_i64().unwrap() >= at));
        assert!(events(&alice, &format!("?since={}", at + 3_600_000))
            .await
            .is_empty());
        let until = events(&alice, &format!("?until={}", at - 1)).await;
        assert!(until.iter().all(|e| e["at"].as_i64().unwrap() < at) && !until.contains(&last));
        let one = events(&alice, "?limit=1").await;
        assert_eq!(one, vec![last.clone()], "the newest one");
        for bad in [
            "?limit=0",
            "?limit=1001",
            "?limit=-1",
            "?follow=true&until=1",
            "?colour=red",
            "?since=soon",
        ] {
            let (s, v) = alice
                .json(Method::GET, &format!("/events{bad}"), None)
                .await;
            assert_eq!(s, 400, "{bad}: {v}");
            assert!(v["error"].is_string(), "{bad}: {v}");
        }
        let (s, _) = d
            .client("bht_nobody")
            .json(Method::GET, "/events", None)
            .await;
        assert_eq!(s, 401);

        // Following: the backlog, then a new event as it is recorded —
        // Alice's only (Bob's start happens first and must not show).
        let resp = alice
            .req(Method::GET, "/events?follow=true&limit=1")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/x-ndjson",
            "{:?}",
            resp.headers()
        );
        let mut stream = resp.bytes_stream();
        let mut seen = String::new();
        common::read_until(&mut stream, &mut seen, "\"type\":\"cold\"").await;
        bob.json(Method::POST, "/sandboxes/box/stop", None).await;
        let (s, v) = alice.json(Method::POST, "/sandboxes/box/start", None).await;
        assert_eq!(s, 200, "{v}");
        common::read_until(&mut stream, &mut seen, "\"type\":\"hot\"").await;
        let lines: Vec<Value> = seen
            .lines()
            .filter(|l| !l.is_empty()) // keep-alives
            .map(|l| serde_json::from_str(l).expect("one JSON event a line"))
            .collect();
        assert!(lines.len() >= 2, "{seen}");
        assert!(
            field(&lines, "sandbox_id").iter().all(|s| *s == a_id),
            "{seen}"
        );
        let hot = lines.iter().find(|e| e["type"] == "hot").unwrap();
        assert_eq!(hot["detail"]["from"], "cold", "{hot}");

        // Open streams are bounded per user: Alice's 8th is her last.
        let follow = |c: &Client| c.req(Method::GET, "/events?follow=true&limit=1").send();
        let mut more = Vec::new();
        for _ in 1..api::routes::events::MAX_FOLLOWERS_PER_USER {
            let r = follow(&alice).await.unwrap();
            assert_eq!(r.status(), 200);
            more.push(r);
        }
        let r = follow(&alice).await.unwrap();
        assert_eq!(r.status(), 429);
        let r = follow(&bob).await.unwrap();
        assert_eq!(r.status(), 200, "Bob's are his own");
        drop(r);
        // One closed: its place is free again (the daemon notices at its
        // next line, a keep-alive at the latest).
        drop(more.pop());
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = follow(&alice).await.unwrap();
            if r.status() == 200 {
                more.push(r);
                break;
            }
            assert_eq!(r.status(), 429);
            assert!(
                std::time::Instant::now() < end,
                "a closed stream's place stayed taken"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A quiet stream sends a keep-alive: an empty line.
        let r = bob
            .req(Method::GET, "/events?follow=true&type=none-such")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut quiet = r.bytes_stream();
        let first = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::StreamExt::next(&mut quiet),
        )
        .await
        .expect("a keep-alive within 30 s")
        .expect("not ended")
        .unwrap();
        assert_eq!(&first[..], b"\n");
        drop(quiet);

        // Shutdown ends the stream (well before the API drain bound).
        let ended = tokio::spawn(async move {
            while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                if chunk.is_err() {
                    break;
                }
            }
        });
        d.stop().await;
        drop(more);
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the follow stream ended at shutdown")
            .unwrap();
    });
}

/// The Python with `prometheus_client`, or `None` (after `cannot_run`).
fn prometheus_python() -> Option<PathBuf> {
    let py = std::env::var_os("BHATTI_PROMETHEUS_PYTHON").map(PathBuf::from)?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(py)
}

/// A scrape as `prometheus_client.parser` reads it: every sample as
/// `name{k="v",…}` (labels sorted) → value. Panics if the parser refuses
/// the text.
fn parse(py: &Path, text: &str) -> BTreeMap<String, f64> {
    use std::io::Write;
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn scrape(c: &Client) -> String {
    let resp = c.req(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    resp.text().await.unwrap()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no series {key}; have {:#?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_parse_and_move_with_a_create_a_wake_and_an_exec() {
    let Some(py) = prometheus_python() else {
        testkit::cannot_run(
            "no prometheus_client: scripts/test.sh installs it and sets BHATTI_PROMETHEUS_PYTHON",
        );
        return;
    };
    common::in_netns("obs-metrics", || async move {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDaemon::start_with_engine(start_config(dir.path()), engine()).await;
        let alice = d.client(&d.user("alice", 5));
        let root = d.client(&d.user("root", 5));

        // Admin keys only.
        let (s, v) = alice.json(Method::GET, "/metrics", None).await;
        assert_eq!(s, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("admin"), "{v}");
        let (s, v) = d
            .client("bht_nobody")
            .json(Method::GET, "/metrics", None)
            .await;
        assert_eq!(s, 401, "{v}");

        let before = parse(&py, &scrape(&root).await);
        let hot_running = r#"bhatti_sandboxes{status="running",thermal="hot"}"#;
        assert_eq!(get(&before, hot_running), 0.0);
        assert_eq!(get(&before, "bhatti_users{}"), 2.0);
        assert_eq!(get(&before, "bhatti_vmm_processes{}"), 0.0);
        let forbidden = r#"bhatti_http_requests_total{method="GET",route="/metrics",status="403"}"#;
        assert_eq!(get(&before, forbidden), 1.0);

        // A create, an exec, a stop (snapshot: cold) and a wake (hot from cold).
        alice.create("box").await;
        let (s, v) = alice.exec("box", &["true"]).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = alice.json(Method::POST, "/sandboxes/box/stop", None).await;
        assert_eq!(s, 200, "{v}");
        let mid = parse(&py, &scrape(&root).await);
        assert_eq!(
            get(&mid, r#"bhatti_sandboxes{status="running",thermal="cold"}"#),
            1.0
        );
        let (s, v) = alice.json(Method::POST, "/sandboxes/box/start", None).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = alice.exec("box", &["true"]).await;
        assert_eq!(s, 200, "{v}");
        let after = parse(&py, &scrape(&root).await);

        assert_eq!(get(&after, hot_running), 1.0);
        assert_eq!(
            get(
                &after,
                r#"bhatti_sandboxes{status="running",thermal="cold"}"#
            ),
            0.0
        );
        assert_eq!(get(&after, "bhatti_vmm_processes{}"), 1.0);
        assert!(get(&after, "bhatti_vmm_resident_memory_bytes{}") > 0.0);
        // Requests by route template (the path said `box`; the label does not).
        let execs = r#"bhatti_http_requests_total{method="POST",route="/sandboxes/{id}/exec",status="200"}"#;
        assert_eq!(get(&after, execs), 2.0);
        assert!(
            !after.keys().any(|k| k.contains("/sandboxes/box")),
            "raw paths leak"
        );
        let creates =
            r#"bhatti_http_request_duration_seconds_count{method="POST",route="/sandboxes"}"#;
        assert_eq!(get(&after, creates), 1.0);
        assert!(
            get(
                &after,
                r#"bhatti_http_request_duration_seconds_sum{method="POST",route="/sandboxes"}"#
            ) > 0.0
        );
        let inf = r#"bhatti_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/sandboxes"}"#;
        assert_eq!(get(&after, inf), 1.0);
        // The snapshot and the wake, timed.
        let cold = r#"bhatti_thermal_transition_duration_seconds_count{from="",kind="cold"}"#;
        let wake = r#"bhatti_thermal_transition_duration_seconds_count{from="cold",kind="hot"}"#;
        assert_eq!(get(&after, cold), 1.0);
        assert_eq!(get(&after, wake), 1.0);
        assert!(!before.contains_key(cold) && !before.contains_key(wake));
        // Agent calls.
        assert_eq!(
            get(
                &after,
                r#"bhatti_agent_call_duration_seconds_count{call="exec"}"#
            ),
            2.0
        );
        // The admin status agrees.
        let (s, st) = root.json(Method::GET, "/admin/status", None).await;
        assert_eq!(s, 200, "{st}");
        assert_eq!(st["health"]["engine"], "fake", "{st}");
        assert_eq!(st["users"], 2, "{st}");
        assert_eq!(st["sandboxes"]["running"], 1, "{st}");
        assert_eq!(st["sandboxes"]["failed"], 0, "{st}");
        assert_eq!(st["running_by_tier"]["hot"], 1, "{st}");
        assert_eq!(st["capacity"]["memory_mb_allocated"], 256, "{st}");
        assert_eq!(st["capacity"]["cpus_allocated"], 1, "{st}");
        assert!(st["capacity"]["host_cpus"].as_u64().unwrap() > 0, "{st}");
        assert!(
            st["capacity"]["host_memory_mb"].as_u64().unwrap() > 0,
            "{st}"
        );
        let (s, v) = alice.json(Method::GET, "/admin/status", None).await;
        assert_eq!(s, 403, "{v}");
        let build = format!(
            "bhatti_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(get(&after, &build), 1.0);
        d.stop().await;
    });
}

#[test]
fn every_answer_carries_a_request_id_and_the_version() {
    common::in_netns("obs-reqid", || async {
        let logs = common::logs();
        let dir = tempfile::tempdir().unwrap();
        let d = TestDaemon::start_with_engine(start_config(dir.path()), engine()).await;
        let alice = d.client(&d.user("alice", 5));
        let http = reqwest::Client::new();
        let is_generated = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());

        // Generated when none is given, on a 200, a 401 and a 404.
        let mut seen = Vec::new();
        for (path, status) in [("/health", 200), ("/sandboxes", 401), ("/nowhere", 404)] {
            let r = http.get(format!("{}{path}", d.url)).send().await.unwrap();
            assert_eq!(r.status(), status, "{path}");
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            assert!(is_generated(&id), "{path}: {id}");
            assert_eq!(r.headers()["x-bhatti-version"], env!("CARGO_PKG_VERSION"));
            assert_eq!(
                r.headers()["x-bhatti-min-client"],
                api_types::MIN_CLIENT_VERSION
            );
            seen.push(id);
        }
        seen.dedup();
        assert_eq!(seen.len(), 3, "ids differ: {seen:?}");

        // A sane one is echoed, and the request's log lines name it.
        let mine = "obs-test-7f3a9c";
        let r = alice
            .req(Method::GET, "/sandboxes/nope")
            .header("x-request-id", mine)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-request-id"], mine);
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        let named: Vec<&str> = text.lines().filter(|l| l.contains(mine)).collect();
        assert!(!named.is_empty(), "no log line names {mine}");
        assert!(
            named.iter().any(|l| l.contains("route=/sandboxes/{id}")),
            "{named:?}"
        );

        // Bad ones are replaced: spaces, too long, non-ASCII.
        let long = "x".repeat(129);
        for bad in ["has space", long.as_str(), "caf\u{e9}"] {
            let r = http
                .get(format!("{}/health", d.url))
                .header(
                    "x-request-id",
                    reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
                )
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-request-id"].to_str().unwrap();
            assert!(is_generated(id), "{bad:?} became {id}");
        }
        // The longest sane one is kept.
        let edge = "y".repeat(128);
        let r = http
            .get(format!("{}/health", d.url))
            .header("x-request-id", &edge)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], edge.as_str());
        d.stop().await;
    });
}
