//! Thermal tiers (docs/thermal.md): hot ⇄ warm is a pause/resume of the vCPUs;
//! warm → cold syncs the guest, saves its device state into the sandbox's
//! `snapshot/` directory (guest RAM already lives in the sandbox's memory
//! file, mapped shared, so nothing else is written), verifies what was
//! written and only then kills the VMM; cold → hot starts a new VMM from
//! that snapshot, which maps the memory file lazily, and sets the guest
//! clock before the sandbox counts as awake.
//!
//! Every transition runs under the sandbox's lifecycle lock, so concurrent
//! wakes of one sandbox coalesce: the first restores, the others find it
//! hot. The registry checks each step against the thermal table. A failed
//! restore opens the sandbox's circuit breaker (no automatic retry) until
//! a forced [`SandboxManager::start`] — unless the attempt spent the
//! snapshot (the guest had begun to run on it, [`vmm::snapshot::consume`]):
//! then it answers [`CoreError::SnapshotSpent`] and the caller boots the
//! sandbox again from its disk. A semaphore caps concurrent restores.
//!
//! The ticker ([`SandboxManager::spawn_thermal`]) moves idle sandboxes
//! down — host-side last activity first, the agent's activity query second
//! (an attached session or a running command keeps it hot). Each due
//! sandbox gets a task of its own, bounded by
//! [`ThermalPolicy::transition_timeout`], so a hung guest or VMM never
//! delays another sandbox's transition; a sandbox whose transition is still
//! running is skipped by later ticks. Every call core itself makes into a
//! guest has its own deadline ([`ThermalPolicy::agent_timeout`],
//! [`ThermalPolicy::sync_timeout`]).
//!
//! A transition cut short (its time limit, an aborted ticker, a caller
//! that went away) leaves the sandbox labelled `warm` if its VMM still
//! runs — the VM may be paused or not, and warm is the label that is right
//! either way: the next use resumes it (resuming a running VM is
//! harmless) — and removes the manifest of any snapshot it began, so a
//! half-made snapshot is never restored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_client::AgentClient;
use proto::ExecRequest;
use tokio::task::JoinSet;
use tracing::Instrument;
use vmm::snapshot::SnapshotManifest;
use vmm::{SnapshotKind, Vmm};

use crate::error::{error_chain, CoreError, Result};
use crate::id::SandboxId;
use crate::machine::{vm_spec, Vm, SNAPSHOT_DIR};
use crate::manager::SandboxManager;
use crate::registry::{now_unix_ms, Entry};
use crate::state::{SandboxState, ThermalState};

/// When the thermal manager moves sandboxes down, how many may wake from
/// cold at once, and how long each step may take.
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
    /// The time limit of one transition the ticker starts (hot → warm
    /// with its activity query, warm → cold with its sync, snapshot and
    /// check). Past it the transition is abandoned (see the module docs)
    /// and tried again on a later tick; other sandboxes are never held up
    /// by it, since each runs in a task of its own.
    pub transition_timeout: Duration,
    /// The deadline of each small call core makes into a guest on its own
    /// account: the activity query before a pause, setting the clock after
    /// a resume, each ping while a restored agent is awaited (the clock
    /// setting after a restore has what is left of `wake_timeout`).
    pub agent_timeout: Duration,
    /// The deadline of the `sync` run in the guest before a snapshot. A
    /// guest that cannot sync in time is not snapshotted (it stays hot).
    pub sync_timeout: Duration,
}

impl Default for ThermalPolicy {
    fn default() -> Self {
        ThermalPolicy {
            warm_after: Duration::from_secs(30),
            cold_after: Duration::from_secs(1800),
            tick: Duration::from_secs(1),
            max_cold_wakes: 4,
            wake_timeout: Duration::from_secs(30),
            transition_timeout: Duration::from_secs(60),
            agent_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(10),
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
pub(crate) fn verify_snapshot(
    dir: &Path,
    engine: vmm::EngineKind,
    spec: &vmm::VmSpec,
) -> Result<u64, String> {
    let m = SnapshotManifest::read_for(dir, engine, spec).map_err(|e| error_chain(&e))?;
    let state = dir.join(vmm::snapshot::STATE_FILE);
    // Read through a fixed buffer: a state file may carry all of guest RAM
    // (a sandbox running on a capture's private memory).
    let read = (|| -> std::io::Result<u64> {
        use std::io::Read;
        let mut f = std::fs::File::open(&state)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match f.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    })()
    .map_err(|e| format!("reading {}: {e}", state.display()))?;
    if read != m.state_bytes || read == 0 {
        return Err(format!(
            "{} has {read} readable bytes, manifest says {}",
            state.display(),
            m.state_bytes
        ));
    }
    Ok(m.state_bytes)
}

fn snapshot_dir(entry: &Entry) -> PathBuf {
    entry.read(|r| r.dir.join(SNAPSHOT_DIR))
}

/// Makes the snapshot in the sandbox's directory unusable (its manifest
/// gone): the VM ran on past it, or it was never finished.
pub(crate) fn discard_snapshot(entry: &Entry) {
    let manifest = snapshot_dir(entry).join(vmm::snapshot::MANIFEST);
    match std::fs::remove_file(&manifest) {
        Ok(()) => tracing::debug!(sandbox = %entry.id, "snapshot manifest removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(sandbox = %entry.id, error = %e, "removing a snapshot manifest")
        }
    }
}

/// Armed while a transition talks to a live VMM; if the transition is
/// dropped before it disarms (cut short), the sandbox is settled as the
/// module docs say.
pub(crate) struct CutShort<'a> {
    entry: &'a Entry,
    armed: bool,
}

impl<'a> CutShort<'a> {
    pub(crate) fn new(entry: &'a Entry) -> CutShort<'a> {
        CutShort { entry, armed: true }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CutShort<'_> {
    fn drop(&mut self) {
        if !self.armed || self.entry.vm().is_none() {
            return;
        }
        tracing::warn!(sandbox = %self.entry.id, "thermal transition cut short; labelled warm");
        discard_snapshot(self.entry);
        if self.entry.thermal() == ThermalState::Hot {
            if let Err(e) = self.entry.set_thermal(ThermalState::Warm) {
                tracing::error!(error = %error_chain(&e), "settling a cut transition");
            }
        }
    }
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
        let (thermal, vmm_pid) = entry.read(|r| (r.thermal, r.vmm_pid));
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

    pub(crate) fn policy(&self) -> &ThermalPolicy {
        &self.inner.config.thermal
    }

    pub(crate) fn thermal_error(
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
        let state = entry.state();
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

    pub(crate) fn vm_of(&self, entry: &Entry, operation: &'static str) -> Result<Vm> {
        entry.vm().ok_or_else(|| CoreError::InvalidState {
            id: entry.id.clone(),
            state: entry.state(),
            operation,
        })
    }

    /// Whether the sandbox's breaker is open, and why.
    pub fn breaker(&self, id: &SandboxId) -> Result<Option<String>> {
        Ok(self.entry(id)?.read(|r| r.breaker.clone()))
    }

    /// Opts a sandbox in or out of the thermal manager.
    pub fn set_keep_hot(&self, id: &SandboxId, keep_hot: bool) -> Result<()> {
        self.entry(id)?.set_keep_hot(keep_hot);
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
        let _life = entry.lock().await;
        match entry.thermal() {
            ThermalState::Hot => self.pause_locked(&entry).await,
            ThermalState::Warm | ThermalState::Cold => Ok(()),
        }
    }

    async fn pause_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "pause")?;
        let started = Instant::now();
        let mut cut = CutShort::new(entry);
        let paused = vm.vmm.pause().await;
        cut.disarm();
        paused.map_err(|e| self.thermal_error(entry, &*vm.vmm, "pause", e))?;
        entry.set_thermal(ThermalState::Warm)?;
        self.emit(entry, ThermalEventKind::Warm, started.elapsed());
        Ok(())
    }

    /// Makes a sandbox hot: resumes a warm one, restores a cold one (unless
    /// its breaker is open). Concurrent callers share one wake. Every call
    /// into the guest goes through here first.
    pub async fn ensure_hot(&self, id: &SandboxId) -> Result<()> {
        let entry = self.entry(id)?;
        entry.touch();
        {
            let (state, thermal) = entry.read(|r| (r.state, r.thermal));
            if state != SandboxState::Running
                || (thermal == ThermalState::Hot && entry.vm().is_some())
            {
                // Not running: the caller's own check reports it.
                return Ok(());
            }
        }
        let _life = entry.lock().await;
        entry.touch();
        self.wake_locked(&entry).await
    }

    async fn wake_locked(&self, entry: &Entry) -> Result<()> {
        let (state, thermal) = entry.read(|r| (r.state, r.thermal));
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
        let _life = entry.lock().await;
        entry.touch();
        if force && entry.set_breaker(None).is_some() {
            self.emit(&entry, ThermalEventKind::BreakerClosed, Duration::ZERO);
        }
        self.wake_locked(&entry).await
    }

    async fn resume_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "resume")?;
        let started = Instant::now();
        let paused_at = entry.read(|r| r.thermal_since_unix_ms);
        let mut cut = CutShort::new(entry);
        let resumed = vm.vmm.resume().await;
        cut.disarm();
        resumed.map_err(|e| self.thermal_error(entry, &*vm.vmm, "resume", e))?;
        entry.set_thermal(ThermalState::Hot)?;
        // The guest's clock stood still while paused; a short pause is not
        // worth a round trip.
        if now_unix_ms().saturating_sub(paused_at) >= 1000 {
            if let Err(e) = vm
                .client
                .deadline(self.policy().agent_timeout)
                .set_time(now_unix_ms())
                .await
            {
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
            let _life = entry.lock().await;
            match entry.thermal() {
                ThermalState::Cold => Ok(()),
                ThermalState::Hot | ThermalState::Warm => self.freeze_locked(&entry).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Resumes a VM whose snapshot failed; if it will not resume, it is
    /// labelled warm so the next use tries again.
    pub(crate) async fn resume_after(&self, entry: &Entry, vm: &Vm, err: CoreError) -> CoreError {
        match vm.vmm.resume().await {
            Ok(()) => tracing::warn!(sandbox = %entry.id, "snapshot failed; VM resumed"),
            Err(r) => {
                tracing::error!(sandbox = %entry.id, error = %error_chain(&r), "snapshot failed and the VM does not resume");
                if entry.thermal() == ThermalState::Hot {
                    if let Err(e) = entry.set_thermal(ThermalState::Warm) {
                        tracing::error!(error = %error_chain(&e), "labelling warm");
                    }
                }
            }
        }
        discard_snapshot(entry);
        err
    }

    /// Syncs the guest's disks (lohar also syncs when a command exits)
    /// under a deadline of its own, before a snapshot.
    pub(crate) async fn sync_guest(&self, entry: &Entry, vm: &Vm) -> Result<()> {
        let limit = self.policy().sync_timeout;
        let sync = ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), "sync".into()],
            timeout_ms: Some(limit.as_millis() as u64),
            ..Default::default()
        };
        let synced = vm
            .client
            .deadline(limit)
            .exec(sync)
            .await
            .map_err(|source| CoreError::Agent {
                id: entry.id.clone(),
                source,
            })?;
        if synced.exit.code != 0 {
            tracing::warn!(sandbox = %entry.id, code = synced.exit.code, "sync before the snapshot failed");
        }
        Ok(())
    }

    pub(crate) async fn freeze_locked(&self, entry: &Entry) -> Result<()> {
        let vm = self.vm_of(entry, "stop")?;
        let started = Instant::now();
        let mut cut = CutShort::new(entry);
        if entry.thermal() == ThermalState::Warm {
            // The guest must run to sync.
            if let Err(e) = vm.vmm.resume().await {
                // Still paused, still labelled warm.
                cut.disarm();
                return Err(self.thermal_error(entry, &*vm.vmm, "resume", e));
            }
            entry.set_thermal(ThermalState::Hot)?;
        }
        // A guest whose agent does not answer is not snapshotted (it runs
        // on, hot).
        if let Err(e) = self.sync_guest(entry, &vm).await {
            cut.disarm();
            return Err(e);
        }
        let dir = snapshot_dir(entry);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                cut.disarm();
                return Err(CoreError::SnapshotVerify {
                    id: entry.id.clone(),
                    reason: format!("removing the old snapshot {}: {e}", dir.display()),
                });
            }
        }
        let info = match vm.vmm.snapshot(&dir, SnapshotKind::Full).await {
            Ok(info) => info,
            Err(e) => {
                let err = self.thermal_error(entry, &*vm.vmm, "snapshot", e);
                let err = self.resume_after(entry, &vm, err).await;
                cut.disarm();
                return Err(err);
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
                let err = self.resume_after(entry, &vm, err).await;
                cut.disarm();
                return Err(err);
            }
        };
        // Verified: the VMM may go. The record says cold before anything
        // awaits again, so a cut from here on finds it consistent; out of
        // the slot first, so nobody takes its exit for a crash.
        if let Err(e) = entry.set_thermal(ThermalState::Cold) {
            let err = self.resume_after(entry, &vm, e).await;
            cut.disarm();
            return Err(err);
        }
        cut.disarm();
        let vm = entry.take_vm().unwrap_or(vm);
        entry.stash_cold_client(vm.client.clone());
        match vm.vmm.kill().await {
            Ok(exit) => tracing::debug!(%exit, "VMM of a cold sandbox ended"),
            Err(e) => {
                tracing::warn!(sandbox = %entry.id, error = %error_chain(&e), "killing the VMM after the snapshot")
            }
        }
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
        if let Some(reason) = entry.read(|r| r.breaker.clone()) {
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
        // A destroy or a shutdown meanwhile wins: the new VMM (dropped
        // with the restore) is killed, and that is no restore failure.
        let restored = tokio::select! {
            r = self.restore_vm(entry) => r,
            () = entry.cancelled() => return Err(CoreError::Cancelled { id: entry.id.clone() }),
        };
        match restored {
            Ok(vm) => {
                // The guest runs again: the saved device state no longer
                // matches the memory file. Without a manifest it is not a
                // snapshot, so a crash from here on never restores it.
                discard_snapshot(entry);
                let vmm = vm.vmm.clone();
                if let Err(e) = entry.install_restored(vm) {
                    if let Err(k) = vmm.kill().await {
                        tracing::warn!(error = %error_chain(&k), "killing a restored VMM");
                    }
                    return Err(e);
                }
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
                self.emit(
                    entry,
                    ThermalEventKind::RestoreFailed {
                        reason: reason.clone(),
                    },
                    started.elapsed(),
                );
                if !snapshot_dir(entry).join(vmm::snapshot::MANIFEST).exists() {
                    // Spent by the attempt: a retry cannot restore it.
                    tracing::error!(sandbox = %entry.id, error = %reason, "restore failed; its snapshot is spent");
                    return Err(match e {
                        CoreError::Restore {
                            id,
                            reason,
                            stderr_tail,
                        } => CoreError::SnapshotSpent {
                            id,
                            reason,
                            stderr_tail,
                        },
                        other => other,
                    });
                }
                tracing::error!(sandbox = %entry.id, error = %reason, "restore failed; breaker open");
                entry.set_breaker(Some(reason));
                Err(e)
            }
        }
    }

    /// A new VMM from the snapshot, its agent answering and the guest clock
    /// set. On failure the new VMM is killed (also when this future is
    /// dropped: the VMM ends with its last handle).
    async fn restore_vm(&self, entry: &Entry) -> Result<Vm> {
        let id = entry.id.clone();
        let record = entry.record();
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
            .take_cold_client()
            .filter(|c| *c.endpoint() == endpoint)
            .unwrap_or_else(|| AgentClient::new(endpoint, record.token.expose()));
        let wake_timeout = self.policy().wake_timeout;
        let deadline = Instant::now() + wake_timeout;
        let mut last = String::from("no attempt finished");
        // First an answer, then the clock. Only pings are retried: a clock
        // setting that timed out here could still reach the guest after a
        // later one and move its clock back.
        let mut answered = false;
        loop {
            if let Some(exit) = vmm.exit() {
                let err = restore_err(format!("the restored VMM exited: {exit}"), Some(&*vmm));
                return Err(err);
            }
            let attempt = self
                .policy()
                .agent_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1));
            if !answered {
                match client.deadline(attempt).ping().await {
                    Ok(_) => answered = true,
                    Err(e) => last = error_chain(&e),
                }
            }
            if answered {
                // The clock before anything else: nothing runs in a woken
                // guest with a stale one.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                match client.deadline(left).set_time(now_unix_ms()).await {
                    Ok(()) => break,
                    // An agent that is not a guest's init (the fake engine's
                    // `lohar serve`) answers but keeps the host's clock,
                    // which is right already: it is awake.
                    Err(e) if e.agent_code() == Some(proto::ErrorCode::PermissionDenied) => break,
                    Err(e) => last = error_chain(&e),
                }
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

    /// Sandboxes the ticker should move down now.
    fn due(&self) -> Vec<Arc<Entry>> {
        let policy = *self.policy();
        let now = now_unix_ms();
        self.entries()
            .into_iter()
            .filter(|entry| {
                let (state, thermal, keep_hot, since) =
                    entry.read(|r| (r.state, r.thermal, r.keep_hot, r.thermal_since_unix_ms));
                if state != SandboxState::Running || keep_hot {
                    return false;
                }
                match thermal {
                    ThermalState::Hot => entry.idle_ms() >= policy.warm_after.as_millis() as u64,
                    ThermalState::Warm => {
                        entry.calls_in_flight() > 0
                            || now.saturating_sub(since) >= policy.cold_after.as_millis() as u64
                    }
                    ThermalState::Cold => false,
                }
            })
            .collect()
    }

    fn start_due(&self, tasks: &mut JoinSet<()>) {
        for entry in self.due() {
            let mgr = self.clone();
            tasks.spawn(async move { mgr.tick_one(&entry).await });
        }
    }

    /// One sandbox's transition, bounded by `transition_timeout`. Skipped
    /// when another lifecycle operation (or an earlier tick's transition)
    /// holds the sandbox.
    async fn tick_one(&self, entry: &Entry) {
        let Some(_life) = entry.try_lock() else {
            return;
        };
        let (state, thermal, keep_hot) = entry.read(|r| (r.state, r.thermal, r.keep_hot));
        if state != SandboxState::Running || keep_hot {
            return;
        }
        let limit = self.policy().transition_timeout;
        let (operation, result) = match thermal {
            ThermalState::Hot => (
                "go warm",
                tokio::time::timeout(limit, self.cool_if_idle(entry)).await,
            ),
            // A call began just as the VM was paused: wake it, not freeze.
            ThermalState::Warm if entry.calls_in_flight() > 0 => (
                "wake for a call in flight",
                tokio::time::timeout(limit, self.resume_locked(entry)).await,
            ),
            ThermalState::Warm => (
                "go cold",
                tokio::time::timeout(limit, self.freeze_locked(entry)).await,
            ),
            ThermalState::Cold => return,
        };
        let err = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => CoreError::TimedOut {
                id: entry.id.clone(),
                operation,
                after: limit,
            },
        };
        tracing::warn!(sandbox = %entry.id, operation, error = %error_chain(&err), "thermal manager");
    }

    /// One pass of the thermal manager: idle hot sandboxes are paused, and
    /// sandboxes warm for `cold_after` go cold, all at once, each within
    /// `transition_timeout`. Returns when every transition it started has
    /// ended. Sandboxes busy with another lifecycle operation are skipped.
    pub async fn thermal_tick(&self) {
        let mut tasks = JoinSet::new();
        self.start_due(&mut tasks);
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a thermal transition task failed");
            }
        }
    }

    /// Pauses a hot sandbox unless its agent reports an attached session
    /// or a running command (then it counts as active now). An agent that
    /// does not answer within `agent_timeout` cannot tell: the sandbox
    /// stays hot and counts as active now (asked again after `warm_after`).
    async fn cool_if_idle(&self, entry: &Entry) -> Result<()> {
        if entry.idle_ms() < self.policy().warm_after.as_millis() as u64 {
            // Touched while we waited for the lock.
            return Ok(());
        }
        if entry.calls_in_flight() > 0 {
            // A host-side call is on its way to the agent (or in it).
            entry.touch();
            return Ok(());
        }
        let vm = self.vm_of(entry, "pause")?;
        let activity = match vm
            .client
            .deadline(self.policy().agent_timeout)
            .activity()
            .await
        {
            Ok(a) => a,
            Err(source) => {
                // Cannot tell: counts as active, asked again after
                // `warm_after`.
                entry.touch();
                return Err(CoreError::Agent {
                    id: entry.id.clone(),
                    source,
                });
            }
        };
        if activity.attached > 0 || activity.running_execs > 0 {
            entry.touch();
            return Ok(());
        }
        self.pause_locked(entry).await
    }

    /// Runs the thermal manager every `policy.tick` until the returned task
    /// is aborted. Each tick starts the due sandboxes' transitions in tasks
    /// of their own and does not wait for them; aborting the returned task
    /// aborts the transitions in flight too (each settles as the module
    /// docs say).
    pub fn spawn_thermal(&self) -> tokio::task::JoinHandle<()> {
        let mgr = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(mgr.policy().tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut in_flight = JoinSet::new();
            loop {
                every.tick().await;
                while let Some(r) = in_flight.try_join_next() {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "a thermal transition task failed");
                    }
                }
                mgr.start_due(&mut in_flight);
            }
        })
    }
}
