//! The MCP server through the official `mcp` Python SDK (PyPI, version
//! pinned in scripts/test.sh), over both transports, against a daemon on
//! the fake engine (`vmm::fake`: each sandbox a real `lohar serve` on the
//! host, so exec and files are real):
//!
//! - `mcp_over_http_and_stdio`: `POST /mcp` with a bearer key, and
//!   `bhatti mcp` (this build's binary) spawned by the SDK with
//!   `BHATTI_URL`/`BHATTI_TOKEN`. Over each the SDK negotiates, lists the
//!   seven tools, creates a sandbox, execs (stdout, stderr, exit code,
//!   env), writes and reads a file, publishes a port (its URL), gets a
//!   tool error naming a wrong argument and "not found" for another
//!   user's sandbox (which exists), and destroys it. Then `/mcp` without a key or with a wrong one is a
//!   JSON 401, GET is 405, an unsupported protocol version 400, a body
//!   over the bound 413.
//!
//! The Python is `$BHATTI_MCP_PYTHON` (scripts/test.sh installs the SDK
//! in a venv and sets it); without it the test fails under scripts/test.sh
//! (`testkit::cannot_run`). Needs root (a network namespace for the
//! daemon) and the host build of lohar (`cargo build -p lohar`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

fn config(data: &Path) -> api::DaemonConfig {
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
         [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n\
         [thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n\
         [limits]\ncreates_per_min = 1000\n\
         [publish]\nlisten = \"127.0.0.1:0\"\n",
        data.display()
    );
    let c = api::DaemonConfig::parse(&text).expect("test config");
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

/// The Python with the `mcp` SDK, or why there is none.
fn python() -> Result<PathBuf, String> {
    let py = std::env::var_os("BHATTI_MCP_PYTHON")
        .map(PathBuf::from)
        .ok_or(
            "BHATTI_MCP_PYTHON is not set (scripts/test.sh installs the `mcp` SDK and sets it)",
        )?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import mcp"])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
    if !ok.success() {
        return Err(format!("{} cannot import mcp", py.display()));
    }
    Ok(py)
}

/// Runs the SDK script; its JSON line.
async fn sdk(py: &Path, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp_client.py");
    let run = tokio::process::Command::new(py)
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the SDK script finishes within 180 s")
        .expect("the SDK script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the SDK script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the SDK script's last line is no JSON ({e}): {stdout}"))
}

/// What the SDK saw over one transport.
fn check(seen: &Value, name: &str) {
    assert_eq!(seen["protocol_version"], "2025-11-25", "{seen}");
    assert_eq!(seen["server"], "bhatti", "{seen}");
    assert_eq!(
        seen["tools"],
        json!([
            "create_sandbox",
            "destroy_sandbox",
            "exec",
            "list_sandboxes",
            "publish_port",
            "read_file",
            "write_file"
        ]),
        "{seen}"
    );
    let schema = &seen["exec_schema"];
    assert_eq!(schema["required"], json!(["sandbox", "command"]), "{seen}");
    assert_eq!(schema["properties"]["timeout_sec"]["type"], "integer");
    assert_eq!(seen["created"], name);
    let exec = &seen["exec"];
    assert_eq!(exec["stdout"], "out-42\n", "{seen}");
    assert_eq!(exec["stderr"], "err\n", "{seen}");
    assert_eq!(exec["exit_code"], 3, "{seen}");
    assert_eq!(seen["written"]["bytes"], 17, "{seen}");
    assert_eq!(seen["read"], "written over MCP\n", "{seen}");
    assert_eq!(seen["cat"], "written over MCP\n", "{seen}");
    let published = &seen["published"];
    assert_eq!(published["port"], 8080, "{seen}");
    assert_eq!(published["alias"], format!("{name}-8080"), "{seen}");
    let url = published["url"].as_str().unwrap();
    assert!(
        url.starts_with("http") && url.contains(&format!("{name}-8080")),
        "{seen}"
    );
    assert_eq!(seen["bad_args"]["is_error"], true, "{seen}");
    let bad = seen["bad_args"]["text"].as_str().unwrap();
    assert!(bad.contains("'timeout_sec'"), "{seen}");
    assert_eq!(seen["theirs"]["is_error"], true, "{seen}");
    let theirs = seen["theirs"]["text"].as_str().unwrap();
    assert!(theirs.contains("no sandbox 'theirs'"), "{seen}");
    assert!(
        seen["listed"].as_array().unwrap().contains(&json!(name)),
        "{seen}"
    );
    assert!(
        !seen["listed"]
            .as_array()
            .unwrap()
            .contains(&json!("theirs")),
        "{seen}"
    );
    assert!(
        !seen["after_destroy"]
            .as_array()
            .unwrap()
            .contains(&json!(name)),
        "{seen}"
    );
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String) {
    let mut rb = http
        .post(format!("{url}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[test]
fn mcp_over_http_and_stdio() {
    if !testkit::is_root() {
        return testkit::cannot_run("the MCP test needs root (a network namespace)");
    }
    let py = match python() {
        Ok(p) => p,
        Err(why) => return testkit::cannot_run(&why),
    };
    let _ns = testkit::Netns::enter("mcp");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_path_buf();
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
        let alice = user(&data, "alice");
        let bob = user(&data, "bob");
        let http = reqwest::Client::new();

        // Bob's sandbox "theirs" exists: alice's tools must not find it.
        let resp = http
            .post(format!("{url}/sandboxes"))
            .bearer_auth(&bob)
            .json(&json!({"name": "theirs"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap()
        );

        let seen = sdk(&py, &["http", &url, &alice, "via-http"]).await;
        check(&seen, "via-http");
        let seen = sdk(&py, &["stdio", BIN, &url, &alice, "via-stdio"]).await;
        check(&seen, "via-stdio");

        // The HTTP transport's own answers.
        let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec();
        for key in [None, Some("bht_not-a-key")] {
            let (st, body) = post(&http, &url, key, &[], ping.clone()).await;
            assert_eq!(st, 401, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert!(v["error"].is_string(), "{body}");
        }
        let (st, body) = post(&http, &url, Some(&alice), &[], ping.clone()).await;
        assert_eq!(
            (st, body.as_str()),
            (200, r#"{"id":1,"jsonrpc":"2.0","result":{}}"#)
        );
        let note = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec();
        let (st, body) = post(&http, &url, Some(&alice), &[], note).await;
        assert_eq!((st, body.as_str()), (202, ""));
        let (st, body) = post(
            &http,
            &url,
            Some(&alice),
            &[("mcp-protocol-version", "1999-01-01")],
            ping.clone(),
        )
        .await;
        assert_eq!(st, 400, "{body}");
        assert!(body.contains("1999-01-01"), "{body}");
        let (st, body) = post(
            &http,
            &url,
            Some(&alice),
            &[("mcp-protocol-version", "2025-06-18")],
            ping.clone(),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let (st, body) = post(&http, &url, Some(&alice), &[], b"{oops".to_vec()).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
            -32700
        );
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
            "x".repeat(api::routes::mcp::MAX_BODY)
        );
        let (st, body) = post(&http, &url, Some(&alice), &[], big.into_bytes()).await;
        assert_eq!(st, 413, "{body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
        let resp = http
            .get(format!("{url}/mcp"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405);
        assert_eq!(resp.headers()["allow"], "POST");

        let _ = stop.send(());
        served.await.unwrap().expect("daemon serves");
    });
}
