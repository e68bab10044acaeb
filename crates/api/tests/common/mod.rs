//! A real daemon for API tests: temp data dir (with the cached guest
//! images linked in), port 0 on loopback, inside a network namespace the
//! test made, with real QEMU-TCG VMs behind it.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::Tier;
use testkit::Netns;

/// Captures everything the daemon logs, to check secrets never appear.
#[derive(Clone, Default)]
pub struct LogSink(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn logs() -> LogSink {
    static SINK: std::sync::OnceLock<LogSink> = std::sync::OnceLock::new();
    SINK.get_or_init(|| {
        let sink = LogSink::default();
        let s2 = sink.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || s2.clone())
            .with_ansi(false)
            .try_init();
        sink
    })
    .clone()
}

/// A data dir whose `images/` is the shared test image cache.
pub fn data_dir() -> tempfile::TempDir {
    testkit::data_dir_with_images(Tier::Tiny)
}

pub fn config(data: &Path, tweak: &str) -> api::DaemonConfig {
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n[defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n{tweak}",
        data.display()
    );
    let mut c = api::DaemonConfig::parse(&text).expect("test config");
    // The public proxy on port 0 too, unless the tweak says otherwise.
    if c.publish.listen == api::publish::PublishConfig::default().listen {
        c.publish.listen = "127.0.0.1:0".into();
    }
    c.validate().expect("valid test config");
    c
}

/// A running daemon; `stop` shuts it down gracefully.
pub struct TestDaemon {
    pub url: String,
    pub addr: SocketAddr,
    /// The public proxy's address (`[publish] listen`), when it is on.
    pub public: Option<SocketAddr>,
    pub data: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestDaemon {
    pub async fn start(config: api::DaemonConfig) -> TestDaemon {
        logs();
        let data = config.data_dir.clone();
        let daemon = api::Daemon::start(config).await.expect("daemon starts");
        TestDaemon::serve(daemon, data)
    }

    /// A daemon whose VMs are the fake engine's (`lohar serve` processes
    /// on the host): for the service's own paths, in seconds.
    pub async fn start_with_engine(
        config: api::DaemonConfig,
        engine: vmm::fake::FakeEngine,
    ) -> TestDaemon {
        logs();
        let data = config.data_dir.clone();
        let daemon = api::Daemon::start_with_engine(config, engine)
            .await
            .expect("daemon starts");
        TestDaemon::serve(daemon, data)
    }

    fn serve(daemon: api::Daemon, data: PathBuf) -> TestDaemon {
        let addr = daemon.local_addr().unwrap();
        let public = daemon.public_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            daemon
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("daemon serves");
        });
        TestDaemon {
            url: format!("http://{addr}"),
            addr,
            public,
            data,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("daemon task");
        }
    }

    /// The daemon "dies with SIGKILL": it stops serving at once, with no
    /// shutdown (its VMs are left as they are; pair with
    /// `FakeEngine::crash` so that they outlive it).
    pub async fn crash(mut self) {
        // Aborted before its stop signal could be seen.
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.stop.take();
    }

    /// Creates a user straight in the database; returns their key.
    pub fn user(&self, name: &str, max_sandboxes: u32) -> String {
        self.user_with(
            name,
            api::users::Quotas {
                max_sandboxes,
                max_cpus: 8,
                max_memory_mb: 4096,
                max_disk_mb: 1 << 20,
            },
        )
    }

    /// Creates a user with these quotas; returns their key.
    pub fn user_with(&self, name: &str, quotas: api::users::Quotas) -> String {
        let store = store::Store::open(&self.data.join("bhatti.db")).unwrap();
        api::users::create_user(&store, name, quotas).unwrap().1
    }

    pub fn client(&self, key: &str) -> Client {
        Client {
            base: self.url.clone(),
            key: key.to_string(),
            http: reqwest::Client::new(),
        }
    }
}

/// An authenticated HTTP client for one user.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(120))
    }

    pub async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("non-JSON answer ({status}): {text}"))
        };
        (status, v)
    }

    pub async fn create(&self, name: &str) -> serde_json::Value {
        let (s, v) = self
            .json(
                reqwest::Method::POST,
                "/sandboxes",
                Some(serde_json::json!({"name": name})),
            )
            .await;
        assert_eq!(s, 201, "create {name}: {v}");
        v
    }

    pub async fn exec(&self, sandbox: &str, cmd: &[&str]) -> (u16, serde_json::Value) {
        self.json(
            reqwest::Method::POST,
            &format!("/sandboxes/{sandbox}/exec"),
            Some(serde_json::json!({ "cmd": cmd })),
        )
        .await
    }
}

/// Runs `script` with `sh -c` in `sandbox`, which must succeed; its stdout.
pub async fn sh(c: &Client, sandbox: &str, script: &str) -> String {
    let (s, v) = c.exec(sandbox, &["sh", "-c", script]).await;
    assert_eq!(s, 200, "{script}: {v}");
    assert_eq!(v["exit_code"], 0, "{script}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// Reads a streamed body until `needle` has arrived (all read so far in
/// `seen`); panics after 60 s without it or when the stream ends first.
pub async fn read_until<S>(stream: &mut S, seen: &mut String, needle: &str)
where
    S: futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin,
{
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::StreamExt::next(stream),
        )
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within 60s; got {seen:?}"))
        .unwrap_or_else(|| panic!("stream ended before {needle:?}; got {seen:?}"))
        .expect("stream chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Runs an async test body in a fresh network namespace, on a runtime
/// whose threads (and their children: QEMU, ip) all live in it.
pub fn in_netns<F, Fut>(tag: &str, f: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    assert!(
        testkit::is_root(),
        "the API suite needs root (namespaces, TAPs)"
    );
    let _ns = Netns::enter(tag);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(f());
    rt.shutdown_timeout(Duration::from_secs(10));
}

/// A sandbox's thermal tier as the API shows it (never wakes it).
pub async fn thermal_of(c: &Client, name: &str) -> String {
    let (s, v) = c
        .json(reqwest::Method::GET, &format!("/sandboxes/{name}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    v["thermal"].as_str().unwrap_or_default().to_string()
}

/// Polls until `name` is in tier `want`; panics after `within`.
pub async fn wait_thermal(c: &Client, name: &str, want: &str, within: Duration) {
    let end = std::time::Instant::now() + within;
    loop {
        let t = thermal_of(c, name).await;
        if t == want {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "{name} is {t}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The kinds of a sandbox's recorded events, oldest first.
pub fn event_kinds(data: &Path, user: &str, sandbox: &str) -> Vec<String> {
    let store = store::Store::open(&data.join("bhatti.db")).unwrap();
    store
        .events_of(user, sandbox)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}
