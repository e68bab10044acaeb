//! Observability through this build's `bhatti` binary:
//!
//! - `events_through_the_cli`: `bhatti events` and `bhatti admin status`
//!   against a daemon on the fake engine (`vmm::fake`: each sandbox a real
//!   `lohar serve` on the host): the table, `--json` with a type filter,
//!   `-f` printing a new event as it is recorded and ending with the
//!   daemon, a bad limit refused with the server's message, the status
//!   for an admin key and refused for another.
//! - `serve_logs_json_lines_naming_the_request`: `bhatti serve
//!   --log-format json` (the real daemon process, no VM started): every
//!   log line is a JSON object, and a request's lines carry its id.
//!
//! Needs root (network namespaces), the host build of lohar and, for the
//! second, the cached test images (QEMU-TCG engine; nothing boots).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

fn config(data: &Path) -> api::DaemonConfig {
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
         [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n\
         [thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n\
         [publish]\nlisten = \"127.0.0.1:0\"\n",
        data.display()
    );
    let mut c = api::DaemonConfig::parse(&text).expect("test config");
    c.admins = vec!["root".into()];
    c.validate().expect("valid test config");
    c
}

fn user(data: &Path, name: &str) -> String {
    let store = store::Store::open(&data.join("bhatti.db")).unwrap();
    let quotas = api::users::Quotas {
        max_sandboxes: 5,
        max_cpus: 8,
        max_memory_mb: 4096,
        max_disk_mb: 1 << 20,
    };
    api::users::create_user(&store, name, quotas).unwrap().1
}

fn bhatti(home: &Path, url: &str, key: &str) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("BHATTI_URL", url)
        .env("BHATTI_TOKEN", key);
    c
}

#[test]
fn events_through_the_cli() {
    if !testkit::is_root() {
        return testkit::cannot_run("the events CLI test needs root (a network namespace)");
    }
    let _ns = testkit::Netns::enter("evcli");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        testkit::placeholder_images(&data);
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let daemon = api::Daemon::start_with_engine(config(&data), engine)
            .await
            .expect("daemon starts");
        let url = format!("http://{}", daemon.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(daemon.serve(async {
            let _ = stopped.await;
        }));
        let key = user(&data, "alice");
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{url}/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({"name": "box"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let sb: Value = resp.json().await.unwrap();
        let id = sb["id"].as_str().unwrap().to_string();

        // The table.
        let (h, u, k) = (home.clone(), url.clone(), key.clone());
        let out =
            tokio::task::spawn_blocking(move || bhatti(&h, &u, &k).arg("events").output().unwrap())
                .await
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("TIME (UTC)"), "{text}");
        let running: Vec<&str> = lines.filter(|l| l.contains(" running ")).collect();
        assert_eq!(running.len(), 1, "{text}");
        assert!(running[0].contains(&id), "{text}");

        // --json, one type.
        let (h, u, k) = (home.clone(), url.clone(), key.clone());
        let out = tokio::task::spawn_blocking(move || {
            bhatti(&h, &u, &k)
                .args(["events", "--json", "--type", "creating"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success());
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0]["type"], "creating");
        assert_eq!(v[0]["sandbox_id"], id.as_str());

        // A bad limit: the server's message, a non-zero exit.
        let (h, u, k) = (home.clone(), url.clone(), key.clone());
        let out = tokio::task::spawn_blocking(move || {
            bhatti(&h, &u, &k)
                .args(["events", "--limit", "0"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("limit must be 1 to 1000"), "{err}");

        // `admin status`: for the admin key, refused for Alice's.
        let root = user(&data, "root");
        let (h, u) = (home.clone(), url.clone());
        let out = tokio::task::spawn_blocking(move || {
            bhatti(&h, &u, &root)
                .args(["admin", "status"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "(fake on ",
            "users:      2\n",
            "sandboxes:  1 (creating 0, failed 0, running 1, stopped 0)\n",
            "running:    cold 0, hot 1, warm 0\n",
            "memory:     256 MiB of ",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }
        let (h, u, k) = (home.clone(), url.clone(), key.clone());
        let out = tokio::task::spawn_blocking(move || {
            bhatti(&h, &u, &k)
                .args(["admin", "status"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("admin key"), "{err}");

        // -f: a stop's `cold` appears while it runs.
        let mut child = bhatti(&home, &url, &key)
            .args(["events", "-f", "--sandbox", "box", "--limit", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the backlog's line");
        assert!(first.contains(" running "), "{first}");
        let resp = http
            .post(format!("{url}/sandboxes/box/stop"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let rx2 = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) {
                let done = l.contains(" cold ");
                got.push(l);
                if done {
                    break;
                }
            }
            got
        })
        .await
        .unwrap();
        let cold = rx2.last().expect("a followed line");
        assert!(
            cold.contains(" cold ") && cold.contains("took_ms="),
            "{rx2:?}"
        );
        // The daemon stopping ends `-f` with success.
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
        let status = tokio::task::spawn_blocking(move || {
            let end = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(s) = child.try_wait().unwrap() {
                    return Some(s);
                }
                if std::time::Instant::now() > end {
                    let _ = child.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .unwrap()
        .expect("bhatti events -f ended with the daemon");
        assert!(status.success(), "{status:?}");
    });
}

#[test]
fn serve_logs_json_lines_naming_the_request() {
    if !testkit::is_root() {
        return testkit::cannot_run("the serve log test needs root (a network namespace)");
    }
    let _ns = testkit::Netns::enter("jsonlog");
    let data = testkit::data_dir_with_images(image::Tier::Tiny);
    let config = data.path().join("bhatti.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n",
            data.path().display()
        ),
    )
    .unwrap();
    let (out, err) = (data.path().join("serve.out"), data.path().join("serve.err"));
    let mut child = Command::new(BIN)
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,api=debug")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut url = String::new();
    testkit::wait_until(
        "bhatti serve says where it listens",
        Duration::from_secs(120),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "bhatti serve exited ({st}): {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            match text.lines().find_map(|l| l.split("serving on ").nth(1)) {
                Some(u) => {
                    url = u.trim().to_string();
                    true
                }
                None => false,
            }
        },
    );
    let id = "json-log-test-5e1d";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, echoed) = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("{url}/sandboxes"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.headers()["x-request-id"].to_str().unwrap().to_string(),
        )
    });
    assert_eq!((status, echoed.as_str()), (401, id));
    let mut named = Vec::new();
    testkit::wait_until(
        "a log line names the request",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            named = text
                .lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
                })
                .filter(|v| v["span"]["request_id"] == id)
                .collect();
            !named.is_empty()
        },
    );
    assert_eq!(named[0]["span"]["route"], "/sandboxes", "{named:?}");
    assert_eq!(named[0]["fields"]["status"], 401, "{named:?}");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    testkit::wait_until("bhatti serve exits", Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
}
