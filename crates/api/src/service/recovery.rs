//! Startup recovery: what an earlier daemon process left behind.
//!
//! A sandbox that was `running` is adopted: cold ones from their snapshot,
//! hot or warm ones by snapshotting the VMM that outlived its daemon
//! (SIGKILL). Then core ends every VMM and removes every sandbox directory
//! that no row owns (a create, destroy or boot cut short), and every row
//! that is not running now is made to match what is on disk: `stopped`
//! when its disk is there (it boots again when next used), `failed` when
//! it is not (only destroy is left). Quotas count rows, so they stay
//! consistent with what exists.

use std::collections::BTreeSet;

use api_types::SandboxStatus;
use bhatti_core::SandboxId;
use image::disk::{CONFIG_DRIVE, SANDBOX_DISK};
use store::SandboxRow;

use super::lifecycle::not_running;
use super::persistence::Runtime;
use super::{Running, Service};
use crate::error::error_chain;
use crate::state::blocking;

impl Service {
    pub(super) async fn recover(&self) {
        let store = self.store.clone();
        let rows = match blocking(move || store.all_sandboxes()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read sandboxes for recovery");
                return;
            }
        };
        let mut owned = BTreeSet::new();
        let mut unsettled = Vec::new();
        for row in rows {
            let Ok(id) = row.id.parse::<SandboxId>() else {
                tracing::error!(sandbox = %row.id, "a row whose id is not a sandbox id; left alone");
                continue;
            };
            owned.insert(id.clone());
            let runtime = match Runtime::of(&row) {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(sandbox = %row.id, error = %e, "unreadable runtime record");
                    None
                }
            };
            if row.status == SandboxStatus::Running {
                if let Some(rt) = &runtime {
                    if self.adopt(&row, rt).await {
                        continue;
                    }
                }
            }
            unsettled.push((row, runtime));
        }
        // Nothing runs VMs yet but the adopted (cold) sandboxes: every
        // other VMM is an orphan, as is every directory without a row.
        match self.core.reap_orphans(&owned).await {
            Ok(reaped) => {
                if !reaped.vmms.is_empty() || !reaped.dirs.is_empty() {
                    tracing::warn!(
                        vmms = reaped.vmms.len(),
                        dirs = reaped.dirs.len(),
                        "removed what no row owns"
                    );
                }
            }
            Err(e) => tracing::error!(error = %error_chain(&e), "removing orphans"),
        }
        for (row, runtime) in unsettled {
            self.settle(&row, runtime.as_ref()).await;
        }
    }

    /// Adopts a row that was running; false when it cannot be (it is then
    /// settled like the rest).
    async fn adopt(&self, row: &SandboxRow, rt: &Runtime) -> bool {
        let orphan = match row.thermal {
            api_types::Thermal::Cold => false,
            api_types::Thermal::Hot | api_types::Thermal::Warm => true,
        };
        let adopted = if orphan {
            self.core.adopt_orphan(rt.core.clone()).await
        } else {
            self.core.adopt_cold(rt.core.clone()).await
        };
        let record = match adopted {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(
                    sandbox = %row.id,
                    error = %error_chain(&e),
                    "no usable snapshot; the sandbox boots again from its disk"
                );
                return false;
            }
        };
        tracing::info!(sandbox = %row.id, "recovered cold; wakes when next used");
        if let Err(e) = self.core.set_keep_hot(&record.id, row.keep_hot) {
            tracing::warn!(sandbox = %row.id, error = %e, "keep_hot");
        }
        let running = Running {
            user_id: row.user_id.clone(),
            name: row.name.clone(),
            secret_names: rt.secret_names.clone(),
        };
        self.index().insert(record.id.clone(), running.clone());
        if orphan {
            self.adopted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(record.id.clone());
        }
        if let Err(e) = self.persist_record(&running, &record).await {
            tracing::error!(sandbox = %row.id, error = %e, "recording a recovered sandbox");
        }
        true
    }

    /// Makes a row that is not running match what is on disk.
    async fn settle(&self, row: &SandboxRow, runtime: Option<&Runtime>) {
        let disk = runtime.map(|rt| {
            [SANDBOX_DISK, CONFIG_DRIVE]
                .iter()
                .all(|f| rt.core.dir.join(f).is_file())
        });
        let (status, reason) = match (row.status, disk) {
            (SandboxStatus::Failed, _) => return,
            (SandboxStatus::Stopped, Some(true)) => return,
            (_, Some(true)) => (
                SandboxStatus::Stopped,
                "the daemon restarted; the sandbox boots again when next used".to_string(),
            ),
            (SandboxStatus::Creating, None) => (
                SandboxStatus::Failed,
                "the daemon restarted while this sandbox was being created".to_string(),
            ),
            (_, _) => (
                SandboxStatus::Failed,
                format!(
                    "the daemon restarted and the sandbox's disk is gone (it was {})",
                    row.status
                ),
            ),
        };
        tracing::warn!(sandbox = %row.id, %status, "recovered after restart");
        let store = self.store.clone();
        let (sid, uid) = (row.id.clone(), row.user_id.clone());
        let detail = serde_json::json!({ "reason": reason });
        let update = not_running(status, &reason);
        let r = blocking(move || {
            store.update_sandbox(&sid, &update)?;
            store.record_event(&uid, Some(&sid), status.as_str(), &detail)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(sandbox = %row.id, error = %e, "cannot update sandbox status");
        }
    }
}
