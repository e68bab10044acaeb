//! Create, destroy, stop, start, booting a stopped sandbox again, and the
//! lookup every guest operation starts with.
//!
//! One sandbox id names a sandbox from the API to the VMM: the service
//! picks it, inserts the row (quota checked in the same transaction) and
//! has core create the VM under it. Lifecycle operations on one sandbox
//! are serialised by its lock here; core serialises its own steps (and
//! thermal transitions) per sandbox too. A destroy during a create first
//! asks core to destroy the sandbox — which ends the boot, or waits for it
//! and then destroys the VM — and then, under the lock, removes whatever
//! is left and the row: no VM outlives its row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use api_types::{CreateSandbox, Sandbox, SandboxStatus, Thermal};
use bhatti_core::{CoreError, SandboxId, SandboxSpec, SandboxState, ThermalState};
use store::{NewSandbox, SandboxRow, SandboxUpdate, StoreError, UserRecord};
use tracing::Instrument;

use super::persistence::{record_update, Runtime};
use super::{check_labels, internal, sandbox_id, view, Running, Service};
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;
use crate::state::blocking;

/// What a name already taken means to a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    /// The existing sandbox is the answer (a create is idempotent by name).
    Return,
    /// A 409 (a fork's children must be new).
    Conflict,
}

/// The row's settings that are not the spec's.
#[derive(Debug, Clone)]
pub(super) struct StartOptions {
    pub(super) keep_hot: bool,
    pub(super) labels: std::collections::BTreeMap<String, String>,
    pub(super) secrets: Vec<String>,
    pub(super) existing: Existing,
    /// The image's name as the user gave it, when it is not the spec's
    /// (an API image's spec names its directory, `i.…`).
    pub(super) shown_image: Option<String>,
}

/// How a new sandbox's VM starts.
#[derive(Debug)]
pub(super) enum Start {
    /// A boot of its image.
    Boot,
    /// A restore from a capture: a checkpoint's or a template's (its
    /// origin, recorded on the sandbox's row), or a fork's.
    Capture {
        capture: Box<bhatti_core::Capture>,
        origin: Option<String>,
    },
}

impl Start {
    fn origin(&self) -> Option<String> {
        match self {
            Start::Boot => None,
            Start::Capture { origin, .. } => origin.clone(),
        }
    }

    fn describe(&self) -> serde_json::Value {
        match self {
            Start::Boot => serde_json::json!("boot"),
            Start::Capture {
                origin: Some(o), ..
            } => match o.strip_prefix("template:") {
                Some(t) => serde_json::json!({ "template": t }),
                None => serde_json::json!({ "checkpoint": o }),
            },
            Start::Capture { capture, .. } => {
                serde_json::json!({ "fork_of": capture.meta.source.as_str() })
            }
        }
    }
}

/// One lock per sandbox, made on first use.
#[derive(Debug, Default)]
pub(super) struct Locks(Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    /// Waits for sandbox `id`'s lock.
    pub(super) async fn lock(&self, id: &SandboxId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Drops a destroyed sandbox's lock (waiters keep theirs, and find the
    /// row gone).
    fn forget(&self, id: &SandboxId) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

impl Service {
    /// Creates a sandbox, or returns the user's existing one of that name
    /// (`Ok((false, …))`). Runs to the end even if the caller goes away
    /// (a client that disconnects must not leave a half-made sandbox).
    pub async fn create(
        self: &Arc<Self>,
        user: &UserRecord,
        body: CreateSandbox,
    ) -> Result<(bool, Sandbox), ApiError> {
        let (this, user) = (self.clone(), user.clone());
        detached(async move { this.create_inner(&user, body).await }).await
    }

    async fn create_inner(
        self: &Arc<Self>,
        user: &UserRecord,
        body: CreateSandbox,
    ) -> Result<(bool, Sandbox), ApiError> {
        if body.from.is_some() {
            return self.create_from_checkpoint(user, body).await;
        }
        let defaults = &self.config.defaults;
        let name = match body.name.clone() {
            Some(n) => n,
            None => format!("sb-{}", random_hex(3).map_err(internal)?),
        };
        // The image as the user names it (shown), and as core stores it.
        let shown_image = body.image.clone().unwrap_or_else(|| defaults.image.clone());
        crate::validate::name("image", &shown_image)?;
        let mut spec = SandboxSpec::new(&name, self.image_storage(user, &shown_image).await?);
        spec.cpus = body.cpus.unwrap_or(defaults.cpus);
        // Each user's sandboxes share a bridge of their own.
        spec.network_group = user.id.clone();
        let memory = body.memory_mb.unwrap_or(defaults.memory_mb);
        spec.memory_mb = u32::try_from(memory)
            .map_err(|_| ApiError::BadRequest(format!("memory_mb {memory} is absurd")))?;
        let disk_mb = body.disk_size_mb.unwrap_or(defaults.disk_mb);
        self.check_disk_size(disk_mb)?;
        spec.disk_mb = Some(disk_mb);
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
        if let Some(e) = &body.egress {
            spec.egress = crate::validate::egress(e)?;
        }
        for k in body.env.keys() {
            crate::validate::env_name(k)?;
        }
        if let Some(init) = &body.init {
            spec.init = Some(crate::validate::init(init)?);
        }
        let attachments = self.volume_specs(user, &body.volumes).await?;
        spec.volumes = attachments.iter().map(|(_, v)| v.clone()).collect();
        spec.validate(&self.core.config().limits)
            .map_err(|e| ApiError::BadRequest(error_chain(&e)))?;
        for secret in &body.secrets {
            let value = self.secret_value(user, secret).await?;
            spec.env.insert(secret.clone(), value);
        }
        let attach: Vec<store::NewAttachment> = attachments.into_iter().map(|(a, _)| a).collect();
        let options = StartOptions {
            keep_hot: body.keep_hot,
            labels: body.labels.clone(),
            secrets: body.secrets.clone(),
            existing: Existing::Return,
            shown_image: Some(shown_image),
        };
        let start = match self.template_for(user, &spec, &body).await {
            Some(capture) => Start::Capture {
                capture: Box::new(capture),
                origin: Some(super::templates::template_origin(
                    &spec.image,
                    spec.cpus,
                    spec.memory_mb,
                )),
            },
            None => Start::Boot,
        };
        let booted = matches!(start, Start::Boot);
        let (template_spec, template_body) = (spec.clone(), body.clone());
        let created = self
            .insert_and_start(user, spec, options, attach, start)
            .await;
        if booted && matches!(created, Ok((true, _))) {
            self.warm_later(user, &template_spec, &template_body);
        }
        created
    }

    /// Inserts the row of a sandbox (quotas checked in the same
    /// transaction) and has core make it: booted, or restored from a
    /// capture. A name taken returns the existing sandbox or a 409, as
    /// `options.existing` says.
    pub(super) async fn insert_and_start(
        &self,
        user: &UserRecord,
        spec: SandboxSpec,
        options: StartOptions,
        attach: Vec<store::NewAttachment>,
        start: Start,
    ) -> Result<(bool, Sandbox), ApiError> {
        let name = spec.name.clone();
        let shown_image = options
            .shown_image
            .clone()
            .unwrap_or_else(|| spec.image.clone());
        let memory = u64::from(spec.memory_mb);
        let disk_mb = spec.disk_mb.unwrap_or(self.config.defaults.disk_mb);
        let id = SandboxId::generate().map_err(internal)?;
        // Taken before the row exists: a destroy by name that finds the
        // row waits for this create to settle.
        let _lock = self.locks.lock(&id).await;
        let new = NewSandbox {
            id: id.to_string(),
            user_id: user.id.clone(),
            name: name.clone(),
            image: shown_image.clone(),
            cpus: spec.cpus,
            memory_mb: memory,
            disk_mb,
            keep_hot: options.keep_hot,
            labels: options.labels.clone(),
            egress: crate::validate::egress_view(&spec.egress),
        };
        let store = self.store.clone();
        let inserted =
            tokio::task::spawn_blocking(move || store.insert_sandbox_with(&new, &attach))
                .await
                .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?;
        match inserted {
            Ok(_) => {
                // A volume a utility VM has now (tar export or import): the
                // row goes again (see `archive`).
                if let Err(e) = self.check_volume_jobs(&spec.volumes) {
                    let store = self.store.clone();
                    let rid = id.to_string();
                    blocking(move || store.delete_sandbox(&rid)).await?;
                    self.locks.forget(&id);
                    return Err(e);
                }
            }
            // The same name again (or a concurrent create of it won): the
            // existing sandbox.
            Err(StoreError::Duplicate { .. }) if options.existing == Existing::Return => {
                return Ok((false, view(&self.row(user, &name).await?)));
            }
            Err(e) => return Err(e.into()),
        }
        self.event(
            user,
            id.as_str(),
            "creating",
            serde_json::json!({"image": shown_image, "from": start.describe()}),
        )
        .await;

        self.creating_set().insert(id.clone());
        let origin = start.origin();
        let created = match start {
            Start::Boot => self.core.create_as(id.clone(), spec).await,
            Start::Capture { capture, .. } => {
                self.core
                    .create_from_capture(id.clone(), spec, *capture)
                    .await
            }
        };
        self.creating_set().remove(&id);
        match created {
            Ok(record) => {
                if let Some(ck) = origin {
                    let (store, rid) = (self.store.clone(), id.to_string());
                    blocking(move || store.set_sandbox_checkpoint(&rid, &ck)).await?;
                }
                if let Err(e) = self.core.set_keep_hot(&id, options.keep_hot) {
                    tracing::warn!(sandbox = %id, error = %e, "keep_hot");
                }
                let running = Running {
                    user_id: user.id.clone(),
                    name: name.clone(),
                    secret_names: options.secrets.clone(),
                };
                let update = SandboxUpdate {
                    status: Some(SandboxStatus::Running),
                    ..record_update(&running, &record)?
                };
                self.index().insert(id.clone(), running);
                let row = self.save(id.as_str(), update).await?;
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
            Err(
                e @ (CoreError::InvalidSpec(_) | CoreError::Image(_) | CoreError::Capture { .. }),
            ) => {
                // Nothing was started: forget the row.
                let store = self.store.clone();
                let rid = id.to_string();
                blocking(move || store.delete_sandbox(&rid)).await?;
                self.locks.forget(&id);
                Err(ApiError::BadRequest(error_chain(&e)))
            }
            // A destroy arrived while it was being created: the destroy owns
            // the teardown and the row; the creator is told why it lost.
            Err(CoreError::Cancelled { .. }) => Err(ApiError::Conflict(format!(
                "sandbox '{name}' was destroyed while it was being created"
            ))),
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(sandbox = %id, error = %reason, "create failed");
                self.mark_failed(user, id.as_str(), &reason).await;
                Err(ApiError::BadGateway(format!(
                    "sandbox '{name}' failed to start: {reason}"
                )))
            }
        }
    }

    /// `disk_size_mb` within this daemon's bounds.
    pub(super) fn check_disk_size(&self, mb: u64) -> Result<(), ApiError> {
        let most = self.config.defaults.max_sandbox_disk_mb;
        if !(bhatti_core::MIN_DISK_MB..=most).contains(&mb) {
            return Err(ApiError::BadRequest(format!(
                "disk_size_mb must be {}..={most}, got {mb}",
                bhatti_core::MIN_DISK_MB
            )));
        }
        Ok(())
    }

    /// Grows a sandbox's disk to `mb` MiB (`PATCH … {"disk_size_mb"}`):
    /// refused (409) while its VM runs hot or warm; a cold one gives up its
    /// snapshot first (its processes end, its files stay) and is
    /// `stopped` after, to boot from the larger disk at the next command,
    /// where lohar grows the file system to fill it. The disk quota is
    /// checked with the new size in the same transaction that records it.
    pub(super) async fn grow_disk(
        &self,
        user: &UserRecord,
        row: &SandboxRow,
        mb: u64,
    ) -> Result<SandboxRow, ApiError> {
        self.check_disk_size(mb)?;
        let id = sandbox_id(row)?;
        let _lock = self.locks.lock(&id).await;
        let row = self.row(user, &row.id).await?;
        if mb < row.disk_mb {
            return Err(ApiError::BadRequest(format!(
                "disks only grow: sandbox '{}' has {} MiB, asked for {mb}",
                row.name, row.disk_mb
            )));
        }
        if mb == row.disk_mb {
            return Ok(row);
        }
        match row.status {
            SandboxStatus::Stopped => {}
            SandboxStatus::Running if self.index().contains_key(&id) => {
                let thermal = self.core.get(&id).map(|r| r.thermal)?;
                if thermal != ThermalState::Cold {
                    return Err(ApiError::Conflict(format!(
                        "sandbox '{}' is {}: stop it first (POST /sandboxes/{}/stop); \
                         its disk grows while it is cold",
                        row.name,
                        super::persistence::thermal(thermal),
                        row.name
                    )));
                }
            }
            status => {
                return Err(ApiError::Conflict(format!(
                    "sandbox '{}' is {status}; its disk cannot grow now",
                    row.name
                )))
            }
        }
        // The quota first: nothing changes on disk for a grow it refuses.
        let store = self.store.clone();
        let (rid, before) = (row.id.clone(), row.disk_mb);
        blocking(move || store.set_disk_mb(&rid, mb)).await?;
        let grown = self.grow_disk_file(user, &id, &row, mb).await;
        if let Err(e) = &grown {
            tracing::warn!(sandbox = %id, error = %e, "growing the disk failed");
            let store = self.store.clone();
            let rid = row.id.clone();
            if let Err(e) = blocking(move || store.set_disk_mb(&rid, before)).await {
                tracing::error!(sandbox = %id, error = %e, "restoring the recorded disk size");
            }
        }
        grown
    }

    /// The file half of [`Service::grow_disk`]: release a cold VM (the
    /// sandbox turns `stopped`), grow the file, record the new spec.
    async fn grow_disk_file(
        &self,
        user: &UserRecord,
        id: &SandboxId,
        row: &SandboxRow,
        mb: u64,
    ) -> Result<SandboxRow, ApiError> {
        let mut rt = self
            .release_held_vm(
                id,
                row,
                "its disk grew; it boots from it at the next command",
            )
            .await?;
        rt.core = self.core.grow_disk(&rt.core, mb).await?;
        let row = self
            .save(
                id.as_str(),
                SandboxUpdate {
                    runtime: Some(rt.to_value()?),
                    ..Default::default()
                },
            )
            .await?;
        self.event(
            user,
            &row.id,
            "disk_grown",
            serde_json::json!({"disk_size_mb": mb}),
        )
        .await;
        Ok(row)
    }

    /// Lets go of the VM this daemon holds for sandbox `id` (a cold one:
    /// the caller checked; its snapshot is dropped, its processes end, its
    /// files stay), marking it `stopped` with `reason`; nothing when no VM
    /// is held. Returns its stored runtime as it is after. The caller
    /// holds the sandbox's lock.
    pub(super) async fn release_held_vm(
        &self,
        id: &SandboxId,
        row: &SandboxRow,
        reason: &str,
    ) -> Result<Runtime, ApiError> {
        let mut rt = match Runtime::of(row) {
            Ok(Some(rt)) => rt,
            Ok(None) => {
                return Err(ApiError::Conflict(format!(
                    "sandbox '{}' has no disk yet",
                    row.name
                )))
            }
            Err(e) => {
                return Err(ApiError::Internal(format!(
                    "stored runtime of {}: {e}",
                    row.id
                )))
            }
        };
        if self.index().contains_key(id) {
            match self.core.release(id).await {
                Ok(record) => rt.core = Runtime::new(&record, &rt.secret_names).core,
                Err(CoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.index().remove(id);
            self.save(
                id.as_str(),
                SandboxUpdate {
                    runtime: Some(rt.to_value()?),
                    ..not_running(SandboxStatus::Stopped, reason)
                },
            )
            .await?;
            self.names.refresh(&self.store).await;
        }
        Ok(rt)
    }

    fn creating_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<SandboxId>> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn secret_value(&self, user: &UserRecord, name: &str) -> Result<String, ApiError> {
        let store = self.store.clone();
        let (uid, n) = (user.id.clone(), name.to_string());
        let rec = blocking(move || store.secret(&uid, &n))
            .await?
            .ok_or_else(|| ApiError::BadRequest(format!("no secret named '{name}'")))?;
        self.secrets.decrypt(&rec.ciphertext).map_err(internal)
    }

    /// The sandbox of `user` named by `reference` (id or name), ready for
    /// a guest operation: booted again if it was stopped, woken if warm or
    /// cold (concurrent callers share one wake; this is also the host-side
    /// activity mark), and checked to be running. Its core id.
    pub(crate) async fn find_awake(
        &self,
        user: &UserRecord,
        reference: &str,
    ) -> Result<SandboxId, ApiError> {
        let id = match self.running_lookup(&user.id, reference) {
            Some(id) => id,
            None => {
                let mut row = self.row(user, reference).await?;
                if row.status == SandboxStatus::Stopped {
                    row = self.boot_stopped(user, &row).await?;
                }
                match row.status {
                    SandboxStatus::Running => {}
                    SandboxStatus::Failed => {
                        return Err(ApiError::Unavailable(format!(
                            "sandbox '{}' has failed: {}",
                            row.name,
                            row.status_reason.unwrap_or_default()
                        )))
                    }
                    SandboxStatus::Creating | SandboxStatus::Stopped => {
                        return Err(ApiError::Unavailable(format!(
                            "sandbox '{}' is {}",
                            row.name, row.status
                        )))
                    }
                }
                let id = sandbox_id(&row)?;
                if !self.index().contains_key(&id) {
                    return Err(ApiError::Unavailable(format!(
                        "sandbox '{}' has no running VM",
                        row.name
                    )));
                }
                id
            }
        };
        // Whether this call wakes it: then the row says hot before the
        // answer (the recorder of thermal events would only catch up later).
        let asleep = self
            .core
            .get(&id)
            .is_ok_and(|r| r.thermal != ThermalState::Hot);
        match self.core.ensure_hot(&id).await {
            Ok(()) => {
                self.adopted_set().remove(&id);
            }
            Err(e @ CoreError::SnapshotSpent { .. }) => {
                // Nothing left to restore; the disk has every acknowledged
                // write (the guest syncs before a snapshot): boot from it,
                // as a machine whose suspend image is lost boots afresh.
                self.adopted_set().remove(&id);
                tracing::warn!(
                    sandbox = %id,
                    error = %error_chain(&e),
                    "the restore spent the snapshot and failed; booting from the disk"
                );
                self.back_to_disk(user, &id).await?;
                self.core.ensure_hot(&id).await?;
            }
            Err(e @ (CoreError::Restore { .. } | CoreError::BreakerOpen { .. }))
                if self.adopted_set().remove(&id) =>
            {
                // The snapshot recovery took of a VMM that outlived its
                // daemon does not restore: the disk still has every
                // acknowledged write (the agent syncs them), so boot from it.
                tracing::warn!(
                    sandbox = %id,
                    error = %error_chain(&e),
                    "the snapshot of an orphaned VMM does not restore; booting from the disk"
                );
                self.back_to_disk(user, &id).await?;
                self.core.ensure_hot(&id).await?;
            }
            Err(e) => return Err(e.into()),
        }
        // A VMM that died is noticed here and the sandbox marked failed.
        let rec = self.core.get(&id)?;
        if rec.state != SandboxState::Running {
            let reason = rec
                .failure
                .unwrap_or_else(|| format!("VM is {}", rec.state));
            self.mark_failed(user, id.as_str(), &reason).await;
            return Err(ApiError::BadGateway(format!(
                "sandbox '{}' failed: {reason}",
                rec.spec.name
            )));
        }
        if asleep {
            if let Err(e) = self.persist(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "recording a wake");
            }
        }
        Ok(id)
    }

    /// Forgets the cold VM of a sandbox recovery adopted from an orphaned
    /// VMM and boots it again from its disk (the sandbox turns `stopped`
    /// first, so a failure leaves it consistent).
    async fn back_to_disk(
        &self,
        user: &UserRecord,
        id: &SandboxId,
    ) -> Result<SandboxRow, ApiError> {
        let _lock = self.locks.lock(id).await;
        self.back_to_disk_locked(user, id).await
    }

    /// [`Service::back_to_disk`] with the sandbox's lock held.
    async fn back_to_disk_locked(
        &self,
        user: &UserRecord,
        id: &SandboxId,
    ) -> Result<SandboxRow, ApiError> {
        match self.core.release(id).await {
            Ok(_) | Err(CoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.index().remove(id);
        let row = self
            .save(
                id.as_str(),
                not_running(
                    SandboxStatus::Stopped,
                    "its snapshot did not restore; it boots again from its disk",
                ),
            )
            .await?;
        self.boot_locked(user, row).await
    }

    fn adopted_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<SandboxId>> {
        self.adopted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Boots a stopped sandbox from its disk; concurrent callers wait for
    /// one boot. The row after.
    async fn boot_stopped(
        &self,
        user: &UserRecord,
        row: &SandboxRow,
    ) -> Result<SandboxRow, ApiError> {
        let id = sandbox_id(row)?;
        let _lock = self.locks.lock(&id).await;
        // Someone else may have booted (or destroyed) it while this waited.
        let row = self.row(user, &row.id).await?;
        if row.status != SandboxStatus::Stopped {
            return Ok(row);
        }
        self.boot_locked(user, row).await
    }

    /// [`Service::boot_stopped`] with the sandbox's lock held.
    async fn boot_locked(
        &self,
        user: &UserRecord,
        row: SandboxRow,
    ) -> Result<SandboxRow, ApiError> {
        let id = sandbox_id(&row)?;
        let rt = match Runtime::of(&row) {
            Ok(Some(rt)) => rt,
            Ok(None) => {
                let reason = "it has no VM record to boot from";
                self.mark_failed(user, &row.id, reason).await;
                return Err(ApiError::BadGateway(format!(
                    "sandbox '{}': {reason}",
                    row.name
                )));
            }
            Err(e) => {
                return Err(ApiError::Internal(format!(
                    "stored runtime of {}: {e}",
                    row.id
                )))
            }
        };
        let span = tracing::info_span!("boot_stopped", sandbox = %id);
        let booted = self
            .core
            .boot_existing(rt.core.clone())
            .instrument(span)
            .await;
        match booted {
            Ok(record) => {
                if let Err(e) = self.core.set_keep_hot(&id, row.keep_hot) {
                    tracing::warn!(sandbox = %id, error = %e, "keep_hot");
                }
                let running = Running {
                    user_id: user.id.clone(),
                    name: row.name.clone(),
                    secret_names: rt.secret_names,
                };
                let update = SandboxUpdate {
                    status: Some(SandboxStatus::Running),
                    status_reason: Some(None),
                    ..record_update(&running, &record)?
                };
                self.index().insert(id.clone(), running);
                let row = self.save(&row.id, update).await?;
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

    /// Destroys a sandbox: its VM, TAP and directory, then its row. Runs to
    /// the end even if the caller goes away.
    pub async fn destroy(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
    ) -> Result<(), ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        detached(async move { this.destroy_inner(&user, &r).await }).await
    }

    async fn destroy_inner(&self, user: &UserRecord, reference: &str) -> Result<(), ApiError> {
        let row = self.row(user, reference).await?;
        let id = sandbox_id(&row)?;
        if self.creating_set().contains(&id) {
            // Core ends the boot (or waits for it) and destroys the VM; the
            // create then settles and releases the lock below.
            match self.core.destroy(&id).await {
                Ok(()) | Err(CoreError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %error_chain(&e), "destroy during create")
                }
            }
        }
        let _lock = self.locks.lock(&id).await;
        let store = self.store.clone();
        let rid = row.id.clone();
        if blocking(move || store.sandbox_row(&rid)).await?.is_none() {
            // A concurrent destroy won.
            return Err(ApiError::NotFound(format!("no sandbox '{reference}'")));
        }
        match self.core.destroy(&id).await {
            Ok(()) | Err(CoreError::NotFound(_)) => {}
            Err(e) => {
                return Err(ApiError::BadGateway(format!(
                    "destroying: {}",
                    error_chain(&e)
                )))
            }
        }
        // Not run by this process (stopped, failed, or created by a daemon
        // that died): whatever its directory still holds.
        self.core
            .purge(&id)
            .await
            .map_err(|e| ApiError::Internal(error_chain(&e)))?;
        self.index().remove(&id);
        let store = self.store.clone();
        let rid = row.id.clone();
        blocking(move || store.delete_sandbox(&rid)).await?;
        self.locks.forget(&id);
        self.event(user, &row.id, "destroyed", serde_json::json!({}))
            .await;
        self.names.refresh(&self.store).await;
        Ok(())
    }

    /// Takes a sandbox to cold (`POST /sandboxes/:id/stop`), to the end
    /// even if the caller goes away.
    pub async fn stop(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
    ) -> Result<Sandbox, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        detached(async move { this.stop_inner(&user, &r).await }).await
    }

    async fn stop_inner(&self, user: &UserRecord, reference: &str) -> Result<Sandbox, ApiError> {
        self.cool(user, reference, Cooling::Stop).await
    }

    /// Takes a running sandbox of `user` down a tier, under its lock.
    async fn cool(
        &self,
        user: &UserRecord,
        reference: &str,
        how: Cooling,
    ) -> Result<Sandbox, ApiError> {
        let row = self.row(user, reference).await?;
        let id = sandbox_id(&row)?;
        let _lock = self.locks.lock(&id).await;
        let row = self.row(user, &row.id).await?;
        if !self.index().contains_key(&id) {
            return Err(ApiError::Conflict(format!(
                "sandbox '{}' is {}; nothing to {}",
                row.name,
                row.status,
                how.verb()
            )));
        }
        match how {
            Cooling::Stop => self.core.stop(&id).await?,
            Cooling::Pause => self.core.pause(&id).await?,
        }
        Ok(view(&self.persist(&id).await?))
    }

    /// Stops a sandbox's vCPUs (hot → warm; a warm or cold one is left as
    /// is): its VMM, memory, processes and open connections stay, and the
    /// next call into it resumes it. The E2B API's `pause`
    /// (`crate::e2b`). Runs to the end even if the caller goes away.
    pub async fn pause(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
    ) -> Result<Sandbox, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        detached(async move { this.pause_inner(&user, &r).await }).await
    }

    async fn pause_inner(&self, user: &UserRecord, reference: &str) -> Result<Sandbox, ApiError> {
        self.cool(user, reference, Cooling::Pause).await
    }

    /// Wakes a warm or cold sandbox, or boots a stopped one
    /// (`POST /sandboxes/:id/start`); `force` first closes an open breaker.
    /// Runs to the end even if the caller goes away.
    pub async fn start_sandbox(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
        force: bool,
    ) -> Result<Sandbox, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        detached(async move { this.start_inner(&user, &r, force).await }).await
    }

    async fn start_inner(
        &self,
        user: &UserRecord,
        reference: &str,
        force: bool,
    ) -> Result<Sandbox, ApiError> {
        let row = self.row(user, reference).await?;
        let id = sandbox_id(&row)?;
        let _lock = self.locks.lock(&id).await;
        let row = self.row(user, &row.id).await?;
        if self.index().contains_key(&id) {
            match self.core.start(&id, force).await {
                Ok(()) => {}
                Err(e @ CoreError::SnapshotSpent { .. }) => {
                    tracing::warn!(
                        sandbox = %id,
                        error = %error_chain(&e),
                        "the restore spent the snapshot and failed; booting from the disk"
                    );
                    self.adopted_set().remove(&id);
                    return Ok(view(&self.back_to_disk_locked(user, &id).await?));
                }
                Err(e) => return Err(e.into()),
            }
            let row = self.persist(&id).await?;
            if row.status_reason.is_none() {
                return Ok(view(&row));
            }
            // Hot, so its breaker is closed: the reason it showed is gone.
            let update = SandboxUpdate {
                status_reason: Some(None),
                ..Default::default()
            };
            return Ok(view(&self.save(&row.id, update).await?));
        }
        match row.status {
            SandboxStatus::Stopped => Ok(view(&self.boot_locked(user, row).await?)),
            SandboxStatus::Creating | SandboxStatus::Running | SandboxStatus::Failed => {
                Err(ApiError::Conflict(format!(
                    "sandbox '{}' is {}; cannot start it",
                    row.name, row.status
                )))
            }
        }
    }
}

/// A step down the thermal tiers a caller asks for.
#[derive(Debug, Clone, Copy)]
enum Cooling {
    /// To cold (`POST /sandboxes/:id/stop`).
    Stop,
    /// To warm (the E2B API's `pause`).
    Pause,
}

impl Cooling {
    fn verb(self) -> &'static str {
        match self {
            Cooling::Stop => "stop",
            Cooling::Pause => "pause",
        }
    }
}

/// Runs a lifecycle operation on its own task: dropping the request's
/// future (the client went away) does not cut it short half-way.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(op)
        .await
        .map_err(|e| ApiError::Internal(format!("lifecycle task failed: {e}")))?
}

/// What a row shows while its VM is not running.
pub(super) fn not_running(status: SandboxStatus, reason: &str) -> SandboxUpdate {
    SandboxUpdate {
        status: Some(status),
        status_reason: Some(Some(reason.to_string())),
        thermal: Some(Thermal::Cold),
        ..Default::default()
    }
}
