//! Supervision of one VMM process: spawn it as a tokio child, keep the tail
//! of its stderr, reap it in a task and publish how it ended.
//!
//! The child is owned by a single supervisor task, so signals are only ever
//! sent to a pid that has not been reaped yet (no pid-reuse race), and the
//! exit status is observed exactly once and then broadcast through a `watch`.
//!
//! What every backend does around its process — the VM's state and the
//! process of the moment, start-up until the control socket answers, the
//! shutdown escalation, the serial log — is in [`slot`].

pub(crate) mod console;
pub(crate) mod slot;

use std::collections::VecDeque;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use crate::error::{Result, VmmError};

/// How many bytes of VMM stderr we keep.
const TAIL_BYTES: usize = 8 * 1024;
/// How long we wait for stderr to drain after the process died.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatusKind {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl fmt::Display for ExitStatusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatusKind::Code(c) => write!(f, "exited with code {c}"),
            ExitStatusKind::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

impl From<std::process::ExitStatus> for ExitStatusKind {
    fn from(s: std::process::ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(c), _) => ExitStatusKind::Code(c),
            (None, Some(sig)) => ExitStatusKind::Signal(sig),
            // Neither a code nor a signal: only possible for stopped
            // processes, which `wait` does not report. Keep it visible.
            (None, None) => ExitStatusKind::Code(-1),
        }
    }
}

/// The end of a VMM process: its status and what it said last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    /// Exit code or signal.
    pub status: ExitStatusKind,
    /// The tail of the VMM's stderr (and log file, where the engine has one).
    pub stderr_tail: String,
}

impl VmmExit {
    /// The error to return when an operation needed the VMM.
    pub fn to_error(&self) -> VmmError {
        VmmError::Exited {
            status: self.status,
            stderr_tail: self.stderr_tail.clone(),
        }
    }
}

impl fmt::Display for VmmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VMM {}", self.status)
    }
}

/// A ring buffer of the last bytes a stream produced.
#[derive(Debug, Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend(bytes);
        let excess = self.0.len().saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
    }

    fn text(&self) -> String {
        let (a, b) = self.0.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).trim().to_string()
    }
}

/// What the supervisor task is asked to do.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// Send this signal (SIGKILL included) unless the process is reaped.
    Signal(i32),
    /// Stop supervising without killing: the process runs on unwatched, as
    /// the VMMs of a daemon killed with SIGKILL do (the fake engine's
    /// simulated crash).
    #[cfg(feature = "fake")]
    Disown,
}

/// Kills the child when dropped (the supervisor task ending with the
/// runtime), unless it was disowned first. Tokio reaps a dropped child
/// that has not exited in the background.
struct KillOnDrop(Option<tokio::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // Already reaped or already dead: nothing to do.
            if let Err(e) = child.start_kill() {
                tracing::debug!(error = %e, "SIGKILL to a dropped VMM");
            }
        }
    }
}

/// Work to do once the process has been reaped, before its exit is
/// published (removing its cgroup). Runs on a blocking thread.
pub(crate) type ExitHook = Box<dyn FnOnce() + Send + 'static>;

/// A running (or ended) VMM process.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: u32,
    exit_rx: watch::Receiver<Option<VmmExit>>,
    control_tx: mpsc::UnboundedSender<Control>,
    tail: Arc<Mutex<Tail>>,
    /// Extra log file whose tail is appended to error reports.
    log_file: Option<PathBuf>,
    /// The VMM's standard input: the guest's console input (QEMU's
    /// `-serial stdio`, Firecracker's serial), written only by the host.
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
}

/// How long one write to a VMM's console input may take.
pub(crate) const CONSOLE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

impl VmmProcess {
    /// Spawns `cmd` (stdin a pipe kept for [`VmmProcess::write_console`],
    /// stderr captured; stdout as the caller set it, or null) and starts
    /// supervising it.
    pub(crate) fn spawn(
        mut cmd: Command,
        binary: &Path,
        stdout: Option<Stdio>,
        log_file: Option<PathBuf>,
        on_exit: Option<ExitHook>,
    ) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(stdout.unwrap_or_else(Stdio::null))
            .stderr(Stdio::piped())
            // Terminal signals (^C on the daemon) must not reach the VMM:
            // the daemon decides how its VMs end.
            .process_group(0)
            // If the supervisor task is dropped with the runtime, the VMM
            // dies with it rather than leaking (see `KillOnDrop`).
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| VmmError::Spawn {
            binary: binary.to_path_buf(),
            source: std::io::Error::other("child exited before its pid was read"),
        })?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let reader = tokio::spawn(drain_into(stderr, tail.clone()));

        let (exit_tx, exit_rx) = watch::channel(None);
        let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Control>();
        let tail2 = tail.clone();
        let log2 = log_file.clone();
        tokio::spawn(async move {
            let mut owned = KillOnDrop(Some(child));
            let status = loop {
                let Some(child) = owned.0.as_mut() else {
                    break None;
                };
                tokio::select! {
                    status = child.wait() => break Some(status),
                    ctl = control_rx.recv() => match ctl {
                        Some(Control::Signal(libc::SIGKILL)) | None => {
                            // `start_kill` only signals a child that has not
                            // been reaped, so this cannot hit a reused pid.
                            if let Err(e) = child.start_kill() {
                                tracing::warn!(pid, error = %e, "SIGKILL to VMM failed");
                            }
                        }
                        Some(Control::Signal(sig)) => {
                            if let Ok(None) = child.try_wait() {
                                // SAFETY: plain kill(2); the child is not yet
                                // reaped (checked just above, and only this task
                                // reaps it), so `pid` still names it.
                                let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
                                if rc != 0 {
                                    tracing::warn!(pid, sig, error = %std::io::Error::last_os_error(), "signal to VMM failed");
                                }
                            }
                        }
                        #[cfg(feature = "fake")]
                        Some(Control::Disown) => {
                            // Dropped without a kill; tokio reaps it if it
                            // ever exits while we run.
                            drop(owned.0.take());
                        }
                    },
                }
            };
            let Some(status) = status else {
                tracing::debug!(pid, "VMM disowned");
                // A disowned VMM keeps running: its hook does not apply.
                drop(on_exit);
                // No exit to publish: the sender goes, and waiters learn
                // that supervision ended.
                return;
            };
            // Let stderr drain so the tail has the VMM's last words. A
            // grandchild holding the pipe open must not keep us waiting.
            if tokio::time::timeout(DRAIN_AFTER_EXIT, reader)
                .await
                .is_err()
            {
                tracing::debug!(pid, "stderr still open after VMM exit");
            }
            let exit = match status {
                Ok(status) => VmmExit {
                    status: status.into(),
                    stderr_tail: full_tail(&tail2, log2.as_deref()),
                },
                Err(e) => VmmExit {
                    status: ExitStatusKind::Code(-1),
                    stderr_tail: format!("waiting for the VMM failed: {e}"),
                },
            };
            if let Some(hook) = on_exit {
                if let Err(e) = tokio::task::spawn_blocking(hook).await {
                    tracing::warn!(pid, error = %e, "VMM exit hook");
                }
            }
            tracing::debug!(pid, status = %exit.status, "VMM exited");
            // Nobody listening is fine: the VM object was dropped.
            exit_tx.send_replace(Some(exit));
        });
        Ok(VmmProcess {
            pid,
            exit_rx,
            control_tx,
            tail,
            log_file,
            stdin: tokio::sync::Mutex::new(stdin),
        })
    }

    /// Writes `bytes` to the VMM's standard input (the guest's console),
    /// within [`CONSOLE_WRITE_TIMEOUT`].
    pub(crate) async fn write_console(&self, bytes: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let fail = |e: std::io::Error| VmmError::Console { source: e };
        let write = async {
            let mut stdin = self.stdin.lock().await;
            let pipe = stdin
                .as_mut()
                .ok_or_else(|| fail(std::io::Error::other("the console input is closed")))?;
            pipe.write_all(bytes).await.map_err(fail)?;
            pipe.flush().await.map_err(fail)
        };
        tokio::time::timeout(CONSOLE_WRITE_TIMEOUT, write)
            .await
            .map_err(|_| VmmError::Timeout {
                what: "a write to the VMM's console input",
                after: CONSOLE_WRITE_TIMEOUT,
            })?
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How the process ended, if it has.
    pub(crate) fn exit(&self) -> Option<VmmExit> {
        self.exit_rx.borrow().clone()
    }

    /// A receiver that turns `Some` when the process has been reaped.
    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.exit_rx.clone()
    }

    /// Waits until the process has exited.
    pub(crate) async fn wait(&self) -> VmmExit {
        wait_exit(self.exit_rx.clone()).await
    }

    /// Waits at most `limit` for the process to exit.
    pub(crate) async fn wait_timeout(&self, limit: Duration) -> Option<VmmExit> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }

    /// Sends `sig` (SIGKILL included) unless the process is already gone.
    pub(crate) fn signal(&self, sig: i32) {
        // A closed channel means the supervisor finished: nothing to signal.
        if self.control_tx.send(Control::Signal(sig)).is_err() {
            tracing::debug!(pid = self.pid, sig, "VMM already reaped");
        }
    }

    /// Stops supervising the process and leaves it running (see
    /// [`Control::Disown`]).
    #[cfg(feature = "fake")]
    pub(crate) fn disown(&self) {
        if self.control_tx.send(Control::Disown).is_err() {
            tracing::debug!(pid = self.pid, "VMM already reaped");
        }
    }

    /// The current tail of stderr plus the engine's log file.
    pub(crate) fn stderr_tail(&self) -> String {
        full_tail(&self.tail, self.log_file.as_deref())
    }

    /// The error for "we needed the VMM and it is gone or going": waits a
    /// little for the reaper so the status is real, not a guess.
    pub(crate) async fn exited_error(&self) -> Option<VmmError> {
        self.wait_timeout(Duration::from_secs(2))
            .await
            .map(|e| e.to_error())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        // The supervisor kills the VMM when this channel closes; an exited
        // VMM makes this a no-op.
        if self.exit().is_none() {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Waits on an exit watch (shared by the trait's `wait_exit`).
pub(crate) async fn wait_exit(mut rx: watch::Receiver<Option<VmmExit>>) -> VmmExit {
    loop {
        if let Some(exit) = rx.borrow_and_update().clone() {
            return exit;
        }
        if rx.changed().await.is_err() {
            // The supervisor dropped the sender without publishing, which it
            // only does if the runtime is shutting down.
            return rx.borrow().clone().unwrap_or(VmmExit {
                status: ExitStatusKind::Code(-1),
                stderr_tail: "VMM supervisor stopped before the VMM exited".into(),
            });
        }
    }
}

async fn drain_into<R: AsyncRead + Unpin>(stream: Option<R>, tail: Arc<Mutex<Tail>>) {
    let Some(mut stream) = stream else { return };
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    tracing::debug!(target: "vmm::stderr", "{line}");
                }
                lock(&tail).push(&buf[..n]);
            }
        }
    }
}

fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    // A poisoned tail is still a tail.
    tail.lock().unwrap_or_else(|p| p.into_inner())
}

fn full_tail(tail: &Mutex<Tail>, log_file: Option<&Path>) -> String {
    let mut out = lock(tail).text();
    if let Some(log) = log_file.and_then(|p| read_file_tail(p, 4096)) {
        if !log.is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&log);
        }
    }
    out
}

/// The last `max` bytes of a file, as lossy text; `None` if unreadable.
pub(crate) fn read_file_tail(path: &Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).ok()?;
    Some(String::from_utf8_lossy(&v).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_only_the_last_bytes() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; TAIL_BYTES]);
        t.push(b"the end");
        let text = t.text();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with("the end"));
    }

    #[test]
    fn exit_status_reads_like_a_sentence() {
        assert_eq!(ExitStatusKind::Signal(9).to_string(), "killed by signal 9");
        assert_eq!(ExitStatusKind::Code(1).to_string(), "exited with code 1");
        let err = VmmExit {
            status: ExitStatusKind::Signal(9),
            stderr_tail: "boom".into(),
        }
        .to_error();
        assert_eq!(
            err.to_string(),
            "VMM exited: killed by signal 9; stderr: boom"
        );
    }

    #[tokio::test]
    async fn reaps_and_reports_exit_code_and_stderr() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let p = VmmProcess::spawn(cmd, Path::new("/bin/sh"), None, None, None).unwrap();
        let exit = p.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert_eq!(exit.status, ExitStatusKind::Code(3));
        assert_eq!(exit.stderr_tail, "oops");
    }

    #[tokio::test]
    async fn kill_is_reported_as_signal_9() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("1000");
        let p = VmmProcess::spawn(cmd, Path::new("/bin/sleep"), None, None, None).unwrap();
        assert!(p.exit().is_none());
        p.signal(libc::SIGKILL);
        let exit = p.wait_timeout(Duration::from_secs(10)).await.unwrap();
        assert_eq!(exit.status, ExitStatusKind::Signal(9));
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_process() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("1000");
        let p = VmmProcess::spawn(cmd, Path::new("/bin/sleep"), None, None, None).unwrap();
        let watch = p.exit_watch();
        drop(p);
        let exit = tokio::time::timeout(Duration::from_secs(10), wait_exit(watch))
            .await
            .unwrap();
        assert_eq!(exit.status, ExitStatusKind::Signal(9));
    }
}
