//! [`CoreConfig`]: where data lives, which engine, which network, and the
//! lifecycle's timeouts.

use std::path::PathBuf;
use std::time::Duration;

use image::Layout;
use net::NetworkConfig;
use vmm::EnginePreference;

use crate::spec::Limits;

/// How the orchestrator runs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Where sandboxes live (`DATA/sandboxes/<id>`).
    pub data_dir: PathBuf,
    /// Where images are read from (`IMAGES/images/…`); usually `data_dir`.
    pub image_dir: PathBuf,
    /// Which engine (`auto` by default; always reported).
    pub engine: EnginePreference,
    /// The guests' architecture (the host's by default): which images are
    /// read (`Layout::for_arch`) and which QEMU runs them. Another than the
    /// host's runs on QEMU+TCG only.
    pub arch: vmm::Arch,
    /// The bridge and subnet every sandbox shares, unless
    /// `group_networks` is set.
    pub network: NetworkConfig,
    /// A bridge and subnet per network group (per user, in the daemon),
    /// made with the group's first sandbox and removed with its last.
    pub group_networks: Option<crate::networks::GroupNetworkConfig>,
    /// Bounds on specs.
    pub limits: Limits,
    /// Size of each sandbox's sparse writable disk.
    pub disk_bytes: u64,
    /// How long a new VM may take until its agent answers.
    pub boot_timeout: Duration,
    /// How long destroy waits for the guest (and then QEMU) to stop before
    /// the next, harsher step. Short: the sandbox's disk is deleted right
    /// after, so the guest has nothing worth flushing, and lohar does not
    /// act on the ACPI power button yet, so this is mostly waited out.
    pub destroy_grace: Duration,
    /// The owner of new TAPs; the daemon's own by default. A confined VMM
    /// does not open its TAP (the daemon passes it), so this need not be
    /// the VMM user.
    pub vmm_uid: Option<u32>,
    /// How VMMs are confined (on by default; see `vmm::confine`). Applies
    /// to the engine [`crate::SandboxManager::new`] picks; an engine passed
    /// to `with_engine` brings its own.
    pub confinement: vmm::ConfineConfig,
    /// Refuse a name a live sandbox already has. The multi-user daemon
    /// turns this off: names are unique per user there (its store enforces
    /// that), and two users' sandboxes may share a hostname.
    pub unique_names: bool,
    /// When idle sandboxes are paused and snapshotted, and how many may
    /// wake from cold at once.
    pub thermal: crate::thermal::ThermalPolicy,
    /// How long daemon shutdown ([`crate::SandboxManager::stop_all`]) gives
    /// each sandbox (all at once) to go cold. One that is not cold by then
    /// has its VMM killed and comes back `stopped`. `stop_all` returns
    /// within this plus [`crate::KILL_GRACE`] plus the VMM's own
    /// bound on dying after SIGKILL (10 s).
    pub shutdown_timeout: Duration,
}

impl CoreConfig {
    /// Defaults with everything under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> CoreConfig {
        let data_dir = data_dir.into();
        CoreConfig {
            image_dir: data_dir.clone(),
            data_dir,
            engine: EnginePreference::Auto,
            arch: vmm::Arch::host_or_default(),
            network: NetworkConfig::default(),
            group_networks: None,
            limits: Limits::for_host(),
            disk_bytes: 2 << 30,
            boot_timeout: Duration::from_secs(60),
            destroy_grace: Duration::from_millis(300),
            vmm_uid: None,
            confinement: vmm::ConfineConfig::default(),
            unique_names: true,
            thermal: crate::thermal::ThermalPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// The layout sandboxes are created in.
    pub fn data_layout(&self) -> Layout {
        Layout::new(&self.data_dir)
    }

    /// The layout images are read from.
    pub fn image_layout(&self) -> Layout {
        Layout::for_arch(&self.image_dir, self.arch)
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig::new(image::layout::DEFAULT_DATA_DIR)
    }
}
