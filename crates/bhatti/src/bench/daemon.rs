//! The in-process daemon `bench api` and `bench proxy` measure: its
//! configuration ([`ScratchDaemon`]) and the running daemon with its one
//! user and sandbox ([`BenchDaemon`]).

use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::json;

/// An in-process daemon's configuration of the bench's own: a temp data
/// dir reading the images in `data_dir`, port 0, a network range, bridge
/// and TAP prefix named after this process (`letter` tells the benches
/// apart), no firewall (applying it would replace the rules of a daemon
/// running in the same namespace) and no public proxy (its default port may
/// be a running daemon's). Dropping it removes the temp dir and the bench's
/// bridge, should the bench have stopped before its sandbox was destroyed.
#[derive(Debug)]
pub struct ScratchDaemon {
    pub config: api::DaemonConfig,
    bridge: String,
    _scratch: tempfile::TempDir,
}

impl ScratchDaemon {
    pub fn new(
        label: &str,
        letter: char,
        data_dir: &std::path::Path,
        subnet: &str,
        image: &str,
    ) -> anyhow::Result<ScratchDaemon> {
        use anyhow::Context;
        let images = data_dir.join("images");
        if !images.is_dir() {
            anyhow::bail!(
                "no images in {}; run `bhatti image build --data-dir {}` first",
                data_dir.display(),
                data_dir.display()
            );
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("bhatti-bench-{label}-"))
            .tempdir()
            .context("temp dir")?;
        std::os::unix::fs::symlink(&images, scratch.path().join("images"))?;
        let tag = format!("{:04x}", std::process::id() & 0xffff);
        let subnet: net::Subnet = subnet.parse().context("--subnet")?;
        // The bench's one user gets the range's first (and only) subnet.
        let bridge_prefix = format!("bh{letter}{tag}");
        let mut config = api::DaemonConfig::parse(&format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n[network]\nrange = \"{subnet}\"\nuser_prefix = {}\nbridge_prefix = \"{bridge_prefix}\"\ntap_prefix = \"b{letter}{tag}\"\nfirewall = false\n\
             [limits]\ncreates_per_min = 1000\nexecs_per_min = 1000000\nreads_per_min = 1000000\n",
            scratch.path().display(),
            subnet.prefix(),
        ))
        .map_err(anyhow::Error::msg)?;
        config.publish.listen = String::new();
        config.defaults.image = image.to_string();
        config.defaults.memory_mb = 256;
        // Benches measure what they ask for, not a template made behind them.
        config.defaults.auto_templates = false;
        Ok(ScratchDaemon {
            config,
            bridge: format!("{bridge_prefix}0000"),
            _scratch: scratch,
        })
    }
}

impl Drop for ScratchDaemon {
    fn drop(&mut self) {
        // Normally gone with the sandbox; only a bench stopped half-way
        // leaves it.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A daemon serving in this process, with a user `bench` and (after
/// [`BenchDaemon::create_sandbox`]) a sandbox `bench`.
#[derive(Debug)]
pub struct BenchDaemon {
    /// `http://<the daemon's address>` (`https://` when `[tls]` is set).
    pub base: String,
    /// With `[tls]`: `http://<addr>` of a second, plain socket serving
    /// the same router and state (`bench api --tls` compares the two).
    pub plain_base: Option<String>,
    plain: Option<tokio::task::JoinHandle<()>>,
    /// The user's API key.
    pub key: String,
    pub user: store::UserRecord,
    pub service: Arc<api::service::Service>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), api::ServeError>>,
}

impl BenchDaemon {
    /// Starts the daemon and prints `bhatti bench <what>: daemon on …,
    /// engine …, <n> samples per <unit>`.
    pub async fn start(
        config: api::DaemonConfig,
        what: &str,
        n: usize,
        unit: &str,
    ) -> anyhow::Result<BenchDaemon> {
        let data = config.data_dir.clone();
        let daemon = api::Daemon::start(config)
            .await
            .context("starting the daemon")?;
        let addr = daemon.local_addr()?;
        let h = daemon.state.health.clone();
        println!(
            "bhatti bench {what}: daemon on {addr}, engine {} ({}), {n} samples per {unit}",
            h.engine, h.accelerator
        );
        let store = store::Store::open(&data.join("bhatti.db"))?;
        let quotas = api::users::Quotas {
            max_sandboxes: 10,
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb: 1 << 20,
        };
        let (user, key) = api::users::create_user(&store, "bench", quotas)?;
        let service = daemon.state.service.clone();
        let tls = daemon.api_tls();
        let (plain_base, plain) = if tls {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let plain_addr = listener.local_addr()?;
            let app = api::routes::router(daemon.state.clone())
                .into_make_service_with_connect_info::<std::net::SocketAddr>();
            // As the daemon's own socket: TCP_NODELAY on every connection.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("warning: the plain bench socket failed: {e}");
                }
            });
            (Some(format!("http://{plain_addr}")), Some(task))
        } else {
            (None, None)
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(daemon.serve(async {
            let _ = stop_rx.await;
        }));
        Ok(BenchDaemon {
            base: format!("{}://{addr}", if tls { "https" } else { "http" }),
            plain_base,
            plain,
            key,
            user,
            service,
            stop,
            server,
        })
    }

    /// Creates the sandbox `bench` through the API; returns its agent.
    pub async fn create_sandbox(
        &self,
        http: &reqwest::Client,
    ) -> anyhow::Result<agent_client::AgentClient> {
        let created = http
            .post(format!("{}/sandboxes", self.base))
            .bearer_auth(&self.key)
            .json(&json!({"name": "bench"}))
            .send()
            .await?;
        if !created.status().is_success() {
            bail!("create failed: {}", created.text().await?);
        }
        self.service
            .bench_agent_client(&self.user, "bench")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Destroys the sandbox (a failure is only a warning) and stops the
    /// daemon.
    pub async fn finish(self, http: &reqwest::Client) -> anyhow::Result<()> {
        let destroyed = http
            .delete(format!("{}/sandboxes/bench", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        if !destroyed.status().is_success() {
            eprintln!(
                "warning: destroying the bench sandbox failed: {}",
                destroyed.text().await?
            );
        }
        let _ = self.stop.send(());
        self.server.await??;
        if let Some(plain) = self.plain {
            plain.abort();
        }
        Ok(())
    }
}
