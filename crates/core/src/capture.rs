//! Captures: a sandbox's memory and disk at one instant, as a directory any
//! number of new sandboxes can start from (checkpoints, forks, templates).
//!
//! A capture directory holds
//! * `snapshot/`: the VMM's device state, its manifest and `memory`, a copy
//!   of guest RAM ([`vmm::snapshot::make_capture`]);
//! * `disk.ext4`: a copy of the sandbox's writable disk (its own layer
//!   above the shared read-only image);
//! * `capture.json`: [`CaptureMeta`], the source's spec and machine.
//!
//! Both copies keep holes, and are clones where the file system has them
//! (XFS, btrfs): the capture costs what the guest had touched. A capture is
//! taken with the vCPUs stopped, so memory and disk agree (the guest's
//! unwritten page cache is in its memory); the source carries on as soon
//! as the copies are made, and a durable capture is synced after that.
//!
//! A sandbox made from a capture runs on the capture's memory mapped
//! copy-on-write ([`vmm::MemoryBacking::Private`]): nothing of it is copied
//! up front, and each new sandbox costs the host the pages it changes. Its
//! disk is a copy of the capture's. Its first act is to learn who it is now
//! — token, hostname, address, MAC, clock, entropy — from one line on its
//! console ([`proto::identity`]); only then does it answer at its own
//! address.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::snapshot::{SnapshotManifest, MANIFEST, MEMORY_FILE, STATE_FILE};
use vmm::{EngineKind, SnapshotKind};

use crate::error::{error_chain, CoreError, Result};
use crate::id::SandboxId;
use crate::machine::SNAPSHOT_DIR;
use crate::manager::SandboxManager;
use crate::registry::{now_unix_ms, Entry};
use crate::spec::SandboxSpec;
use crate::state::{SandboxState, ThermalState};
use crate::thermal::CutShort;

/// The snapshot inside a capture directory.
pub const CAPTURE_SNAPSHOT: &str = "snapshot";
/// The copy of the writable disk inside a capture directory.
pub const CAPTURE_DISK: &str = image::disk::SANDBOX_DISK;
/// What was captured, inside a capture directory.
pub const CAPTURE_META: &str = "capture.json";

/// Whether a capture must survive a crash of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk before the capture is reported made (checkpoints,
    /// templates); the sync happens after the source resumes.
    Durable,
    /// Left to the page cache (a fork's capture, gone once its children
    /// have started).
    Scratch,
}

/// What a capture is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureMeta {
    /// The sandbox it was taken of.
    pub source: SandboxId,
    /// That sandbox's spec (a new sandbox takes its image, shape, disk
    /// size, environment and network from here).
    pub spec: SandboxSpec,
    /// The engine that took it (only that engine restores it).
    pub engine: EngineKind,
    /// The kernel the guest runs.
    pub kernel_release: String,
    /// When, in milliseconds since the epoch.
    pub taken_unix_ms: u64,
}

/// A capture made by [`SandboxManager::capture`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// Its directory.
    pub dir: PathBuf,
    /// What it is of.
    pub meta: CaptureMeta,
    /// Bytes the capture occupies on the host (data, not holes).
    pub bytes: u64,
    /// How long the source's vCPUs were stopped for it (zero for a cold
    /// source, which has none running).
    pub paused: Duration,
    /// Guest RAM is a memory image beside the state (mapped copy-on-write
    /// by a restore); else it is in the state file itself (a capture of a
    /// source whose RAM was private, such as a cold sandbox that was made
    /// from a capture and has not cycled since), and a restore loads it
    /// into a memory file of the new VM's own.
    pub memory_image: bool,
}

impl Capture {
    /// Reads and checks the capture in `dir`: its meta, and a snapshot that
    /// `engine` can restore with the meta's shape (the state file's size
    /// and the memory image's against the manifest). Never trusts a
    /// directory without its manifest.
    pub fn open(dir: &Path, engine: EngineKind) -> Result<Capture> {
        let bad = |reason: String| CoreError::Capture {
            dir: dir.to_path_buf(),
            reason,
        };
        let body = std::fs::read(dir.join(CAPTURE_META))
            .map_err(|e| bad(format!("reading {CAPTURE_META}: {e}")))?;
        let meta: CaptureMeta =
            serde_json::from_slice(&body).map_err(|e| bad(format!("{CAPTURE_META}: {e}")))?;
        if meta.engine != engine {
            return Err(bad(format!(
                "taken with {}, this daemon runs {engine}",
                meta.engine
            )));
        }
        let snap = dir.join(CAPTURE_SNAPSHOT);
        let mut probe = vmm::VmSpec::new(dir.join("kernel"), dir);
        probe.vcpus = meta.spec.cpus;
        probe.memory_mib = meta.spec.memory_mb;
        let manifest =
            SnapshotManifest::read_for(&snap, engine, &probe).map_err(|e| bad(error_chain(&e)))?;
        let memory_image = matches!(manifest.memory, vmm::snapshot::SnapshotMemory::File { .. });
        let disk = dir.join(CAPTURE_DISK);
        let want = meta.spec.disk_mb.map(|mb| mb << 20);
        let len = std::fs::metadata(&disk)
            .map_err(|e| bad(format!("{}: {e}", disk.display())))?
            .len();
        if want.is_some_and(|w| w != len) {
            return Err(bad(format!(
                "{CAPTURE_DISK} is {len} bytes, the spec's disk is not"
            )));
        }
        Ok(Capture {
            bytes: allocated(dir),
            dir: dir.to_path_buf(),
            meta,
            paused: Duration::ZERO,
            memory_image,
        })
    }

    /// The snapshot to restore.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(CAPTURE_SNAPSHOT)
    }

    /// The memory image a restored VM maps (copy-on-write).
    pub fn memory(&self) -> PathBuf {
        self.snapshot_dir().join(MEMORY_FILE)
    }

    /// Makes `spec` (a new VM's, with a memory file of its own) restore
    /// from this capture: its memory image mapped copy-on-write, or, for a
    /// capture with RAM in its state, the spec's own file filled from it.
    pub fn apply_memory(&self, spec: &mut vmm::VmSpec) {
        if self.memory_image {
            spec.memory = vmm::MemoryBacking::Private {
                path: self.memory(),
            };
        }
    }

    /// The disk a new sandbox gets a copy of.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(CAPTURE_DISK)
    }
}

/// Bytes allocated under `dir` (one level of subdirectories).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn io(dir: &Path) -> impl Fn(String) -> CoreError + '_ {
    move |reason| CoreError::Capture {
        dir: dir.to_path_buf(),
        reason,
    }
}

/// Copies a cold sandbox's snapshot (state and manifest) into `snap`.
fn copy_cold_snapshot(from: &Path, snap: &Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(snap).map_err(|e| format!("{}: {e}", snap.display()))?;
    for f in [STATE_FILE, MANIFEST] {
        vmm::snapshot::copy_sparse(&from.join(f), &snap.join(f)).map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

impl SandboxManager {
    /// Captures sandbox `id` into `dest` (a directory that must not exist;
    /// removed again on failure). A hot or warm sandbox is synced, stopped
    /// for as long as the copies take and resumed (it ends hot); a cold one
    /// is copied from its snapshot without starting anything. A sandbox
    /// with volumes attached is refused (a volume cannot be in two
    /// sandboxes read-write, and a new sandbox would find the device
    /// missing).
    pub async fn capture(
        &self,
        id: &SandboxId,
        dest: &Path,
        durability: Durability,
    ) -> Result<Capture> {
        let entry = self.entry(id)?;
        let mgr = self.clone();
        let dest = dest.to_path_buf();
        // A task of its own: a caller that goes away cannot leave the
        // source paused.
        tokio::spawn(async move {
            let _life = entry.lock().await;
            let result = mgr.capture_locked(&entry, &dest, durability).await;
            if result.is_err() {
                if let Err(e) = std::fs::remove_dir_all(&dest) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(error = %e, dir = %dest.display(), "removing a failed capture");
                    }
                }
            }
            result
        })
        .await?
    }

    async fn capture_locked(
        &self,
        entry: &Entry,
        dest: &Path,
        durability: Durability,
    ) -> Result<Capture> {
        let record = entry.record();
        let refuse = |state, operation| CoreError::InvalidState {
            id: entry.id.clone(),
            state,
            operation,
        };
        if record.state != SandboxState::Running {
            return Err(refuse(record.state, "capture"));
        }
        if !record.spec.volumes.is_empty() {
            return Err(refuse(record.state, "capture (it has volumes attached)"));
        }
        let fail = io(dest);
        std::fs::create_dir(dest).map_err(|e| fail(format!("creating it: {e}")))?;
        let snap = dest.join(CAPTURE_SNAPSHOT);
        let disk = record.dir.join(image::disk::SANDBOX_DISK);
        let started = Instant::now();
        let paused = if entry.thermal() == ThermalState::Cold {
            let from = record.dir.join(SNAPSHOT_DIR);
            let (s, d, to) = (snap.clone(), disk.clone(), dest.join(CAPTURE_DISK));
            tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
                copy_cold_snapshot(&from, &s)?;
                vmm::snapshot::make_capture(&s).map_err(|e| error_chain(&e))?;
                vmm::snapshot::copy_sparse(&d, &to).map_err(|e| error_chain(&e))?;
                Ok(())
            })
            .await?
            .map_err(&fail)?;
            Duration::ZERO
        } else {
            self.capture_live(entry, &snap, &disk, dest).await?
        };
        let meta = CaptureMeta {
            source: entry.id.clone(),
            spec: record.spec.clone(),
            engine: self.inner.engine.kind(),
            kernel_release: record.kernel_release.clone(),
            taken_unix_ms: now_unix_ms(),
        };
        let body = serde_json::to_vec_pretty(&meta).map_err(|e| fail(e.to_string()))?;
        std::fs::write(dest.join(CAPTURE_META), body).map_err(|e| fail(e.to_string()))?;
        if durability == Durability::Durable {
            // The source runs again already: only the capture waits.
            let d = dest.to_path_buf();
            tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
                let snap = d.join(CAPTURE_SNAPSHOT);
                for p in [
                    snap.join(MEMORY_FILE),
                    snap.join(STATE_FILE),
                    snap.clone(),
                    d.join(CAPTURE_DISK),
                    d.join(CAPTURE_META),
                    d.clone(),
                ] {
                    if p.exists() {
                        vmm::snapshot::sync_path(&p).map_err(|e| error_chain(&e))?;
                    }
                }
                Ok(())
            })
            .await?
            .map_err(&fail)?;
        }
        let mut capture = Capture::open(dest, self.inner.engine.kind())?;
        capture.paused = paused;
        tracing::info!(
            sandbox = %entry.id,
            paused_ms = paused.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            bytes = capture.bytes,
            "captured"
        );
        Ok(capture)
    }

    /// Stop, snapshot, copy memory and disk, resume.
    async fn capture_live(
        &self,
        entry: &Entry,
        snap: &Path,
        disk: &Path,
        dest: &Path,
    ) -> Result<Duration> {
        let vm = self.vm_of(entry, "capture")?;
        let mut cut = CutShort::new(entry);
        if entry.thermal() == ThermalState::Warm {
            if let Err(e) = vm.vmm.resume().await {
                cut.disarm();
                return Err(self.thermal_error(entry, &*vm.vmm, "resume", e));
            }
            entry.set_thermal(ThermalState::Hot)?;
        }
        // No sync in the guest first: memory and disk are taken at one
        // instant (QEMU drains and flushes its block layer when it stops),
        // so what the guest has in its page cache comes with its memory.
        let stopped = Instant::now();
        if let Err(e) = vm.vmm.snapshot(snap, SnapshotKind::Full).await {
            let err = self.thermal_error(entry, &*vm.vmm, "capture", e);
            let err = self.resume_after(entry, &vm, err).await;
            cut.disarm();
            return Err(err);
        }
        let (s, d, to) = (
            snap.to_path_buf(),
            disk.to_path_buf(),
            dest.join(CAPTURE_DISK),
        );
        let copied = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            vmm::snapshot::make_capture(&s).map_err(|e| error_chain(&e))?;
            vmm::snapshot::copy_sparse(&d, &to).map_err(|e| error_chain(&e))?;
            Ok(())
        })
        .await;
        let resumed = vm.vmm.resume().await;
        let paused = stopped.elapsed();
        cut.disarm();
        entry.touch();
        if let Err(e) = resumed {
            tracing::error!(sandbox = %entry.id, error = %error_chain(&e), "the source does not resume after a capture");
            entry.set_thermal(ThermalState::Warm)?;
            return Err(self.thermal_error(entry, &*vm.vmm, "resume after the capture", e));
        }
        copied?.map_err(io(dest))?;
        Ok(paused)
    }
}

impl SandboxManager {
    /// Rolls sandbox `id` back to `capture`: its VM, whatever its tier, is
    /// replaced by one restored from the capture, and its disk by a copy of
    /// the capture's. It keeps its own identity (id, name, address, token):
    /// the restored guest is told it as a new sandbox is. Its processes and
    /// files are the capture's from then on. The capture must be of the
    /// same shape (image, CPUs, memory, disk) and the sandbox without
    /// volumes. If the restore fails after the old VM was ended, the
    /// sandbox is `failed` with the reason.
    pub async fn restore_to(&self, id: &SandboxId, capture: Capture) -> Result<()> {
        let entry = self.entry(id)?;
        let mgr = self.clone();
        tokio::spawn(async move {
            let _life = entry.lock().await;
            mgr.restore_to_locked(&entry, &capture).await
        })
        .await?
    }

    async fn restore_to_locked(&self, entry: &Entry, capture: &Capture) -> Result<()> {
        let record = entry.record();
        let refuse = |operation| CoreError::InvalidState {
            id: entry.id.clone(),
            state: record.state,
            operation,
        };
        if record.state != SandboxState::Running {
            return Err(refuse("restore a checkpoint"));
        }
        if !record.spec.volumes.is_empty() {
            return Err(refuse("restore a checkpoint (it has volumes attached)"));
        }
        let (src, spec) = (&capture.meta.spec, &record.spec);
        if (src.image.as_str(), src.cpus, src.memory_mb, src.disk_mb)
            != (spec.image.as_str(), spec.cpus, spec.memory_mb, spec.disk_mb)
        {
            return Err(CoreError::Capture {
                dir: capture.dir.clone(),
                reason: format!(
                    "of a {} sandbox with {} CPUs, {} MiB and a {:?} MiB disk; this one is {} with {}, {} and {:?}",
                    src.image, src.cpus, src.memory_mb, src.disk_mb,
                    spec.image, spec.cpus, spec.memory_mb, spec.disk_mb
                ),
            });
        }
        let image = self.inner.images.resolve(&spec.image)?;
        let att = record.network.clone().ok_or_else(|| CoreError::Capture {
            dir: capture.dir.clone(),
            reason: "the sandbox has no network attachment".into(),
        })?;
        // From here on the old state goes: its VM, its snapshot, its disk.
        if let Some(vm) = entry.take_vm() {
            if vm.vmm.exit().is_none() {
                if let Err(e) = vm.vmm.kill().await {
                    tracing::warn!(error = %error_chain(&e), "killing the VMM replaced by a checkpoint");
                }
            }
        }
        crate::thermal::discard_snapshot(entry);
        let result = self.restore_into(entry, capture, &image, &att).await;
        match result {
            Ok(vm) => {
                if entry.thermal() != ThermalState::Cold {
                    entry.set_thermal(ThermalState::Cold)?;
                }
                entry.install_restored(vm)?;
                entry.touch();
                Ok(())
            }
            Err(e) => {
                entry.set_vmm_pid(None);
                if let Err(f) = entry.fail(format!("restoring a checkpoint: {}", error_chain(&e))) {
                    tracing::error!(error = %error_chain(&f), "marking a failed rollback");
                }
                Err(e)
            }
        }
    }

    /// The disk replaced by the capture's, a VMM restored from it, told the
    /// sandbox's own identity, its agent answering.
    async fn restore_into(
        &self,
        entry: &Entry,
        capture: &Capture,
        image: &image::ResolvedImage,
        att: &net::Attachment,
    ) -> Result<crate::machine::Vm> {
        let record = entry.record();
        let dir = record.dir.clone();
        let (d, from) = (dir.clone(), capture.disk());
        tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            let disk = d.join(image::disk::SANDBOX_DISK);
            for stale in [disk.clone(), d.join(crate::machine::MEMORY_FILE)] {
                match std::fs::remove_file(&stale) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", stale.display())),
                }
            }
            vmm::snapshot::copy_sparse(&from, &disk).map_err(|e| error_chain(&e))?;
            Ok(())
        })
        .await?
        .map_err(io(&capture.dir))?;
        let mut spec = crate::machine::vm_spec(&record.spec, image, &dir, att);
        capture.apply_memory(&mut spec);
        let vmm: std::sync::Arc<dyn vmm::Vmm> =
            std::sync::Arc::from(self.inner.engine.new_vmm(spec).map_err(|source| {
                CoreError::Vmm {
                    id: entry.id.clone(),
                    source,
                }
            })?);
        let vmm_err = |source| CoreError::Vmm {
            id: entry.id.clone(),
            source,
        };
        let started = async {
            vmm.restore(&capture.snapshot_dir())
                .await
                .map_err(vmm_err)?;
            let line = crate::lifecycle::identity(&record.token, &record.spec.name, att)?.to_line();
            vmm.send_console(line.as_bytes()).await.map_err(vmm_err)
        }
        .await;
        let endpoint = crate::boot::agent_endpoint(&*vmm, att.ip);
        let client = agent_client::AgentClient::new(endpoint.clone(), record.token.expose());
        let ready = match started {
            Ok(()) => {
                crate::boot::wait_for_agent(
                    &entry.id,
                    &*vmm,
                    &client,
                    &endpoint,
                    self.inner.config.boot_timeout,
                    &record.serial_log(),
                    true,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            if vmm.pid().is_some() && vmm.exit().is_none() {
                if let Err(k) = vmm.kill().await {
                    tracing::warn!(error = %error_chain(&k), "killing a failed rollback's VMM");
                }
            }
            return Err(e);
        }
        match client
            .deadline(self.policy().agent_timeout)
            .set_time(now_unix_ms())
            .await
        {
            Ok(()) => {}
            Err(e) if e.agent_code() == Some(proto::ErrorCode::PermissionDenied) => {}
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "setting the clock after a rollback")
            }
        }
        Ok(crate::machine::Vm { vmm, client })
    }
}

impl SandboxManager {
    /// Forks sandbox `id`: one capture into `scratch` (a directory that
    /// must not exist), then one new sandbox per `children` entry restored
    /// from it, all at once. The capture is removed once every child has
    /// started or failed: a running child's VMM keeps the memory image it
    /// mapped (the file lives on, unnamed, until the last one lets go), and
    /// each child's disk is its own copy. Returns the capture (its
    /// directory already gone) and each child's outcome, in order.
    pub async fn fork(
        &self,
        id: &SandboxId,
        children: Vec<(SandboxId, SandboxSpec)>,
        scratch: &Path,
    ) -> Result<(Capture, Vec<Result<crate::SandboxRecord>>)> {
        let capture = self.capture(id, scratch, Durability::Scratch).await?;
        let mut set = tokio::task::JoinSet::new();
        for (i, (child, spec)) in children.into_iter().enumerate() {
            let (mgr, capture) = (self.clone(), capture.clone());
            set.spawn(async move { (i, mgr.create_from_capture(child, spec, capture).await) });
        }
        let mut out: Vec<Option<Result<crate::SandboxRecord>>> = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined?;
            if out.len() <= i {
                out.resize_with(i + 1, || None);
            }
            out[i] = Some(r);
        }
        let dir = capture.dir.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await? {
            tracing::warn!(error = %e, "removing a fork's capture");
        }
        Ok((capture, out.into_iter().flatten().collect()))
    }
}

impl SandboxManager {
    /// A template: `spec` booted under a sandbox of its own (`id`, never
    /// listed by the daemon), captured into `dest` once its agent answers,
    /// and destroyed. New sandboxes of the same image and shape can then
    /// be restored from it instead of booting.
    pub async fn capture_fresh(
        &self,
        id: SandboxId,
        spec: SandboxSpec,
        dest: &Path,
    ) -> Result<Capture> {
        self.create_as(id.clone(), spec).await?;
        let captured = self.capture(&id, dest, Durability::Durable).await;
        if let Err(e) = self.destroy(&id).await {
            tracing::warn!(sandbox = %id, error = %error_chain(&e), "destroying a template's source");
        }
        captured
    }

    /// The kernel release of `image`, as a capture records it.
    pub fn kernel_release(&self, image: &str) -> Result<String> {
        Ok(self.inner.images.resolve(image)?.kernel_release)
    }
}
