//! The sandbox's boot command (`init` on the config drive): what a
//! Dockerfile's `CMD` or a Fly machine's `init.cmd` is, for daemons such
//! as `dockerd`.
//!
//! In a VM, PID 1 starts it on every boot, before the agent ([`start`]):
//! as the agent's own user (root), in its own session (no controlling
//! terminal), stdin `/dev/null`, in `cwd` (default `/workspace`), with the
//! sandbox's environment. A snapshot restore is no boot: the command's
//! processes carry on and nothing starts again. Its stdout and stderr go
//! into a pipe whose read end PID 1 keeps for the life of the VM; every
//! agent process (PID 1 forks it, and again after a crash) copies what
//! arrives to [`LOG_PATH`] ([`relay`]), rotated to `LOG_PATH.1` at
//! [`LOG_LIMIT`], so the log never holds more than about twice that. A
//! slow or absent copier never kills the command: while the pipe is full
//! its writes wait. PID 1 also notes in the log when the command started
//! and how it ended ([`note`]). A command that cannot start is noted there
//! and on the console; the boot goes on (the agent never waits for it).
//!
//! `lohar serve` (test mode) starts it from the agent, as the agent's user.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// Where the command's output is kept in the guest.
pub const LOG_PATH: &str = "/var/log/bhatti-init.log";
/// The log is rotated (to `LOG_PATH.1`, replacing it) past this many bytes.
pub const LOG_LIMIT: u64 = 1 << 20;
/// Bytes copied per read.
const CHUNK: usize = 16 * 1024;

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCommand {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// The whole environment (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Who it runs as, when not its starter (an image's `User`).
    pub user: Option<RunUser>,
}

/// A user to switch to before the command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// A started boot command.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    /// The read end of its stdout and stderr (close-on-exec).
    pub output: OwnedFd,
}

/// Starts `cmd` in a session of its own with its output in a new pipe.
/// Called by PID 1 (single-threaded): the `pre_exec` step only makes
/// async-signal-safe calls.
pub fn start(cmd: &BootCommand) -> std::io::Result<Started> {
    let Some(program) = cmd.argv.first().filter(|p| !p.is_empty()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the boot command's argv is empty",
        ));
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut c = std::process::Command::new(program);
    c.args(&cmd.argv[1..])
        .env_clear()
        .envs(&cmd.env)
        .current_dir(&cmd.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write));
    let user = cmd.user.as_ref().map(|u| {
        (
            nix::unistd::Uid::from_raw(u.uid),
            nix::unistd::Gid::from_raw(u.gid),
            u.groups
                .iter()
                .map(|g| nix::unistd::Gid::from_raw(*g))
                .collect::<Vec<_>>(),
        )
    });
    // SAFETY: runs in the forked child before exec; setsid, sigprocmask,
    // setgroups, setgid and setuid are async-signal-safe and nothing is
    // allocated (the ids were prepared above).
    unsafe {
        c.pre_exec(move || {
            // PID 1 blocks the signals it waits for; the command must not
            // inherit that mask.
            let empty = nix::sys::signal::SigSet::empty();
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&empty),
                None,
            )?;
            nix::unistd::setsid()?;
            if let Some((uid, gid, groups)) = &user {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
    let child = c.spawn()?;
    // `c` holds the write ends until dropped: the relay must see EOF once
    // the command and its children have closed theirs.
    drop(c);
    Ok(Started {
        child,
        output: read,
    })
}

/// Appends `[bhatti] line` to the log at `path` (errors only on stderr).
pub fn note(path: &Path, line: &str) {
    let result = open_log(path).and_then(|mut f| writeln!(f, "[bhatti] {line}"));
    if let Err(e) = result {
        eprintln!("lohar: cannot write {}: {e}", path.display());
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
}

/// The log file being written, rotated at a size.
struct Log {
    path: PathBuf,
    limit: u64,
    file: Option<File>,
    size: u64,
}

impl Log {
    fn new(path: &Path, limit: u64) -> Log {
        Log {
            path: path.to_path_buf(),
            limit,
            file: None,
            size: 0,
        }
    }

    fn rotated_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Writes `data`, rotating first when the file is full; on an error
    /// the data is dropped and the file opened again next time.
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            let f = open_log(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if self.size >= self.limit {
            self.file = None;
            std::fs::rename(&self.path, self.rotated_path())?;
            self.file = Some(open_log(&self.path)?);
            self.size = 0;
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let written = f.write_all(data);
        if written.is_err() {
            self.file = None;
        }
        written?;
        self.size += data.len() as u64;
        Ok(())
    }
}

/// Copies the command's output from `output` to the log at `path` until
/// every writer has closed the pipe. Blocking: run it on a thread of its own.
pub fn relay(output: OwnedFd, path: &Path, limit: u64) {
    let mut pipe = File::from(output);
    let mut log = Log::new(path, limit);
    let mut buf = vec![0u8; CHUNK];
    let mut complained = false;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("lohar: reading the boot command's output: {e}");
                return;
            }
        };
        if let Err(e) = log.write(&buf[..n]) {
            // Disk full and the like: the output is dropped, the command
            // is never held up. Said once.
            if !complained {
                eprintln!("lohar: cannot write {}: {e}", path.display());
                complained = true;
            }
        }
    }
}

/// Starts the copier thread for `output`.
pub fn spawn_relay(output: OwnedFd, path: PathBuf, limit: u64) {
    let spawned = std::thread::Builder::new()
        .name("boot-log".into())
        .spawn(move || relay(output, &path, limit));
    if let Err(e) = spawned {
        eprintln!("lohar: cannot start the boot command's log copier: {e}");
    }
}

/// How the command ended, for its log.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("was killed by {s}"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        (None, None) => "ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, dir: &Path) -> BootCommand {
        BootCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: dir.to_path_buf(),
            user: None,
            env: BTreeMap::from([
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("GREETING".to_string(), "hello".to_string()),
            ]),
        }
    }

    #[test]
    fn runs_in_its_own_session_with_its_env_and_cwd_and_logs_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log/init.log");
        let script = "echo \"$GREETING from $(pwd)\"; echo to-stderr >&2; \
                      echo \"sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$\"; \
                      test -z \"$HOME\" && echo no-inherited-env; exit 3";
        let mut s = start(&sh(script, dir.path())).unwrap();
        let pid = s.child.id();
        note(&log, &format!("started (pid {pid})"));
        let status = s.child.wait().unwrap();
        relay(s.output, &log, LOG_LIMIT);
        note(&log, &describe_exit(status));
        let text = std::fs::read_to_string(&log).unwrap();
        let want = format!(
            "[bhatti] started (pid {pid})\nhello from {}\nto-stderr\nsid={pid} pid={pid}\n\
             no-inherited-env\n[bhatti] exited with code 3\n",
            dir.path().display()
        );
        assert_eq!(text, want);
    }

    #[test]
    fn runs_as_its_user_with_its_groups_when_given_one() {
        // Switching needs root (the suite runs as root; elsewhere the
        // positive control below still runs).
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("init.log");
        let ids = "echo \"$(id -u):$(id -g):$(id -G)\"";
        let mut s = start(&sh(ids, dir.path())).unwrap();
        assert!(s.child.wait().unwrap().success());
        relay(s.output, &log, LOG_LIMIT);
        let me = nix::unistd::geteuid().as_raw();
        let mine = std::fs::read_to_string(&log).unwrap();
        assert!(mine.starts_with(&format!("{me}:")), "{mine}");
        if me != 0 {
            return;
        }
        let mut cmd = sh(ids, dir.path());
        cmd.user = Some(RunUser {
            uid: 4321,
            gid: 4322,
            groups: vec![4322, 4323],
        });
        let log = dir.path().join("user.log");
        let mut s = start(&cmd).unwrap();
        assert!(s.child.wait().unwrap().success());
        relay(s.output, &log, LOG_LIMIT);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.trim(), "4321:4322:4322 4323");
    }

    #[test]
    fn the_relay_ends_only_when_every_writer_has_closed() {
        // The command exits at once; its background child writes later
        // and still reaches the log.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("init.log");
        let mut s = start(&sh("(sleep 0.3; echo late) & echo early", dir.path())).unwrap();
        assert!(s.child.wait().unwrap().success());
        relay(s.output, &log, LOG_LIMIT);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "early\nlate\n");
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = sh("true", dir.path());
        c.cwd = dir.path().join("missing");
        assert!(start(&c).is_err());
        c.cwd = dir.path().to_path_buf();
        c.argv = vec![];
        assert!(start(&c).is_err());
        c.argv = vec!["/nonexistent/program".into()];
        assert!(start(&c).is_err());
    }

    #[test]
    fn the_log_is_rotated_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("init.log");
        let limit = 64 * 1024;
        // 1 MiB of numbered lines through a real pipe.
        let script = "i=0; while [ $i -lt 100000 ]; do echo \"line $i\"; i=$((i+1)); done";
        let mut s = start(&sh(script, dir.path())).unwrap();
        relay(s.output, &log, limit);
        assert!(s.child.wait().unwrap().success());
        let current = std::fs::read_to_string(&log).unwrap();
        let older = std::fs::read_to_string(dir.path().join("init.log.1")).unwrap();
        for f in [&current, &older] {
            assert!(f.len() as u64 <= limit + CHUNK as u64, "{}", f.len());
        }
        assert!(current.ends_with("line 99999\n"));
        // Nothing lost at the rotation: the rotated file and the log hold
        // consecutive lines (the first one of the rotated file may be cut).
        let joined = older + &current;
        let numbers: Vec<u64> = joined
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(numbers.last(), Some(&99_999));
        assert!(numbers.len() as u64 > limit / 12, "{}", numbers.len());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "only the log and one rotated file"
        );
    }

    #[test]
    fn a_log_that_is_already_full_is_rotated_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.log");
        std::fs::write(&path, vec![b'x'; 100]).unwrap();
        let mut log = Log::new(&path, 100);
        log.write(b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(
            std::fs::read(dir.path().join("init.log.1")).unwrap().len(),
            100
        );
    }
}
