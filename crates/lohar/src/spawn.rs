//! Building the command a request asks for: argv, environment, working
//! directory, user, and process group or session.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use proto::{ErrorCode, ExecRequest};

use crate::agent::Agent;
use crate::failure::Failure;
use crate::identity::Identity;

/// How the child is detached from the agent's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// Its own process group, so a kill reaches its whole tree.
    ProcessGroup,
    /// Its own session with the stdin pty as controlling terminal.
    TtySession,
}

/// A command ready to start, and how.
#[derive(Debug)]
pub struct Prepared {
    pub cmd: tokio::process::Command,
    /// Start it from the agent's spawner thread, which already has the
    /// command user's credentials (see `spawner.rs`).
    via_spawner: bool,
}

impl Prepared {
    pub async fn spawn(mut self, agent: &Agent) -> std::io::Result<tokio::process::Child> {
        match (&agent.spawner, self.via_spawner) {
            (Some(spawner), true) => spawner.spawn(self.cmd).await,
            _ => self.cmd.spawn(),
        }
    }
}

/// Validates the request and builds the command (stdio left to the caller).
pub fn command(agent: &Agent, req: &ExecRequest, grouping: Grouping) -> Result<Prepared, Failure> {
    let Some(program) = req.argv.first() else {
        return Err(Failure::bad_request("argv is empty"));
    };
    if program.is_empty() {
        return Err(Failure::bad_request("argv[0] is empty"));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(Failure::bad_request("argv contains a NUL byte"));
    }
    if req
        .env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(Failure::bad_request(
            "env names must be non-empty without '=' or NUL; values without NUL",
        ));
    }
    let id = &agent.identity;
    let cwd = working_dir(agent, req)?;
    let env = id.environment(&agent.config, &req.env, req.tty);
    let resolved = resolve_program(program, env.get("PATH").map(String::as_str), &cwd)?;
    let mut cmd = std::process::Command::new(resolved);
    cmd.arg0(program)
        .args(&req.argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(cwd);
    let mut via_spawner = false;
    match grouping {
        Grouping::ProcessGroup => {
            cmd.process_group(0);
            if id.switch {
                if agent.spawner.is_some() {
                    via_spawner = true;
                } else {
                    set_identity(&mut cmd, id.clone(), false);
                }
            }
        }
        Grouping::TtySession => set_identity(&mut cmd, id.clone(), true),
    }
    Ok(Prepared {
        cmd: tokio::process::Command::from(cmd),
        via_spawner,
    })
}

/// Looks `program` up in the command's own `PATH`, as `execvp` would.
///
/// Done here rather than by the standard library because a `Command` whose
/// environment sets `PATH` for a bare program name falls back from
/// `posix_spawn` to a full `fork`, which costs a large share of a short
/// exec. It also gives a clear error for a program that does not exist.
fn resolve_program(
    program: &str,
    path: Option<&str>,
    cwd: &std::path::Path,
) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(cwd.join(program));
    }
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    path.unwrap_or("/usr/bin:/bin")
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                cwd.to_path_buf()
            } else {
                cwd.join(dir)
            }
        })
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::SpawnFailed,
                format!("cannot run '{program}': not found in PATH"),
            )
        })
}

fn working_dir(agent: &Agent, req: &ExecRequest) -> Result<PathBuf, Failure> {
    let dir = match &req.cwd {
        Some(cwd) if !cwd.is_empty() => {
            let p = PathBuf::from(cwd);
            if p.is_absolute() {
                p
            } else {
                agent.identity.home.join(p)
            }
        }
        // No directory asked for: the configured one, else home, else `/`
        // (a user such as `nobody` has a home that does not exist).
        _ => {
            return Ok([
                agent.config.default_cwd.clone(),
                Some(agent.identity.home.clone()),
            ]
            .into_iter()
            .flatten()
            .find(|d| d.is_dir())
            .unwrap_or_else(|| PathBuf::from("/")))
        }
    };
    if !dir.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotFound,
            format!("working directory {} does not exist", dir.display()),
        ));
    }
    Ok(dir)
}

/// Switches user (and, for ttys, starts a session owning the pty) in the
/// child between fork and exec. Everything is computed before the fork:
/// the closure only makes async-signal-safe calls.
fn set_identity(cmd: &mut std::process::Command, id: Identity, tty: bool) {
    let groups: Vec<nix::unistd::Gid> = id
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let switch = id.switch;
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(id.uid),
        nix::unistd::Gid::from_raw(id.gid),
    );
    // SAFETY: the closure runs in the forked child before exec and only makes
    // raw system calls (setsid, ioctl, setgroups, setgid, setuid) that are
    // async-signal-safe; it allocates nothing (the group list was built before).
    unsafe {
        cmd.pre_exec(move || {
            if tty {
                nix::unistd::setsid()?;
                // fd 0 is the pty slave, placed there by Command.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if switch {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        });
    }
}

/// Exit status as the protocol reports it: the code, or `128 + n` for signal `n`.
pub fn exit_of(status: std::process::ExitStatus) -> proto::Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => proto::Exit {
            code,
            signal: None,
            timed_out: false,
        },
        (None, Some(sig)) => proto::Exit {
            code: 128 + sig,
            signal: Some(sig),
            timed_out: false,
        },
        (None, None) => proto::Exit {
            code: 255,
            signal: None,
            timed_out: false,
        },
    }
}

/// Signals a whole process group; a group that is already gone is not an error.
pub fn kill_group(pgid: u32, signal: nix::sys::signal::Signal) {
    let pgid = nix::unistd::Pid::from_raw(pgid as i32);
    if let Err(e) = nix::sys::signal::killpg(pgid, signal) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(%pgid, ?signal, error = %e, "killpg failed");
        }
    }
}

/// The message for a command that could not start.
pub fn spawn_failed(program: &str, e: &std::io::Error) -> Failure {
    Failure::new(
        ErrorCode::SpawnFailed,
        format!("cannot run '{program}': {e}"),
    )
}
