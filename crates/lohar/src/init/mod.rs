//! lohar as PID 1: the guest's boot, synchronous and before any runtime
//! starts, then the agent in a child process and PID 1's duties
//! ([`supervise`]).
//!
//! Boot order (each step in its own module; any failure prints
//! `lohar: boot failed: …` on the console and powers off — PID 1 never
//! exits, which would panic the kernel, and never panics):
//!
//! 1. signals blocked ([`supervise::take_signals`]), Ctrl-Alt-Del → `SIGINT`;
//! 2. `/dev`, `/proc`, `/sys` ([`mounts::early`]);
//! 3. kernel release check and modules ([`modules`]);
//! 4. network settings from `/proc/cmdline` ([`cmdline`]), checked early so
//!    a bad line fails before the slow steps;
//! 5. the three disks, identified by content ([`disks`]), the raw config
//!    drive read with `read(2)`;
//! 6. overlay root, switch into it, late mounts ([`mounts`]);
//! 7. `lo` and `eth0` ([`net`]), hostname, hosts, DNS, the drive's files
//!    ([`guest`]);
//! 8. the drive's `init` command, as root in a session of its own
//!    ([`crate::boot_command`]), its output copied to a log by the agent;
//!    wrapped by the image's boot service ([`IMAGE_BOOT`]) when it has one;
//! 9. fork the agent: TCP `0.0.0.0:`[`AGENT_PORT`], commands as uid 1000
//!    in `/workspace`, the drive's env.

mod cmdline;
mod disks;
mod error;
mod grow;
pub(crate) mod guest;
mod modules;
mod mounts;
pub(crate) mod net;
mod supervise;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::{fork, ForkResult, Pid};

use crate::boot_command::{self, BootCommand};
use crate::config::{AgentConfig, RunAs};
use crate::identity::Identity;
pub use error::BootError;

/// The agent's TCP port on the guest IP (defined by the protocol).
pub use proto::AGENT_PORT;
/// Default working directory of commands.
pub const WORKSPACE: &str = "/workspace";
/// How long the boot waits for devices (disks, `eth0`) to appear.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the boot hands to the agent process.
#[derive(Debug, Clone)]
struct Booted {
    config: AgentConfig,
    token: String,
    /// The boot command: its pid and the read end of its output, which
    /// PID 1 keeps open for the life of the VM (each agent process it
    /// forks inherits it and copies from it).
    boot_command: Option<(Pid, RawFd)>,
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn set_process_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) } != 0 {
        tracing::debug!("cannot set the process name");
    }
}

/// Runs PID 1. Never returns.
pub fn run() -> ! {
    supervise::take_signals();
    init_logging();
    let started = Instant::now();
    let kernel_ms = uptime_ms();
    let booted = match std::panic::catch_unwind(|| boot(started)) {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => fatal(&e.chain()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            fatal(&format!("panic: {msg}"))
        }
    };
    eprintln!(
        "lohar: booted: init started {kernel_ms} ms after the kernel, took {} ms",
        started.elapsed().as_millis()
    );
    let start = || spawn_agent(&booted);
    match start() {
        Ok(pid) => supervise::supervise(pid, start, booted.boot_command.map(|(p, _)| p)),
        Err(e) => fatal(&e.chain()),
    }
}

fn fatal(msg: &str) -> ! {
    eprintln!("lohar: boot failed: {msg}");
    supervise::poweroff("boot failed")
}

fn init_logging() {
    // The kernel passes unknown `KEY=value` words of its command line to
    // init's environment, so `LOHAR_LOG=debug` there turns on debug logs.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOHAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    if tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init()
        .is_err()
    {
        eprintln!("lohar: logging was already set up");
    }
}

fn boot(started: Instant) -> Result<Booted, BootError> {
    set_process_name(c"lohar");
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        eprintln!("lohar: cannot route Ctrl-Alt-Del to SIGINT: {e}");
    }
    let step = |name: &str, t: &mut Instant| {
        tracing::info!(
            step = name,
            ms = t.elapsed().as_millis() as u64,
            "boot step"
        );
        *t = Instant::now();
    };
    let mut t = started;
    mounts::early()?;
    let release = modules::check_release()?;
    let n = modules::load_all(&release)?;
    step("modules", &mut t);
    tracing::debug!(modules = n, %release, "modules loaded");
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(BootError::io("read", "/proc/cmdline"))?;
    let netcfg = cmdline::NetConfig::from_cmdline(&cmdline)?;
    let found = disks::find(DEVICE_TIMEOUT)?;
    let drive = disks::read_config(&found.config)?;
    step("disks", &mut t);
    mounts::assemble_root(&found)?;
    mounts::switch_root()?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    mounts::late(guest::tty_gid(&group))?;
    if !drive.volumes.is_empty() {
        let devs = disks::find_volumes(&drive.volumes, DEVICE_TIMEOUT)?;
        mounts::mount_volumes(&drive.volumes, &devs)?;
    }
    step("root", &mut t);
    net::configure(&netcfg, DEVICE_TIMEOUT)?;
    guest::apply_identity(&drive.hostname, netcfg.ip, netcfg.dns)?;
    guest::write_files(&drive.files)?;
    step("net+config", &mut t);
    // The init command is PID 1's (once per boot), not the agent's, which
    // may be started again.
    // An OCI image's User and WorkingDir (docs/images.md): root and `/`
    // unless it says; the tiers keep uid 1000 (when it exists) and
    // /workspace.
    let (run_as, default_cwd) = match &drive.exec_defaults {
        None => (RunAs::Auto, WORKSPACE.to_string()),
        Some(d) => {
            let run_as = match &d.user {
                None => RunAs::Uid { uid: 0, gid: None },
                Some(u) => {
                    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
                    crate::identity::run_as_from_image(u, &passwd, &group).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "the image's User does not resolve; commands run as root");
                        RunAs::Uid { uid: 0, gid: None }
                    })
                }
            };
            (run_as, d.cwd.clone().unwrap_or_else(|| "/".to_string()))
        }
    };
    let config = AgentConfig {
        env: drive.env,
        // The daemon's utility VMs (a volume's tar) run commands as root;
        // else the image's user (above).
        run_as: if drive.agent_as_root {
            RunAs::Agent
        } else {
            run_as
        },
        default_cwd: Some(PathBuf::from(&default_cwd)),
        ..AgentConfig::default()
    };
    let boot_command = with_image_boot(drive.init, Path::new(IMAGE_BOOT)).and_then(|init| {
        // Root (a sandbox's `init`), or the image's User (its own
        // Entrypoint + Cmd); a User that does not resolve runs as root,
        // as execs do.
        let who = init
            .user
            .as_deref()
            .and_then(|u| {
                let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
                crate::identity::run_as_from_image(u, &passwd, &group)
                    .map_err(|e| tracing::warn!(error = %e, "the boot command's user does not resolve; it runs as root"))
                    .ok()
            })
            .map(Identity::resolve)
            .filter(|id| id.uid != 0)
            .unwrap_or_else(Identity::root);
        let cmd = BootCommand {
            argv: init.argv,
            cwd: PathBuf::from(init.cwd.unwrap_or(default_cwd)),
            // The sandbox's env, for its user.
            env: who.environment(&config, &BTreeMap::new(), false),
            user: (who.uid != 0).then(|| boot_command::RunUser {
                uid: who.uid,
                gid: who.gid,
                groups: who.groups.clone(),
            }),
        };
        start_boot_command(&cmd, Path::new(boot_command::LOG_PATH))
    });
    step("init command", &mut t);
    Ok(Booted {
        config,
        token: drive.token,
        boot_command,
    })
}

/// The image's own boot service: an executable file at this path in the
/// root (the `docker` tier's starts `dockerd`) runs at every boot as the
/// boot command, with the drive's `init` argv, if any, as its arguments
/// (it starts its services, then `exec "$@"`).
pub const IMAGE_BOOT: &str = "/etc/bhatti/boot";

/// The boot command: the drive's `init`, wrapped by the image's boot
/// service at `hook` when the image has one (a regular file with an
/// execute bit; a symlink is followed inside the guest's own root). An
/// `init` that runs as a user of its own (an OCI image's Entrypoint +
/// Cmd) is not wrapped: the service runs as root and could not switch.
fn with_image_boot(
    init: Option<proto::config_drive::InitCommand>,
    hook: &Path,
) -> Option<proto::config_drive::InitCommand> {
    use std::os::unix::fs::PermissionsExt;
    let runnable =
        std::fs::metadata(hook).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !runnable || init.as_ref().is_some_and(|i| i.user.is_some()) {
        return init;
    }
    let hook = hook.display().to_string();
    Some(match init {
        None => proto::config_drive::InitCommand {
            argv: vec![hook],
            cwd: None,
            user: None,
        },
        Some(i) => proto::config_drive::InitCommand {
            argv: std::iter::once(hook).chain(i.argv).collect(),
            cwd: i.cwd,
            user: None,
        },
    })
}

/// Starts the boot command; a failure is noted and the boot goes on.
fn start_boot_command(cmd: &BootCommand, log: &Path) -> Option<(Pid, RawFd)> {
    match boot_command::start(cmd) {
        Ok(started) => {
            let pid = started.child.id();
            boot_command::note(log, &format!("init started: pid {pid}, {:?}", cmd.argv));
            // PID 1 reaps it (see `supervise`); the handle is not needed.
            drop(started.child);
            Some((Pid::from_raw(pid as i32), started.output.into_raw_fd()))
        }
        Err(e) => {
            eprintln!("lohar: the init command did not start: {e}");
            boot_command::note(log, &format!("init did not start: {:?}: {e}", cmd.argv));
            None
        }
    }
}

/// Forks the agent process. PID 1 never starts a thread, so the child may
/// do anything after `fork`.
fn spawn_agent(booted: &Booted) -> Result<Pid, BootError> {
    // SAFETY: PID 1 is single-threaded (no runtime, no helper threads), so
    // the child starts with consistent allocator and libc state.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => Ok(child),
        Ok(ForkResult::Child) => {
            supervise::release_signals();
            set_process_name(c"lohar-agent");
            if let Some((_, fd)) = booted.boot_command {
                // SAFETY: this process's own copy of the descriptor PID 1
                // keeps open; nothing else in this process owns it.
                let output = unsafe { OwnedFd::from_raw_fd(fd) };
                boot_command::spawn_relay(
                    output,
                    PathBuf::from(boot_command::LOG_PATH),
                    boot_command::LOG_LIMIT,
                );
            }
            let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, AGENT_PORT));
            let code = match crate::server::serve_guest(
                booted.config.clone(),
                // A restored guest's new token outlives an agent restart.
                crate::reidentify::saved_token().unwrap_or_else(|| booted.token.clone()),
                addr,
                || {
                    eprintln!(
                        "lohar: agent ready on {addr}, {} ms after the kernel started",
                        uptime_ms()
                    );
                },
            ) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("lohar: agent failed: {e:#}");
                    1
                }
            };
            std::process::exit(code)
        }
        Err(e) => Err(BootError::Fork(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::config_drive::InitCommand;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_image_boot_service_wraps_the_drive_init() {
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("boot");
        let user = InitCommand {
            argv: vec!["sleep".into(), "1".into()],
            cwd: Some("/srv".into()),
            user: None,
        };
        // No hook, or one that is not executable: the drive's init as is.
        assert_eq!(
            with_image_boot(Some(user.clone()), &hook),
            Some(user.clone())
        );
        assert_eq!(with_image_boot(None, &hook), None);
        std::fs::write(&hook, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(with_image_boot(None, &hook), None);
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        assert_eq!(with_image_boot(None, &dir.path().join("dir")), None);
        // An executable hook: alone, or with the drive's argv after it.
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let h = hook.display().to_string();
        assert_eq!(
            with_image_boot(None, &hook),
            Some(InitCommand {
                argv: vec![h.clone()],
                cwd: None,
                user: None,
            })
        );
        assert_eq!(
            with_image_boot(Some(user), &hook),
            Some(InitCommand {
                argv: vec![h, "sleep".into(), "1".into()],
                cwd: Some("/srv".into()),
                user: None,
            })
        );
        // An image's own command, run as its user, is not wrapped.
        let image_cmd = InitCommand {
            argv: vec!["serve".into()],
            cwd: None,
            user: Some("app".into()),
        };
        assert_eq!(
            with_image_boot(Some(image_cmd.clone()), &hook),
            Some(image_cmd)
        );
    }
}
