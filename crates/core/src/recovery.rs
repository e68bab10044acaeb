//! Recovery at daemon start: sandboxes an earlier daemon process ran.
//!
//! * [`SandboxManager::adopt_cold`] — one that went cold (its snapshot is
//!   on disk): checked, its address and TAP taken again, cold until used.
//! * [`SandboxManager::adopt_orphan`] — one whose VMM outlived its daemon
//!   (SIGKILL while hot or warm): that VMM is snapshotted through its QMP
//!   socket and ends, and the sandbox is adopted cold.
//! * [`kill_orphan_vmm`] — a VMM left by an earlier daemon that is not to
//!   be adopted (its sandbox boots again from its disk, or is gone).
//! * [`SandboxManager::reap_orphans`] (`orphans.rs`) — after adoption:
//!   VMMs and sandbox directories that no sandbox owns (the store's rows,
//!   the registry) are killed and removed. (TAPs without a sandbox go when
//!   the manager starts.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{error_chain, CoreError, Result};
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

impl SandboxManager {
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
                &record.spec.egress,
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
