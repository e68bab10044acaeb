//! What the store keeps of a sandbox's VM, and the writes that keep it
//! current: the typed runtime record (serialised whole, never edited by
//! key), status changes, events, and the recorder of thermal transitions.

use std::sync::Arc;

use api_types::{SandboxStatus, Thermal};
use bhatti_core::{SandboxId, SandboxManager, SandboxRecord, ThermalEvent, ThermalEventKind};
use serde::{Deserialize, Serialize};
use store::{SandboxRow, SandboxUpdate, Store, UserRecord};

use super::{Index, Running, Service};
use crate::error::ApiError;
use crate::state::blocking;

/// The `runtime` column: core's record of the sandbox's VM and the names
/// of the secrets its env was given. Secret values never reach it: the
/// record's env is the plain variables only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Runtime {
    pub(super) core: SandboxRecord,
    pub(super) secret_names: Vec<String>,
}

impl Runtime {
    /// The record to store for `record`, its secret variables left out.
    pub(super) fn new(record: &SandboxRecord, secret_names: &[String]) -> Runtime {
        let mut core = record.clone();
        core.spec.env.retain(|k, _| !secret_names.contains(k));
        Runtime {
            core,
            secret_names: secret_names.to_vec(),
        }
    }

    /// A row's record; `None` when its VM was never created.
    pub(super) fn of(row: &SandboxRow) -> Result<Option<Runtime>, serde_json::Error> {
        row.runtime
            .as_ref()
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
    }

    pub(super) fn to_value(&self) -> Result<serde_json::Value, ApiError> {
        serde_json::to_value(self)
            .map_err(|e| ApiError::Internal(format!("serialising a runtime record: {e}")))
    }
}

/// Core's thermal state as the API's.
pub(super) fn thermal(t: bhatti_core::ThermalState) -> Thermal {
    match t {
        bhatti_core::ThermalState::Hot => Thermal::Hot,
        bhatti_core::ThermalState::Warm => Thermal::Warm,
        bhatti_core::ThermalState::Cold => Thermal::Cold,
    }
}

/// The update that writes a core record whole: runtime, thermal, address.
pub(super) fn record_update(
    running: &Running,
    record: &SandboxRecord,
) -> Result<SandboxUpdate, ApiError> {
    Ok(SandboxUpdate {
        // An open breaker is why the sandbox answers 503: the row says so
        // (a start that succeeds clears it; see `Service::start_sandbox`).
        status_reason: record.breaker.as_ref().map(|b| {
            Some(format!(
                "waking it failed ({b}); POST /sandboxes/{}/start?force=true tries again",
                record.id
            ))
        }),
        thermal: Some(thermal(record.thermal)),
        ip: Some(record.network.as_ref().map(|a| a.ip.to_string())),
        runtime: Some(Runtime::new(record, &running.secret_names).to_value()?),
        ..Default::default()
    })
}

impl Service {
    /// Applies `update` to row `sid` (one statement).
    pub(super) async fn save(
        &self,
        sid: &str,
        update: SandboxUpdate,
    ) -> Result<SandboxRow, ApiError> {
        let store = self.store.clone();
        let sid = sid.to_string();
        blocking(move || store.update_sandbox(&sid, &update)).await
    }

    /// Writes core's current record of a sandbox this process runs.
    pub(super) async fn persist(&self, id: &SandboxId) -> Result<SandboxRow, ApiError> {
        let running = self
            .index()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::Unavailable(format!("sandbox {id} has no VM here")))?;
        let record = self.core.get(id)?;
        self.persist_record(&running, &record).await
    }

    /// Writes `record` to its row.
    pub(super) async fn persist_record(
        &self,
        running: &Running,
        record: &SandboxRecord,
    ) -> Result<SandboxRow, ApiError> {
        self.save(record.id.as_str(), record_update(running, record)?)
            .await
    }

    /// Sets a row's status (and reason) and records the event of that name.
    /// Failures are logged: the caller has a more important error to report.
    pub(super) async fn set_status(
        &self,
        user_id: &str,
        sid: &str,
        status: SandboxStatus,
        reason: Option<&str>,
    ) {
        let update = SandboxUpdate {
            status: Some(status),
            status_reason: Some(reason.map(String::from)),
            thermal: (status != SandboxStatus::Running).then_some(Thermal::Cold),
            ..Default::default()
        };
        let store = self.store.clone();
        let (s, uid) = (sid.to_string(), user_id.to_string());
        let detail = serde_json::json!({ "reason": reason });
        let r = blocking(move || {
            store.update_sandbox(&s, &update)?;
            store.record_event(&uid, Some(&s), status.as_str(), &detail)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(sandbox = %sid, error = %e, "cannot update sandbox status");
        }
    }

    /// Marks a sandbox `failed`, forgetting its VM.
    pub(super) async fn mark_failed(&self, user: &UserRecord, sid: &str, reason: &str) {
        if let Ok(id) = sid.parse::<SandboxId>() {
            self.index().remove(&id);
        }
        self.set_status(&user.id, sid, SandboxStatus::Failed, Some(reason))
            .await;
    }

    pub(super) async fn event(
        &self,
        user: &UserRecord,
        sid: &str,
        kind: &str,
        detail: serde_json::Value,
    ) {
        let store = self.store.clone();
        let (uid, s, k) = (user.id.clone(), sid.to_string(), kind.to_string());
        if let Err(e) = blocking(move || store.record_event(&uid, Some(&s), &k, &detail)).await {
            tracing::warn!(sandbox = %sid, error = %e, "cannot record event");
        }
    }
}

/// Records thermal events as they come: the row's thermal column and its
/// runtime record (core's current one, written whole — a restore starts a
/// new VMM, so recovery after a crash must find the right pid), and an
/// event (`warm`, `hot`, `cold`, `restore_failed`, `breaker_closed`).
pub(super) async fn record_thermal(
    mut events: tokio::sync::mpsc::UnboundedReceiver<ThermalEvent>,
    store: Arc<Store>,
    core: SandboxManager,
    running: Index,
    metrics: Arc<crate::observe::Metrics>,
) {
    while let Some(ev) = events.recv().await {
        let from = match &ev.kind {
            ThermalEventKind::Hot { from } => from.to_string(),
            _ => String::new(),
        };
        metrics.thermal(ev.kind.name(), &from, ev.took.as_secs_f64());
        let found = running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ev.id)
            .cloned();
        let Some(owner) = found else {
            continue;
        };
        let took_ms = ev.took.as_millis() as u64;
        let detail = match &ev.kind {
            ThermalEventKind::Cold { state_bytes } => {
                serde_json::json!({ "took_ms": took_ms, "state_bytes": state_bytes })
            }
            ThermalEventKind::Hot { from } => {
                serde_json::json!({ "took_ms": took_ms, "from": from.to_string() })
            }
            ThermalEventKind::RestoreFailed { reason } => {
                serde_json::json!({ "took_ms": took_ms, "reason": reason })
            }
            ThermalEventKind::Warm | ThermalEventKind::BreakerClosed => {
                serde_json::json!({ "took_ms": took_ms })
            }
        };
        // Core's record now (it may be past this event already).
        let update = match core.get(&ev.id) {
            Ok(record) => match record_update(&owner, &record) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!(sandbox = %ev.id, error = %e, "recording a thermal event");
                    None
                }
            },
            Err(_) => None,
        };
        let (sid, kind) = (ev.id.to_string(), ev.kind.name());
        let store = store.clone();
        let r = blocking(move || {
            if let Some(update) = update {
                match store.update_sandbox(&sid, &update) {
                    // Destroyed meanwhile.
                    Ok(_) | Err(store::StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            store.record_event(&owner.user_id, Some(&sid), kind, &detail)?;
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(sandbox = %ev.id, error = %e, "recording a thermal event");
        }
    }
}
