//! The daemon's way into guests under pressure, on real VMs: a collected
//! exec of endless output and a 4 GiB download each stay within a bounded
//! amount of the daemon's memory (the daemon runs in this process, so its
//! RSS is this process's); many calls at once succeed or are told to back
//! off (429), never fail with a 5xx; a VM killed under a call is a 502
//! within seconds, not at the call's deadline.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The daemon's default `limits.max_exec_output`.
const EXEC_CAP: usize = 16 * 1024 * 1024;
/// What one request may add to the daemon's memory.
const RSS_BUDGET: u64 = 100 * 1024 * 1024;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Samples this process's RSS every 20 ms until dropped; `peak_rise` is
/// the highest sample over the RSS when it started.
struct RssWatch {
    base: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start() -> RssWatch {
        let base = rss_bytes();
        let peak = Arc::new(AtomicU64::new(base));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssWatch {
            base,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak_rise(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak
            .load(Ordering::Relaxed)
            .max(rss_bytes())
            .saturating_sub(self.base)
    }
}

fn mib(b: u64) -> u64 {
    b / (1024 * 1024)
}

/// Streams a response body without keeping it: its length, sha256 and
/// last bytes.
async fn drain(resp: reqwest::Response) -> (u64, String, Vec<u8>) {
    let mut body = resp.bytes_stream();
    let (mut n, mut hash, mut tail) = (0u64, Sha256::new(), Vec::new());
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), body.next())
        .await
        .expect("the body stalled for 120s")
    {
        let chunk = chunk.expect("body chunk");
        n += chunk.len() as u64;
        hash.update(&chunk);
        tail.extend_from_slice(&chunk);
        if tail.len() > 4096 {
            tail.drain(..tail.len() - 4096);
        }
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (n, hex, tail)
}

/// One booted sandbox for the memory cases, three more for the load case,
/// and the dead-VM case last (it kills one).
#[test]
fn guest_calls_stay_bounded_under_pressure() {
    in_netns("api-guest", || async {
        let data = data_dir();
        // The progress polls below are execs too: room for them.
        let d = TestDaemon::start(config(data.path(), "[limits]\nexecs_per_min = 1000\n")).await;
        let c = d.client(&d.user("mallory", 4));
        let creates = ["g0", "g1", "g2", "g3"].map(|n| {
            let c = c.clone();
            async move { c.create(n).await }
        });
        let created = futures_util::future::join_all(creates).await;

        exec_output_is_capped(&c).await;
        a_4gib_file_downloads_whole(&c).await;
        a_slow_reader_stalls_the_command(&c).await;
        many_calls_at_once_never_5xx(&c).await;
        a_vm_killed_under_a_call_is_a_502(&c, &created[3]).await;

        for n in ["g0", "g1", "g2", "g3"] {
            let (s, v) = c
                .json(Method::DELETE, &format!("/sandboxes/{n}"), None)
                .await;
            assert_eq!(s, 204, "destroy {n}: {v}");
        }
        d.stop().await;
    });
}

async fn exec_output_is_capped(c: &Client) {
    let watch = RssWatch::start();
    let t = Instant::now();
    let resp = c
        .req(Method::POST, "/sandboxes/g0/exec")
        .json(&json!({"cmd": ["timeout", "10", "yes"]}))
        .send()
        .await
        .expect("exec");
    assert_eq!(resp.status(), 200);
    let (n, _, tail) = drain(resp).await;
    let rise = watch.peak_rise();
    let tail = String::from_utf8_lossy(&tail).into_owned();
    println!(
        "collected exec of `timeout 10 yes`: {n} bytes of JSON in {:?}, daemon RSS rose {} MiB at most",
        t.elapsed(),
        mib(rise)
    );
    assert!(tail.contains("\"stdout_truncated\":true"), "{tail}");
    assert!(tail.contains("\"stderr_truncated\":false"), "{tail}");
    // `timeout` ends `yes` after 10 s: exit code 124, the command's own.
    assert!(tail.contains("\"timed_out\":false"), "{tail}");
    // "y\n" is 3 bytes of JSON ("y\\n"): the cap's worth of output is
    // there, and not more.
    let expected = (EXEC_CAP / 2 * 3) as u64;
    assert!(
        n >= expected && n < expected + 4096,
        "{n} bytes of JSON for {EXEC_CAP} bytes of output"
    );
    assert!(rise < RSS_BUDGET, "RSS rose {} MiB", mib(rise));

    // The answer's shape, on a small command.
    let (s, v) = c.exec("g0", &["sh", "-c", "echo hi; exit 124"]).await;
    assert_eq!(s, 200);
    assert_eq!(v["exit_code"], 124);
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["stdout_truncated"], false);
}

async fn a_4gib_file_downloads_whole(c: &Client) {
    sh(c, "g0", "truncate -s 4G /tmp/big").await;
    // The guest's own sum, computed while the file downloads (each takes
    // minutes under TCG).
    let guest_sum = {
        let c = c.clone();
        tokio::spawn(async move {
            let resp = c
                .req(Method::POST, "/sandboxes/g0/exec")
                .timeout(Duration::from_secs(3600))
                .json(&json!({"cmd": ["sha256sum", "/tmp/big"], "timeout_sec": 3000}))
                .send()
                .await
                .expect("sha256sum");
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(v["exit_code"], 0, "{v}");
            v["stdout"].as_str().unwrap()[..64].to_string()
        })
    };
    let watch = RssWatch::start();
    let t = Instant::now();
    let resp = c
        .req(Method::GET, "/sandboxes/g0/files?path=/tmp/big")
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-file-size"], "4294967296");
    assert_eq!(resp.headers()["x-truncated"], "false");
    let (n, sum, _) = drain(resp).await;
    let rise = watch.peak_rise();
    println!(
        "download of a 4 GiB file: {n} bytes in {:?}, daemon RSS rose {} MiB at most",
        t.elapsed(),
        mib(rise)
    );
    assert_eq!(n, 4 << 30);
    let guest_sum = guest_sum.await.unwrap();
    assert_eq!(sum, guest_sum, "sha256 of the download");
    assert!(rise < RSS_BUDGET, "RSS rose {} MiB", mib(rise));

    // `max_bytes` still cuts server-side, and says so up front.
    let resp = c
        .req(
            Method::GET,
            "/sandboxes/g0/files?path=/tmp/big&max_bytes=1000",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-truncated"], "true");
    assert_eq!(resp.bytes().await.unwrap().len(), 1000);

    // An upload streams in; the sandbox is looked up before the body is read.
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let resp = c
        .req(Method::PUT, "/sandboxes/g0/files?path=/tmp/up.bin")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let back = c
        .req(Method::GET, "/sandboxes/g0/files?path=/tmp/up.bin")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(back[..] == blob[..], "upload round trip");
    // (On a client of its own: the daemon answers without reading the
    // body and closes that connection.)
    let resp = reqwest::Client::new()
        .put(format!("{}/sandboxes/nope/files?path=/tmp/x", c.base))
        .bearer_auth(&c.key)
        .body(blob)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let (s, v) = c.exec("g0", &["rm", "/tmp/big"]).await;
    assert_eq!(s, 200, "{v}");
}

/// A streamed exec whose client stops reading: the command's writes block
/// (its progress counter stops moving) instead of its output piling up
/// in the daemon.
async fn a_slow_reader_stalls_the_command(c: &Client) {
    let script =
        "i=0; while true; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/progress; done";
    let watch = RssWatch::start();
    let resp = c
        .req(Method::POST, "/sandboxes/g2/exec")
        .header("accept", "application/x-ndjson")
        .json(&json!({"cmd": ["sh", "-c", script], "timeout_sec": 120}))
        .send()
        .await
        .expect("streamed exec");
    assert_eq!(resp.status(), 200);
    let progress = || async {
        let out = sh(c, "g2", "cat /tmp/progress 2>/dev/null || echo 0").await;
        out.trim().parse::<u64>().unwrap_or(0)
    };
    // Not reading: the buffers between the guest and this client fill up.
    let mut last = progress().await;
    let end = Instant::now() + Duration::from_secs(90);
    let stalled = loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = progress().await;
        if now == last && now > 0 {
            break true;
        }
        last = now;
        if Instant::now() > end {
            break false;
        }
    };
    let rise = watch.peak_rise();
    println!(
        "streamed exec with a client not reading: stalled ({stalled}) after {last} chunks of 64 KiB, daemon RSS rose {} MiB at most",
        mib(rise)
    );
    assert!(stalled, "the command kept writing: {last} chunks");
    assert!(last < 1024, "{last} chunks (64 MiB) went out unread");
    assert!(rise < RSS_BUDGET, "RSS rose {} MiB", mib(rise));
    // Reading again lets it go on; dropping the stream kills it.
    let reader = tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        while let Some(Ok(_)) = body.next().await {}
    });
    let end = Instant::now() + Duration::from_secs(60);
    let mut moved = last;
    while moved <= last && Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        moved = progress().await;
    }
    reader.abort();
    assert!(moved > last, "reading again did not let it go on");
}

async fn many_calls_at_once_never_5xx(c: &Client) {
    sh(c, "g1", "head -c 1048576 /dev/urandom > /tmp/m").await;
    let execs = (0..20).map(|i| {
        let c = c.clone();
        async move {
            let sb = format!("g{}", i % 4);
            c.exec(&sb, &["sh", "-c", "echo $((6*7)); sleep 1"]).await
        }
    });
    let reads = (0..50).map(|_| {
        let c = c.clone();
        async move {
            let r = c
                .req(Method::GET, "/sandboxes/g1/files?path=/tmp/m")
                .send()
                .await
                .expect("read");
            let s = r.status().as_u16();
            let body = r.bytes().await.expect("read body");
            (s, body.len())
        }
    });
    let (execs, reads) = tokio::join!(
        futures_util::future::join_all(execs),
        futures_util::future::join_all(reads)
    );
    let mut limited = 0;
    for (s, v) in &execs {
        match s {
            200 => assert_eq!(v["stdout"], "42\n", "{v}"),
            429 => limited += 1,
            other => panic!("exec answered {other}: {v}"),
        }
    }
    for (s, len) in &reads {
        match s {
            200 => assert_eq!(*len, 1 << 20),
            429 => limited += 1,
            other => panic!("file read answered {other}"),
        }
    }
    println!("load: 20 execs over 4 sandboxes and 50 file reads at once, {limited} told 429");
    assert!(limited < 70, "everything was refused");
}

/// The QEMU process behind a sandbox: its command line names the
/// sandbox's directory (`DATA/sandboxes/<id>`; a confined QEMU gets its TAP
/// as a descriptor, so the TAP's name is not there).
fn vmm_pid(id: &str) -> u32 {
    let dir = format!("/sandboxes/{id}/");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu") && cmd.contains(&dir) {
            return pid;
        }
    }
    panic!("no QEMU for sandbox {id}");
}

async fn a_vm_killed_under_a_call_is_a_502(c: &Client, sandbox: &serde_json::Value) {
    let pid = vmm_pid(sandbox["id"].as_str().unwrap());
    let call = {
        let c = c.clone();
        tokio::spawn(async move { c.exec("g3", &["sleep", "600"]).await })
    };
    // Let the exec start, then kill the VM under it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    // SAFETY: kill(2) on a pid this test found; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let (s, v) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the exec answered within 30 s of the VM's death")
        .unwrap();
    println!("exec under a killed VM: {s} after {:?}: {v}", t.elapsed());
    assert_eq!(s, 502, "{v}");
    assert!(v["error"].as_str().unwrap().contains("dead"), "{v}");
    // It is recorded as failed at once.
    let (s, v) = c.json(Method::GET, "/sandboxes/g3", None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("failed")), "{v}");
}
