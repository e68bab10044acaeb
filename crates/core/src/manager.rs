//! [`SandboxManager`]: the handle the daemon holds — the engine, the image
//! store, the networks and the [registry](crate::registry) — with the
//! operations that only read it (`list`, `get`) and the helpers the other
//! modules share. The operations themselves live by concept:
//! [`lifecycle`](crate::lifecycle) (create, boot, destroy),
//! [`thermal`](crate::thermal) (pause, resume, stop, start, the ticker),
//! [`shutdown`](crate::shutdown) (the bounded `stop_all`),
//! [`recovery`](crate::recovery) (adoption after a restart) and
//! [`guest`](crate::guest) (calls into a running guest).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use image::ImageStore;
use net::{Attachment, NetOps, Network};
use vmm::{Engine, EngineChoice};

use crate::boot::dead;
use crate::config::CoreConfig;
use crate::error::{error_chain, CoreError, Result};
use crate::id::SandboxId;
pub(crate) use crate::machine::Vm;
use crate::record::SandboxRecord;
pub(crate) use crate::registry::Entry;
use crate::registry::Registry;
use crate::state::SandboxState;

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: CoreConfig,
    /// What makes this manager's VMs (the chosen engine, or a test's fake).
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) images: ImageStore,
    pub(crate) networks: crate::networks::Networks,
    pub(crate) vmm_uid: u32,
    pub(crate) registry: Registry,
    /// Caps concurrent restores from cold.
    pub(crate) cold_wakes: tokio::sync::Semaphore,
    /// Where thermal transitions are reported (the daemon records them).
    pub(crate) events:
        Mutex<Option<tokio::sync::mpsc::UnboundedSender<crate::thermal::ThermalEvent>>>,
}

/// The sandbox lifecycle over an engine, the image store and a network.
/// Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct SandboxManager {
    pub(crate) inner: Arc<Inner>,
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

impl SandboxManager {
    /// Picks the engine (`config.engine`, logged with its reason), sets up
    /// VMM confinement (`config.confinement`: the VMM user, cgroups; the
    /// engine's reason says whether it is on) and the network (bridge,
    /// orphan TAPs removed). Blocks for a few milliseconds of `ip`
    /// commands.
    pub fn new(config: CoreConfig, net_ops: Arc<dyn NetOps>) -> Result<SandboxManager> {
        let engine = vmm::select_engine(config.engine, config.arch).map_err(CoreError::Engine)?;
        let confine = vmm::confine::Confinement::prepare(&config.confinement, engine.kind)
            .map_err(CoreError::Engine)?;
        SandboxManager::with_engine(config, vmm::ConfinedEngine::new(engine, confine), net_ops)
    }

    /// Like [`SandboxManager::new`] with an engine chosen by the caller: an
    /// [`EngineChoice`], or a test's `vmm::fake::FakeEngine`.
    pub fn with_engine(
        config: CoreConfig,
        engine: impl Engine + 'static,
        net_ops: Arc<dyn NetOps>,
    ) -> Result<SandboxManager> {
        let engine: Arc<dyn Engine> = Arc::new(engine);
        {
            let c = engine.choice();
            tracing::info!(engine = %c.kind, arch = %config.arch, binary = %c.binary.display(), reason = %c.reason, "engine");
        }
        let networks = crate::networks::Networks::new(
            &config.network,
            config.group_networks.as_ref(),
            net_ops,
        )
        .map_err(CoreError::NetworkSetup)?;
        Ok(SandboxManager {
            inner: Arc::new(Inner {
                images: ImageStore::new(config.image_layout()),
                vmm_uid: config.vmm_uid.unwrap_or_else(own_uid),
                cold_wakes: tokio::sync::Semaphore::new(config.thermal.max_cold_wakes.max(1)),
                events: Mutex::new(None),
                config,
                engine,
                networks,
                registry: Registry::default(),
            }),
        })
    }

    /// The engine in use, and why.
    pub fn engine(&self) -> &EngineChoice {
        self.inner.engine.choice()
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// The networks that exist now: the shared one, or every group's.
    pub fn networks(&self) -> Vec<Arc<Network>> {
        self.inner.networks.all()
    }

    /// Reports group networks coming and going (those up already are
    /// reported at once). One subscriber; a new one replaces the last.
    pub fn subscribe_networks(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<crate::networks::NetworkEvent>,
    ) {
        self.inner.networks.subscribe(tx);
    }

    /// Every sandbox's allow-listed names and the addresses learned for
    /// them: the daemon's DNS relay learns into it
    /// ([`net::dns::Relay::learn_into`]).
    pub fn name_sets(&self) -> Arc<net::NameSets> {
        self.inner.networks.name_sets()
    }

    /// Changes where a sandbox may send: its TAP's guard is replaced now
    /// (established connections included, whatever its thermal state), and
    /// its record keeps the policy for every later attach. Waits for a
    /// lifecycle step of the sandbox in progress.
    pub async fn set_egress(&self, id: &SandboxId, egress: net::Egress) -> Result<()> {
        let entry = self.entry(id)?;
        let _life = entry.lock().await;
        if let Some(att) = entry.read(|r| r.network.clone()) {
            let inner = self.inner.clone();
            let e = egress.clone();
            tokio::task::spawn_blocking(move || inner.networks.set_egress(&att, &e))
                .await?
                .map_err(|source| CoreError::Network {
                    id: id.clone(),
                    source,
                })?;
        }
        entry.set_egress(egress);
        Ok(())
    }

    /// Removes every bridge and TAP (benches and tests, after their
    /// sandboxes are gone).
    pub fn teardown_networks(&self) -> std::result::Result<(), net::NetError> {
        self.inner.networks.teardown_all()
    }

    /// Every sandbox, by id.
    pub fn list(&self) -> Vec<SandboxRecord> {
        self.entries().iter().map(|e| e.record()).collect()
    }

    /// One sandbox's record. Does not touch the guest; a VMM that died is
    /// noticed here too (the sandbox turns `failed`).
    pub fn get(&self, id: &SandboxId) -> Result<SandboxRecord> {
        let entry = self.entry(id)?;
        if let Some(vm) = entry.vm() {
            if let Some(exit) = vm.vmm.exit() {
                self.mark_dead(&entry, &exit);
            }
        }
        Ok(entry.record())
    }

    pub(crate) fn entry(&self, id: &SandboxId) -> Result<Arc<Entry>> {
        self.inner
            .registry
            .get(id)
            .ok_or_else(|| CoreError::NotFound(id.clone()))
    }

    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        self.inner.registry.all()
    }

    /// Marks a sandbox whose VMM died as `failed` and returns the error
    /// that says so.
    pub(crate) fn mark_dead(&self, entry: &Entry, exit: &vmm::VmmExit) -> CoreError {
        let serial_log = entry.read(|r| r.serial_log());
        let err = dead(&entry.id, exit, &serial_log);
        if entry.state() == SandboxState::Running
            && entry.fail(crate::boot::exit_reason(exit)).is_ok()
        {
            entry.set_vmm_pid(None);
        }
        err
    }

    /// The running VM of a sandbox, or why there is none.
    pub(crate) fn running(&self, entry: &Entry, operation: &'static str) -> Result<Vm> {
        let vm = entry.vm();
        if let Some(exit) = vm.as_ref().and_then(|vm| vm.vmm.exit()) {
            return Err(self.mark_dead(entry, &exit));
        }
        let state = entry.state();
        match (state, vm) {
            (SandboxState::Running, Some(vm)) => Ok(vm),
            (state, _) => Err(CoreError::InvalidState {
                id: entry.id.clone(),
                state,
                operation,
            }),
        }
    }

    /// Attaches on the sandbox's group network (blocking work off the
    /// runtime).
    pub(crate) async fn attach(
        &self,
        id: &SandboxId,
        group: &str,
        placement: crate::networks::Placement,
        egress: &net::Egress,
    ) -> Result<Attachment> {
        let inner = self.inner.clone();
        let (group, uid, egress) = (group.to_string(), self.inner.vmm_uid, egress.clone());
        tokio::task::spawn_blocking(move || inner.networks.attach(&group, uid, placement, &egress))
            .await?
            .map_err(|source| CoreError::Network {
                id: id.clone(),
                source,
            })
    }

    /// Undoes [`SandboxManager::attach`].
    pub(crate) async fn detach(&self, att: Attachment) -> Result<()> {
        let inner = self.inner.clone();
        let tap = att.tap.clone();
        tokio::task::spawn_blocking(move || inner.networks.detach(&att))
            .await?
            .map_err(|source| CoreError::Detach {
                tap,
                source: Box::new(source),
            })
    }

    /// Removes a sandbox directory (a missing one is fine).
    pub(crate) async fn remove_dir(&self, dir: PathBuf) -> std::result::Result<(), String> {
        let root = self.inner.config.data_layout().sandboxes_dir();
        if !root.exists() {
            return Ok(());
        }
        match tokio::task::spawn_blocking(move || image::destroy_sandbox_dir(&root, &dir)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(e) => Err(e.to_string()),
        }
    }
}
