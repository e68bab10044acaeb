//! Recovery of what an earlier daemon process left behind.
//!
//! A daemon killed with SIGKILL leaves its VMMs running (they are in
//! process groups of their own) and its sandbox directories on disk. At
//! the next start, after the daemon has adopted what its store still owns
//! ([`SandboxManager::adopt_orphan`], [`SandboxManager::adopt_cold`]),
//! [`SandboxManager::reap_orphans`] ends every VMM process this process
//! does not run and removes every sandbox directory no owner claims. TAPs
//! need no pass of their own: network setup removes every TAP at start
//! (none is attached then), and adoption makes again those it keeps.
//!
//! A VMM is recognised by its executable being this daemon's engine binary
//! and its command line naming a directory under `DATA/sandboxes/` (its
//! disk, serial log and QMP socket live there). Any other process that
//! names such a directory (an operator's `tail -f` of a console log) is
//! left alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::id::SandboxId;
use crate::manager::SandboxManager;

/// How long a killed VMM may take to disappear (it holds its disk's lock).
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// What [`SandboxManager::reap_orphans`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// VMM processes killed: pid and the sandbox their command line names.
    pub vmms: Vec<(u32, SandboxId)>,
    /// Sandbox directories removed.
    pub dirs: Vec<PathBuf>,
}

/// Why leftovers could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    #[error("Listing processes")]
    ListProcesses(#[source] std::io::Error),
    #[error("Listing the sandboxes directory {path}")]
    ListSandboxes {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Killing VMM {pid} of sandbox {id}")]
    Kill {
        pid: u32,
        id: SandboxId,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM {pid} of sandbox {id} still runs {waited:?} after SIGKILL")]
    Survived {
        pid: u32,
        id: SandboxId,
        waited: Duration,
    },
    #[error("Removing the directory of sandbox {id}")]
    RemoveDir {
        id: SandboxId,
        #[source]
        source: Box<image::Error>,
    },
    #[error("Sandbox {0} is run by this daemon; destroy it instead")]
    Live(SandboxId),
    #[error("A recovery task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl SandboxManager {
    /// Ends every VMM process under this daemon's sandboxes directory that
    /// this process does not run, and removes every sandbox directory that
    /// is neither in `owned` (the store's rows) nor a sandbox this process
    /// has. Called once at start, after adoption and before any request.
    /// Every orphan is attempted; the first failure is returned after.
    pub async fn reap_orphans(&self, owned: &BTreeSet<SandboxId>) -> Result<Reaped, OrphanError> {
        let root = self.config().data_layout().sandboxes_dir();
        let binary = self.engine().binary.clone();
        let records = self.list();
        let running: BTreeSet<u32> = records.iter().filter_map(|r| r.vmm_pid).collect();
        let mut keep = owned.clone();
        keep.extend(records.into_iter().map(|r| r.id));
        tokio::task::spawn_blocking(move || reap(&root, &binary, &running, &keep)).await?
    }

    /// Removes what sandbox `id`, which this process does not run, left
    /// behind: a VMM whose command line names its directory, and the
    /// directory. Nothing there is fine.
    pub async fn purge(&self, id: &SandboxId) -> Result<(), OrphanError> {
        if self.list().iter().any(|r| &r.id == id) {
            return Err(OrphanError::Live(id.clone()));
        }
        let root = self.config().data_layout().sandboxes_dir();
        let binary = self.engine().binary.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let vmms: Vec<_> = vmm_processes(&root, &binary)?
                .into_iter()
                .filter(|(_, of)| *of == id)
                .collect();
            kill_all(&vmms)?;
            remove_dir(&root, &id)
        })
        .await?
    }
}

fn reap(
    root: &Path,
    binary: &Path,
    running: &BTreeSet<u32>,
    keep: &BTreeSet<SandboxId>,
) -> Result<Reaped, OrphanError> {
    let mut reaped = Reaped::default();
    let mut first: Option<OrphanError> = None;
    let orphans: Vec<_> = vmm_processes(root, binary)?
        .into_iter()
        .filter(|(pid, _)| !running.contains(pid))
        .collect();
    for (pid, id) in &orphans {
        tracing::warn!(pid, sandbox = %id, "killing a VMM this daemon does not run");
    }
    if let Err(e) = kill_all(&orphans) {
        first.get_or_insert(e);
    }
    reaped.vmms = orphans;

    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return finish(reaped, first),
        Err(source) => {
            return Err(OrphanError::ListSandboxes {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| OrphanError::ListSandboxes {
            path: root.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.parse::<SandboxId>().ok()) else {
            tracing::warn!(entry = ?name, "not a sandbox directory; left alone");
            continue;
        };
        if keep.contains(&id) {
            continue;
        }
        tracing::warn!(sandbox = %id, "removing a sandbox directory no row owns");
        match remove_dir(root, &id) {
            Ok(()) => reaped.dirs.push(entry.path()),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    finish(reaped, first)
}

fn finish(reaped: Reaped, first: Option<OrphanError>) -> Result<Reaped, OrphanError> {
    match first {
        None => Ok(reaped),
        Some(e) => Err(e),
    }
}

fn remove_dir(root: &Path, id: &SandboxId) -> Result<(), OrphanError> {
    image::destroy_sandbox_dir(root, &root.join(id.as_str())).map_err(|source| {
        OrphanError::RemoveDir {
            id: id.clone(),
            source: Box::new(source),
        }
    })
}

/// Every process running `binary` (the engine's VMM) whose command line
/// names a sandbox directory under `root`, with that sandbox's id.
pub fn vmm_processes(root: &Path, binary: &Path) -> Result<Vec<(u32, SandboxId)>, OrphanError> {
    let prefix = format!("{}/", root.display());
    let binary = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(OrphanError::ListProcesses)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end while we look: then it is no orphan.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let Some(id) = names_sandbox(&cmdline, &prefix) else {
            continue;
        };
        if runs(&entry.path(), &binary) {
            found.push((pid, id));
        } else {
            tracing::debug!(pid, sandbox = %id, "names a sandbox directory but is no VMM; left alone");
        }
    }
    Ok(found)
}

/// Whether the process at `/proc/<pid>` runs `binary`. A binary replaced
/// since the process started (a package upgrade) reads `… (deleted)`.
fn runs(proc_dir: &Path, binary: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else {
        return false;
    };
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    Path::new(exe) == binary
}

/// The sandbox a command line (NUL-separated) names under `prefix`.
fn names_sandbox(cmdline: &[u8], prefix: &str) -> Option<SandboxId> {
    let text = String::from_utf8_lossy(cmdline);
    text.match_indices(prefix).find_map(|(at, _)| {
        let rest = &text[at + prefix.len()..];
        let end = rest.find(['/', '\0', ',']).unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// SIGKILLs each process and waits until all are gone.
fn kill_all(vmms: &[(u32, SandboxId)]) -> Result<(), OrphanError> {
    for (pid, id) in vmms {
        let Ok(raw) = i32::try_from(*pid) else {
            continue;
        };
        // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
        if unsafe { libc::kill(raw, libc::SIGKILL) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::ESRCH) {
                return Err(OrphanError::Kill {
                    pid: *pid,
                    id: id.clone(),
                    source,
                });
            }
        }
    }
    let started = Instant::now();
    for (pid, id) in vmms {
        // Gone, or a zombie (empty command line) its parent has yet to reap.
        while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
            if started.elapsed() > EXIT_WAIT {
                return Err(OrphanError::Survived {
                    pid: *pid,
                    id: id.clone(),
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_name_their_sandbox() {
        let prefix = "/d/sandboxes/";
        let qemu =
            b"qemu-system-x86_64\0-drive\0file=/d/sandboxes/sb-0123456789ab/disk.ext4,if=none\0";
        assert_eq!(
            names_sandbox(qemu, prefix).unwrap().as_str(),
            "sb-0123456789ab"
        );
        for other in [
            &b"qemu\0-drive\0file=/e/sandboxes/sb-0123456789ab/disk.ext4"[..],
            b"qemu\0/d/sandboxes/sb-0123\0",
            b"qemu\0/d/sandboxes/../etc/x",
            b"bhatti\0serve\0--config\0/d/config.toml",
            b"",
        ] {
            assert_eq!(names_sandbox(other, prefix), None, "{other:?}");
        }
    }

    /// Kills its process when dropped (a failed assertion leaves none).
    struct Reap(std::process::Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            if let Err(e) = self.0.kill() {
                eprintln!("killing a test process: {e}");
            }
            if let Err(e) = self.0.wait() {
                eprintln!("reaping a test process: {e}");
            }
        }
    }

    /// A process that names `dir` and never forks (a forked shell child
    /// would carry the same command line for a moment and be seen too):
    /// `tail -F` of a file in it. `tail` is the engine's binary here.
    fn pretend_vmm(dir: &Path) -> Reap {
        let child = Reap(
            std::process::Command::new("tail")
                .arg("-F")
                .arg(dir.join("serial.log"))
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // `spawn` can return while the child is still inside execve (a
        // vfork-style spawn resumes the parent once the old memory is
        // released, before the new command line is in place): wait until
        // /proc shows the command line a VMM's would have.
        let want = dir.display().to_string();
        let cmdline = format!("/proc/{}/cmdline", child.0.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(&cmdline).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&want)) {
            assert!(
                std::time::Instant::now() < deadline,
                "tail never showed its command line"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn orphans_are_killed_and_their_directories_removed() {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("sandboxes");
        let (orphan, owned, stray): (SandboxId, SandboxId, SandboxId) = (
            "sb-00000000000a".parse().unwrap(),
            "sb-00000000000b".parse().unwrap(),
            "sb-00000000000c".parse().unwrap(),
        );
        for id in [&orphan, &owned, &stray] {
            std::fs::create_dir_all(root.join(id.as_str())).unwrap();
        }
        std::fs::create_dir_all(root.join("not-a-sandbox")).unwrap();
        // A process that names the orphan's directory, as a VMM does.
        let mut child = pretend_vmm(&root.join(orphan.as_str()));
        let pid = child.0.id();
        // One the daemon runs is left alone.
        let mut ours = pretend_vmm(&root.join(owned.as_str()));
        // An operator's shell given the orphan's console log is no VMM.
        let mut bystander = Reap(
            std::process::Command::new("sh")
                .args(["-c", "while :; do sleep 1; done"])
                .arg(root.join(orphan.as_str()).join("console.log"))
                .spawn()
                .unwrap(),
        );
        // The pretend VMMs run `tail`: the engine's binary here.
        let engine = Path::new("/usr/bin/tail");
        let keep = BTreeSet::from([owned.clone()]);
        // Reaping waits until the killed VMM is a zombie (an empty command
        // line), so it can run on this thread; the child is waited for after.
        // Were the orphan missed, the assertion fails (and `Reap` ends it)
        // rather than a wait hanging.
        let reaped = reap(&root, engine, &BTreeSet::from([ours.0.id()]), &keep).unwrap();
        assert_eq!(
            reaped.vmms,
            vec![(pid, orphan.clone())],
            "orphan {pid}: exe {:?}, cmdline {:?}",
            std::fs::read_link(format!("/proc/{pid}/exe")),
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).into_owned()),
        );
        let status = child.0.wait().unwrap();
        assert!(!status.success());
        assert_eq!(
            reaped.dirs.iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([&root.join(orphan.as_str()), &root.join(stray.as_str())])
        );
        assert!(root.join(owned.as_str()).is_dir());
        assert!(root.join("not-a-sandbox").is_dir());
        assert!(
            ours.0.try_wait().unwrap().is_none(),
            "the daemon's own VMM runs on"
        );
        assert!(
            bystander.0.try_wait().unwrap().is_none(),
            "a process that is not a VMM was killed"
        );
        drop(ours);
        drop(bystander);
        // Nothing left: a second pass finds nothing.
        let again = reap(&root, engine, &BTreeSet::new(), &keep).unwrap();
        assert_eq!(again, Reaped::default());
    }
}
