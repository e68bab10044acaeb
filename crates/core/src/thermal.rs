//! Thermal tiers (DESIGN §7): hot ⇄ warm is a pause/resume of the vCPUs;
//! warm → cold syncs the guest, saves its device state into the sandbox's
//! `snapshot/` directory (guest RAM already lives in the sandbox's memory
//! file, mapped shared, so nothing else is written), verifies what was
//! written and only then kills the VMM; cold → hot starts a new VMM from
//! that snapshot, which maps the memory file lazily, and sets the guest
//! clock before the sandbox counts as awake.
//!
//! Every transition runs under the sandbox's lifecycle lock, so concurrent
//! wakes of one sandbox coalesce: the first restores, the others find it
//! hot. A failed restore opens the sandbox's circuit breaker (no automatic
//! retry) until a forced [`SandboxManager::start`]. A semaphore caps
//! concurrent restores. [`SandboxManager::thermal_tick`] moves idle
//! sandboxes down: host-side last activity first, the agent's activity
//! query second (an attached session or a running command keeps it hot).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_client::AgentClient;
use proto::ExecRequest;
use tracing::Instrument;
use vmm::snapshot::SnapshotManifest;
use vmm::{SnapshotKind, Vmm};

use crate::error::{CoreError, Result};
use crate::id::SandboxId;
use crate::manager::{error_chain, now_unix_ms, vm_spec, Entry, SandboxManager, Vm, SNAPSHOT_DIR};
use crate::record::SandboxRecord;
use crate::state::{valid_thermal, SandboxState, ThermalState};

/// When the thermal manager moves sandboxes down, and how many may wake
/// from cold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThermalPolicy {
    /// Hot → warm after this long without host-side activity (and none
    /// reported by the agent).
    pub warm_after: Duration,
    /// Warm → cold this long after the pause.
    pub cold_after: Duration,
    /// How often the ticker looks.
    pub tick: Duration,
    /// Restores from cold that may run at once.
    pub max_cold_wakes: usize,
    /// How long a restored agent may take to answer.
    pub wake_timeout: Duration,
}

impl Default for ThermalPolicy {
    fn default() -> Self {
        ThermalPolicy {
            warm_after: Duration::from_secs(30),
            cold_after: Duration::from_secs(1800),
            tick: Duration::from_secs(1),
            max_cold_wakes: 4,
            wake_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened, for the daemon's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThermalEventKind {
    /// Hot → warm.
    Warm,
    /// Warm or cold → hot.
    Hot {
        /// Where it woke from.
        from: ThermalState,
    },
    /// → cold.
    Cold {
        /// Device-state bytes written.
        state_bytes: u64,
    },
    /// A restore failed and opened the breaker.
    RestoreFailed {
        /// Why.
        reason: String,
    },
    /// A forced start closed the breaker.
    BreakerClosed,
}

impl ThermalEventKind {
    /// The event's name in the store (`warm`, `hot`, `cold`,
    /// `restore_failed`, `breaker_closed`).
    pub fn name(&self) -> &'static str {
        match self {
            ThermalEventKind::Warm => "warm",
            ThermalEventKind::Hot { .. } => "hot",
            ThermalEventKind::Cold { .. } => "cold",
            ThermalEventKind::RestoreFailed { .. } => "restore_failed",
            ThermalEventKind::BreakerClosed => "breaker_closed",
        }
    }
}

/// One thermal transition of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThermalEvent {
    /// The sandbox.
    pub id: SandboxId,
    /// What happened.
    pub kind: ThermalEventKind,
    /// The thermal state after it.
    pub thermal: ThermalState,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// How long the operation took.
    pub took: Duration,
    /// The VMM's pid after it (a restore starts a new one).
    pub vmm_pid: Option<u32>,
}

/// Reads every byte of the state file and checks the manifest against the
/// VM: what a restore will need, checked while the VMM can still be resumed.
fn verify_snapshot(dir: &Path, engine: vmm::EngineKind, spec: &vmm::VmSpec) -> Result<u64, String> {
    let m = SnapshotManifest::read_for(dir, engine, spec).map_err(|e| error_chain(&e))?;
    let state = dir.join(vmm::snapshot::STATE_FILE);
    let bytes = std::fs::read(&state).map_err(|e| format!("reading {}: {e}", state.display()))?;
    if bytes.len() as u64 != m.state_bytes || bytes.is_empty() {
        return Err(format!(
            "{} has {} readable bytes, manifest says {}",
            state.display(),
            bytes.len(),
            m.state_bytes
        ));
    }
    Ok(m.state_bytes)
}

impl SandboxManager {
    /// Thermal transitions from now on are sent here (one subscriber; a
    /// new call replaces the old one).
    pub fn subscribe_thermal(&self) -> tokio::sync::mpsc::UnboundedReceiver<ThermalEvent> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.inner.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn emit(&self, entry: &Entry, kind: ThermalEventKind, took: Duration) {
        let (thermal, vmm_pid) = {
            let r = entry.record();
            (r.thermal, r.vmm_pid)
        };
        tracing::info!(sandbox = %entry.id, event = kind.name(), %thermal, took_ms = took.as_millis() as u64, "thermal");
        let ev = ThermalEvent {
            id: entry.id.clone(),
            kind,
            thermal,
            at_unix_ms: now_unix_ms(),
            took,
            vmm_pid,
        };
        if let Some(tx) = &*self.inner.events.lock().unwrap_or_else(|p| p.into_inner()) {
            // A dropped receiver only means nobody records events any more.
            if tx.send(ev).is_err() {
                tracing::debug!("no thermal event subscriber");
            }
        }
    }

    fn set_thermal(&self, entry: &Entry, to: ThermalState) {
        let mut r = entry.record();
        if !valid_thermal(r.thermal, to) {
            // Callers match on the current state first; this is a bug.
            tracing::error!(sandbox = %entry.id, from = %r.thermal, %to, "invalid thermal transition");
        }
        r.thermal = to;
        r.thermal_since_unix_ms = now_unix_ms();
    }

    fn thermal_error(
        &self,
        entry: &Entry,
        vmm: &dyn Vmm,
        operation: &'static str,
        source: vmm::VmmError,
    ) -> CoreError {
        CoreError::Thermal {
            id: entry.id.clone(),
            operation,
            source: Box::new(source),
            stderr_tail: vmm.stderr_tail().unwrap_or_default(),
        }
    }

    fn running_entry(&self, id: &SandboxId, operation: &'static str) -> Result<Arc<Entry>> {
        let entry = self.entry(id)?;
        let state = entry.record().state;
        match state {
            SandboxState::Running => Ok(entry),
            SandboxState::Creating
            | SandboxState::Failed
            | SandboxState::Destroying
            | SandboxState::Destroyed => Err(CoreError::InvalidState {
                id: id.clone(),
                state,
                operation,
            }),
        }
    }

    /// Whether the sandbox's breaker is open, and why.
    pub fn breaker(&self, id: &SandboxId) -> Result<Option<String>> {
        Ok(self.entry(id)?.record().breaker.clone())
    }

    /// Opts a sandbox in or out of the thermal manager.
    pub fn set_keep_hot(&self, id: &SandboxId, keep_hot: bool) -> Result<()> {
        self.entry(id)?.record().keep_hot = keep_hot;
        Ok(())
    }

    /// Records host-side activity (the daemon calls it on every request
    /// that names the sandbox).
    pub fn touch(&self, id: &SandboxId) {
        if let Ok(e) = self.entry(id) {
            e.touch();
        }
    }

    /// Pauses a hot sandbox (hot → warm); a warm or cold one is left as is.
    pub async fn pause(&self, id: &SandboxId) -> Result<()> {
        let entry = self.running_entry(id, "pause")?;
        let _life = entry.lifecycle.lock().await;
        let thermal = entry.record().thermal;
        match thermal {
            ThermalState::Hot => self.pause_locked(&entry).await,
            ThermalState::Warm | ThermalState::Cold => Ok(()),
        }
    }

    async fn pause_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "pause")?;
        let started = Instant::now();
        vm.vmm
            .pause()
            .await
            .map_err(|e| self.thermal_error(entry, &*vm.vmm, "pause", e))?;
        self.set_thermal(entry, ThermalState::Warm);
        self.emit(entry, ThermalEventKind::Warm, started.elapsed());
        Ok(())
    }

    fn vm_of(&self, entry: &Entry, operation: &'static str) -> Result<Vm> {
        entry.vm().ok_or_else(|| CoreError::InvalidState {
            id: entry.id.clone(),
            state: entry.record().state,
            operation,
        })
    }

    /// Makes a sandbox hot: resumes a warm one, restores a cold one (unless
    /// its breaker is open). Concurrent callers share one wake. Every call
    /// into the guest goes through here first.
    pub async fn ensure_hot(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        entry.touch();
        {
            let r = entry.record();
            if r.state != SandboxState::Running
                || (r.thermal == ThermalState::Hot && entry.vm().is_some())
            {
                // Not running: the caller's own check reports it.
                return Ok(());
            }
        }
        let _life = entry.lifecycle.lock().await;
        entry.touch();
        self.wake_locked(&entry).await
    }

    async fn wake_locked(&self, entry: &Entry) -> Result<()> {
        let (state, thermal) = {
            let r = entry.record();
            (r.state, r.thermal)
        };
        if state != SandboxState::Running {
            return Ok(());
        }
        match thermal {
            ThermalState::Hot => Ok(()),
            ThermalState::Warm => self.resume_locked(entry).await,
            ThermalState::Cold => self.restore_locked(entry).await,
        }
    }

    /// Starts a warm or cold sandbox; `force` first closes an open breaker.
    pub async fn start(&self, id: &SandboxId, force: bool) -> Result<()> {
        let entry = self.running_entry(id, "start")?;
        let _life = entry.lifecycle.lock().await;
        entry.touch();
        if force && entry.record().breaker.take().is_some() {
            self.emit(&entry, ThermalEventKind::BreakerClosed, Duration::ZERO);
        }
        self.wake_locked(&entry).await
    }

    async fn resume_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "resume")?;
        let started = Instant::now();
        let paused_at = entry.record().thermal_since_unix_ms;
        vm.vmm
            .resume()
            .await
            .map_err(|e| self.thermal_error(entry, &*vm.vmm, "resume", e))?;
        self.set_thermal(entry, ThermalState::Hot);
        // The guest's clock stood still while paused; a short pause is not
        // worth a round trip.
        if now_unix_ms().saturating_sub(paused_at) >= 1000 {
            if let Err(e) = vm.client.set_time(now_unix_ms()).await {
                tracing::warn!(sandbox = %entry.id, error = %error_chain(&e), "setting the guest clock after a resume");
            }
        }
        self.emit(
            entry,
            ThermalEventKind::Hot {
                from: ThermalState::Warm,
            },
            started.elapsed(),
        );
        Ok(())
    }

    /// Takes a sandbox to cold: the guest is synced, its device state saved
    /// next to its memory file, the snapshot verified, the VMM killed. If
    /// any step before the kill fails, the VM keeps running (hot).
    pub async fn stop(&self, id: &SandboxId) -> Result<()> {
        let entry = self.running_entry(id, "stop")?;
        let span = tracing::info_span!("stop", sandbox = %id);
        async {
            let _life = entry.lifecycle.lock().await;
            let thermal = entry.record().thermal;
            match thermal {
                ThermalState::Cold => Ok(()),
                ThermalState::Hot | ThermalState::Warm => self.freeze_locked(&entry).await,
            }
        }
        .instrument(span)
        .await
    }

    fn snapshot_dir(entry: &Entry) -> PathBuf {
        entry.record().dir.join(SNAPSHOT_DIR)
    }

    async fn freeze_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "stop")?;
        let started = Instant::now();
        if entry.record().thermal == ThermalState::Warm {
            // The guest must run to sync.
            vm.vmm
                .resume()
                .await
                .map_err(|e| self.thermal_error(entry, &*vm.vmm, "resume", e))?;
            self.set_thermal(entry, ThermalState::Hot);
        }
        // Sync the guest's disks (lohar also syncs when a command exits).
        let sync = ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), "sync".into()],
            timeout_ms: Some(30_000),
            ..Default::default()
        };
        vm.client
            .exec(sync)
            .await
            .map_err(|source| CoreError::Agent {
                id: entry.id.clone(),
                source,
            })?;
        let dir = Self::snapshot_dir(entry);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| CoreError::SnapshotVerify {
                id: entry.id.clone(),
                reason: format!("removing the old snapshot {}: {e}", dir.display()),
            })?;
        }
        let resume_after = |e: CoreError| async {
            match vm.vmm.resume().await {
                Ok(()) => tracing::warn!(sandbox = %entry.id, "snapshot failed; VM resumed"),
                Err(r) => {
                    tracing::error!(sandbox = %entry.id, error = %error_chain(&r), "snapshot failed and the VM does not resume")
                }
            }
            e
        };
        let info = match vm.vmm.snapshot(&dir, SnapshotKind::Full).await {
            Ok(info) => info,
            Err(e) => {
                let err = self.thermal_error(entry, &*vm.vmm, "snapshot", e);
                return Err(resume_after(err).await);
            }
        };
        let (d, engine, spec) = (dir.clone(), vm.vmm.engine(), vm.vmm.spec().clone());
        let verified =
            tokio::task::spawn_blocking(move || verify_snapshot(&d, engine, &spec)).await?;
        let state_bytes = match verified {
            Ok(n) => n,
            Err(reason) => {
                let err = CoreError::SnapshotVerify {
                    id: entry.id.clone(),
                    reason,
                };
                return Err(resume_after(err).await);
            }
        };
        // Verified: the VMM may go. Out of the slot first, so nobody takes
        // its exit for a crash.
        let vm = entry.vm_slot().take().unwrap_or(vm);
        *entry.cold_client() = Some(vm.client.clone());
        match vm.vmm.kill().await {
            Ok(exit) => tracing::debug!(%exit, "VMM of a cold sandbox ended"),
            Err(e) => {
                tracing::warn!(sandbox = %entry.id, error = %error_chain(&e), "killing the VMM after the snapshot")
            }
        }
        entry.record().vmm_pid = None;
        self.set_thermal(entry, ThermalState::Cold);
        tracing::info!(
            sandbox = %entry.id,
            save_ms = info.duration.as_millis() as u64,
            state_bytes,
            "snapshot saved"
        );
        self.emit(
            entry,
            ThermalEventKind::Cold { state_bytes },
            started.elapsed(),
        );
        Ok(())
    }

    async fn restore_locked(&self, entry: &Entry) -> Result<()> {
        if let Some(reason) = entry.record().breaker.clone() {
            return Err(CoreError::BreakerOpen {
                id: entry.id.clone(),
                reason,
            });
        }
        let _permit =
            self.inner
                .cold_wakes
                .acquire()
                .await
                .map_err(|_| CoreError::InvalidState {
                    id: entry.id.clone(),
                    state: SandboxState::Running,
                    operation: "wake (shutting down)",
                })?;
        let started = Instant::now();
        match self.restore_vm(entry).await {
            Ok(vm) => {
                let dir = Self::snapshot_dir(entry);
                // The guest runs again: the saved device state no longer
                // matches the memory file. Without a manifest it is not a
                // snapshot, so a crash from here on never restores it.
                if let Err(e) = std::fs::remove_file(dir.join(vmm::snapshot::MANIFEST)) {
                    tracing::warn!(sandbox = %entry.id, error = %e, "removing the used snapshot's manifest");
                }
                {
                    let mut r = entry.record();
                    r.vmm_pid = vm.vmm.pid();
                    r.cold_wakes += 1;
                }
                *entry.vm_slot() = Some(vm);
                self.set_thermal(entry, ThermalState::Hot);
                self.emit(
                    entry,
                    ThermalEventKind::Hot {
                        from: ThermalState::Cold,
                    },
                    started.elapsed(),
                );
                Ok(())
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::error!(sandbox = %entry.id, error = %reason, "restore failed; breaker open");
                entry.record().breaker = Some(reason.clone());
                self.emit(
                    entry,
                    ThermalEventKind::RestoreFailed { reason },
                    started.elapsed(),
                );
                Err(e)
            }
        }
    }

    /// A new VMM from the snapshot, its agent answering and the guest clock
    /// set. On failure the new VMM is killed.
    async fn restore_vm(&self, entry: &Entry) -> Result<Vm> {
        let id = entry.id.clone();
        let record = entry.record().clone();
        let restore_err = |reason: String, vmm: Option<&dyn Vmm>| CoreError::Restore {
            id: id.clone(),
            // A VMM that exited already has its stderr in the reason.
            stderr_tail: match vmm.filter(|v| v.exit().is_none()) {
                Some(v) => v.stderr_tail().unwrap_or_default(),
                None => String::new(),
            },
            reason,
        };
        let att = record
            .network
            .clone()
            .ok_or_else(|| restore_err("the sandbox has no network attachment".into(), None))?;
        let image = self
            .inner
            .images
            .resolve(&record.spec.image)
            .map_err(|e| restore_err(error_chain(&e), None))?;
        let spec = vm_spec(&record.spec, &image, &record.dir, &att);
        let vmm: Arc<dyn Vmm> = Arc::from(
            self.inner
                .engine
                .new_vmm(spec)
                .map_err(|e| restore_err(error_chain(&e), None))?,
        );
        let kill = |vmm: Arc<dyn Vmm>| async move {
            if vmm.pid().is_some() && vmm.exit().is_none() {
                if let Err(e) = vmm.kill().await {
                    tracing::warn!(error = %error_chain(&e), "killing the VMM of a failed restore");
                }
            }
        };
        if let Err(e) = vmm.restore(&record.dir.join(SNAPSHOT_DIR)).await {
            let err = restore_err(error_chain(&e), Some(&*vmm));
            kill(vmm).await;
            return Err(err);
        }
        let endpoint = crate::boot::agent_endpoint(&*vmm, att.ip);
        let client = entry
            .cold_client()
            .take()
            .filter(|c| *c.endpoint() == endpoint)
            .unwrap_or_else(|| AgentClient::new(endpoint, record.token.expose()));
        let deadline = Instant::now() + self.inner.config.thermal.wake_timeout;
        let mut last;
        loop {
            if let Some(exit) = vmm.exit() {
                let err = restore_err(format!("the restored VMM exited: {exit}"), Some(&*vmm));
                return Err(err);
            }
            // The clock first: nothing runs in a woken guest with a stale one.
            match client
                .deadline(Duration::from_secs(2))
                .set_time(now_unix_ms())
                .await
            {
                Ok(()) => break,
                // An agent that is not a guest's init (the fake engine's
                // `lohar serve`) answers but keeps the host's clock, which
                // is right already: it is awake.
                Err(e) if e.agent_code() == Some(proto::ErrorCode::PermissionDenied) => break,
                Err(e) => last = error_chain(&e),
            }
            if Instant::now() >= deadline {
                let err = restore_err(
                    format!("the agent did not answer after the restore: {last}"),
                    Some(&*vmm),
                );
                kill(vmm).await;
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Vm { vmm, client })
    }

    /// One pass of the thermal manager: idle hot sandboxes are paused, and
    /// sandboxes warm for `cold_after` go cold. Sandboxes busy with another
    /// lifecycle operation are skipped until the next tick.
    pub async fn thermal_tick(&self) {
        let policy = self.inner.config.thermal;
        for entry in self.entries() {
            let (state, thermal, keep_hot, since) = {
                let r = entry.record();
                (r.state, r.thermal, r.keep_hot, r.thermal_since_unix_ms)
            };
            if state != SandboxState::Running || keep_hot {
                continue;
            }
            let now = now_unix_ms();
            let idle = now.saturating_sub(entry.last_activity_ms.load(Ordering::Relaxed));
            let due = match thermal {
                ThermalState::Hot => idle >= policy.warm_after.as_millis() as u64,
                ThermalState::Warm => {
                    now.saturating_sub(since) >= policy.cold_after.as_millis() as u64
                }
                ThermalState::Cold => false,
            };
            if !due {
                continue;
            }
            let Ok(_life) = entry.lifecycle.try_lock() else {
                continue;
            };
            let now_thermal = entry.record().thermal;
            let r = match now_thermal {
                ThermalState::Hot => self.cool_if_idle(&entry).await,
                ThermalState::Warm => self.freeze_locked(&entry).await,
                ThermalState::Cold => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(sandbox = %entry.id, error = %error_chain(&e), "thermal manager");
            }
        }
    }

    /// Pauses a hot sandbox unless its agent reports an attached session
    /// or a running command (then it counts as active now).
    async fn cool_if_idle(&self, entry: &Entry) -> Result<()> {
        let idle = now_unix_ms().saturating_sub(entry.last_activity_ms.load(Ordering::Relaxed));
        if idle < self.inner.config.thermal.warm_after.as_millis() as u64 {
            // Touched while we waited for the lock.
            return Ok(());
        }
        let vm = self.vm_of(entry, "pause")?;
        let activity = vm
            .client
            .deadline(Duration::from_secs(2))
            .activity()
            .await
            .map_err(|source| CoreError::Agent {
                id: entry.id.clone(),
                source,
            })?;
        if activity.attached > 0 || activity.running_execs > 0 {
            entry.touch();
            return Ok(());
        }
        self.pause_locked(entry).await
    }

    /// Runs [`SandboxManager::thermal_tick`] every `policy.tick` until the
    /// returned task is aborted.
    pub fn spawn_thermal(&self) -> tokio::task::JoinHandle<()> {
        let mgr = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(mgr.inner.config.thermal.tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                mgr.thermal_tick().await;
            }
        })
    }

    /// Daemon shutdown: every running sandbox goes cold (then its TAP is
    /// removed and it is forgotten, directory kept — see
    /// [`SandboxManager::adopt_cold`]). A sandbox that cannot be
    /// snapshotted is left running. Returns the records of those released
    /// and the errors of the others.
    pub async fn stop_all(&self) -> (Vec<SandboxRecord>, Vec<(SandboxId, CoreError)>) {
        let mut released = Vec::new();
        let mut failed = Vec::new();
        for entry in self.entries() {
            if entry.record().state != SandboxState::Running {
                continue;
            }
            let id = entry.id.clone();
            match self.stop(&id).await {
                Ok(()) => match self.release(&id).await {
                    Ok(r) => released.push(r),
                    Err(e) => failed.push((id, e)),
                },
                Err(e) => failed.push((id, e)),
            }
        }
        (released, failed)
    }

    /// Startup recovery of a sandbox whose VMM outlived an earlier daemon
    /// (killed with SIGKILL while the sandbox was hot or warm): that VMM
    /// (`record.vmm_pid`, only if its command line names the sandbox
    /// directory) is snapshotted by the engine (`Vmm::snapshot_orphan`:
    /// QEMU through its QMP socket) and ends, and the
    /// sandbox is adopted cold — its processes and memory intact.
    pub async fn adopt_orphan(&self, record: SandboxRecord) -> Result<SandboxRecord> {
        let id = record.id.clone();
        let fail = |reason: String| CoreError::Restore {
            id: id.clone(),
            reason,
            stderr_tail: String::new(),
        };
        let pid = record
            .vmm_pid
            .ok_or_else(|| fail("no VMM pid recorded".into()))?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let cmdline = std::fs::read(proc_dir.join("cmdline"))
            .map_err(|e| fail(format!("VMM {pid} is gone: {e}")))?;
        if !String::from_utf8_lossy(&cmdline).contains(&record.dir.display().to_string()) {
            return Err(fail(format!("pid {pid} is not this sandbox's VMM")));
        }
        let image = self.inner.images.resolve(&record.spec.image)?;
        let att = record
            .network
            .clone()
            .ok_or_else(|| fail("the record has no network attachment".into()))?;
        let spec = vm_spec(&record.spec, &image, &record.dir, &att);
        let dir = record.dir.join(SNAPSHOT_DIR);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| fail(format!("removing the old snapshot: {e}")))?;
        }
        let orphan = self.inner.engine.new_vmm(spec).map_err(|e| {
            fail(format!(
                "the VM of the orphaned VMM {pid}: {}",
                error_chain(&e)
            ))
        })?;
        let info = orphan.snapshot_orphan(&dir).await.map_err(|e| {
            fail(format!(
                "snapshotting the orphaned VMM {pid}: {}",
                error_chain(&e)
            ))
        })?;
        // It holds the disk's lock and the old TAP: wait until it has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        // (A zombie, exited but not yet reaped, has an empty command line.)
        while std::fs::read(proc_dir.join("cmdline")).is_ok_and(|c| !c.is_empty()) {
            if Instant::now() >= deadline {
                // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
                if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
                    tracing::warn!(pid, error = %std::io::Error::last_os_error(), "killing the orphaned VMM");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(sandbox = %id, pid, state_bytes = info.state_bytes, "orphaned VMM snapshotted");
        self.adopt_cold(SandboxRecord {
            vmm_pid: None,
            ..record
        })
        .await
    }

    /// Startup recovery of a sandbox that went cold under an earlier
    /// daemon: its snapshot is checked and its address and TAP taken again;
    /// it stays cold (no VMM) until something wakes it.
    pub async fn adopt_cold(&self, record: SandboxRecord) -> Result<SandboxRecord> {
        let id = record.id.clone();
        let image = self.inner.images.resolve(&record.spec.image)?;
        let ip = record
            .network
            .as_ref()
            .map(|a| a.ip)
            .ok_or_else(|| CoreError::Restore {
                id: id.clone(),
                reason: "the record has no network attachment".into(),
                stderr_tail: String::new(),
            })?;
        let att = self
            .attach(
                &id,
                &record.spec.network_group,
                crate::networks::Placement::Exactly(ip),
            )
            .await?;
        let spec = vm_spec(&record.spec, &image, &record.dir, &att);
        let (dir, engine) = (record.dir.join(SNAPSHOT_DIR), self.inner.engine.kind());
        let checked =
            tokio::task::spawn_blocking(move || verify_snapshot(&dir, engine, &spec)).await?;
        if let Err(reason) = checked {
            if let Err(e) = self.detach(att.clone()).await {
                tracing::warn!(sandbox = %id, error = %e, "detaching after a bad snapshot");
            }
            return Err(CoreError::Restore {
                id,
                reason: format!("no usable snapshot: {reason}"),
                stderr_tail: String::new(),
            });
        }
        let record = SandboxRecord {
            state: SandboxState::Running,
            failure: None,
            network: Some(att),
            vmm_pid: None,
            engine: self.inner.engine.kind(),
            kernel_release: image.kernel_release.clone(),
            thermal: ThermalState::Cold,
            cold_wakes: 0,
            ..record
        };
        self.insert_adopted(record.clone())?;
        tracing::info!(sandbox = %id, "adopted cold");
        Ok(record)
    }
}
