//! A hostile guest cannot stall the daemon. In one sandbox, root (through
//! `sudo`) stops the agent process with SIGSTOP; in another an exec streams output forever. Meanwhile a third sandbox still
//! goes warm and cold on schedule and answers normally, calls to the stuck
//! one fail within their deadline with a 502/504 naming the sandbox, and a
//! daemon shutdown completes within its bound (docs/thermal.md).

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

/// Stops the agent process (`lohar-agent`, a child of PID 1) with
/// SIGSTOP, as root, a second after the exec that starts it has answered,
/// and writes the stopped process's state to the console, which the host
/// reads in the sandbox's serial log: the positive control that the stop
/// happened.
const STOP_AGENT: &str = "sleep 1; pid=$(pgrep -x lohar-agent); kill -STOP $pid; \
    echo \"bhatti-test: agent stopped $pid $(grep ^State: /proc/$pid/status)\" > /dev/console";

/// How long a graceful daemon shutdown may take with a hung guest among
/// its sandboxes (docs/thermal.md, "Shutdown").
const SHUTDOWN_BOUND: Duration = Duration::from_secs(90);

/// Polls `cond` without blocking the runtime, until it holds (`true`) or
/// `within` has passed (`false`, logged naming `what`).
async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while !cond() {
        if Instant::now() >= end {
            eprintln!("timed out after {within:?} waiting until {what}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

#[test]
fn a_stopped_agent_and_an_endless_stream_stall_nobody_else() {
    in_netns("api-hostile", || async {
        let data = data_dir();
        let tweak = "[thermal]\nwarm_after_secs = 2\ncold_after_secs = 4\n";
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let key = d.user("mallory", 5);
        let c = d.client(&key);
        let (s, stuck) = c
            .json(
                Method::POST,
                "/sandboxes",
                // Kept hot until its agent is stopped, so the ticker cannot
                // pause the VM under the background `sleep` that stops it.
                Some(json!({"name": "stuck", "image": "minimal", "memory_mb": 512, "keep_hot": true})),
            )
            .await;
        assert_eq!(s, 201, "{stuck}");
        c.create("streamer").await;
        let calm = c.create("calm").await;

        // An exec that streams forever, read as fast as it comes.
        let resp = c
            .req(Method::POST, "/sandboxes/streamer/exec")
            .header("accept", "application/x-ndjson")
            .timeout(Duration::from_secs(3600))
            .json(&json!({"cmd": ["yes"], "timeout_sec": 3600}))
            .send()
            .await
            .expect("streaming exec");
        assert_eq!(resp.status(), 200);
        let streamed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let streamed = streamed.clone();
            tokio::spawn(async move {
                let mut body = resp.bytes_stream();
                while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
                    streamed.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };

        // Root in `stuck` stops the agent.
        let script = format!(
            "setsid sudo sh -c '{STOP_AGENT}' </dev/null >/tmp/stop_agent.log 2>&1 & echo started"
        );
        assert_eq!(sh(&c, "stuck", &script).await.trim(), "started");
        // The console logs of every sandbox (only `stuck` prints the marker).
        let sandboxes = d.data.join("sandboxes");
        let consoles = move || -> String {
            std::fs::read_dir(&sandboxes)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("serial.log")).ok())
                .collect()
        };
        let stopped = wait_for(
            "the guest says its agent is stopped",
            Duration::from_secs(60),
            || consoles().contains("bhatti-test: agent stopped"),
        )
        .await;
        if !stopped {
            // The agent still answers: say why the stop failed.
            let (_, v) = c.exec("stuck", &["cat", "/tmp/stop_agent.log"]).await;
            panic!("the agent was not stopped: {v}");
        }
        let log = consoles();
        let line = log
            .lines()
            .find(|l| l.contains("bhatti-test: agent stopped"))
            .unwrap();
        assert!(
            line.contains("State:\tT (stopped)"),
            "the agent is stopped: {line}"
        );

        // From now on the ticker may take it warm and cold like any other.
        let (s, v) = c
            .json(
                Method::PATCH,
                "/sandboxes/stuck",
                Some(json!({"keep_hot": false})),
            )
            .await;
        assert_eq!(s, 200, "{v}");

        // A call to the stuck sandbox fails within its deadline, clearly.
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes/stuck/exec",
                Some(json!({"cmd": ["true"], "timeout_sec": 2})),
            )
            .await;
        assert!(s == 502 || s == 504, "stuck exec: {s} {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "a JSON error: {v}"
        );
        // Reading its record never touches the guest.
        let (s, v) = c.json(Method::GET, "/sandboxes/stuck", None).await;
        assert_eq!(s, 200, "{v}");

        // The calm sandbox cools on schedule and wakes normally meanwhile.
        wait_thermal(&c, "calm", "cold", Duration::from_secs(120)).await;
        let user_id = {
            let store = store::Store::open(&d.data.join("bhatti.db")).unwrap();
            store.user_by_name("mallory").unwrap().unwrap().id
        };
        let kinds = event_kinds(&d.data, &user_id, calm["id"].as_str().unwrap());
        assert!(
            kinds.ends_with(&["warm".into(), "cold".into()]),
            "calm went warm, then cold: {kinds:?}"
        );
        assert_eq!(sh(&c, "calm", "echo awake").await.trim(), "awake");
        let (s, v) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v.as_array().map(Vec::len), Some(3), "{v}");
        // The stuck one is still refused clearly (whatever tier the ticker
        // left it in).
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes/stuck/exec",
                Some(json!({"cmd": ["true"], "timeout_sec": 2})),
            )
            .await;
        assert!(s == 502 || s == 504, "stuck exec again: {s} {v}");

        // The stream really flowed the whole time.
        let before = streamed.load(std::sync::atomic::Ordering::Relaxed);
        let flows = wait_for(
            "the endless stream still flows",
            Duration::from_secs(30),
            || streamed.load(std::sync::atomic::Ordering::Relaxed) > before,
        )
        .await;
        if !flows {
            let (_, v) = c.json(Method::GET, "/sandboxes/streamer", None).await;
            panic!(
                "the endless stream stopped flowing after {before} bytes (reader ended: {}); streamer: {v}",
                reader.is_finished()
            );
        }
        assert!(before > 0);

        // Shutdown completes within its bound, stream and stuck guest notwithstanding.
        tokio::time::timeout(SHUTDOWN_BOUND, d.stop())
            .await
            .unwrap_or_else(|_| panic!("daemon shutdown took longer than {SHUTDOWN_BOUND:?}"));
        reader.abort();
    });
}
