//! Daemon shutdown: every sandbox goes cold, all at once, each within
//! [`CoreConfig::shutdown_timeout`](crate::CoreConfig::shutdown_timeout).
//!
//! A sandbox that is not cold in time — a guest whose agent does not
//! answer the pre-snapshot `sync`, a VMM that does not answer, a snapshot
//! that fails — has its VMM killed and is reported as
//! [`Stopped::Killed`]: its disk is kept, so it boots again from it
//! ([`SandboxManager::boot_existing`]); the daemon records it `stopped`.
//! A create or boot in progress is cancelled (it undoes itself). No VMM
//! this process started outlives `stop_all`, except one that did not die
//! within its own bound after SIGKILL (reported as an error).
//!
//! The bound: `stop_all` returns within `shutdown_timeout` +
//! [`KILL_GRACE`] + the VMM's own wait after SIGKILL (10 s), however many
//! guests hang.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{error_chain, CoreError, Result};
use crate::id::SandboxId;
use crate::manager::SandboxManager;
use crate::record::SandboxRecord;
use crate::registry::Entry;
use crate::state::{SandboxState, ThermalState};
use crate::thermal::discard_snapshot;

/// How long shutdown waits, after killing a sandbox's VMM, for the
/// operation that held the sandbox (a wake, say) to give up.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// What daemon shutdown did with one running sandbox.
#[derive(Debug)]
pub enum Stopped {
    /// Snapshotted in time: cold, its VMM gone, its TAP removed, forgotten
    /// by this manager. Its directory holds the snapshot;
    /// [`SandboxManager::adopt_cold`] takes it back with its processes and
    /// memory.
    Cold(SandboxRecord),
    /// Not cold in time (or its snapshot failed): its VMM was killed, its
    /// TAP removed, and it was forgotten. Its directory and disk are kept,
    /// so [`SandboxManager::boot_existing`] boots it again (its processes
    /// start afresh): the daemon records it `stopped`.
    Killed {
        /// Its last record (no VMM).
        record: SandboxRecord,
        /// Why it could not go cold.
        reason: CoreError,
    },
}

impl SandboxManager {
    /// Daemon shutdown (see the module docs): every running sandbox goes
    /// cold or is killed, concurrently and within the documented bound;
    /// creates in progress are cancelled. Returns what became of each
    /// running sandbox, and the errors of those that could not even be
    /// killed or detached.
    pub async fn stop_all(&self) -> (Vec<Stopped>, Vec<(SandboxId, CoreError)>) {
        let limit = self.inner.config.shutdown_timeout;
        let deadline = Instant::now() + limit;
        let mut tasks = JoinSet::new();
        for entry in self.entries() {
            let mgr = self.clone();
            match entry.state() {
                SandboxState::Running => {
                    tasks.spawn(async move { mgr.stop_one(entry, deadline).await });
                }
                SandboxState::Creating => {
                    entry.cancel();
                    tasks.spawn(async move {
                        // The create undoes itself and lets go of the lock.
                        let id = entry.id.clone();
                        match tokio::time::timeout_at(deadline + KILL_GRACE, entry.lock()).await {
                            Ok(_) => None,
                            Err(_) => Some(Err((
                                id.clone(),
                                CoreError::TimedOut {
                                    id,
                                    operation: "cancel a create",
                                    after: limit + KILL_GRACE,
                                },
                            ))),
                        }
                    });
                }
                SandboxState::Failed | SandboxState::Destroying | SandboxState::Destroyed => {}
            }
        }
        let mut stopped = Vec::new();
        let mut failed = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Some(Ok(s))) => stopped.push(s),
                Ok(Some(Err(f))) => failed.push(f),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "a shutdown task failed"),
            }
        }
        (stopped, failed)
    }

    /// `None` when the sandbox turned out not to be running any more (a
    /// destroy got to it first).
    async fn stop_one(
        &self,
        entry: Arc<Entry>,
        deadline: Instant,
    ) -> Option<std::result::Result<Stopped, (SandboxId, CoreError)>> {
        let id = entry.id.clone();
        let limit = self.inner.config.shutdown_timeout;
        let timed_out = |operation| CoreError::TimedOut {
            id: id.clone(),
            operation,
            after: limit,
        };
        let mut cut = None;
        let life = match tokio::time::timeout_at(deadline, entry.lock()).await {
            Ok(life) => Some(life),
            Err(_) => {
                // Something holds the sandbox past the bound: it is told to
                // give up, its VMM goes, and it gets a little longer.
                cut = Some(timed_out("wait for the sandbox's running operation"));
                entry.cancel();
                if let Err(e) = self.kill_vm(&entry).await {
                    tracing::warn!(sandbox = %id, error = %error_chain(&e), "killing at shutdown");
                }
                tokio::time::timeout(KILL_GRACE, entry.lock()).await.ok()
            }
        };
        let Some(_life) = life else {
            return Some(Err((
                id.clone(),
                timed_out("wait for the sandbox's running operation"),
            )));
        };
        if entry.state() != SandboxState::Running {
            return None;
        }
        let frozen = match (entry.thermal(), cut) {
            (ThermalState::Cold, _) if entry.vm().is_none() => Ok(()),
            (_, Some(cut)) => Err(cut),
            (ThermalState::Hot | ThermalState::Warm | ThermalState::Cold, None) => {
                match tokio::time::timeout_at(deadline, self.freeze_locked(&entry)).await {
                    Ok(r) => r,
                    Err(_) => Err(timed_out("go cold at shutdown")),
                }
            }
        };
        let outcome = match frozen {
            Ok(()) => self.forget(&entry).await.map(|record| {
                tracing::info!(sandbox = %id, "cold at shutdown (directory kept)");
                Stopped::Cold(record)
            }),
            Err(reason) => {
                tracing::warn!(sandbox = %id, error = %error_chain(&reason), "not cold in time; killing its VMM");
                match self.kill_vm(&entry).await {
                    Ok(()) => self
                        .forget(&entry)
                        .await
                        .map(|record| Stopped::Killed { record, reason }),
                    Err(e) => Err(e),
                }
            }
        };
        Some(outcome.map_err(|e| (id, e)))
    }

    /// Kills the sandbox's VMM, if it has one; a snapshot it may have
    /// begun is discarded (the VM ran on past it).
    async fn kill_vm(&self, entry: &Entry) -> Result<()> {
        let Some(vm) = entry.take_vm() else {
            return Ok(());
        };
        discard_snapshot(entry);
        if vm.vmm.exit().is_some() {
            return Ok(());
        }
        vm.vmm
            .kill()
            .await
            .map(|exit| tracing::debug!(sandbox = %entry.id, %exit, "VMM killed"))
            .map_err(|source| CoreError::Vmm {
                id: entry.id.clone(),
                source,
            })
    }

    /// Removes the sandbox's TAP (its address stays in the record, for the
    /// next daemon) and forgets it; its directory is kept.
    async fn forget(&self, entry: &Entry) -> Result<SandboxRecord> {
        if let Some(att) = entry.read(|r| r.network.clone()) {
            self.detach(att).await?;
        }
        self.inner.registry.remove(entry);
        Ok(entry.record())
    }
}
