//! The engine-neutral VM interface.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Result, VmmError};
use crate::process::VmmExit;
use crate::select::{EngineChoice, EngineKind};
use crate::snapshot::{SnapshotInfo, SnapshotKind};
use crate::spec::VmSpec;

/// What an engine can do. A `false` here means the matching call returns
/// [`VmmError::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Capabilities {
    /// Pause and resume vCPUs.
    pub pause: bool,
    /// Full snapshots to files, and restore from them.
    pub snapshot: bool,
    /// Snapshots of only the memory dirtied since the last one.
    pub diff_snapshot: bool,
    /// A restore maps guest memory from the file lazily instead of reading
    /// it all up front.
    pub lazy_memory: bool,
    /// A snapshot leaves guest RAM where it is and saves only device state
    /// (QEMU with a shared memory file).
    pub device_state_only_snapshot: bool,
    /// Graceful power-off request to the guest (ACPI / Ctrl-Alt-Del).
    pub guest_shutdown: bool,
}

/// Where one VM is in its life, from the host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    /// Built, not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped; the VMM is alive.
    Paused,
    /// The VMM process has exited.
    Exited,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "not started",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Exited => "exited",
        })
    }
}

/// Which host operation a state change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Boot,
    Restore,
    Pause,
    Resume,
    Snapshot,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Restore => "restore",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Snapshot => "snapshot",
        }
    }
}

/// The state `op` leads to from `from`, or the error for trying. Exhaustive
/// over `(state, op)` with no wildcard, so a new state or operation must be
/// decided here.
pub(crate) fn transition(from: VmState, op: Op) -> Result<VmState> {
    use Op::*;
    use VmState::*;
    let to = match (from, op) {
        (Created, Boot) | (Created, Restore) => Some(Running),
        (Running, Pause) | (Paused, Pause) => Some(Paused),
        (Paused, Resume) | (Running, Resume) => Some(Running),
        // A snapshot needs stopped vCPUs and leaves them stopped.
        (Running, Snapshot) | (Paused, Snapshot) => Some(Paused),
        (Created, Pause) | (Created, Resume) | (Created, Snapshot) => None,
        (Running, Boot) | (Running, Restore) | (Paused, Boot) | (Paused, Restore) => None,
        (Exited, Boot)
        | (Exited, Restore)
        | (Exited, Pause)
        | (Exited, Resume)
        | (Exited, Snapshot) => None,
    };
    to.ok_or(VmmError::InvalidState {
        operation: op.name(),
        state: from,
    })
}

/// How [`Vmm::shutdown`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownPath {
    /// The guest powered off after the request.
    Guest,
    /// The guest did not, within the grace period; the VMM was told to quit.
    Vmm,
    /// Neither worked; the VMM was killed.
    Killed,
}

/// The outcome of [`Vmm::shutdown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Which step ended it.
    pub path: ShutdownPath,
    /// The VMM's exit.
    pub exit: VmmExit,
}

/// One virtual machine on some engine. Methods take `&self` so that one task
/// can wait for the exit while another pauses or snapshots; lifecycle calls
/// are serialised inside the implementation.
#[async_trait]
pub trait Vmm: Send + Sync + fmt::Debug {
    /// Which engine runs this VM.
    fn engine(&self) -> EngineKind;

    /// What this engine (with this spec) can do.
    fn capabilities(&self) -> Capabilities;

    /// The VM's spec.
    fn spec(&self) -> &VmSpec;

    /// The current state (a VMM that died is `Exited`).
    fn state(&self) -> VmState;

    /// The VMM's process id while it runs.
    fn pid(&self) -> Option<u32>;

    /// Starts the VMM and boots the guest. Returns when the guest's vCPUs
    /// run (not when the guest is ready).
    async fn boot(&self) -> Result<()>;

    /// Stops the vCPUs (hot → warm).
    async fn pause(&self) -> Result<()>;

    /// Restarts the vCPUs (warm → hot).
    async fn resume(&self) -> Result<()>;

    /// Pauses (if needed) and writes a snapshot into `dir`. The VM stays
    /// paused; the caller resumes it or kills it.
    async fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo>;

    /// Starts a fresh VMM from the snapshot in `dir` and runs it. The VM
    /// must not have been started. An engine whose restored guest runs on
    /// the snapshot's own memory (QEMU) spends the snapshot
    /// ([`crate::snapshot::consume`]) before the guest can run: a restore
    /// that fails after that point leaves no snapshot to try again.
    async fn restore(&self, dir: &Path) -> Result<()>;

    /// Writes `bytes` to the guest's console input (its first serial
    /// port), within a short deadline: how the host tells a restored guest
    /// its new identity (the line format is `proto::identity`).
    async fn send_console(&self, bytes: &[u8]) -> Result<()>;

    /// Asks the guest to power off; after `grace`, asks the VMM to quit;
    /// after another `grace`, kills it.
    async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport>;

    /// Kills the VMM (SIGKILL) and returns its exit.
    async fn kill(&self) -> Result<VmmExit>;

    /// Waits until the VMM exits, for whatever reason.
    async fn wait_exit(&self) -> Result<VmmExit>;

    /// The VMM's exit, if it has exited.
    fn exit(&self) -> Option<VmmExit>;

    /// What the VMM has written to stderr (and its log) lately, for
    /// diagnostics while it still runs.
    fn stderr_tail(&self) -> Option<String>;

    /// Takes over a VMM that an earlier process started with this same
    /// spec and then lost (a daemon killed with SIGKILL leaves its VMMs
    /// running), saves a full snapshot of it into `dir` and ends it. The VM
    /// must not have been started by this value; afterwards it counts as
    /// exited. An engine that cannot answers [`VmmError::Unsupported`].
    async fn snapshot_orphan(&self, dir: &Path) -> Result<SnapshotInfo>;

    /// A Unix socket on the host where the guest's agent listens, for an
    /// engine whose guest is not behind the VM's network interface (the
    /// fake engine's `lohar serve`). `None` (every real engine): reach the
    /// agent at the guest's address.
    fn agent_socket(&self) -> Option<PathBuf> {
        None
    }
}

/// Something that makes VMs: an engine chosen for this host, or a test's
/// fake. The orchestrator holds one and never names a backend.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Which engine, its binary, and why it was chosen.
    fn choice(&self) -> &EngineChoice;

    /// Builds the VM object for `spec`; validates, starts nothing.
    fn new_vmm(&self, spec: VmSpec) -> Result<Box<dyn Vmm>>;

    /// The engine's kind (as in [`Engine::choice`]).
    fn kind(&self) -> EngineKind {
        self.choice().kind
    }
}

impl Engine for EngineChoice {
    fn choice(&self) -> &EngineChoice {
        self
    }

    fn new_vmm(&self, spec: VmSpec) -> Result<Box<dyn Vmm>> {
        crate::new_vmm(self, spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use Op::*;
        use VmState::*;
        assert_eq!(transition(Created, Boot).unwrap(), Running);
        assert_eq!(transition(Created, Restore).unwrap(), Running);
        assert_eq!(transition(Running, Pause).unwrap(), Paused);
        assert_eq!(transition(Paused, Resume).unwrap(), Running);
        assert_eq!(transition(Running, Snapshot).unwrap(), Paused);
        let e = transition(Created, Pause).unwrap_err();
        assert_eq!(e.to_string(), "cannot pause a VM that is not started");
        assert!(transition(Running, Boot).is_err());
        assert!(transition(Paused, Restore).is_err());
        for op in [Boot, Restore, Pause, Resume, Snapshot] {
            assert!(transition(Exited, op).is_err(), "{op:?} from Exited");
        }
    }
}
