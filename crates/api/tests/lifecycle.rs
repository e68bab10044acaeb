//! Sandboxes end to end through the API, on real VMs.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};

#[test]
fn create_list_inspect_exec_destroy() {
    in_netns("api-life", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));

        let (s, created) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "dev", "disk_size_mb": 300})),
            )
            .await;
        assert_eq!(s, 201, "{created}");
        assert_eq!(created["disk_size_mb"], 300, "{created}");
        for field in [
            "id",
            "name",
            "image",
            "cpus",
            "memory_mb",
            "status",
            "thermal",
            "ip",
            "created_at",
        ] {
            assert!(
                created.get(field).is_some(),
                "sandbox JSON lacks {field}: {created}"
            );
        }
        assert_eq!(created["status"], "running");
        assert_eq!(created["image"], "tiny");
        let id = created["id"].as_str().unwrap().to_string();

        // Creating the same name again answers 200 with the existing sandbox.
        let (s, again) = c
            .json(Method::POST, "/sandboxes", Some(json!({"name": "dev"})))
            .await;
        assert_eq!((s, again["id"].as_str()), (200, Some(id.as_str())));

        let (s, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(s, 200);
        assert_eq!(list.as_array().unwrap().len(), 1);
        for key in [id.as_str(), "dev"] {
            let (s, one) = c
                .json(Method::GET, &format!("/sandboxes/{key}"), None)
                .await;
            assert_eq!((s, one["id"].as_str()), (200, Some(id.as_str())));
        }

        let (s, out) = c.exec("dev", &["uname", "-r"]).await;
        assert_eq!(s, 200, "{out}");
        assert!(
            out["stdout"].as_str().unwrap().contains("cloud-amd64"),
            "{out}"
        );

        let (s, patched) = c
            .json(
                Method::PATCH,
                "/sandboxes/dev",
                Some(json!({"labels": {"team": "x"}, "keep_hot": true})),
            )
            .await;
        assert_eq!(
            (s, &patched["labels"]["team"], &patched["keep_hot"]),
            (200, &json!("x"), &json!(true))
        );

        // The disk size shows in the guest's df, and a disk grows while the
        // sandbox is cold: its files stay and the guest's file system fills
        // the larger disk at the next boot.
        let (s, v) = c
            .json(
                Method::PATCH,
                "/sandboxes/dev",
                Some(json!({"keep_hot": false})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_disk_mb(&c, "dev", 300).await;
        assert_eq!(
            sh(&c, "dev", "echo kept > /tmp/grown.txt; sync; echo ok").await,
            "ok\n"
        );
        let (s, v) = c
            .json(
                Method::PATCH,
                "/sandboxes/dev",
                Some(json!({"disk_size_mb": 600})),
            )
            .await;
        assert_eq!(s, 409, "a hot sandbox's disk does not grow: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("stop it first"),
            "{v}"
        );
        let (s, v) = c.json(Method::POST, "/sandboxes/dev/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let (s, v) = c
            .json(
                Method::PATCH,
                "/sandboxes/dev",
                Some(json!({"disk_size_mb": 600})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (v["disk_size_mb"].as_u64(), v["status"].as_str()),
            (Some(600), Some("stopped")),
            "{v}"
        );
        assert_disk_mb(&c, "dev", 600).await;
        assert_eq!(sh(&c, "dev", "cat /tmp/grown.txt").await, "kept\n");

        let (s, _) = c.json(Method::DELETE, "/sandboxes/dev", None).await;
        assert_eq!(s, 204);
        let (s, err) = c.json(Method::GET, &format!("/sandboxes/{id}"), None).await;
        assert_eq!(s, 404);
        assert!(err["error"].as_str().is_some());
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert!(list.as_array().unwrap().is_empty());
        // Nothing of it is left on disk.
        let left: Vec<_> = std::fs::read_dir(data.path().join("sandboxes"))
            .map(|r| r.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
        d.stop().await;
    });
}

/// The guest's `/` (the overlay on the sandbox disk) is about `mb` MiB in
/// `df`: ext4 keeps some for itself (journal, inode tables), so a little
/// less, never more.
async fn assert_disk_mb(c: &Client, sandbox: &str, mb: u64) {
    let out = sh(c, sandbox, "df -k / | tail -n 1").await;
    let kib: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("df: {out:?}"));
    let shown = kib / 1024;
    assert!(
        shown <= mb && shown * 100 >= mb * 85,
        "df shows {shown} MiB for a {mb} MiB disk: {out:?}"
    );
}

#[test]
fn exec_reports_codes_streams_in_order_and_times_out() {
    in_netns("api-exec", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        c.create("ex").await;

        let (s, out) = c
            .exec("ex", &["sh", "-c", "echo out; echo err >&2; exit 3"])
            .await;
        assert_eq!(s, 200);
        assert_eq!(
            (
                out["exit_code"].as_i64(),
                out["stdout"].as_str(),
                out["stderr"].as_str()
            ),
            (Some(3), Some("out\n"), Some("err\n"))
        );

        // A megabyte of output arrives whole.
        let (_, out) = c
            .exec(
                "ex",
                &["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a"],
            )
            .await;
        let stdout = out["stdout"].as_str().unwrap();
        assert_eq!(stdout.len(), 1_048_576);
        assert!(stdout.bytes().all(|b| b == b'a'));

        // NDJSON: lines in order, each flushed as produced — the command
        // cannot finish until the test has seen its first line. (stdout
        // and stderr are separate pipes, so only output separated in time
        // has a defined order; hence the pause before "three".)
        let resp = c
            .req(Method::POST, "/sandboxes/ex/exec")
            .header("accept", "application/x-ndjson")
            .json(&json!({"cmd": ["sh", "-c", "echo one; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two >&2; sleep 0.3; echo three"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut lines: Vec<serde_json::Value> = Vec::new();
        let mut released = false;
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.unwrap());
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                lines.push(serde_json::from_slice(&line).unwrap());
            }
            if !released && !lines.is_empty() {
                assert_eq!(lines[0], json!({"type": "stdout", "data": "one\n"}));
                let (s, out) = c.exec("ex", &["touch", "/tmp/go"]).await;
                assert_eq!(s, 200, "{out}");
                released = true;
            }
        }
        let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["stdout", "stderr", "stdout", "exit"], "{lines:?}");
        assert_eq!(lines[3]["exit_code"], 0);

        // Timeouts kill the command.
        let (s, out) = c
            .json(
                Method::POST,
                "/sandboxes/ex/exec",
                Some(json!({"cmd": ["sleep", "60"], "timeout_sec": 1})),
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(
            (out["timed_out"].as_bool(), out["exit_code"].as_i64()),
            (Some(true), Some(137))
        );

        // Detached commands return at once.
        let (s, out) = c
            .json(
                Method::POST,
                "/sandboxes/ex/exec",
                Some(json!({"cmd": ["sh", "-c", "echo bg > /tmp/bg.txt"], "detach": true})),
            )
            .await;
        assert_eq!(s, 202, "{out}");
        assert!(out["pid"].as_u64().unwrap() > 0);
        d.stop().await;
    });
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn files_round_trip_truncate_and_list() {
    in_netns("api-files", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        c.create("fs").await;

        let blob = pseudo_random(5 * 1024 * 1024);
        let resp = c
            .req(Method::PUT, "/sandboxes/fs/files?path=/tmp/blob.bin")
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let w: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(w["bytes"], blob.len());
        let resp = c
            .req(Method::GET, "/sandboxes/fs/files?path=/tmp/blob.bin")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-file-size"],
            blob.len().to_string().as_str()
        );
        let back = resp.bytes().await.unwrap();
        assert_eq!(Sha256::digest(&back), Sha256::digest(&blob));
        // The guest sees the same bytes.
        let (_, out) = c
            .exec(
                "fs",
                &["sh", "-c", "sha256sum /tmp/blob.bin | cut -d' ' -f1"],
            )
            .await;
        assert_eq!(
            out["stdout"].as_str().unwrap().trim(),
            hex(&Sha256::digest(&blob))
        );

        // Truncated reads keep the whole size in X-File-Size.
        let resp = c
            .req(
                Method::GET,
                "/sandboxes/fs/files?path=/tmp/blob.bin&max_bytes=10",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-truncated"], "true");
        assert_eq!(
            resp.headers()["x-file-size"],
            blob.len().to_string().as_str()
        );
        assert_eq!(resp.bytes().await.unwrap().as_ref(), &blob[..10]);
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        c.req(
            Method::PUT,
            "/sandboxes/fs/files?path=/tmp/lines.txt&mode=0600",
        )
        .body(text)
        .send()
        .await
        .unwrap();
        let resp = c
            .req(
                Method::GET,
                "/sandboxes/fs/files?path=/tmp/lines.txt&offset=5&limit=2",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-truncated"], "true");
        assert_eq!(resp.text().await.unwrap(), "line 5\nline 6\n");
        let resp = c
            .req(Method::HEAD, "/sandboxes/fs/files?path=/tmp/lines.txt")
            .send()
            .await
            .unwrap();
        assert_eq!(
            (
                resp.headers()["x-file-kind"].to_str().unwrap(),
                resp.headers()["x-file-mode"].to_str().unwrap()
            ),
            ("file", "600")
        );
        let (s, l) = c
            .json(Method::GET, "/sandboxes/fs/files?path=/tmp&ls=true", None)
            .await;
        assert_eq!(s, 200);
        let names: Vec<&str> = l["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"blob.bin") && names.contains(&"lines.txt"),
            "{names:?}"
        );

        // Bad input.
        for (path, status) in [
            ("/sandboxes/fs/files?path=/tmp/../etc/passwd", 400),
            ("/sandboxes/fs/files?path=relative.txt", 400),
            ("/sandboxes/fs/files?path=/tmp/lines.txt&max_bytes=-5", 400),
            ("/sandboxes/fs/files?path=/tmp/lines.txt&limit=abc", 400),
            ("/sandboxes/fs/files", 400),
            ("/sandboxes/fs/files?path=/no/such/file", 404),
            ("/sandboxes/nope/files?path=/tmp/x", 404),
        ] {
            let (s, v) = c.json(Method::GET, path, None).await;
            assert_eq!(s, status, "{path}: {v}");
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{path}: {v}"
            );
        }
        d.stop().await;
    });
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_open(d: &TestDaemon, key: &str, open: serde_json::Value) -> (Ws, serde_json::Value) {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let mut req = format!("ws://{}/sandboxes/sh/ws", d.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    ws.send(Message::Text(open.to_string().into()))
        .await
        .unwrap();
    let attached = match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected the attached message, got {other:?}"),
    };
    (ws, attached)
}

async fn ws_read_until(ws: &mut Ws, needle: &str) -> String {
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = String::new();
    let fut = async {
        while !seen.contains(needle) {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Some(Ok(Message::Text(t))) => seen.push_str(&format!("[{t}]")),
                other => panic!("websocket ended before {needle:?} ({other:?}); saw {seen:?}"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("never saw {needle:?}; saw {seen:?}"));
    seen
}

#[test]
fn websocket_shell_echoes_resizes_and_reattaches_with_replay() {
    use tokio_tungstenite::tungstenite::Message;
    in_netns("api-ws", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let key = d.user("alice", 5);
        let c = d.client(&key);
        c.create("sh").await;

        let (mut ws, attached) = ws_open(
            &d,
            &key,
            json!({"session": "main", "cmd": ["/bin/sh"], "rows": 24, "cols": 80}),
        )
        .await;
        assert_eq!(attached["type"], "attached");
        assert_eq!(attached["session"], "main");
        ws.send(Message::Binary(b"echo hello-$((40+2))\n".to_vec().into()))
            .await
            .unwrap();
        ws_read_until(&mut ws, "hello-42").await;
        ws.send(Message::Text(
            json!({"type": "resize", "rows": 33, "cols": 101})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        ws.send(Message::Binary(b"stty size\n".to_vec().into()))
            .await
            .unwrap();
        ws_read_until(&mut ws, "33 101").await;
        ws.send(Message::Text(json!({"type": "detach"}).to_string().into()))
            .await
            .unwrap();
        ws_read_until(&mut ws, "detached").await;
        drop(ws);

        let (s, sessions) = c.json(Method::GET, "/sandboxes/sh/sessions", None).await;
        assert_eq!(s, 200);
        assert_eq!(sessions[0]["session"], "main");
        assert_eq!(sessions[0]["attached"], false);

        let (mut ws, attached) = ws_open(&d, &key, json!({"session": "main"})).await;
        assert_eq!(attached["session"], "main");
        let replay = ws_read_until(&mut ws, "hello-42").await;
        assert!(replay.contains("echo hello-$((40+2))"), "{replay}");
        ws.send(Message::Binary(b"exit 4\n".to_vec().into()))
            .await
            .unwrap();
        ws_read_until(&mut ws, "\"exit_code\":4").await;
        d.stop().await;
    });
}
