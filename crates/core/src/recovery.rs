//! Recovery at daemon start: sandboxes an earlier daemon process ran.
//!
//! * [`SandboxManager::adopt_cold`] — one that went cold (its snapshot is
//!   on disk): checked, its address and TAP taken again, cold until used.
//! * [`SandboxManager::adopt_orphan`] — one whose VMM outlived its daemon
//!   (SIGKILL while hot or warm): that VMM is snapshotted through its QMP
//!   socket and ends, and the sandbox is adopted cold.
//! * [`kill_orphan_vmm`] — a VMM left by an earlier daemon that is not to
//!   be adopted (its sandbox boots again from its disk, or is gone).
//! * [`SandboxManager::sweep_orphans`] — after adoption: VMMs and sandbox
//!   directories that no sandbox owns (the store's rows, the registry) are
//!   killed and removed. (TAPs without a sandbox go when the manager
//!   starts.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{error_chain, CoreError, Result};
use crate::id::SandboxId;
use crate::machine::{vm_spec, SNAPSHOT_DIR};
use crate::manager::SandboxManager;
use crate::record::SandboxRecord;
use crate::registry::Entry;
use crate::state::{SandboxState, ThermalState};
use crate::thermal::verify_snapshot;

/// Whether process `pid` is a VMM of the sandbox in `dir` (its command line
/// names the directory). A zombie (exited, not yet reaped) has an empty
/// command line and is not.
fn is_vmm_of(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        !c.is_empty() && String::from_utf8_lossy(&c).contains(&dir.display().to_string())
    })
}

/// Kills process `pid` with SIGKILL if it is a VMM of the sandbox in `dir`
/// (its command line names the directory — never another process that
/// reused the pid). Returns whether it killed one.
pub fn kill_orphan_vmm(pid: u32, dir: &Path) -> std::io::Result<bool> {
    if !is_vmm_of(pid, dir) {
        return Ok(false);
    }
    tracing::warn!(pid, dir = %dir.display(), "killing a VMM left by an earlier daemon");
    // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// What [`SandboxManager::sweep_orphans`] killed and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// VMM processes killed, with the sandbox each named.
    pub vmms: Vec<(u32, SandboxId)>,
    /// Sandbox directories removed.
    pub dirs: Vec<SandboxId>,
}

/// The sandbox ids a command line names as `<root>/<id>` followed by `/`,
/// a separator or its end.
fn ids_named(cmdline: &str, root: &str) -> BTreeSet<SandboxId> {
    let prefix = format!("{}/", root.trim_end_matches('/'));
    cmdline
        .match_indices(&prefix)
        .filter_map(|(at, _)| {
            let rest = &cmdline[at + prefix.len()..];
            let id = rest.get(..15)?;
            let ends = rest[15..]
                .chars()
                .next()
                .is_none_or(|c| matches!(c, '/' | ',' | ' ' | '\0' | '"' | '\''));
            if ends {
                id.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// Kills every process running `vmm_binary` whose command line names a
/// sandbox under `root` that `keep` does not, waits (10 s at most) until
/// they are gone, then removes every sandbox directory under `root` that
/// `keep` does not name. Blocking.
fn sweep(root: &Path, vmm_binary: &Path, keep: &dyn Fn(&SandboxId) -> bool) -> Swept {
    let mut swept = Swept::default();
    let exe = std::fs::canonicalize(vmm_binary).unwrap_or_else(|_| vmm_binary.to_path_buf());
    let root_text = root.display().to_string();
    let procs = match std::fs::read_dir("/proc") {
        Ok(rd) => rd.flatten().collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list processes; no VMM swept");
            Vec::new()
        }
    };
    for p in procs {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Processes come and go while we look; another user's exe is not
        // readable. Either way: not ours to kill.
        if std::fs::read_link(p.path().join("exe")).ok().as_deref() != Some(exe.as_path()) {
            continue;
        }
        let Ok(raw) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw);
        let Some(id) = ids_named(&cmdline, &root_text)
            .into_iter()
            .find(|id| !keep(id))
        else {
            continue;
        };
        tracing::warn!(pid, sandbox = %id, "killing a VMM no sandbox owns");
        // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
        if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(pid, error = %e, "killing an orphaned VMM");
            continue;
        }
        swept.vmms.push((pid, id));
    }
    // Gone, or a zombie (empty command line) that holds no file.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, _) in &swept.vmms {
        while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
            if Instant::now() >= deadline {
                tracing::warn!(pid, "an orphaned VMM outlives SIGKILL");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let dirs = match std::fs::read_dir(root) {
        Ok(rd) => rd.flatten().collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(root = %root.display(), error = %e, "cannot list sandbox directories");
            Vec::new()
        }
    };
    for d in dirs {
        let Some(id) = d
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<SandboxId>().ok())
        else {
            continue;
        };
        if keep(&id) {
            continue;
        }
        match image::destroy_sandbox_dir(root, &d.path()) {
            Ok(()) => {
                tracing::warn!(sandbox = %id, "removed a directory no sandbox owns");
                swept.dirs.push(id);
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %error_chain(&e), "removing an orphaned directory")
            }
        }
    }
    swept
}

impl SandboxManager {
    /// Startup cleanup, after adoption: kills every VMM of this engine
    /// whose command line names a sandbox directory (`DATA/sandboxes/<id>`)
    /// for an id neither in `keep` (the store's rows) nor in the registry,
    /// then removes every such directory. Failures are logged; what was
    /// killed and removed is returned.
    pub async fn sweep_orphans(&self, keep: BTreeSet<SandboxId>) -> Result<Swept> {
        let root = self.inner.config.data_layout().sandboxes_dir();
        let binary = self.inner.engine.choice().binary.clone();
        let mgr = self.clone();
        Ok(tokio::task::spawn_blocking(move || {
            sweep(&root, &binary, &|id| {
                keep.contains(id) || mgr.inner.registry.get(id).is_some()
            })
        })
        .await?)
    }

    /// Startup recovery of a sandbox whose VMM outlived an earlier daemon
    /// (killed with SIGKILL while the sandbox was hot or warm): that VMM
    /// (`record.vmm_pid`, only if its command line names the sandbox
    /// directory) is snapshotted through its QMP socket and ends, and the
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
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            return Err(fail(format!("VMM {pid} is gone")));
        }
        if !is_vmm_of(pid, &record.dir) {
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
        while is_vmm_of(pid, &record.dir) {
            if Instant::now() >= deadline {
                if let Err(e) = kill_orphan_vmm(pid, &record.dir) {
                    tracing::warn!(pid, error = %e, "killing the orphaned VMM");
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
        if self.inner.registry.get(&id).is_some() {
            return Err(CoreError::IdTaken(id));
        }
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
        let undo_attach = |att: net::Attachment| async move {
            if let Err(e) = self.detach(att).await {
                tracing::warn!(sandbox = %id, error = %e, "detaching a sandbox not adopted");
            }
        };
        let spec = vm_spec(&record.spec, &image, &record.dir, &att);
        let (dir, engine) = (record.dir.join(SNAPSHOT_DIR), self.inner.engine.kind());
        let checked =
            match tokio::task::spawn_blocking(move || verify_snapshot(&dir, engine, &spec)).await {
                Ok(c) => c,
                Err(e) => {
                    undo_attach(att).await;
                    return Err(e.into());
                }
            };
        if let Err(reason) = checked {
            undo_attach(att).await;
            return Err(CoreError::Restore {
                id: record.id.clone(),
                reason: format!("no usable snapshot: {reason}"),
                stderr_tail: String::new(),
            });
        }
        let record = SandboxRecord {
            state: SandboxState::Running,
            failure: None,
            network: Some(att.clone()),
            vmm_pid: None,
            engine: self.inner.engine.kind(),
            kernel_release: image.kernel_release.clone(),
            thermal: ThermalState::Cold,
            cold_wakes: 0,
            ..record
        };
        if let Err(e) = self
            .inner
            .registry
            .insert(Arc::new(Entry::new(record.clone())), false)
        {
            undo_attach(att).await;
            return Err(e);
        }
        tracing::info!(sandbox = %record.id, "adopted cold");
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SandboxId {
        format!("sb-{n:012x}").parse().unwrap()
    }

    #[test]
    fn command_lines_name_sandboxes_only_as_whole_path_components() {
        let root = "/d/sandboxes";
        let cmd = "qemu -drive file=/d/sandboxes/sb-000000000001/disk.ext4,if=virtio \
                   -serial file:/d/sandboxes/sb-000000000002/serial.log \
                   -x /d/sandboxes/sb-0000000000031/y /e/sandboxes/sb-000000000004/z \
                   /d/sandboxes/sb-000000000005";
        assert_eq!(
            ids_named(cmd, root),
            [id(1), id(2), id(5)].into_iter().collect::<BTreeSet<_>>()
        );
        assert!(ids_named("qemu /d/sandboxes/../etc", root).is_empty());
        assert_eq!(
            ids_named("a /d/sandboxes/sb-000000000001/x", "/d/sandboxes/").len(),
            1
        );
    }

    /// A process whose executable is the shell and whose command line names
    /// `path`; it waits on its stdin (a builtin: no child).
    fn holder(path: &Path) -> std::process::Child {
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("read x")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_sweep_kills_and_removes_only_what_no_sandbox_owns() {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("sandboxes");
        for n in [1, 2, 3] {
            std::fs::create_dir_all(root.join(id(n).as_str())).unwrap();
            std::fs::write(root.join(id(n).as_str()).join("disk.ext4"), b"x").unwrap();
        }
        std::fs::create_dir_all(root.join("not-a-sandbox")).unwrap();
        let mut kept = holder(&root.join(id(1).as_str()).join("disk.ext4"));
        let mut orphan = holder(&root.join(id(2).as_str()).join("disk.ext4"));
        // A sandbox named by another executable is left alone.
        let mut other = std::process::Command::new("tail")
            .arg("-f")
            .arg(root.join(id(3).as_str()).join("disk.ext4"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Control: both holders run the shell and name their sandbox.
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        for c in [&kept, &orphan] {
            let exe = std::fs::read_link(format!("/proc/{}/exe", c.id())).unwrap();
            assert_eq!(exe, sh);
        }

        let keep = [id(1)];
        let swept = sweep(&root, Path::new("/bin/sh"), &|i| keep.contains(i));
        assert_eq!(swept.vmms, vec![(orphan.id(), id(2))]);
        let mut dirs = swept.dirs.clone();
        dirs.sort();
        assert_eq!(dirs, vec![id(2), id(3)]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(orphan.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(
            kept.try_wait().unwrap().is_none(),
            "the kept holder was killed"
        );
        assert!(root.join(id(1).as_str()).join("disk.ext4").exists());
        assert!(root.join("not-a-sandbox").exists());
        assert!(!root.join(id(2).as_str()).exists());
        kept.kill().unwrap();
        kept.wait().unwrap();
        assert!(other.try_wait().unwrap().is_none(), "tail was killed");
        other.kill().unwrap();
        other.wait().unwrap();
        // Nothing left to do the second time.
        let again = sweep(&root, Path::new("/bin/sh"), &|i| keep.contains(i));
        assert_eq!(again, Swept::default());
    }
}
