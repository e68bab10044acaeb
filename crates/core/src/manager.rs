//! [`SandboxManager`]: creates, runs and destroys sandboxes.
//!
//! One lifecycle lock per sandbox serialises create and destroy; calls
//! into the guest (exec, files, sessions) run concurrently and are raced
//! against the VMM's exit, so a dead VM is reported as soon as it dies
//! rather than after a network timeout. No lock is held across `.await`
//! except the per-sandbox lifecycle lock (a tokio mutex, for exactly that).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agent_client::AgentClient;
use image::disk::{CONFIG_DRIVE, SANDBOX_DISK};
use image::{ConfigDriveFormat, ImageStore, ResolvedImage};
use net::{Attachment, NetOps, Network};
use tracing::Instrument;
use vmm::{DriveSpec, Engine, EngineChoice, MacAddr, MemoryBacking, NetSpec, VmSpec, Vmm};

use crate::boot::{agent_endpoint, dead, wait_for_agent};
use crate::config::CoreConfig;
use crate::error::{CoreError, Result};
use crate::id::{SandboxId, Token};
use crate::record::{BootTimings, SandboxRecord};
use crate::spec::SandboxSpec;
use crate::state::{transition, SandboxState};

/// The TCP port lohar listens on in the guest (control and tunnels).
pub const AGENT_PORT: u16 = 1024;
/// File name of the guest console log in a sandbox directory.
pub const SERIAL_LOG: &str = "serial.log";
/// The kernel command line before the network arguments: serial console,
/// no crypto self-tests (~0.4 s under TCG), quiet, and a panic ends QEMU.
/// The QEMU backend appends `tsc_early_khz=` itself.
pub const BASE_CMDLINE: &str = "console=ttyS0 cryptomgr.notests quiet panic=-1";

/// File name of guest RAM in a sandbox directory (QEMU
/// `memory-backend-file,share=on`): a snapshot leaves it in place.
pub const MEMORY_FILE: &str = "memory.ram";
/// Directory of a sandbox's snapshot (device state and manifest).
pub const SNAPSHOT_DIR: &str = "snapshot";

/// A running VM and the client of its agent.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) vmm: Arc<dyn Vmm>,
    pub(crate) client: AgentClient,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: SandboxId,
    /// Serialises create, destroy and thermal transitions of this sandbox.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    record: Mutex<SandboxRecord>,
    /// The VM while there is a VMM (hot or warm); `None` while cold.
    vm: Mutex<Option<Vm>>,
    /// Host-side last use (Unix ms): every agent call touches it.
    pub(crate) last_activity_ms: AtomicU64,
    /// While cold: the agent client of the VM that was snapshotted. Its
    /// idle connections are frozen in the snapshot with the guest and work
    /// again after the restore, which saves the first calls a TCP
    /// handshake and an auth round trip through a guest whose code is
    /// cold. A connection that turns out dead is replaced transparently.
    pub(crate) cold_client: Mutex<Option<AgentClient>>,
}

impl Entry {
    fn new(id: SandboxId, record: SandboxRecord) -> Entry {
        Entry {
            id,
            lifecycle: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            vm: Mutex::new(None),
            last_activity_ms: AtomicU64::new(now_unix_ms()),
            cold_client: Mutex::new(None),
        }
    }

    pub(crate) fn record(&self) -> MutexGuard<'_, SandboxRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn vm_slot(&self) -> MutexGuard<'_, Option<Vm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn vm(&self) -> Option<Vm> {
        self.vm_slot().clone()
    }

    pub(crate) fn cold_client(&self) -> MutexGuard<'_, Option<AgentClient>> {
        self.cold_client.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn touch(&self) {
        self.last_activity_ms
            .store(now_unix_ms(), Ordering::Relaxed);
    }

    fn set_state(&self, to: SandboxState) -> Result<()> {
        let mut r = self.record();
        r.state = transition(r.state, to).map_err(|source| CoreError::Transition {
            id: self.id.clone(),
            source,
        })?;
        tracing::info!(sandbox = %self.id, state = %to, "state");
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: CoreConfig,
    /// What makes this manager's VMs (the chosen engine, or a test's fake).
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) images: ImageStore,
    pub(crate) networks: crate::networks::Networks,
    vmm_uid: u32,
    sandboxes: Mutex<BTreeMap<SandboxId, Arc<Entry>>>,
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

/// What a failed create must undo, filled in as it goes.
#[derive(Debug, Default)]
struct Undo {
    dir: Option<PathBuf>,
    attachment: Option<Attachment>,
    vmm: Option<Arc<dyn Vmm>>,
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

impl SandboxManager {
    /// Picks the engine (`config.engine`, logged with its reason) and sets
    /// up the network (bridge, orphan TAPs removed). Blocks for a few
    /// milliseconds of `ip` commands.
    pub fn new(config: CoreConfig, net_ops: Arc<dyn NetOps>) -> Result<SandboxManager> {
        let engine = vmm::select_engine(config.engine).map_err(CoreError::Engine)?;
        SandboxManager::with_engine(config, engine, net_ops)
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
            tracing::info!(engine = %c.kind, binary = %c.binary.display(), reason = %c.reason, "engine");
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
                sandboxes: Mutex::new(BTreeMap::new()),
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

    /// Removes every bridge and TAP (benches and tests, after their
    /// sandboxes are gone).
    pub fn teardown_networks(&self) -> std::result::Result<(), net::NetError> {
        self.inner.networks.teardown_all()
    }

    /// Attaches on the sandbox's group network (blocking work off the
    /// runtime).
    pub(crate) async fn attach(
        &self,
        id: &SandboxId,
        group: &str,
        placement: crate::networks::Placement,
    ) -> Result<Attachment> {
        let inner = self.inner.clone();
        let (group, uid) = (group.to_string(), self.inner.vmm_uid);
        tokio::task::spawn_blocking(move || inner.networks.attach(&group, uid, placement))
            .await?
            .map_err(|source| CoreError::Network {
                id: id.clone(),
                source,
            })
    }

    /// Undoes [`SandboxManager::attach`].
    pub(crate) async fn detach(&self, att: Attachment) -> std::result::Result<(), CoreError> {
        let inner = self.inner.clone();
        let tap = att.tap.clone();
        tokio::task::spawn_blocking(move || inner.networks.detach(&att))
            .await?
            .map_err(|source| CoreError::Detach {
                tap,
                source: Box::new(source),
            })
    }

    fn sandboxes(&self) -> MutexGuard<'_, BTreeMap<SandboxId, Arc<Entry>>> {
        self.inner
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn entry(&self, id: &SandboxId) -> Result<Arc<Entry>> {
        self.sandboxes()
            .get(id)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(id.clone()))
    }

    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        self.sandboxes().values().cloned().collect()
    }

    /// Registers a recovered record (cold, no VMM) unless its id is taken.
    pub(crate) fn insert_adopted(&self, record: SandboxRecord) -> Result<()> {
        let mut map = self.sandboxes();
        if let Some(e) = map.get(&record.id) {
            return Err(CoreError::InvalidState {
                id: record.id.clone(),
                state: e.record().state,
                operation: "adopt",
            });
        }
        let id = record.id.clone();
        map.insert(id.clone(), Arc::new(Entry::new(id, record)));
        Ok(())
    }

    /// Every sandbox, by id.
    pub fn list(&self) -> Vec<SandboxRecord> {
        let entries: Vec<_> = self.sandboxes().values().cloned().collect();
        entries.iter().map(|e| e.record().clone()).collect()
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
        let r = entry.record().clone();
        Ok(r)
    }

    /// Creates a sandbox and returns once its agent answers.
    ///
    /// The spec and the image are checked first; on any error there,
    /// nothing has been created. Later failures undo what was done (VMM
    /// killed, TAP and address released, directory removed) and return the
    /// error: [`CoreError::VmmExited`], [`CoreError::BootTimeout`] and
    /// [`CoreError::AgentUnreachable`] carry the guest console's tail.
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxRecord> {
        let id = SandboxId::generate().map_err(CoreError::Random)?;
        self.create_as(id, spec).await
    }

    /// [`SandboxManager::create`] under an id the caller chose (the
    /// daemon's, so that one id names the sandbox from the API to the VMM).
    pub async fn create_as(&self, id: SandboxId, spec: SandboxSpec) -> Result<SandboxRecord> {
        spec.validate(&self.inner.config.limits)?;
        let image = self.inner.images.resolve(&spec.image)?;
        let token = Token::generate().map_err(CoreError::Random)?;
        let span =
            tracing::info_span!("create", sandbox = %id, name = %spec.name, image = %spec.image);
        async move {
            let entry = self.register(&id, spec, &image, token)?;
            let _life = entry.lifecycle.lock().await;
            let mut undo = Undo::default();
            match self.build(&entry, &image, &mut undo, true, None).await {
                Ok((vm, timings)) => {
                    self.mark_running(&entry, vm, timings)?;
                    tracing::info!(
                        prepare_ms = timings.prepare.as_millis() as u64,
                        vmm_start_ms = timings.vmm_start.as_millis() as u64,
                        agent_ready_ms = timings.agent_ready.as_millis() as u64,
                        "sandbox running"
                    );
                    Ok(entry.record().clone())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "create failed; cleaning up");
                    self.undo(undo).await;
                    self.sandboxes().remove(&id);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Records a booted VM on its entry (under the lifecycle lock) and
    /// makes the sandbox `running`.
    fn mark_running(&self, entry: &Entry, vm: Vm, timings: BootTimings) -> Result<()> {
        {
            let mut r = entry.record();
            r.boot = Some(timings);
            r.vmm_pid = vm.vmm.pid();
        }
        {
            let mut r = entry.record();
            r.thermal = crate::state::ThermalState::Hot;
            r.thermal_since_unix_ms = now_unix_ms();
        }
        // Under the lifecycle lock.
        *entry.vm_slot() = Some(vm);
        entry.touch();
        entry.set_state(SandboxState::Running)
    }

    /// Adds the `creating` entry, refusing a name a live sandbox has (unless
    /// [`CoreConfig::unique_names`] is off).
    fn register(
        &self,
        id: &SandboxId,
        spec: SandboxSpec,
        image: &ResolvedImage,
        token: Token,
    ) -> Result<Arc<Entry>> {
        let mut map = self.sandboxes();
        if map.contains_key(id) {
            return Err(CoreError::IdTaken(id.clone()));
        }
        if self.inner.config.unique_names && map.values().any(|e| e.record().spec.name == spec.name)
        {
            return Err(CoreError::NameTaken(spec.name));
        }
        let entry = Arc::new(Entry::new(
            id.clone(),
            SandboxRecord {
                id: id.clone(),
                spec,
                state: SandboxState::Creating,
                failure: None,
                engine: self.inner.engine.kind(),
                kernel_release: image.kernel_release.clone(),
                dir: self
                    .inner
                    .config
                    .data_layout()
                    .sandboxes_dir()
                    .join(id.as_str()),
                network: None,
                token,
                vmm_pid: None,
                created_unix_ms: now_unix_ms(),
                boot: None,
                thermal: crate::state::ThermalState::Hot,
                thermal_since_unix_ms: now_unix_ms(),
                keep_hot: false,
                breaker: None,
                cold_wakes: 0,
            },
        ));
        map.insert(id.clone(), entry.clone());
        Ok(entry)
    }

    /// Prepares what the VM needs and boots it. A `fresh` sandbox gets its
    /// directory, disk and config drive made; otherwise they must exist
    /// (a sandbox booted again) and `ip` names the address to keep.
    async fn build(
        &self,
        entry: &Entry,
        image: &ResolvedImage,
        undo: &mut Undo,
        fresh: bool,
        ip: Option<std::net::Ipv4Addr>,
    ) -> Result<(Vm, BootTimings)> {
        let started = Instant::now();
        let id = entry.id.clone();
        let (spec, dir, token) = {
            let r = entry.record();
            (r.spec.clone(), r.dir.clone(), r.token.clone())
        };

        if !fresh {
            for file in [SANDBOX_DISK, CONFIG_DRIVE] {
                let path = dir.join(file);
                if !path.is_file() {
                    return Err(CoreError::Disk {
                        id: id.clone(),
                        source: Box::new(image::Error::Io {
                            op: "find the sandbox's disk",
                            path,
                            source: std::io::Error::from(std::io::ErrorKind::NotFound),
                        }),
                    });
                }
            }
        }
        // Disks: the sandbox directory, its sparse disk and config drive.
        let root = self.inner.config.data_layout().sandboxes_dir();
        std::fs::create_dir_all(&root).map_err(|source| CoreError::Disk {
            id: id.clone(),
            source: Box::new(image::Error::Io {
                op: "create directory",
                path: root.clone(),
                source,
            }),
        })?;
        if fresh {
            undo.dir = Some(dir.clone());
            let cfg = spec.config_drive(token.expose().to_owned());
            let disk_bytes = self.inner.config.disk_bytes;
            let d = dir.clone();
            tokio::task::spawn_blocking(move || -> image::Result<()> {
                image::create_sandbox_disk(&d, disk_bytes)?;
                image::write_config_drive(&d.join(CONFIG_DRIVE), &cfg, ConfigDriveFormat::Raw)
            })
            .await?
            .map_err(|source| CoreError::Disk {
                id: id.clone(),
                source: Box::new(source),
            })?;
        }

        // Network: an address, a TAP on the group's bridge, a neighbour entry.
        // A sandbox booted again from its disk keeps its address when it
        // can, and learns a new one at boot when it cannot.
        let placement = ip.map_or(
            crate::networks::Placement::Any,
            crate::networks::Placement::Prefer,
        );
        let att = self.attach(&id, &spec.network_group, placement).await?;
        undo.attachment = Some(att.clone());
        entry.record().network = Some(att.clone());

        // The VM.
        let spec = vm_spec(&spec, image, &dir, &att);
        let vmm: Arc<dyn Vmm> =
            Arc::from(
                self.inner
                    .engine
                    .new_vmm(spec)
                    .map_err(|source| CoreError::Vmm {
                        id: id.clone(),
                        source,
                    })?,
            );
        undo.vmm = Some(vmm.clone());
        let prepared = Instant::now();
        let serial_log = dir.join(SERIAL_LOG);
        vmm.boot().await.map_err(|source| match vmm.exit() {
            Some(exit) => dead(&id, &exit, &serial_log),
            None => CoreError::Vmm {
                id: id.clone(),
                source,
            },
        })?;
        entry.record().vmm_pid = vmm.pid();
        let vcpus_running = Instant::now();

        let endpoint = agent_endpoint(&*vmm, att.ip);
        let client = AgentClient::new(endpoint.clone(), token.expose());
        wait_for_agent(
            &id,
            &*vmm,
            &client,
            &endpoint,
            self.inner.config.boot_timeout,
            &serial_log,
        )
        .await?;
        let ready = Instant::now();
        Ok((
            Vm { vmm, client },
            BootTimings {
                prepare: prepared - started,
                vmm_start: vcpus_running - prepared,
                agent_ready: ready - vcpus_running,
            },
        ))
    }

    /// Undoes a failed create; failures are logged (the create's own error
    /// is the one returned).
    async fn undo(&self, undo: Undo) {
        if let Some(vmm) = undo.vmm {
            if vmm.pid().is_some() && vmm.exit().is_none() {
                if let Err(e) = vmm.kill().await {
                    tracing::warn!(error = %e, "killing the VMM of a failed create");
                }
            }
        }
        if let Some(att) = undo.attachment {
            if let Err(e) = self.detach(att).await {
                tracing::warn!(error = %e, "detaching a failed create");
            }
        }
        if let Some(dir) = undo.dir {
            if let Err(e) = self.remove_dir(dir).await {
                tracing::warn!(error = %e, "removing the directory of a failed create");
            }
        }
    }

    async fn remove_dir(&self, dir: PathBuf) -> std::result::Result<(), String> {
        let root = self.inner.config.data_layout().sandboxes_dir();
        match tokio::task::spawn_blocking(move || image::destroy_sandbox_dir(&root, &dir)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Marks a sandbox whose VMM died as `failed` and returns the error
    /// that says so.
    pub(crate) fn mark_dead(&self, entry: &Entry, exit: &vmm::VmmExit) -> CoreError {
        let serial_log = entry.record().serial_log();
        let err = dead(&entry.id, exit, &serial_log);
        let mut r = entry.record();
        if r.state == SandboxState::Running {
            r.state = SandboxState::Failed;
            r.failure = Some(crate::boot::exit_reason(exit));
            r.vmm_pid = None;
            tracing::warn!(sandbox = %entry.id, reason = ?r.failure, "VMM died");
        }
        err
    }

    /// The running VM of a sandbox, or why there is none.
    pub(crate) fn running(&self, entry: &Entry, operation: &'static str) -> Result<Vm> {
        let vm = entry.vm();
        if let Some(exit) = vm.as_ref().and_then(|vm| vm.vmm.exit()) {
            return Err(self.mark_dead(entry, &exit));
        }
        let state = entry.record().state;
        match (state, vm) {
            (SandboxState::Running, Some(vm)) => Ok(vm),
            (state, _) => Err(CoreError::InvalidState {
                id: entry.id.clone(),
                state,
                operation,
            }),
        }
    }

    /// Destroys a sandbox: stops the VMM (the guest gets `destroy_grace`,
    /// then QEMU is told to quit, then killed), removes the TAP and the
    /// neighbour entry, releases the address, deletes the directory.
    /// Every step is attempted; if one fails the sandbox stays, `failed`,
    /// and destroy can be retried.
    pub async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        let span = tracing::info_span!("destroy", sandbox = %id);
        async move {
            let _life = entry.lifecycle.lock().await;
            if entry.record().state == SandboxState::Destroyed {
                return Ok(());
            }
            entry.set_state(SandboxState::Destroying)?;
            let mut first: Option<CoreError> = None;
            let mut fail =
                |step: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
                    tracing::warn!(step, error = %error_chain(&*source), "destroy step failed");
                    first.get_or_insert(CoreError::Destroy {
                        id: id.clone(),
                        step,
                        source,
                    });
                };
            if let Some(vm) = entry.vm() {
                if vm.vmm.exit().is_none() {
                    match vm.vmm.shutdown(self.inner.config.destroy_grace).await {
                        Ok(report) => {
                            tracing::info!(path = ?report.path, exit = %report.exit, "VMM stopped")
                        }
                        Err(e) => fail("stop the VMM", Box::new(e)),
                    }
                }
            }
            let att = entry.record().network.clone();
            if let Some(att) = att {
                if let Err(e) = self.detach(att).await {
                    fail("remove the TAP", Box::new(e));
                }
            }
            let dir = entry.record().dir.clone();
            if let Err(e) = self.remove_dir(dir).await {
                fail("remove the directory", e.into());
            }
            match first {
                None => {
                    entry.set_state(SandboxState::Destroyed)?;
                    entry.record().vmm_pid = None;
                    self.sandboxes().remove(id);
                    Ok(())
                }
                Some(e) => {
                    entry.set_state(SandboxState::Failed)?;
                    entry.record().failure = Some(error_chain(&e));
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Boots a sandbox again from its record — after a daemon restart, say —
    /// reusing its directory (disk and config drive, so its files and boot
    /// settings are as they were) and, when free, its address. Its
    /// processes start afresh. On failure the directory is left in place.
    pub async fn boot_existing(&self, record: SandboxRecord) -> Result<SandboxRecord> {
        let image = self.inner.images.resolve(&record.spec.image)?;
        let id = record.id.clone();
        let ip = record.network.as_ref().map(|a| a.ip);
        let span = tracing::info_span!("boot", sandbox = %id, name = %record.spec.name);
        async move {
            let entry = {
                let mut map = self.sandboxes();
                if map.contains_key(&id) {
                    return Err(CoreError::InvalidState {
                        id: id.clone(),
                        state: map[&id].record().state,
                        operation: "boot again",
                    });
                }
                let entry = Arc::new(Entry::new(
                    id.clone(),
                    SandboxRecord {
                        state: SandboxState::Creating,
                        failure: None,
                        network: None,
                        vmm_pid: None,
                        boot: None,
                        engine: self.inner.engine.kind(),
                        kernel_release: image.kernel_release.clone(),
                        breaker: None,
                        ..record
                    },
                ));
                map.insert(id.clone(), entry.clone());
                entry
            };
            let _life = entry.lifecycle.lock().await;
            let mut undo = Undo::default();
            match self.build(&entry, &image, &mut undo, false, ip).await {
                Ok((vm, timings)) => {
                    self.mark_running(&entry, vm, timings)?;
                    tracing::info!(
                        boot_ms = timings.total().as_millis() as u64,
                        "sandbox booted again"
                    );
                    Ok(entry.record().clone())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "boot failed; cleaning up (directory kept)");
                    self.undo(undo).await;
                    self.sandboxes().remove(&id);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Stops a sandbox's VM, removes its TAP and forgets it, but keeps its
    /// directory, so [`SandboxManager::boot_existing`] can bring it back
    /// (daemon shutdown). Returns its last record.
    pub async fn release(&self, id: &SandboxId) -> Result<SandboxRecord> {
        let entry = self.entry(id)?;
        let _life = entry.lifecycle.lock().await;
        if let Some(vm) = entry.vm() {
            if vm.vmm.exit().is_none() {
                vm.vmm
                    .shutdown(self.inner.config.destroy_grace)
                    .await
                    .map_err(|source| CoreError::Vmm {
                        id: id.clone(),
                        source,
                    })?;
            }
        }
        let att = entry.record().network.clone();
        if let Some(att) = att {
            self.detach(att).await?;
        }
        self.sandboxes().remove(id);
        let mut r = entry.record().clone();
        r.vmm_pid = None;
        tracing::info!(sandbox = %id, "released (directory kept)");
        Ok(r)
    }

    /// Releases every sandbox (daemon shutdown); returns the errors.
    pub async fn release_all(&self) -> Vec<CoreError> {
        let ids: Vec<SandboxId> = self.sandboxes().keys().cloned().collect();
        let mut errors = Vec::new();
        for id in ids {
            if let Err(e) = self.release(&id).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Destroys every sandbox (tests, benches, daemon uninstall); returns
    /// the errors of those that could not be destroyed.
    pub async fn destroy_all(&self) -> Vec<CoreError> {
        let ids: Vec<SandboxId> = self.sandboxes().keys().cloned().collect();
        let mut errors = Vec::new();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                errors.push(e);
            }
        }
        errors
    }
}

/// The VM for a sandbox: vda = the image's rootfs (read-only, shared),
/// vdb = the sandbox disk, vdc = the config drive; kernel arguments carry
/// the static address.
pub(crate) fn vm_spec(
    spec: &SandboxSpec,
    image: &ResolvedImage,
    dir: &Path,
    att: &Attachment,
) -> VmSpec {
    VmSpec {
        vcpus: spec.cpus,
        memory_mib: spec.memory_mb,
        kernel: image.vmlinux.clone(),
        initrd: Some(image.initramfs.clone()),
        cmdline: format!("{BASE_CMDLINE} {}", att.kernel_args()),
        drives: vec![
            DriveSpec {
                id: "rootfs".into(),
                path: image.rootfs.clone(),
                read_only: true,
            },
            DriveSpec {
                id: "disk".into(),
                path: dir.join(SANDBOX_DISK),
                read_only: false,
            },
            DriveSpec {
                id: "config".into(),
                path: dir.join(CONFIG_DRIVE),
                read_only: true,
            },
        ],
        net: Some(NetSpec {
            tap: att.tap.clone(),
            mac: MacAddr(att.mac.0),
        }),
        serial_log: dir.join(SERIAL_LOG),
        work_dir: dir.to_path_buf(),
        // Guest RAM in a file of the sandbox: going cold writes only device
        // state, and a restore maps this file lazily.
        memory: MemoryBacking::File {
            path: dir.join(MEMORY_FILE),
        },
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_spec_follows_the_guest_contract() {
        let image = ResolvedImage {
            tier: image::Tier::Tiny,
            vmlinux: "/d/images/kernel/vmlinux".into(),
            vmlinuz: "/d/images/kernel/vmlinuz".into(),
            kernel_release: "6.1".into(),
            initramfs: "/d/images/initramfs/initramfs.cpio".into(),
            rootfs: "/d/images/tiny/rootfs.ext4".into(),
        };
        let att = Attachment {
            bridge: "bhatti0".into(),
            tap: "bt0ac80002".into(),
            ip: "10.200.0.2".parse().unwrap(),
            prefix: 24,
            mac: net::Mac::for_ip("10.200.0.2".parse().unwrap()),
            gateway: "10.200.0.1".parse().unwrap(),
            dns: None,
        };
        let mut spec = SandboxSpec::new("a", "tiny");
        spec.cpus = 2;
        spec.memory_mb = 300;
        let dir = Path::new("/d/sandboxes/sb-000000000001");
        let v = vm_spec(&spec, &image, dir, &att);
        assert_eq!(
            v.cmdline,
            "console=ttyS0 cryptomgr.notests quiet panic=-1 bhatti.ip=10.200.0.2/24 bhatti.gw=10.200.0.1"
        );
        let drives: Vec<_> = v
            .drives
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.read_only))
            .collect();
        assert_eq!(
            drives,
            vec![
                ("/d/images/tiny/rootfs.ext4", true),
                ("/d/sandboxes/sb-000000000001/disk.ext4", false),
                ("/d/sandboxes/sb-000000000001/config.img", true),
            ]
        );
        assert_eq!((v.vcpus, v.memory_mib), (2, 300));
        assert_eq!(v.net.as_ref().unwrap().mac.to_string(), "02:b4:0a:c8:00:02");
        assert_eq!(v.work_dir, dir);
        assert_eq!(
            v.initrd.as_deref(),
            Some(Path::new("/d/images/initramfs/initramfs.cpio"))
        );
    }

    #[test]
    fn error_chains() {
        let e = CoreError::Disk {
            id: "sb-000000000001".parse().unwrap(),
            source: Box::new(image::Error::DiskSize {
                size: 1,
                min: 2,
                max: 3,
            }),
        };
        assert_eq!(
            error_chain(&e),
            "Preparing the disks of sandbox sb-000000000001: Disk size 1 bytes is outside 2..=3"
        );
    }
}
