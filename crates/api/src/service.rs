//! The sandbox service: the store's records (per user, persistent) over
//! core's running VMs (per daemon process). Handlers call this; it never
//! sees HTTP.
//!
//! What is persisted: the API's view of each sandbox (name, size, status,
//! ip, labels) and core's record of its VM (directory, network attachment,
//! agent token), minus secret values — those are stored only encrypted, in
//! the secrets table, and looked up again by name when needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use agent_client::AgentClient;
use api_types::{CreateSandbox, PatchSandbox, Sandbox};
use bhatti_core::{
    CoreConfig, CoreError, SandboxId, SandboxManager, SandboxRecord, SandboxSpec, Stopped,
    ThermalEvent, ThermalEventKind, ThermalPolicy, ThermalState,
};
use serde::{Deserialize, Serialize};
use store::{NewSandbox, SandboxUpdate, Store, UserRecord};

use crate::config::DaemonConfig;
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;
use crate::secrets::SecretBox;
use crate::state::blocking;

mod publish;

/// Statuses the API shows.
pub mod status {
    pub const CREATING: &str = "creating";
    pub const RUNNING: &str = "running";
    /// Its VM is not running (the daemon stopped); its disk is kept and the
    /// next operation that needs the guest boots it again.
    pub const STOPPED: &str = "stopped";
    pub const FAILED: &str = "failed";
}

/// A sandbox whose VM this process runs.
#[derive(Debug, Clone)]
struct Live {
    core: SandboxId,
    user_id: String,
    name: String,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What the store keeps of a sandbox's VM (`runtime` column).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Runtime {
    /// Core's record, with the spec's env reduced to the plain variables.
    core: SandboxRecord,
    /// Secrets (by name) the sandbox's env was given.
    secret_names: Vec<String>,
}

#[derive(Debug)]
pub struct Service {
    config: Arc<DaemonConfig>,
    store: Arc<Store>,
    secrets: Arc<SecretBox>,
    core: SandboxManager,
    /// The VMs this process runs, by store id: the hot path (exec, files)
    /// finds its sandbox here without a database read.
    live: Arc<Mutex<HashMap<String, Live>>>,
    /// The thermal ticker and the task recording its events.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Serialises boots of one stopped sandbox, so concurrent requests
    /// wait for one boot instead of starting several.
    booting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sandbox names by user and address, for the gateway's DNS responder.
    names: Arc<crate::network::GuestNames>,
}

fn engine_preference(s: &str) -> vmm::EnginePreference {
    match s {
        "firecracker" => vmm::EnginePreference::Firecracker,
        "qemu-kvm" => vmm::EnginePreference::QemuKvm,
        "qemu-tcg" => vmm::EnginePreference::QemuTcg,
        _ => vmm::EnginePreference::Auto,
    }
}

/// Builds the API's view of a stored sandbox.
pub fn view(r: &store::SandboxRecord) -> Sandbox {
    Sandbox {
        id: r.id.clone(),
        name: r.name.clone(),
        image: r.image.clone(),
        cpus: r.cpus,
        memory_mb: r.memory_mb,
        status: r.status.clone(),
        status_reason: r.status_reason.clone(),
        thermal: r.thermal.clone(),
        thermal_since: r.thermal_since,
        ip: r.ip.clone(),
        keep_hot: r.keep_hot,
        labels: r.labels.clone(),
        created_at: r.created_at,
        // Filled in by the calls that show them (get, list).
        published: Vec::new(),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Maps core's errors to API errors: what the caller asked for wrong is a
/// 400, a sandbox that died or never booted a 502.
fn core_error(e: CoreError) -> ApiError {
    match &e {
        CoreError::InvalidSpec(_) | CoreError::Image(_) => ApiError::BadRequest(error_chain(&e)),
        CoreError::NotFound(_) => ApiError::Unavailable(format!(
            "the sandbox's VM is not running: {}",
            error_chain(&e)
        )),
        CoreError::Agent { source, .. } => ApiError::from(clone_client_error(source)),
        CoreError::BreakerOpen { .. } => ApiError::Unavailable(error_chain(&e)),
        _ => ApiError::BadGateway(error_chain(&e)),
    }
}

fn clone_client_error(e: &agent_client::ClientError) -> agent_client::ClientError {
    match e {
        agent_client::ClientError::Agent { code, message } => agent_client::ClientError::Agent {
            code: *code,
            message: message.clone(),
        },
        other => agent_client::ClientError::InvalidRequest(error_chain(other)),
    }
}

impl Service {
    /// Picks the engine, sets up the network and recovers what the store
    /// says existed before this process.
    pub async fn start(
        config: Arc<DaemonConfig>,
        store: Arc<Store>,
        secrets: Arc<SecretBox>,
    ) -> Result<Service, StartError> {
        let mut core_config = CoreConfig::new(&config.data_dir);
        core_config.engine = engine_preference(&config.engine);
        core_config.unique_names = false;
        core_config.confinement = config.confinement.to_vmm();
        core_config.thermal = thermal_policy(&config.thermal);
        core_config.group_networks = Some(
            config
                .network
                .group_networks()
                .map_err(StartError::Config)?,
        );
        let core = tokio::task::spawn_blocking(move || {
            SandboxManager::new(core_config, Arc::new(net::IpRoute::new("ip")))
        })
        .await
        .map_err(|e| StartError::Config(format!("setting up the VM layer: {e}")))??;
        let service = Service {
            config,
            store,
            secrets,
            core,
            live: Arc::new(Mutex::new(HashMap::new())),
            tasks: Mutex::new(Vec::new()),
            booting: Mutex::new(HashMap::new()),
            names: Arc::default(),
        };
        let events = service.core.subscribe_thermal();
        let net_tasks = crate::network::start(
            &service.config,
            service.store.clone(),
            service.names.clone(),
            &service.core,
        )
        .await?;
        service.recover().await;
        let recorder = tokio::spawn(record_thermal(
            events,
            service.store.clone(),
            service.live.clone(),
        ));
        let ticker = service.core.spawn_thermal();
        service
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([recorder, ticker]);
        service
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(net_tasks);
        Ok(service)
    }

    /// `/health`'s answer.
    pub fn health(&self) -> api_types::Health {
        let engine = self.core.engine();
        let (engine_name, accelerator) = match engine.kind {
            vmm::EngineKind::Firecracker => ("firecracker", "kvm"),
            vmm::EngineKind::QemuKvm => ("qemu", "kvm"),
            vmm::EngineKind::QemuTcg => ("qemu", "tcg"),
            vmm::EngineKind::Fake => ("fake", "none"),
        };
        api_types::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            engine: engine_name.into(),
            accelerator: accelerator.into(),
            engine_reason: engine.reason.clone(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live sandbox of `user` by id or name.
    fn live_lookup(&self, user_id: &str, key: &str) -> Option<(String, Live)> {
        let live = self.live();
        if let Some(l) = live.get(key).filter(|l| l.user_id == user_id) {
            return Some((key.to_string(), l.clone()));
        }
        live.iter()
            .find(|(_, l)| l.user_id == user_id && l.name == key)
            .map(|(id, l)| (id.clone(), l.clone()))
    }

    /// Startup recovery: a sandbox whose VM belonged to an earlier daemon
    /// process is not running now. It becomes `stopped` (its disk is kept,
    /// and the next operation that needs the guest boots it again); a VMM
    /// that outlived its daemon (kill -9) is killed first.
    async fn recover(&self) {
        let store = self.store.clone();
        let rows = match blocking(move || store.all_sandboxes()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read sandboxes for recovery");
                return;
            }
        };
        for row in rows {
            if row.status == status::FAILED || row.status == status::STOPPED {
                continue;
            }
            let runtime = serde_json::from_value::<Runtime>(row.runtime.clone()).ok();
            if row.status == status::RUNNING {
                if let Some(rt) = &runtime {
                    // Cold: the snapshot is on disk. Hot or warm: its VMM
                    // outlived the daemon (SIGKILL); snapshot it first.
                    let adopted = if row.thermal == "cold" {
                        self.core.adopt_cold(rt.core.clone()).await
                    } else {
                        self.core.adopt_orphan(rt.core.clone()).await
                    };
                    match adopted {
                        Ok(record) => {
                            tracing::info!(sandbox = %row.id, "recovered cold; wakes when next used");
                            self.live().insert(
                                row.id.clone(),
                                Live {
                                    core: record.id.clone(),
                                    user_id: row.user_id.clone(),
                                    name: row.name.clone(),
                                },
                            );
                            if let Err(e) = self.core.set_keep_hot(&record.id, row.keep_hot) {
                                tracing::warn!(sandbox = %row.id, error = %e, "keep_hot");
                            }
                            if let Err(e) = persist(&self.store, &row.id, &record).await {
                                tracing::error!(sandbox = %row.id, error = %e, "recording a recovered sandbox");
                            }
                            continue;
                        }
                        Err(e) => tracing::warn!(
                            sandbox = %row.id,
                            error = %error_chain(&e),
                            "no usable snapshot; the sandbox boots again from its disk"
                        ),
                    }
                }
            }
            if let Some(pid) = runtime.as_ref().and_then(|rt| rt.core.vmm_pid) {
                if let Some(rt) = &runtime {
                    kill_orphan_vmm(pid, &rt.core.dir);
                }
            }
            let (new_status, reason) = match &runtime {
                Some(_) => (
                    status::STOPPED,
                    "the daemon restarted; the sandbox boots again when next used",
                ),
                // Never got as far as a VM: nothing to boot.
                None => (
                    status::FAILED,
                    "the daemon restarted while this sandbox was being created",
                ),
            };
            tracing::warn!(sandbox = %row.id, status = new_status, "recovered after restart");
            self.set_status(&row.user_id, &row.id, new_status, Some(reason))
                .await;
        }
    }

    async fn set_status(&self, user_id: &str, id: &str, new_status: &str, reason: Option<&str>) {
        let update = SandboxUpdate {
            status: Some(new_status.into()),
            status_reason: Some(reason.map(String::from)),
            thermal: Some(
                if new_status == status::RUNNING {
                    "hot"
                } else {
                    "cold"
                }
                .into(),
            ),
            ..Default::default()
        };
        let store = self.store.clone();
        let (sid, uid, kind) = (id.to_string(), user_id.to_string(), new_status.to_string());
        let detail = serde_json::json!({ "reason": reason });
        let r = blocking(move || {
            store.update_sandbox(&sid, &update)?;
            store.record_event(&uid, Some(&sid), &kind, &detail)
        })
        .await;
        if let Err(e) = r {
            tracing::error!(sandbox = %id, error = %e, "cannot update sandbox status");
        }
    }

    pub async fn list(&self, user: &UserRecord) -> Result<Vec<Sandbox>, ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let rows = blocking(move || store.sandboxes_of(&uid)).await?;
        self.all_with_published(user, rows.iter().map(view).collect())
            .await
    }

    async fn row(&self, user: &UserRecord, id: &str) -> Result<store::SandboxRecord, ApiError> {
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
        let row = self.row(user, id).await?;
        let live = self.live().get(&row.id).cloned();
        if let (Some(keep_hot), Some(live)) = (p.keep_hot, live) {
            self.core
                .set_keep_hot(&live.core, keep_hot)
                .map_err(core_error)?;
        }
        let store = self.store.clone();
        let update = SandboxUpdate {
            keep_hot: p.keep_hot,
            labels: p.labels,
            ..Default::default()
        };
        let updated = blocking(move || store.update_sandbox(&row.id, &update)).await?;
        Ok(view(&updated))
    }

    /// Creates a sandbox, or returns the user's existing one of that name
    /// (`Ok((false, …))`).
    pub async fn create(
        &self,
        user: &UserRecord,
        body: CreateSandbox,
    ) -> Result<(bool, Sandbox), ApiError> {
        let defaults = &self.config.defaults;
        let name = match body.name.clone() {
            Some(n) => n,
            None => format!("sb-{}", random_hex(3).map_err(internal)?),
        };
        let mut spec = SandboxSpec::new(
            &name,
            body.image.clone().unwrap_or_else(|| defaults.image.clone()),
        );
        spec.cpus = body.cpus.unwrap_or(defaults.cpus);
        // Each user's sandboxes share a bridge of their own.
        spec.network_group = user.id.clone();
        let memory = body.memory_mb.unwrap_or(defaults.memory_mb);
        spec.memory_mb = u32::try_from(memory)
            .map_err(|_| ApiError::BadRequest(format!("memory_mb {memory} is absurd")))?;
        spec.env = body.env.clone();
        spec.files = body
            .files
            .iter()
            .map(|f| {
                crate::validate::guest_path(&f.path)?;
                Ok(proto::config_drive::ConfigFile {
                    path: f.path.clone(),
                    content: f.content.clone(),
                    mode: f.mode.unwrap_or(0o644),
                    owner: 1000,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        check_labels(&body.labels)?;
        for k in body.env.keys() {
            crate::validate::env_name(k)?;
        }
        spec.validate(&self.core.config().limits)
            .map_err(|e| ApiError::BadRequest(error_chain(&e)))?;

        // The same name again: the existing sandbox.
        if let Some(existing) = {
            let store = self.store.clone();
            let (uid, n) = (user.id.clone(), name.clone());
            blocking(move || store.sandbox(&uid, &n)).await?
        } {
            return Ok((false, view(&existing)));
        }
        self.check_quota(user, spec.cpus, memory).await?;
        let plain_env = spec.env.clone();
        for secret in &body.secrets {
            let value = self.secret_value(user, secret).await?;
            spec.env.insert(secret.clone(), value);
        }

        let id = format!("sb-{}", random_hex(6).map_err(internal)?);
        let new = NewSandbox {
            id: id.clone(),
            user_id: user.id.clone(),
            name: name.clone(),
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mb: memory,
            status: status::CREATING.into(),
            thermal: "hot".into(),
            keep_hot: body.keep_hot,
            labels: body.labels.clone(),
        };
        let store = self.store.clone();
        let inserted = blocking(move || store.insert_sandbox(&new)).await;
        match inserted {
            Ok(_) => {}
            // A concurrent create of the same name won: answer with it.
            Err(ApiError::Conflict(_)) => {
                let store = self.store.clone();
                let (uid, n) = (user.id.clone(), name.clone());
                let row = blocking(move || store.sandbox(&uid, &n))
                    .await?
                    .ok_or_else(|| ApiError::Internal("sandbox vanished during create".into()))?;
                return Ok((false, view(&row)));
            }
            Err(e) => return Err(e),
        }
        self.event(
            user,
            &id,
            "creating",
            serde_json::json!({"image": spec.image}),
        )
        .await;

        match self.core.create(spec).await {
            Ok(mut record) => {
                record.spec.env = plain_env;
                let rt = Runtime {
                    core: record.clone(),
                    secret_names: body.secrets.clone(),
                };
                if let Err(e) = self.core.set_keep_hot(&record.id, body.keep_hot) {
                    tracing::warn!(sandbox = %id, error = %e, "keep_hot");
                }
                self.live().insert(
                    id.clone(),
                    Live {
                        core: record.id.clone(),
                        user_id: user.id.clone(),
                        name: name.clone(),
                    },
                );
                let update = SandboxUpdate {
                    status: Some(status::RUNNING.into()),
                    ip: Some(record.network.as_ref().map(|a| a.ip.to_string())),
                    runtime: Some(serde_json::to_value(&rt).map_err(internal)?),
                    ..Default::default()
                };
                let store = self.store.clone();
                let row = blocking(move || store.update_sandbox(&id, &update)).await?;
                self.event(
                    user,
                    &row.id,
                    "running",
                    serde_json::json!({
                        "boot_ms": record.boot.map(|b| b.total().as_millis() as u64),
                    }),
                )
                .await;
                self.names.refresh(&self.store).await;
                Ok((true, view(&row)))
            }
            Err(e @ (CoreError::InvalidSpec(_) | CoreError::Image(_))) => {
                // Nothing was started: forget the row.
                let store = self.store.clone();
                let rid = id.clone();
                blocking(move || store.delete_sandbox(&rid)).await?;
                Err(ApiError::BadRequest(error_chain(&e)))
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(sandbox = %id, error = %reason, "create failed");
                let update = SandboxUpdate {
                    status: Some(status::FAILED.into()),
                    status_reason: Some(Some(reason.clone())),
                    ..Default::default()
                };
                let store = self.store.clone();
                let rid = id.clone();
                blocking(move || store.update_sandbox(&rid, &update)).await?;
                self.event(user, &id, "failed", serde_json::json!({"reason": reason}))
                    .await;
                Err(ApiError::BadGateway(format!(
                    "sandbox '{name}' failed to start: {reason}"
                )))
            }
        }
    }

    async fn check_quota(
        &self,
        user: &UserRecord,
        cpus: u32,
        memory_mb: u64,
    ) -> Result<(), ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let (count, used_cpus, used_mem) = blocking(move || store.usage_of(&uid)).await?;
        if count >= user.max_sandboxes {
            return Err(ApiError::Forbidden(format!(
                "sandbox quota reached: {count} of {} sandboxes in use; destroy one first",
                user.max_sandboxes
            )));
        }
        if used_cpus + cpus > user.max_cpus {
            return Err(ApiError::Forbidden(format!(
                "CPU quota reached: {used_cpus} of {} CPUs in use, {cpus} more asked",
                user.max_cpus
            )));
        }
        if used_mem + memory_mb > user.max_memory_mb {
            return Err(ApiError::Forbidden(format!(
                "memory quota reached: {used_mem} of {} MiB in use, {memory_mb} more asked",
                user.max_memory_mb
            )));
        }
        Ok(())
    }

    async fn secret_value(&self, user: &UserRecord, name: &str) -> Result<String, ApiError> {
        let store = self.store.clone();
        let (uid, n) = (user.id.clone(), name.to_string());
        let rec = blocking(move || store.secret(&uid, &n))
            .await?
            .ok_or_else(|| ApiError::BadRequest(format!("no secret named '{name}'")))?;
        self.secrets.decrypt(&rec.ciphertext).map_err(internal)
    }

    async fn event(&self, user: &UserRecord, id: &str, kind: &str, detail: serde_json::Value) {
        let store = self.store.clone();
        let (uid, sid, k) = (user.id.clone(), id.to_string(), kind.to_string());
        if let Err(e) = blocking(move || store.record_event(&uid, Some(&sid), &k, &detail)).await {
            tracing::warn!(sandbox = %id, error = %e, "cannot record event");
        }
    }

    /// The agent of a sandbox of `user`, booting it again first if it is
    /// stopped.
    pub async fn agent(&self, user: &UserRecord, id: &str) -> Result<AgentClient, ApiError> {
        if let Some((sid, live)) = self.live_lookup(&user.id, id) {
            return self.live_agent(user, &sid, &live).await;
        }
        let mut row = self.row(user, id).await?;
        if row.status == status::STOPPED {
            row = self.boot_stopped(user, row).await?;
        }
        match row.status.as_str() {
            status::RUNNING => {}
            status::FAILED => {
                return Err(ApiError::Unavailable(format!(
                    "sandbox '{}' has failed: {}",
                    row.name,
                    row.status_reason.unwrap_or_default()
                )))
            }
            other => {
                return Err(ApiError::Unavailable(format!(
                    "sandbox '{}' is {other}",
                    row.name
                )))
            }
        }
        let live = self.live().get(&row.id).cloned().ok_or_else(|| {
            ApiError::Unavailable(format!("sandbox '{}' has no running VM", row.name))
        })?;
        self.live_agent(user, &row.id, &live).await
    }

    async fn live_agent(
        &self,
        user: &UserRecord,
        sid: &str,
        live: &Live,
    ) -> Result<AgentClient, ApiError> {
        // Warm: resumed; cold: restored (concurrent callers share one
        // wake). This is also the host-side activity mark.
        self.core.ensure_hot(&live.core).await.map_err(core_error)?;
        // A VMM that died is noticed here and the sandbox marked failed.
        match self.core.get(&live.core) {
            Ok(rec) if rec.state == bhatti_core::SandboxState::Running => {}
            Ok(rec) => {
                let reason = rec
                    .failure
                    .unwrap_or_else(|| format!("VM is {}", rec.state));
                self.live().remove(sid);
                self.mark_failed(user, sid, &reason).await;
                return Err(ApiError::BadGateway(format!(
                    "sandbox '{}' failed: {reason}",
                    live.name
                )));
            }
            Err(e) => return Err(core_error(e)),
        }
        self.core.agent(&live.core).map_err(core_error)
    }

    /// Boots a stopped sandbox from its disk; concurrent callers share one boot.
    async fn boot_stopped(
        &self,
        user: &UserRecord,
        row: store::SandboxRecord,
    ) -> Result<store::SandboxRecord, ApiError> {
        let gate = {
            let mut booting = self.booting.lock().unwrap_or_else(|p| p.into_inner());
            booting.entry(row.id.clone()).or_default().clone()
        };
        let _one_at_a_time = gate.lock().await;
        // Someone else may have booted it while this call waited.
        let row = self.row(user, &row.id).await?;
        if row.status != status::STOPPED {
            return Ok(row);
        }
        let mut rt: Runtime = serde_json::from_value(row.runtime.clone())
            .map_err(|e| ApiError::Internal(format!("stored runtime of {}: {e}", row.id)))?;
        tracing::info!(sandbox = %row.id, "booting a stopped sandbox");
        match self.core.boot_existing(rt.core.clone()).await {
            Ok(mut record) => {
                record.spec.env = rt.core.spec.env.clone();
                rt.core = record.clone();
                self.live().insert(
                    row.id.clone(),
                    Live {
                        core: record.id.clone(),
                        user_id: user.id.clone(),
                        name: row.name.clone(),
                    },
                );
                let update = SandboxUpdate {
                    status: Some(status::RUNNING.into()),
                    status_reason: Some(None),
                    thermal: Some("hot".into()),
                    ip: Some(record.network.as_ref().map(|a| a.ip.to_string())),
                    runtime: Some(serde_json::to_value(&rt).map_err(internal)?),
                    ..Default::default()
                };
                let store = self.store.clone();
                let id = row.id.clone();
                let row = blocking(move || store.update_sandbox(&id, &update)).await?;
                self.event(
                    user,
                    &row.id,
                    "running",
                    serde_json::json!({"booted_again": true}),
                )
                .await;
                Ok(row)
            }
            Err(e) => {
                let reason = format!("booting again failed: {}", error_chain(&e));
                self.mark_failed(user, &row.id, &reason).await;
                Err(ApiError::BadGateway(format!(
                    "sandbox '{}' {reason}",
                    row.name
                )))
            }
        }
    }

    async fn mark_failed(&self, user: &UserRecord, id: &str, reason: &str) {
        let update = SandboxUpdate {
            status: Some(status::FAILED.into()),
            status_reason: Some(Some(reason.to_string())),
            ..Default::default()
        };
        let store = self.store.clone();
        let sid = id.to_string();
        if let Err(e) = blocking(move || store.update_sandbox(&sid, &update)).await {
            tracing::error!(sandbox = %id, error = %e, "cannot mark sandbox failed");
        }
        self.event(user, id, "failed", serde_json::json!({"reason": reason}))
            .await;
    }

    /// Destroys a sandbox: its VM, TAP and directory, then its record.
    pub async fn destroy(&self, user: &UserRecord, id: &str) -> Result<(), ApiError> {
        let row = self.row(user, id).await?;
        let core_id = self.live().get(&row.id).map(|l| l.core.clone());
        match core_id {
            Some(cid) => match self.core.destroy(&cid).await {
                Ok(()) | Err(CoreError::NotFound(_)) => {}
                Err(e) => {
                    return Err(ApiError::BadGateway(format!(
                        "destroying: {}",
                        error_chain(&e)
                    )))
                }
            },
            None => {
                // Not run by this process (e.g. failed after a restart):
                // remove what its record says is left on disk.
                if let Ok(rt) = serde_json::from_value::<Runtime>(row.runtime.clone()) {
                    if let Some(pid) = rt.core.vmm_pid {
                        kill_orphan_vmm(pid, &rt.core.dir);
                    }
                    let root = self.config.data_dir.join("sandboxes");
                    if rt.core.dir.exists() {
                        image::destroy_sandbox_dir(&root, &rt.core.dir)
                            .map_err(|e| ApiError::Internal(error_chain(&e)))?;
                    }
                }
            }
        }
        self.live().remove(&row.id);
        let store = self.store.clone();
        let rid = row.id.clone();
        blocking(move || store.delete_sandbox(&rid)).await?;
        self.event(user, &row.id, "destroyed", serde_json::json!({}))
            .await;
        self.names.refresh(&self.store).await;
        Ok(())
    }

    /// Takes a sandbox to cold (`POST /sandboxes/:id/stop`).
    pub async fn stop(&self, user: &UserRecord, id: &str) -> Result<Sandbox, ApiError> {
        let row = self.row(user, id).await?;
        let live = self.live().get(&row.id).cloned().ok_or_else(|| {
            ApiError::Conflict(format!(
                "sandbox '{}' is {}; nothing to stop",
                row.name, row.status
            ))
        })?;
        self.core.stop(&live.core).await.map_err(core_error)?;
        self.persist_thermal(&row.id, &live.core).await?;
        Ok(view(&self.row(user, &row.id).await?))
    }

    /// Wakes a warm or cold sandbox, or boots a stopped one
    /// (`POST /sandboxes/:id/start`); `force` first closes an open breaker.
    pub async fn start_sandbox(
        &self,
        user: &UserRecord,
        id: &str,
        force: bool,
    ) -> Result<Sandbox, ApiError> {
        let row = self.row(user, id).await?;
        let live = self.live().get(&row.id).cloned();
        match live {
            Some(live) => {
                self.core
                    .start(&live.core, force)
                    .await
                    .map_err(core_error)?;
                self.persist_thermal(&row.id, &live.core).await?;
            }
            None if row.status == status::STOPPED => {
                self.boot_stopped(user, row.clone()).await?;
            }
            None => {
                return Err(ApiError::Conflict(format!(
                    "sandbox '{}' is {}; cannot start it",
                    row.name, row.status
                )))
            }
        }
        Ok(view(&self.row(user, &row.id).await?))
    }

    /// Writes core's thermal state (and record) of a live sandbox to the store.
    async fn persist_thermal(&self, sid: &str, core: &SandboxId) -> Result<(), ApiError> {
        let record = self.core.get(core).map_err(core_error)?;
        persist(&self.store, sid, &record).await
    }

    /// Daemon shutdown: every VM this process runs goes cold (snapshot,
    /// VMM exits, TAP removed); the next daemon adopts them as cold and
    /// they wake with their processes and memory. One that is not cold
    /// within core's shutdown bound has its VMM killed and is `stopped`
    /// (it boots again from its disk).
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        // The ticker (last) stops first; the recorder keeps recording.
        if let Some(ticker) = tasks.last() {
            ticker.abort();
        }
        let (stopped, failed) = self.core.stop_all().await;
        for (id, e) in failed {
            tracing::error!(sandbox = %id, error = %error_chain(&e), "shutdown could not stop this sandbox");
        }
        let by_core: HashMap<SandboxId, (String, String)> = self
            .live()
            .iter()
            .map(|(sid, l)| (l.core.clone(), (sid.clone(), l.user_id.clone())))
            .collect();
        for s in stopped {
            let (record, killed) = match s {
                Stopped::Cold(record) => (record, None),
                Stopped::Killed { record, reason } => (record, Some(reason)),
            };
            let Some((sid, uid)) = by_core.get(&record.id) else {
                continue;
            };
            self.live().remove(sid);
            if let Err(e) = persist(&self.store, sid, &record).await {
                tracing::error!(sandbox = %sid, error = %e, "recording a sandbox at shutdown");
            }
            if let Some(reason) = killed {
                let why = format!(
                    "not cold in time at shutdown ({}); boots again from its disk when next used",
                    error_chain(&reason)
                );
                self.set_status(uid, sid, status::STOPPED, Some(&why)).await;
            }
        }
        for t in tasks {
            t.abort();
        }
    }
}

/// `[thermal]` as core's policy: the ticker looks four times per shortest
/// timer, at least every second.
fn thermal_policy(c: &crate::config::ThermalConfig) -> ThermalPolicy {
    let warm = std::time::Duration::from_secs(c.warm_after_secs.max(1));
    let cold = std::time::Duration::from_secs(c.cold_after_secs.max(1));
    ThermalPolicy {
        warm_after: warm,
        cold_after: cold,
        tick: (warm.min(cold) / 4).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        ),
        ..ThermalPolicy::default()
    }
}

/// Writes a core record's thermal state to the store row `sid`: the column
/// (and `thermal_since`) and the runtime, so that a daemon that dies while
/// a sandbox is cold finds it cold.
async fn persist(store: &Arc<Store>, sid: &str, record: &SandboxRecord) -> Result<(), ApiError> {
    let store = store.clone();
    let sid = sid.to_string();
    let record = record.clone();
    blocking(move || {
        let row = store
            .all_sandboxes()?
            .into_iter()
            .find(|r| r.id == sid)
            .ok_or_else(|| store::StoreError::NotFound {
                kind: "sandbox",
                id: sid.clone(),
            })?;
        let mut runtime = row.runtime.clone();
        if let Ok(mut rt) = serde_json::from_value::<Runtime>(row.runtime.clone()) {
            let env = rt.core.spec.env.clone();
            rt.core = record.clone();
            rt.core.spec.env = env;
            runtime = serde_json::to_value(&rt)?;
        }
        store.update_sandbox(
            &sid,
            &SandboxUpdate {
                thermal: Some(record.thermal.to_string()),
                runtime: Some(runtime),
                ..Default::default()
            },
        )?;
        Ok(())
    })
    .await
}

/// Records thermal events as they come: the row's thermal column and
/// runtime, and an event (`warm`, `hot`, `cold`, `restore_failed`,
/// `breaker_closed`).
async fn record_thermal(
    mut events: tokio::sync::mpsc::UnboundedReceiver<ThermalEvent>,
    store: Arc<Store>,
    live: Arc<Mutex<HashMap<String, Live>>>,
) {
    while let Some(ev) = events.recv().await {
        let found = live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, l)| l.core == ev.id)
            .map(|(sid, l)| (sid.clone(), l.user_id.clone()));
        let Some((sid, uid)) = found else {
            continue;
        };
        let detail = match &ev.kind {
            ThermalEventKind::Cold { state_bytes } => {
                serde_json::json!({ "took_ms": ev.took.as_millis() as u64, "state_bytes": state_bytes })
            }
            ThermalEventKind::Hot { from } => {
                serde_json::json!({ "took_ms": ev.took.as_millis() as u64, "from": from.to_string() })
            }
            ThermalEventKind::RestoreFailed { reason } => {
                serde_json::json!({ "took_ms": ev.took.as_millis() as u64, "reason": reason })
            }
            ThermalEventKind::Warm | ThermalEventKind::BreakerClosed => {
                serde_json::json!({ "took_ms": ev.took.as_millis() as u64 })
            }
        };
        let thermal: &'static str = match ev.thermal {
            ThermalState::Hot => "hot",
            ThermalState::Warm => "warm",
            ThermalState::Cold => "cold",
        };
        let store2 = store.clone();
        let (s2, kind, pid) = (sid.clone(), ev.kind.name(), ev.vmm_pid);
        let r = blocking(move || {
            // The runtime keeps the VMM's pid current (a restore starts a
            // new VMM), so recovery after a crash finds the right one.
            let runtime = store2.sandbox(&uid, &s2)?.map(|row| {
                let mut rt = row.runtime;
                if let Some(core) = rt.get_mut("core").and_then(|c| c.as_object_mut()) {
                    core.insert("vmm_pid".into(), serde_json::json!(pid));
                }
                rt
            });
            store2.update_sandbox(
                &s2,
                &SandboxUpdate {
                    thermal: Some(thermal.into()),
                    runtime,
                    ..Default::default()
                },
            )?;
            store2.record_event(&uid, Some(&s2), kind, &detail)?;
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(sandbox = %sid, error = %e, "recording a thermal event");
        }
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

/// Kills a VMM left over from an earlier daemon, if `pid` is still that VMM
/// (its command line names the sandbox directory).
fn kill_orphan_vmm(pid: u32, dir: &std::path::Path) {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let needle = dir.display().to_string();
    if String::from_utf8_lossy(&cmdline).contains(&needle) {
        tracing::warn!(pid, dir = %needle, "killing a VMM left by an earlier daemon");
        if let Err(e) = nix_kill(pid) {
            tracing::warn!(pid, error = %e, "cannot kill the orphaned VMM");
        }
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
