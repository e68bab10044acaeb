//! `bhatti serve`: the daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (every setting has a default). Default:
    /// $BHATTI_CONFIG, else /etc/bhatti/config.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (images, sandboxes, database); overrides the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8700 (port 0 picks one); overrides the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// `auto`, `firecracker`, `qemu-kvm` or `qemu-tcg`; overrides the config.
    #[arg(long)]
    engine: Option<String>,
    /// Guest architecture, `amd64` or `arm64` (default: the host's);
    /// overrides the config.
    #[arg(long)]
    arch: Option<String>,
    /// Remove bhatti's firewall rules from this host and exit.
    #[arg(long)]
    cleanup: bool,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.cleanup {
        api::network::cleanup().context("removing bhatti's firewall rules")?;
        println!("bhatti: firewall rules removed");
        return Ok(());
    }
    let (mut config, source) = api::DaemonConfig::resolve(args.config.as_deref())?;
    println!("config: {source}");
    match source {
        api::config::ConfigSource::BuiltIn(_) => {
            tracing::warn!(%source, "no config file: running with built-in defaults")
        }
        _ => tracing::info!(%source, "config loaded"),
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(e) = args.engine {
        config.engine = e;
    }
    if let Some(a) = args.arch {
        config.arch = a;
    }
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let arch = config.guest_arch()?;
    rt.block_on(async move {
        let daemon = api::Daemon::start(config).await?;
        let addr = daemon.local_addr()?;
        let h = &daemon.state.health;
        println!(
            "bhatti {} serving on http://{addr}\nengine: {} ({}, {arch} guests) — {}",
            h.version,
            h.engine,
            h.accelerator.to_uppercase(),
            h.engine_reason
        );
        if let Some(public) = daemon.public_addr() {
            println!("public proxy (published ports) on http://{public}");
        }
        if h.accelerator == "tcg" {
            println!(
                "WARNING: no usable KVM: VMs run under QEMU software emulation (TCG), \
                 tens of times slower than on a KVM host"
            );
        }
        tracing::info!(%addr, engine = %h.engine, accelerator = %h.accelerator, "serving");
        daemon.serve(shutdown_signal()).await?;
        println!("bhatti: stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
