//! `bhatti bench …`: each benchmark measures an operation and, in the same
//! run, the physical limit it is built on, and reports both with their ratio.

mod agent;
mod api;
mod boot;
mod proxy;
mod stats;
mod thermal;

use clap::Subcommand;

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
}

/// An in-process daemon's configuration of the bench's own: a temp data
/// dir reading the images in `data_dir`, port 0, a network range, bridge
/// and TAP prefix named after this process (`letter` tells the benches
/// apart), no firewall (applying it would replace the rules of a daemon
/// running in the same namespace) and no public proxy (its default port may
/// be a running daemon's). Dropping it removes the temp dir and the bench's
/// bridge, should the bench have stopped before its sandbox was destroyed.
#[derive(Debug)]
pub struct ScratchDaemon {
    pub config: ::api::DaemonConfig,
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
        let mut config = ::api::DaemonConfig::parse(&format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n[network]\nrange = \"{subnet}\"\nuser_prefix = {}\nbridge_prefix = \"{bridge_prefix}\"\ntap_prefix = \"b{letter}{tag}\"\nfirewall = false\n\
             [limits]\ncreates_per_min = 1000\nexecs_per_min = 1000000\nreads_per_min = 1000000\n",
            scratch.path().display(),
            subnet.prefix(),
        ))
        .map_err(anyhow::Error::msg)?;
        config.publish.listen = String::new();
        config.defaults.image = image.to_string();
        config.defaults.memory_mb = 256;
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

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Agent(args) => agent::run(args),
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Api(args) => api::run(args),
        BenchCommand::Thermal(args) => thermal::run(args),
        BenchCommand::Proxy(args) => proxy::run(args),
    }
}
