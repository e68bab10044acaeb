//! The lifecycle: create (and boot again from a kept disk), destroy, and
//! the undo of a create that failed or was cancelled.
//!
//! Each of these runs under the sandbox's lifecycle lock, and in a task of
//! its own: a caller that stops waiting (an HTTP client that went away)
//! cannot cut a create or a destroy in half. A create registers its entry
//! with the lock already held, so nothing else can act on a sandbox that
//! is half made.
//!
//! A destroy that arrives while a create or boot is in progress wins: it
//! raises the entry's cancellation flag before it waits for the lock; the
//! create watches the flag while the VMM starts and while it waits for the
//! agent, and between the steps before, undoes everything (VMM killed, TAP
//! and address released, a new directory removed), marks the sandbox
//! `failed` and returns [`CoreError::Cancelled`]. The destroy then takes
//! the lock and removes what is left.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use agent_client::AgentClient;
use image::disk::{CONFIG_DRIVE, SANDBOX_DISK};
use image::{ConfigDriveFormat, ResolvedImage};
use net::Attachment;
use tracing::Instrument;
use vmm::Vmm;

use crate::boot::{agent_endpoint, dead, wait_for_agent};
use crate::capture::Capture;
use crate::error::{error_chain, CoreError, Result};
use crate::id::{SandboxId, Token};
use crate::machine::{vm_spec, Vm, SERIAL_LOG};
use crate::manager::SandboxManager;
use crate::record::{BootTimings, SandboxRecord};
use crate::registry::{now_unix_ms, Entry};
use crate::spec::SandboxSpec;
use crate::state::{SandboxState, ThermalState};

/// What a failed create must undo, filled in as it goes.
#[derive(Debug, Default)]
struct Undo {
    dir: Option<PathBuf>,
    attachment: Option<Attachment>,
    vmm: Option<Arc<dyn Vmm>>,
}

/// Whether the sandbox's directory is made now or exists already, and
/// whether its VM boots or is restored.
#[derive(Debug, Clone)]
enum Origin {
    /// A new sandbox: directory, disk and config drive are made (and
    /// removed again on failure).
    Fresh,
    /// Booted again from its kept directory, preferring its old address.
    Again { ip: Option<Ipv4Addr> },
    /// A new sandbox restored from a capture: its disk a copy of the
    /// capture's, its memory the capture's mapped copy-on-write, told its
    /// own identity before it answers.
    Restored(Box<Capture>),
    /// A new sandbox booted afresh whose disk is a copy of this file (a
    /// sandbox disk taken from another sandbox: `image save`).
    Seeded(PathBuf),
}

/// The identity line a sandbox restored from a capture is told.
pub(crate) fn identity(
    token: &Token,
    hostname: &str,
    att: &Attachment,
) -> std::result::Result<proto::identity::GuestIdentity, CoreError> {
    let entropy = crate::id::random_hex(proto::identity::IDENTITY_ENTROPY_BYTES)
        .map_err(CoreError::Random)?;
    Ok(proto::identity::GuestIdentity {
        token: token.expose().to_owned(),
        hostname: hostname.to_owned(),
        ip: att.ip,
        prefix: att.prefix,
        gateway: att.gateway,
        mac: vmm::MacAddr(att.mac.0).to_string(),
        unix_ms: now_unix_ms(),
        entropy,
    })
}

/// Runs `fut` in a task of its own: dropping the returned future does not
/// cancel it.
async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut).await?
}

impl SandboxManager {
    /// Creates a sandbox and returns once its agent answers.
    ///
    /// The spec and the image are checked first; on any error there,
    /// nothing has been created. Later failures undo what was done (VMM
    /// killed, TAP and address released, directory removed) and return the
    /// error: [`CoreError::VmmExited`], [`CoreError::BootTimeout`] and
    /// [`CoreError::AgentUnreachable`] carry the guest console's tail; a
    /// destroy that arrived meanwhile makes it [`CoreError::Cancelled`].
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxRecord> {
        let id = SandboxId::generate().map_err(CoreError::Random)?;
        self.create_as(id, spec).await
    }

    /// [`SandboxManager::create`] under an id the caller chose (the
    /// daemon's, so that one id names the sandbox from the API to the VMM).
    pub async fn create_as(&self, id: SandboxId, spec: SandboxSpec) -> Result<SandboxRecord> {
        spec.validate(&self.inner.config.limits)?;
        let image = self.inner.images.resolve(&spec.image)?;
        let entry = self.new_entry(id, spec, &image)?;
        let span = tracing::info_span!("create", sandbox = %entry.id, name = %entry.read(|r| r.spec.name.clone()), image = %image.name);
        let mgr = self.clone();
        let unique = self.inner.config.unique_names;
        detached(
            async move { mgr.bring_up(entry, image, Origin::Fresh, unique).await }.instrument(span),
        )
        .await
    }

    /// The entry of a sandbox about to be made, with a new token.
    fn new_entry(
        &self,
        id: SandboxId,
        spec: SandboxSpec,
        image: &ResolvedImage,
    ) -> Result<Arc<Entry>> {
        let token = Token::generate().map_err(CoreError::Random)?;
        Ok(Arc::new(Entry::creating(SandboxRecord {
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
            thermal: ThermalState::Hot,
            thermal_since_unix_ms: now_unix_ms(),
            keep_hot: false,
            breaker: None,
            cold_wakes: 0,
        })))
    }

    /// Creates sandbox `id` from `capture` instead of booting: the spec's
    /// image, CPUs, memory and disk size must be the capture's (the caller
    /// takes them from [`Capture::meta`]). Returns once the restored agent
    /// answers at the new sandbox's own address with its own token. Undone
    /// on failure as a create is.
    pub async fn create_from_capture(
        &self,
        id: SandboxId,
        spec: SandboxSpec,
        capture: Capture,
    ) -> Result<SandboxRecord> {
        spec.validate(&self.inner.config.limits)?;
        let src = &capture.meta.spec;
        if (src.image.as_str(), src.cpus, src.memory_mb, src.disk_mb)
            != (spec.image.as_str(), spec.cpus, spec.memory_mb, spec.disk_mb)
        {
            return Err(CoreError::Capture {
                dir: capture.dir.clone(),
                reason: "the new sandbox's image, CPUs, memory and disk must be the capture's"
                    .into(),
            });
        }
        if !spec.volumes.is_empty() {
            return Err(CoreError::Capture {
                dir: capture.dir.clone(),
                reason: "a sandbox made from a capture cannot attach volumes".into(),
            });
        }
        let image = self.inner.images.resolve(&spec.image)?;
        if image.kernel_release != capture.meta.kernel_release {
            return Err(CoreError::Capture {
                dir: capture.dir.clone(),
                reason: format!(
                    "taken on kernel {}, the image now has {}",
                    capture.meta.kernel_release, image.kernel_release
                ),
            });
        }
        let entry = self.new_entry(id, spec, &image)?;
        let span = tracing::info_span!("create_from_capture", sandbox = %entry.id);
        let mgr = self.clone();
        let unique = self.inner.config.unique_names;
        detached(
            async move {
                mgr.bring_up(entry, image, Origin::Restored(Box::new(capture)), unique)
                    .await
            }
            .instrument(span),
        )
        .await
    }

    /// [`SandboxManager::create_as`] with a disk that is a copy of `disk`
    /// (a sandbox disk, `disk.ext4`, of another sandbox, taken while it
    /// was quiet) instead of an empty one: the new sandbox boots with
    /// that sandbox's files over its image. The copy is the new
    /// sandbox's; `disk` is left as it is.
    pub async fn create_seeded(
        &self,
        id: SandboxId,
        spec: SandboxSpec,
        disk: PathBuf,
    ) -> Result<SandboxRecord> {
        spec.validate(&self.inner.config.limits)?;
        let image = self.inner.images.resolve(&spec.image)?;
        let entry = self.new_entry(id, spec, &image)?;
        let span = tracing::info_span!("create_seeded", sandbox = %entry.id);
        let mgr = self.clone();
        let unique = self.inner.config.unique_names;
        detached(
            async move {
                mgr.bring_up(entry, image, Origin::Seeded(disk), unique)
                    .await
            }
            .instrument(span),
        )
        .await
    }

    /// Boots a sandbox again from its record — after a daemon restart, say —
    /// reusing its directory (disk and config drive, so its files and boot
    /// settings are as they were) and, when free, its address. Its
    /// processes start afresh. On failure the directory is left in place;
    /// a destroy meanwhile cancels the boot as it cancels a create.
    pub async fn boot_existing(&self, record: SandboxRecord) -> Result<SandboxRecord> {
        let image = self.inner.images.resolve(&record.spec.image)?;
        let ip = record.network.as_ref().map(|a| a.ip);
        let span = tracing::info_span!("boot", sandbox = %record.id, name = %record.spec.name);
        let entry = Arc::new(Entry::creating(SandboxRecord {
            network: None,
            engine: self.inner.engine.kind(),
            kernel_release: image.kernel_release.clone(),
            breaker: None,
            ..record
        }));
        let mgr = self.clone();
        detached(
            async move {
                mgr.bring_up(entry, image, Origin::Again { ip }, false)
                    .await
            }
            .instrument(span),
        )
        .await
    }

    /// Registers `entry` (lifecycle lock held), builds its VM and makes it
    /// `running`, or undoes everything.
    async fn bring_up(
        &self,
        entry: Arc<Entry>,
        image: ResolvedImage,
        origin: Origin,
        unique_names: bool,
    ) -> Result<SandboxRecord> {
        // A new mutex: this does not wait. Held from before the entry is
        // visible until it is running or failed.
        let _life = entry.lock().await;
        self.inner.registry.insert(entry.clone(), unique_names)?;
        let mut undo = Undo::default();
        let built = self.build(&entry, &image, &mut undo, origin).await;
        let result = match built {
            // A destroy that came after the agent answered still wins.
            Ok(_) if entry.is_cancelled() => Err(CoreError::Cancelled {
                id: entry.id.clone(),
            }),
            Ok((vm, timings)) => entry.start_running(vm, timings).map(|()| timings),
            Err(e) => Err(e),
        };
        match result {
            Ok(timings) => {
                tracing::info!(
                    prepare_ms = timings.prepare.as_millis() as u64,
                    vmm_start_ms = timings.vmm_start.as_millis() as u64,
                    agent_ready_ms = timings.agent_ready.as_millis() as u64,
                    "sandbox running"
                );
                Ok(entry.record())
            }
            Err(e) => {
                tracing::warn!(error = %e, "create failed; cleaning up");
                self.undo(&entry, undo).await;
                if let Err(t) = entry.fail(error_chain(&e)) {
                    tracing::error!(error = %error_chain(&t), "marking a failed create");
                }
                // A cancelled create leaves its (failed) entry to the
                // destroy that cancelled it.
                if !entry.is_cancelled() {
                    self.inner.registry.remove(&entry);
                }
                Err(e)
            }
        }
    }

    /// Prepares what the VM needs and boots it. A fresh sandbox gets its
    /// directory, disk and config drive made; one booted again must have
    /// them, and keeps its address when it can (it learns a new one at
    /// boot when it cannot).
    async fn build(
        &self,
        entry: &Entry,
        image: &ResolvedImage,
        undo: &mut Undo,
        origin: Origin,
    ) -> Result<(Vm, BootTimings)> {
        let started = Instant::now();
        let id = entry.id.clone();
        let cancelled = || CoreError::Cancelled { id: id.clone() };
        let check = || {
            if entry.is_cancelled() {
                Err(cancelled())
            } else {
                Ok(())
            }
        };
        let (spec, dir, token) = entry.read(|r| (r.spec.clone(), r.dir.clone(), r.token.clone()));

        if let Origin::Again { .. } = origin {
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
        check()?;
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
        let placement = match &origin {
            Origin::Fresh | Origin::Restored(_) | Origin::Seeded(_) => {
                undo.dir = Some(dir.clone());
                // A restored sandbox's drive is for a later boot from its
                // disk (its agent runs on with the capture's settings).
                let mut cfg = spec.config_drive(token.expose().to_owned());
                if let Some(rc) = &image.run_config {
                    crate::spec::apply_image_config(&mut cfg, rc);
                }
                let disk_bytes = spec
                    .disk_mb
                    .map_or(self.inner.config.disk_bytes, |mb| mb << 20);
                let from = match &origin {
                    Origin::Restored(capture) => Some(capture.disk()),
                    Origin::Seeded(disk) => Some(disk.clone()),
                    Origin::Fresh | Origin::Again { .. } => None,
                };
                let d = dir.clone();
                tokio::task::spawn_blocking(move || -> image::Result<()> {
                    match from {
                        None => {
                            image::create_sandbox_disk(&d, disk_bytes)?;
                        }
                        Some(from) => {
                            std::fs::create_dir_all(&d).map_err(|source| image::Error::Io {
                                op: "create directory",
                                path: d.clone(),
                                source,
                            })?;
                            vmm::snapshot::copy_sparse(&from, &d.join(SANDBOX_DISK)).map_err(
                                |e| image::Error::Io {
                                    op: "copy the capture's disk",
                                    path: from.clone(),
                                    source: std::io::Error::other(error_chain(&e)),
                                },
                            )?;
                        }
                    }
                    image::write_config_drive(&d.join(CONFIG_DRIVE), &cfg, ConfigDriveFormat::Raw)
                })
                .await?
                .map_err(|source| CoreError::Disk {
                    id: id.clone(),
                    source: Box::new(source),
                })?;
                crate::networks::Placement::Any
            }
            Origin::Again { ip } => ip.map_or(
                crate::networks::Placement::Any,
                crate::networks::Placement::Prefer,
            ),
        };
        check()?;

        // Network: an address, a TAP on the group's bridge, a neighbour entry.
        let att = self
            .attach(&id, &spec.network_group, placement, &spec.egress)
            .await?;
        undo.attachment = Some(att.clone());
        entry.set_network(Some(att.clone()));
        check()?;

        // The VM. Starting it and waiting for its agent are raced against
        // the cancellation; both leave the VMM where `undo` finds it.
        let hostname = spec.name.clone();
        let mut spec = vm_spec(&spec, image, &dir, &att);
        let restore_from = match &origin {
            Origin::Restored(capture) => {
                capture.apply_memory(&mut spec);
                Some(capture.snapshot_dir())
            }
            Origin::Fresh | Origin::Again { .. } | Origin::Seeded(_) => None,
        };
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
        let start = async {
            match &restore_from {
                None => vmm.boot().await,
                Some(snapshot) => {
                    vmm.restore(snapshot).await?;
                    // Who it is now, before anything can reach it.
                    let line = identity(&token, &hostname, &att)
                        .map_err(|e| vmm::VmmError::Console {
                            source: std::io::Error::other(e.to_string()),
                        })?
                        .to_line();
                    vmm.send_console(line.as_bytes()).await
                }
            }
        };
        tokio::select! {
            r = start => r.map_err(|source| match vmm.exit() {
                Some(exit) => dead(&id, &exit, &serial_log),
                None => CoreError::Vmm {
                    id: id.clone(),
                    source,
                },
            })?,
            () = entry.cancelled() => return Err(cancelled()),
        }
        entry.set_vmm_pid(vmm.pid());
        let vcpus_running = Instant::now();

        let endpoint = agent_endpoint(&*vmm, att.ip);
        let client = AgentClient::new(endpoint.clone(), token.expose());
        tokio::select! {
            r = wait_for_agent(
                &id,
                &*vmm,
                &client,
                &endpoint,
                self.inner.config.boot_timeout,
                &serial_log,
                restore_from.is_some(),
            ) => r?,
            () = entry.cancelled() => return Err(cancelled()),
        }
        if restore_from.is_some() {
            // The identity carried the clock as it was when sent; set it
            // again now that the agent answers (an agent outside a guest,
            // the fake engine's, keeps the host's and says so).
            match client
                .deadline(self.inner.config.thermal.agent_timeout)
                .set_time(now_unix_ms())
                .await
            {
                Ok(()) => {}
                Err(e) if e.agent_code() == Some(proto::ErrorCode::PermissionDenied) => {}
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "setting the clock of a restored sandbox")
                }
            }
        }
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
    async fn undo(&self, entry: &Entry, undo: Undo) {
        if let Some(vmm) = undo.vmm {
            if vmm.pid().is_some() && vmm.exit().is_none() {
                if let Err(e) = vmm.kill().await {
                    tracing::warn!(error = %e, "killing the VMM of a failed create");
                }
            }
            entry.set_vmm_pid(None);
        }
        if let Some(att) = undo.attachment {
            match self.detach(att).await {
                Ok(()) => entry.set_network(None),
                Err(e) => tracing::warn!(error = %e, "detaching a failed create"),
            }
        }
        if let Some(dir) = undo.dir {
            if let Err(e) = self.remove_dir(dir).await {
                tracing::warn!(error = %e, "removing the directory of a failed create");
            }
        }
    }

    /// Destroys a sandbox: stops the VMM (the guest gets `destroy_grace`,
    /// then QEMU is told to quit, then killed), removes the TAP and the
    /// neighbour entry, releases the address, deletes the directory.
    /// Every step is attempted; if one fails the sandbox stays, `failed`,
    /// and destroy can be retried. A create or boot in progress is
    /// cancelled first (see the module docs).
    pub async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        entry.cancel();
        let span = tracing::info_span!("destroy", sandbox = %id);
        let mgr = self.clone();
        detached(async move { mgr.destroy_entry(&entry).await }.instrument(span)).await
    }

    /// Stops a sandbox's VM (if it has one), removes its TAP and forgets
    /// it, but keeps its directory, so [`SandboxManager::boot_existing`]
    /// can bring it back from its disk (the daemon uses it for a sandbox
    /// whose snapshot will not restore, and before growing a disk). Its
    /// snapshot, if any, is removed: a released sandbox boots from its
    /// disk, and a snapshot of it would be stale. Returns its last record.
    pub async fn release(&self, id: &SandboxId) -> Result<SandboxRecord> {
        let entry = self.entry(id)?;
        entry.cancel();
        let mgr = self.clone();
        let span = tracing::info_span!("release", sandbox = %id);
        detached(
            async move {
                let _life = entry.lock().await;
                if let Some(vm) = entry.take_vm() {
                    if vm.vmm.exit().is_none() {
                        vm.vmm
                            .shutdown(mgr.inner.config.destroy_grace)
                            .await
                            .map_err(|source| CoreError::Vmm {
                                id: entry.id.clone(),
                                source,
                            })?;
                    }
                }
                if let Some(att) = entry.read(|r| r.network.clone()) {
                    mgr.detach(att).await?;
                    entry.set_network(None);
                }
                entry.set_vmm_pid(None);
                let snapshot = entry.read(|r| r.dir.join(crate::machine::SNAPSHOT_DIR));
                if let Err(e) = std::fs::remove_dir_all(&snapshot) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(error = %e, "removing the released sandbox's snapshot");
                    }
                }
                mgr.inner.registry.remove(&entry);
                tracing::info!("released (directory kept, snapshot removed)");
                Ok(entry.record())
            }
            .instrument(span),
        )
        .await
    }

    /// Grows the writable disk of a sandbox whose VM does not run here
    /// (stopped, or released with [`SandboxManager::release`]) to `mb`
    /// MiB, and returns its record with the new size in its spec. Only the
    /// disk file grows: the guest grows its file system to fill the disk at
    /// its next boot (the host never parses the guest's file system). A
    /// sandbox whose VM this manager holds is refused: its VMM (and any
    /// snapshot of it) knows the old size.
    pub async fn grow_disk(&self, record: &SandboxRecord, mb: u64) -> Result<SandboxRecord> {
        if let Ok(entry) = self.entry(&record.id) {
            return Err(CoreError::InvalidState {
                id: record.id.clone(),
                state: entry.state(),
                operation: "grow its disk while its VM is held (stop and release it first)",
            });
        }
        let mut grown = record.clone();
        grown.spec.disk_mb = Some(mb);
        grown
            .spec
            .validate(&self.inner.config.limits)
            .map_err(CoreError::InvalidSpec)?;
        let dir = record.dir.clone();
        tokio::task::spawn_blocking(move || image::grow_sandbox_disk(&dir, mb << 20))
            .await?
            .map_err(|source| CoreError::Disk {
                id: record.id.clone(),
                source: Box::new(source),
            })?;
        Ok(grown)
    }

    async fn destroy_entry(&self, entry: &Entry) -> Result<()> {
        let _life = entry.lock().await;
        if entry.state() == SandboxState::Destroyed {
            return Ok(());
        }
        entry.set_state(SandboxState::Destroying)?;
        let id = entry.id.clone();
        let mut first: Option<CoreError> = None;
        let mut fail = |step: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
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
        let att = entry.read(|r| r.network.clone());
        if let Some(att) = att {
            match self.detach(att).await {
                Ok(()) => entry.set_network(None),
                Err(e) => fail("remove the TAP", Box::new(e)),
            }
        }
        let dir = entry.read(|r| r.dir.clone());
        if let Err(e) = self.remove_dir(dir).await {
            fail("remove the directory", e.into());
        }
        match first {
            None => {
                entry.take_vm();
                entry.set_state(SandboxState::Destroyed)?;
                self.inner.registry.remove(entry);
                Ok(())
            }
            Some(e) => {
                entry.fail(error_chain(&e))?;
                Err(e)
            }
        }
    }
}
