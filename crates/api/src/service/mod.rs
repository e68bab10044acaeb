//! The sandbox service: the store's rows (per user, persistent) over
//! core's sandboxes (per daemon process), under one id from the API to the
//! VMM. Handlers call this; it never sees HTTP.
//!
//! * [`startup`] — starting (engine, network, recovery, thermal tasks),
//!   `/health` and shutdown.
//! * [`recovery`] — what an earlier daemon process left: adopted, or made
//!   consistent, and its orphans removed.
//! * [`lifecycle`] — create, destroy, stop, start, booting a stopped
//!   sandbox again, and [`Service::find_awake`], the one lookup every
//!   guest operation starts with; each serialised per sandbox.
//! * [`persistence`] — the typed runtime record, status changes, events,
//!   and the recorder of thermal transitions.
//! * `publish` — ports under public aliases.
//! * `share` — share links of sandboxes' browser terminals.
//!
//! What is persisted: the API's view of each sandbox (name, size, status,
//! ip, labels) and core's record of its VM (directory, network attachment,
//! agent token), minus secret values — those are stored only encrypted, in
//! the secrets table, and looked up again by name when needed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use api_types::{PatchSandbox, Sandbox};
use bhatti_core::{SandboxId, SandboxManager};
use store::{SandboxRow, SandboxUpdate, Store, UserRecord};

use crate::config::DaemonConfig;
use crate::error::ApiError;
use crate::secrets::SecretBox;
use crate::state::blocking;

mod archive;
mod checkpoints;
mod guest;
mod images;
mod lifecycle;
mod persistence;
mod publish;
mod recovery;
mod share;
mod startup;
mod templates;
mod volumes;

pub use archive::VolumeExport;
pub use guest::{guest_error, KeepHot, ShellRequest};
pub use images::oci_error;
pub use startup::StartError;

/// A sandbox whose VM (hot, warm or cold) this process runs: the hot path
/// (exec, files) finds it here without a database read, and thermal
/// events find whose it is. Keyed by the sandbox's one id.
#[derive(Debug, Clone)]
struct Running {
    user_id: String,
    name: String,
    /// Secrets (by name) its env was given: kept out of the stored record.
    secret_names: Vec<String>,
}

/// The sandboxes this process runs, by id.
type Index = Arc<Mutex<HashMap<SandboxId, Running>>>;

#[derive(Debug)]
pub struct Service {
    config: Arc<DaemonConfig>,
    store: Arc<Store>,
    secrets: Arc<SecretBox>,
    core: SandboxManager,
    running: Index,
    /// One lock per sandbox: create, boot, stop, start and destroy of one
    /// sandbox run one at a time.
    locks: lifecycle::Locks,
    /// Sandboxes whose VM core is creating now: a destroy asks core to
    /// stop that create rather than wait for it.
    creating: Mutex<HashSet<SandboxId>>,
    /// Sandboxes recovery adopted by snapshotting a VMM that outlived its
    /// daemon, not yet woken since: if that snapshot does not restore,
    /// they boot from their disk instead.
    adopted: Mutex<HashSet<SandboxId>>,
    /// Templates being made (their directories), one at a time each.
    warming: Mutex<HashSet<String>>,
    /// The thermal ticker and the task recording its events.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Sandbox names by user and address, for the gateway's DNS responder.
    names: Arc<crate::network::GuestNames>,
    /// The daemon's metrics (`GET /metrics`).
    metrics: Arc<crate::observe::Metrics>,
    /// Volumes a utility VM (tar export or import) has now.
    volume_jobs: archive::VolumeJobs,
    /// Image pulls, imports and saves running or recently finished.
    image_tasks: images::Tasks,
}

impl Service {
    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<crate::observe::Metrics> {
        &self.metrics
    }

    /// The pids of the VMMs this process runs now.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let ids: Vec<SandboxId> = self.index().keys().cloned().collect();
        ids.iter()
            .filter_map(|id| self.core.get(id).ok()?.vmm_pid)
            .collect()
    }
}

/// Builds the API's view of a stored sandbox.
pub fn view(r: &SandboxRow) -> Sandbox {
    Sandbox {
        id: r.id.clone(),
        name: r.name.clone(),
        image: r.image.clone(),
        cpus: r.cpus,
        memory_mb: r.memory_mb,
        disk_size_mb: r.disk_mb,
        status: r.status,
        status_reason: r.status_reason.clone(),
        thermal: r.thermal,
        thermal_since: r.thermal_since,
        ip: r.ip.clone(),
        keep_hot: r.keep_hot,
        labels: r.labels.clone(),
        created_at: r.created_at,
        // Filled in by the calls that show them (get, list).
        published: Vec::new(),
        egress: r.egress.clone(),
        init: init_of(r),
    }
}

/// The boot command in a row's runtime record (core's spec), as shown.
fn init_of(r: &SandboxRow) -> Option<String> {
    let init = r.runtime.as_ref()?.pointer("/core/spec/init")?;
    let cmd: proto::config_drive::InitCommand = serde_json::from_value(init.clone()).ok()?;
    Some(crate::validate::init_view(&cmd))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// The core id of a stored row (rows and core share one id).
fn sandbox_id(row: &SandboxRow) -> Result<SandboxId, ApiError> {
    row.id
        .parse()
        .map_err(|e| ApiError::Internal(format!("stored sandbox id: {e}")))
}

impl Service {
    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sandbox of `user` this process runs, by id or name.
    fn running_lookup(&self, user_id: &str, key: &str) -> Option<SandboxId> {
        let index = self.index();
        if let Ok(id) = key.parse::<SandboxId>() {
            if index.get(&id).is_some_and(|r| r.user_id == user_id) {
                return Some(id);
            }
        }
        index
            .iter()
            .find(|(_, r)| r.user_id == user_id && r.name == key)
            .map(|(id, _)| id.clone())
    }

    /// The id of a sandbox this process runs, by its stored id.
    fn running_id(&self, sid: &str) -> Option<SandboxId> {
        let id = sid.parse::<SandboxId>().ok()?;
        self.index().contains_key(&id).then_some(id)
    }

    pub async fn list(&self, user: &UserRecord) -> Result<Vec<Sandbox>, ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let rows = blocking(move || store.sandboxes_of(&uid)).await?;
        self.all_with_published(user, rows.iter().map(view).collect())
            .await
    }

    /// A sandbox row of `user` by id or name.
    async fn row(&self, user: &UserRecord, id: &str) -> Result<SandboxRow, ApiError> {
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), id.to_string());
        blocking(move || store.sandbox(&uid, &key))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no sandbox '{id}'")))
    }

    pub async fn get(&self, user: &UserRecord, id: &str) -> Result<Sandbox, ApiError> {
        self.with_published(view(&self.row(user, id).await?)).await
    }

    pub async fn patch(
        &self,
        user: &UserRecord,
        id: &str,
        p: PatchSandbox,
    ) -> Result<Sandbox, ApiError> {
        if let Some(labels) = &p.labels {
            check_labels(labels)?;
        }
        let egress = p.egress.as_ref().map(crate::validate::egress).transpose()?;
        if let Some(mb) = p.disk_size_mb {
            self.check_disk_size(mb)?;
        }
        let mut row = self.row(user, id).await?;
        if let Some(mb) = p.disk_size_mb {
            row = self.grow_disk(user, &row, mb).await?;
        }
        if let Some(egress) = egress {
            row = self.set_egress(user, &row, egress).await?;
        }
        if let (Some(keep_hot), Some(id)) = (p.keep_hot, self.running_id(&row.id)) {
            self.core.set_keep_hot(&id, keep_hot)?;
        }
        let update = SandboxUpdate {
            keep_hot: p.keep_hot,
            labels: p.labels,
            ..Default::default()
        };
        let updated = self.save(&row.id, update).await?;
        Ok(view(&updated))
    }
}

impl Service {
    /// Gives a sandbox a new egress policy: in force at once when its VM
    /// runs here (its TAP's guard is replaced), and in its stored record
    /// for every later boot either way. Under the sandbox's lock, so no
    /// create, boot or destroy is half-way.
    async fn set_egress(
        &self,
        user: &UserRecord,
        row: &SandboxRow,
        egress: net::Egress,
    ) -> Result<SandboxRow, ApiError> {
        let sid = sandbox_id(row)?;
        let _lock = self.locks.lock(&sid).await;
        let row = self.row(user, &row.id).await?;
        let shown = Some(crate::validate::egress_view(&egress));
        let running = self.index().get(&sid).cloned();
        let update = match running {
            Some(running) => {
                self.core.set_egress(&sid, egress).await?;
                let record = self.core.get(&sid)?;
                SandboxUpdate {
                    egress: shown,
                    ..persistence::record_update(&running, &record)?
                }
            }
            None => {
                let runtime = match persistence::Runtime::of(&row) {
                    Ok(Some(mut rt)) => {
                        rt.core.spec.egress = egress;
                        Some(rt.to_value()?)
                    }
                    Ok(None) => None,
                    Err(e) => {
                        return Err(ApiError::Internal(format!(
                            "stored runtime of {}: {e}",
                            row.id
                        )))
                    }
                };
                SandboxUpdate {
                    egress: shown,
                    runtime,
                    ..Default::default()
                }
            }
        };
        let row = self.save(&row.id, update).await?;
        self.event(
            user,
            &row.id,
            "egress",
            serde_json::json!({ "egress": row.egress }),
        )
        .await;
        Ok(row)
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::BadRequest("at most 64 labels".into()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 63 || v.len() > 256 {
            return Err(ApiError::BadRequest(format!(
                "label '{k}': keys are 1-63 bytes, values at most 256"
            )));
        }
    }
    Ok(())
}
