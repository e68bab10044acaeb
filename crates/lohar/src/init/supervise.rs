//! PID 1 after boot: reaping, the agent process, signals, poweroff.
//!
//! # Reaping without stealing exit statuses
//!
//! PID 1 forks once more: the agent (tokio runtime, every session and
//! exec) runs in a child process, and PID 1 itself stays a small,
//! single-threaded loop that waits for signals. So:
//!
//! * tokio waits for the agent's own children by pid in the agent process;
//!   nobody else can reap them (only a parent can), so no exit status is
//!   ever stolen, with no registry and no race between `spawn` returning a
//!   pid and the pid being recorded;
//! * an orphan (`sh -c 'sleep 1 &'`) is reparented to PID 1, not to the
//!   agent (which is not a subreaper), and PID 1's only own children are
//!   the agent and the boot command (whose exit it notes in that command's
//!   log), so a blind `waitpid(-1, WNOHANG)` loop is correct here;
//! * if the agent dies (OOM killer, a bug), PID 1 notices and starts it
//!   again (sessions are lost, the sandbox stays reachable); past
//!   [`MAX_RESTARTS`] in [`RESTART_WINDOW`] it powers off, so the host
//!   sees the VM end instead of a silent guest.
//!
//! The price is one more process (its pages are shared copy-on-write with
//! PID 1) and one `fork` at boot.
//!
//! # Signals
//!
//! PID 1 blocks `SIGCHLD`, `SIGTERM`, `SIGINT` (Ctrl-Alt-Del, once
//! `reboot(RB_DISABLE_CAD)` is set) and `SIGPWR` before anything else and
//! takes them with `sigwait`, so nothing runs in signal context. They are
//! also given no-op handlers: the kernel drops signals with the default
//! disposition sent to init. A signal sent during boot waits in the queue.
//! Any of the last three powers off: `SIGTERM` then `SIGKILL` to every
//! process, `sync`, root and sandbox disk remounted read-only (the journal
//! is flushed and the disk marked clean), `reboot(RB_POWER_OFF)`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::error::BootError;
use super::mounts;

/// Agent restarts tolerated within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long processes get between `SIGTERM` and `SIGKILL` at poweroff.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

const SIGNALS: [Signal; 4] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGPWR,
];

fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in SIGNALS {
        set.add(s);
    }
    set
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs no-op handlers and blocks PID 1's signals; first thing at boot.
pub fn take_signals() {
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in SIGNALS {
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        if let Err(e) = unsafe { signal::sigaction(s, &action) } {
            eprintln!("lohar: cannot handle {s}: {e}");
        }
    }
    if let Err(e) = signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signal_set()), None) {
        eprintln!("lohar: cannot block signals: {e}");
    }
}

/// In a forked child: default dispositions and nothing blocked again.
pub fn release_signals() {
    for s in SIGNALS {
        // SAFETY: restoring the default disposition installs no handler.
        if let Err(e) = unsafe {
            signal::sigaction(
                s,
                &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()),
            )
        } {
            eprintln!("lohar: cannot reset {s}: {e}");
        }
    }
    if let Err(e) = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        eprintln!("lohar: cannot unblock signals: {e}");
    }
}

/// Reaps every zombie child now; returns the agent's status if it was one.
/// The boot command's end is noted on the console and in its log.
fn reap_ready(agent: Pid, boot_command: &mut Option<Pid>) -> Option<WaitStatus> {
    let mut agent_status = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return agent_status,
            Ok(status) => {
                if status.pid() == Some(agent) {
                    agent_status = Some(status);
                } else if status.pid().is_some() && status.pid() == *boot_command {
                    // Noted once: its pid may be reused by an orphan later.
                    *boot_command = None;
                    let how = describe(status);
                    eprintln!("lohar: the init command {how}");
                    crate::boot_command::note(
                        std::path::Path::new(crate::boot_command::LOG_PATH),
                        &format!("init {how}"),
                    );
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("lohar: waitpid: {e}");
                return agent_status;
            }
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with code {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("ended ({other:?})"),
    }
}

/// Serves as PID 1 forever: reaps, restarts the agent, powers off on request.
pub fn supervise(
    mut agent: Pid,
    start_agent: impl Fn() -> Result<Pid, BootError>,
    mut boot_command: Option<Pid>,
) -> ! {
    let set = signal_set();
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lohar: sigwait: {e}");
                continue;
            }
        };
        match sig {
            Signal::SIGCHLD => {
                let Some(status) = reap_ready(agent, &mut boot_command) else {
                    continue;
                };
                eprintln!("lohar: the agent process ended ({status:?})");
                let now = Instant::now();
                restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                if restarts.len() >= MAX_RESTARTS {
                    poweroff(&format!(
                        "the agent ended {} times within {RESTART_WINDOW:?}",
                        restarts.len() + 1
                    ));
                }
                restarts.push_back(now);
                match start_agent() {
                    Ok(pid) => agent = pid,
                    Err(e) => poweroff(&format!("cannot restart the agent: {}", e.chain())),
                }
            }
            other => poweroff(&format!("{other} received")),
        }
    }
}

/// Reaps until no child is left or `limit` passes; true when none is left.
fn reap_all(limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return true,
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= end {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("lohar: waitpid: {e}");
                return false;
            }
        }
    }
}

/// Stops every process, flushes and remounts the disks read-only, and
/// powers the VM off. Never returns (PID 1 must not exit).
pub fn poweroff(reason: &str) -> ! {
    eprintln!("lohar: powering off: {reason}");
    let all = Pid::from_raw(-1);
    let kill = |s: Signal| match signal::kill(all, s) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => eprintln!("lohar: kill(-1, {s}): {e}"),
    };
    kill(Signal::SIGTERM);
    if !reap_all(TERM_GRACE) {
        kill(Signal::SIGKILL);
        if !reap_all(Duration::from_secs(2)) {
            eprintln!("lohar: some processes did not end");
        }
    }
    nix::unistd::sync();
    for failure in mounts::remount_read_only() {
        eprintln!("lohar: cannot remount read-only: {failure}");
    }
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("lohar: power off failed: {e:?}; halting");
    loop {
        // SAFETY: pause(2) only sleeps until a signal arrives.
        unsafe { libc::pause() };
    }
}
