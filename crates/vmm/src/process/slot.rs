//! The process side of one VM, shared by every backend: its lifecycle state
//! and the VMM process of the moment ([`ProcessSlot`]), starting a process
//! and waiting until its control channel answers ([`ProcessSlot::spawn`],
//! [`wait_ready`]), the serial log ([`open_serial_log`]), and the shutdown
//! escalation ([`Escalation`]). A backend adds only what is its own: the
//! command line, the control protocol, and what "ask the guest" and "ask the
//! VMM" mean.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::{ExitHook, VmmExit, VmmProcess};
use crate::error::{Result, VmmError};
use crate::vmm::{transition, Op, ShutdownPath, ShutdownReport, VmState};

/// How long [`ProcessSlot::kill`] waits for the reaper after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often [`wait_ready`] retries (it also wakes when the process dies).
const READY_POLL: Duration = Duration::from_millis(2);

/// One VM's state and its current VMM process (a restore replaces it).
#[derive(Debug)]
pub(crate) struct ProcessSlot {
    /// The engine, in error messages ("QEMU", "Firecracker", …).
    name: &'static str,
    shared: Mutex<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: VmState,
    process: Option<Arc<VmmProcess>>,
}

impl ProcessSlot {
    /// A VM that has not been started.
    pub(crate) fn new(name: &'static str) -> Self {
        ProcessSlot {
            name,
            shared: Mutex::new(Shared {
                state: VmState::Created,
                process: None,
            }),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current process, running or ended.
    pub(crate) fn process(&self) -> Option<Arc<VmmProcess>> {
        self.shared().process.clone()
    }

    pub(crate) fn set_state(&self, state: VmState) {
        self.shared().state = state;
    }

    /// The state, with a dead VMM read as `Exited`.
    pub(crate) fn state(&self) -> VmState {
        let s = self.shared();
        match &s.process {
            Some(p) if p.exit().is_some() => VmState::Exited,
            _ => s.state,
        }
    }

    /// The state `op` leads to; a dead VMM answers with its exit.
    pub(crate) fn next_state(&self, op: Op) -> Result<VmState> {
        if let Some(exit) = self.exit() {
            return Err(exit.to_error());
        }
        transition(self.state(), op)
    }

    /// The running process, or why there is none (its exit, or the state).
    #[cfg_attr(not(feature = "fake"), allow(dead_code))]
    pub(crate) fn live(&self, operation: &'static str) -> Result<Arc<VmmProcess>> {
        let state = self.state();
        match self.process() {
            Some(p) => match p.exit() {
                Some(exit) => Err(exit.to_error()),
                None => Ok(p),
            },
            None => Err(VmmError::InvalidState { operation, state }),
        }
    }

    /// Writes to the console input of the VMM that runs now.
    pub(crate) async fn write_console(&self, bytes: &[u8]) -> Result<()> {
        self.live("write to the console of")?
            .write_console(bytes)
            .await
    }

    /// The VMM's pid while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process()
            .filter(|p| p.exit().is_none())
            .map(|p| p.pid())
    }

    /// How the current process ended, if it has.
    pub(crate) fn exit(&self) -> Option<VmmExit> {
        self.process().and_then(|p| p.exit())
    }

    pub(crate) fn stderr_tail(&self) -> Option<String> {
        self.process().map(|p| p.stderr_tail())
    }

    /// For a control channel that failed: the VMM's exit if it is dying
    /// (waiting a little for the reaper, so the status is real).
    pub(crate) async fn exited_error(&self) -> Option<VmmError> {
        match self.process() {
            Some(p) => p.exited_error().await,
            None => None,
        }
    }

    fn started(&self, operation: &'static str) -> Result<Arc<VmmProcess>> {
        self.process().ok_or(VmmError::InvalidState {
            operation,
            state: VmState::Created,
        })
    }

    /// Waits until the current process exits.
    pub(crate) async fn wait_exit(&self) -> Result<VmmExit> {
        let watch = self.started("wait for")?.exit_watch();
        Ok(super::wait_exit(watch).await)
    }

    /// SIGKILL and wait for the reaper.
    pub(crate) async fn kill(&self) -> Result<VmmExit> {
        let proc = self.started("kill")?;
        proc.signal(libc::SIGKILL);
        proc.wait_timeout(KILL_WAIT).await.ok_or(VmmError::Timeout {
            what: "the VMM to die after SIGKILL",
            after: KILL_WAIT,
        })
    }

    /// Spawns `cmd` as this VM's process (stdin null, stderr kept for the
    /// tail, stdout to `stdout` or null) and makes it the current one.
    pub(crate) fn spawn(
        &self,
        cmd: Command,
        binary: &Path,
        stdout: Option<Stdio>,
        log_file: Option<PathBuf>,
        on_exit: Option<ExitHook>,
    ) -> Result<Arc<VmmProcess>> {
        let proc = Arc::new(VmmProcess::spawn(cmd, binary, stdout, log_file, on_exit)?);
        tracing::debug!(engine = self.name, pid = proc.pid(), binary = %binary.display(), "VMM started");
        self.shared().process = Some(proc.clone());
        Ok(proc)
    }

    /// Starts a shutdown: `Done` if the VMM has exited already, else the
    /// escalation to drive.
    pub(crate) fn begin_shutdown(&self, grace: Duration) -> Result<Shutdown> {
        let proc = self.started("shut down")?;
        Ok(match proc.exit() {
            Some(exit) => Shutdown::Done(ShutdownReport {
                path: ShutdownPath::Guest,
                exit,
            }),
            None => Shutdown::Running(Escalation { proc, grace }),
        })
    }
}

/// Where a shutdown starts.
#[derive(Debug)]
pub(crate) enum Shutdown {
    /// The VMM had exited already.
    Done(ShutdownReport),
    /// Ask the guest, then the VMM, then kill (see [`Escalation`]).
    Running(Escalation),
}

/// The shutdown escalation every engine follows: the backend asks the guest
/// to power off and calls `wait(Guest)`; then asks the VMM to quit and calls
/// `wait(Vmm)`; then `kill()`. Each wait gives the process `grace`.
#[derive(Debug)]
pub(crate) struct Escalation {
    proc: Arc<VmmProcess>,
    grace: Duration,
}

impl Escalation {
    /// The process being stopped (to signal it).
    #[cfg_attr(not(any(feature = "firecracker", feature = "fake")), allow(dead_code))]
    pub(crate) fn process(&self) -> &VmmProcess {
        &self.proc
    }

    /// Waits `grace` for the exit; `Some` means the step at `path` ended it.
    pub(crate) async fn wait(&self, path: ShutdownPath) -> Option<ShutdownReport> {
        self.proc
            .wait_timeout(self.grace)
            .await
            .map(|exit| ShutdownReport { path, exit })
    }

    /// The last step: SIGKILL.
    pub(crate) async fn kill(self) -> Result<ShutdownReport> {
        self.proc.signal(libc::SIGKILL);
        let limit = self.grace.max(Duration::from_secs(5));
        let exit = self
            .proc
            .wait_timeout(limit)
            .await
            .ok_or(VmmError::Timeout {
                what: "the VMM to die after SIGKILL",
                after: limit,
            })?;
        Ok(ShutdownReport {
            path: ShutdownPath::Killed,
            exit,
        })
    }
}

/// One try of a readiness check.
#[derive(Debug)]
pub(crate) enum Attempt<T> {
    /// It answered.
    Ready(T),
    /// Not listening yet: try again.
    NotYet,
    /// It answered wrongly, or failed in a way retrying will not fix.
    Failed(VmmError),
}

/// Retries `attempt` until it is ready, the process dies (its exit is the
/// error), it fails (the exit, if the process is dying, else the failure),
/// or `timeout` passes.
pub(crate) async fn wait_ready<T, F, Fut>(
    proc: &VmmProcess,
    timeout: Duration,
    what: &'static str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut exit = proc.exit_watch();
    loop {
        if let Some(e) = proc.exit() {
            return Err(e.to_error());
        }
        match attempt().await {
            Attempt::Ready(v) => return Ok(v),
            Attempt::NotYet => {}
            Attempt::Failed(e) => {
                return Err(proc.exited_error().await.unwrap_or(e));
            }
        }
        if Instant::now() > deadline {
            return Err(VmmError::Timeout {
                what,
                after: timeout,
            });
        }
        // The socket appears within milliseconds of exec; wake early if the
        // process dies instead.
        tokio::select! {
            _ = tokio::time::sleep(READY_POLL) => {}
            _ = exit.changed() => {}
        }
    }
}

/// Removes a socket (or any file) a previous process left behind.
pub(crate) fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Prepare {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Opens the serial log for a VMM that writes the guest console to it (or
/// to its stdout): a fresh boot starts it empty, a restore appends, so the
/// log of one sandbox reads as one story.
#[cfg_attr(not(feature = "fake"), allow(dead_code))]
pub(crate) fn open_serial_log(path: &Path, fresh: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!fresh)
        .truncate(fresh)
        .open(path)
        .map_err(|source| VmmError::Prepare {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(slot: &ProcessSlot, script: &str) -> Arc<VmmProcess> {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        slot.spawn(cmd, Path::new("/bin/sh"), None, None, None)
            .unwrap()
    }

    #[tokio::test]
    async fn a_dead_process_reads_as_exited_and_blocks_operations() {
        let slot = ProcessSlot::new("test");
        assert_eq!(slot.state(), VmState::Created);
        assert!(slot.live("pause").is_err());
        assert!(slot.kill().await.is_err(), "nothing to kill yet");
        let p = sleeper(&slot, "echo bye >&2; exit 4");
        slot.set_state(VmState::Running);
        p.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert_eq!(slot.state(), VmState::Exited);
        assert_eq!(slot.pid(), None);
        let e = slot.next_state(Op::Pause).unwrap_err();
        assert_eq!(e.to_string(), "VMM exited: exited with code 4; stderr: bye");
        assert!(slot.live("pause").unwrap_err().is_exited());
    }

    #[tokio::test]
    async fn escalation_stops_at_the_step_that_worked() {
        let slot = ProcessSlot::new("test");
        // Ignores SIGTERM (once it says so): only the kill ends it.
        let d = tempfile::tempdir().unwrap();
        let ready = d.path().join("ready");
        let p = sleeper(
            &slot,
            &format!(
                "trap '' TERM; touch {}; while :; do sleep 0.05; done",
                ready.display()
            ),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the script never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Shutdown::Running(esc) = slot.begin_shutdown(Duration::from_millis(50)).unwrap() else {
            panic!("running process reported as done");
        };
        esc.process().signal(libc::SIGTERM);
        assert!(esc.wait(ShutdownPath::Guest).await.is_none());
        let report = esc.kill().await.unwrap();
        assert_eq!(report.path, ShutdownPath::Killed);
        assert_eq!(report.exit.status, super::super::ExitStatusKind::Signal(9));
        assert_eq!(p.exit(), Some(report.exit.clone()));
        // A second shutdown finds it done.
        assert!(matches!(
            slot.begin_shutdown(Duration::ZERO).unwrap(),
            Shutdown::Done(_)
        ));

        let slot = ProcessSlot::new("test");
        sleeper(&slot, "sleep 1000");
        let Shutdown::Running(esc) = slot.begin_shutdown(Duration::from_secs(10)).unwrap() else {
            panic!("running process reported as done");
        };
        esc.process().signal(libc::SIGTERM);
        let report = esc.wait(ShutdownPath::Vmm).await.unwrap();
        assert_eq!(report.path, ShutdownPath::Vmm);
    }

    #[tokio::test]
    async fn wait_ready_reports_the_exit_of_a_process_that_dies() {
        let slot = ProcessSlot::new("test");
        let p = sleeper(&slot, "echo no socket for you >&2; exit 2");
        let e = wait_ready(&p, Duration::from_secs(10), "the socket", || async {
            Attempt::<()>::NotYet
        })
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "VMM exited: exited with code 2; stderr: no socket for you"
        );
        let slot = ProcessSlot::new("test");
        let p = sleeper(&slot, "sleep 1000");
        let mut tries = 0;
        let v = wait_ready(&p, Duration::from_secs(10), "the socket", || {
            tries += 1;
            let t = tries;
            async move {
                if t < 3 {
                    Attempt::NotYet
                } else {
                    Attempt::Ready(t)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
        let e = wait_ready(&p, Duration::from_millis(20), "the socket", || async {
            Attempt::<()>::NotYet
        })
        .await
        .unwrap_err();
        assert!(matches!(e, VmmError::Timeout { .. }), "{e}");
        slot.kill().await.unwrap();
    }

    #[test]
    fn serial_log_is_fresh_on_boot_and_appended_on_restore() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("serial.log");
        open_serial_log(&log, true)
            .unwrap()
            .write_all(b"boot 1\n")
            .unwrap();
        open_serial_log(&log, false)
            .unwrap()
            .write_all(b"restore\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "boot 1\nrestore\n");
        open_serial_log(&log, true)
            .unwrap()
            .write_all(b"boot 2\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "boot 2\n");
        remove_stale(&log).unwrap();
        remove_stale(&log).unwrap();
        assert!(!log.exists());
    }
}
