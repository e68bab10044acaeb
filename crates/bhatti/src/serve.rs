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
    let file_config = config.to_toml();
    let config_flag = args.config.clone();
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
        // SIGHUP (systemd's ExecReload) is watched before the daemon says it
        // serves, so an early one cannot end it.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("watching SIGHUP")?;
        let reload = tokio::spawn(reload_on_sighup(
            hup,
            daemon.tls_reloader(),
            config_flag,
            file_config,
        ));
        let addr = daemon.local_addr()?;
        let h = &daemon.state.health;
        let scheme = if daemon.api_tls() { "https" } else { "http" };
        println!(
            "bhatti {} serving on {scheme}://{addr}\nengine: {} ({}, {arch} guests) — {}",
            h.version,
            h.engine,
            h.accelerator.to_uppercase(),
            h.engine_reason
        );
        if let Some(public) = daemon.public_addr() {
            let scheme = if daemon.public_tls() { "https" } else { "http" };
            println!("public proxy (published ports) on {scheme}://{public}");
        }
        if let Some(redirect) = daemon.redirect_addr() {
            println!("public HTTP on http://{redirect} redirects to HTTPS");
        }
        if h.accelerator == "tcg" {
            println!(
                "WARNING: no usable KVM: VMs run under QEMU software emulation (TCG), \
                 tens of times slower than on a KVM host"
            );
        }
        tracing::info!(%addr, engine = %h.engine, accelerator = %h.accelerator, "serving");
        daemon.serve(shutdown_signal()).await?;
        reload.abort();
        println!("bhatti: stopped");
        anyhow::Ok(())
    })
}

/// SIGHUP (`systemctl reload bhatti`): reads the TLS certificate files
/// again (changed files are also picked up at the next handshake), then
/// reads the config file again the way the daemon found it and says whether
/// it is valid and whether it differs from the one running. Nothing else is
/// applied while running: a changed file takes effect at the next start.
/// (Without this handler SIGHUP would end the daemon abruptly.)
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    certificates: api::tls::TlsReloader,
    flag: Option<PathBuf>,
    running: String,
) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reading the TLS certificates again");
        certificates.reload_all();
        let flag = flag.clone();
        let checked =
            tokio::task::spawn_blocking(move || api::DaemonConfig::resolve(flag.as_deref())).await;
        match checked {
            Ok(Ok((config, source))) if config.to_toml() == running => {
                println!("reload: config {source} is valid and unchanged");
                tracing::info!(%source, "SIGHUP: config valid and unchanged");
            }
            Ok(Ok((_, source))) => {
                println!("reload: config {source} is valid and changed; restart to apply it");
                tracing::warn!(%source, "SIGHUP: config changed; it takes effect at the next start");
            }
            Ok(Err(e)) => {
                println!("reload: {e}");
                tracing::error!(error = %e, "SIGHUP: config invalid; the running daemon keeps its settings");
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: config check failed"),
        }
    }
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
