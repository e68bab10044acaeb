//! `bhatti bench …`: each benchmark measures an operation and, in the same
//! run, the physical limit it is built on, and reports both with their ratio.

mod agent;
mod api;
mod boot;
mod daemon;
mod fork;
mod image_pull;
mod proxy;
mod stats;
mod thermal;

use clap::Subcommand;

pub use daemon::{BenchDaemon, ScratchDaemon};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The guest agent on this host: exec, file I/O and streaming through
    /// lohar vs. doing the same directly.
    Agent(agent::AgentBenchArgs),
    /// Create → first exec on real VMs (tiny and minimal), with where the
    /// time goes. Needs root and built images.
    Boot(boot::BootBenchArgs),
    /// The daemon's API against the agent client it wraps: exec, 1 KiB
    /// files, 10 concurrent execs, /health. Needs root and built images.
    Api(api::ApiBenchArgs),
    /// Thermal tiers on a real VM: pause, resume, warm and cold wake +
    /// exec vs. a fresh boot, snapshot size vs. memory dirtied. Needs root
    /// and built images.
    Thermal(thermal::ThermalBenchArgs),
    /// HTTP through the daemon's authenticated proxy vs. the same request
    /// over an agent tunnel (busybox httpd on tiny). Needs root and built
    /// images.
    Proxy(proxy::ProxyBenchArgs),
    /// Fork → first exec in the child and create from a template → first
    /// exec, against a fresh boot → first exec in the same run. Needs root
    /// and built images.
    Fork(fork::ForkBenchArgs),
    /// Pull → bootable rootfs of a ≥ 200 MB image from a local registry
    /// (in a network namespace of its own), cold and warm, against skopeo
    /// copy + umoci unpack + mkfs.ext4 -d in the same run. Needs root.
    Image(image_pull::ImageBenchArgs),
}

/// A sandbox manager of the bench's own: a temp data dir reading the images
/// in `data_dir`, and a bridge, TAP prefix and subnet named after this
/// process, so a daemon's links in the same namespace are never taken for
/// orphans (`tap_letter` must differ from every other user of the
/// namespace's `b…` TAP prefixes: the daemon's default is `bt`). Prints the
/// engine and network it uses.
pub fn scratch_manager(
    label: &str,
    tap_letter: char,
    data_dir: &std::path::Path,
    engine: vmm::EnginePreference,
    subnet: &str,
    confine: bool,
) -> anyhow::Result<(tempfile::TempDir, bhatti_core::SandboxManager)> {
    use anyhow::Context;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("bhatti-bench-{label}-"))
        .tempdir()
        .context("temp dir")?;
    let tag = format!("{:04x}", std::process::id() & 0xffff);
    let mut config = bhatti_core::CoreConfig::new(scratch.path());
    config.image_dir = data_dir.to_path_buf();
    config.engine = engine;
    config.confinement.enabled = confine;
    config.disk_bytes = 1 << 30;
    config.network = net::NetworkConfig {
        bridge: format!("bh{}{tag}", &label[..label.len().min(5)]),
        subnet: subnet.parse().context("--subnet")?,
        tap_prefix: format!("b{tap_letter}{tag}"),
        dns: None,
    };
    let mgr =
        bhatti_core::SandboxManager::new(config, std::sync::Arc::new(net::IpRoute::default()))
            .context("setting up (root is needed for the bridge and TAPs)")?;
    let engine = mgr.engine().clone();
    println!("engine: {} ({})", engine.kind, engine.reason);
    println!(
        "accelerator: {}",
        match engine.kind {
            vmm::EngineKind::QemuTcg =>
                "tcg (software emulation: absolute times are not KVM times)",
            vmm::EngineKind::QemuKvm | vmm::EngineKind::Firecracker => "kvm",
            vmm::EngineKind::Fake => "none (fake engine: no VM)",
        }
    );
    for n in mgr.networks() {
        println!(
            "network: bridge {} {} (removed at the end)",
            n.config().bridge,
            n.config().subnet
        );
    }
    Ok((scratch, mgr))
}

/// Destroys every sandbox of a scratch manager (a bench's cleanup, also on
/// failure) through the one destroy there is; returns the errors.
pub async fn destroy_every_sandbox(
    mgr: &bhatti_core::SandboxManager,
) -> Vec<bhatti_core::CoreError> {
    let mut errors = Vec::new();
    for record in mgr.list() {
        if let Err(e) = mgr.destroy(&record.id).await {
            errors.push(e);
        }
    }
    errors
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Agent(args) => agent::run(args),
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Api(args) => api::run(args),
        BenchCommand::Fork(args) => fork::run(args),
        BenchCommand::Image(args) => image_pull::run_bench(args),
        BenchCommand::Thermal(args) => thermal::run(args),
        BenchCommand::Proxy(args) => proxy::run(args),
    }
}
