//! Checkpoints, rollbacks, creates from a checkpoint, and forks
//! (`docs/state.md`). Each is a capture of a sandbox's memory and disk
//! (core's `capture`) and new VMs restored from it copy-on-write.
//!
//! A checkpoint's files live in `DATA/checkpoints/<user-id>/<checkpoint-id>/`
//! (0700 directories), its row in the store; a fork's capture lives in
//! `DATA/captures/` only until its children have started.

use std::path::PathBuf;
use std::sync::Arc;

use api_types::{
    Checkpoint, CreateCheckpoint, CreateSandbox, ForkSandbox, RestoreSandbox, Sandbox,
};
use bhatti_core::{Capture, Durability, SandboxId};
use store::{CheckpointRow, NewCheckpoint, SandboxStatus, UserRecord};

use super::lifecycle::{Existing, Start, StartOptions};
use super::{internal, sandbox_id, view, Service};
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;
use crate::state::blocking;

/// Most children one fork makes.
pub const MAX_FORK_COUNT: u32 = 16;

fn checkpoint_view(r: &CheckpointRow) -> Checkpoint {
    Checkpoint {
        id: r.id.clone(),
        name: r.name.clone(),
        sandbox: r.sandbox_name.clone(),
        sandbox_id: r.sandbox_id.clone(),
        image: r.image.clone(),
        cpus: r.cpus,
        memory_mb: r.memory_mb,
        disk_size_mb: r.disk_mb,
        bytes: r.bytes,
        created_at: r.created_at,
    }
}

/// Makes `dir`'s parents, owner-only.
fn private_parent(dir: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", parent.display())))?;
    }
    Ok(())
}

impl Service {
    fn checkpoint_dir(&self, user_id: &str, id: &str) -> PathBuf {
        self.core
            .config()
            .data_dir
            .join("checkpoints")
            .join(user_id)
            .join(id)
    }

    async fn checkpoint_row(
        &self,
        user: &UserRecord,
        reference: &str,
    ) -> Result<CheckpointRow, ApiError> {
        let (store, uid, r) = (self.store.clone(), user.id.clone(), reference.to_string());
        blocking(move || store.checkpoint(&uid, &r)).await
    }

    /// A checkpoint's capture, checked before use.
    async fn open_checkpoint(&self, row: &CheckpointRow) -> Result<Capture, ApiError> {
        let dir = self.checkpoint_dir(&row.user_id, &row.id);
        let engine = self.core.engine().kind;
        tokio::task::spawn_blocking(move || Capture::open(&dir, engine))
            .await
            .map_err(internal)?
            .map_err(|e| {
                ApiError::Conflict(format!(
                    "checkpoint '{}' cannot be used: {}",
                    row.name,
                    error_chain(&e)
                ))
            })
    }

    /// The sandbox named by `reference`, if it is one whose VM this daemon
    /// runs (hot, warm or cold); else the 409 that says why not.
    async fn capturable(
        &self,
        user: &UserRecord,
        reference: &str,
        what: &str,
    ) -> Result<(store::SandboxRow, SandboxId), ApiError> {
        let row = self.row(user, reference).await?;
        let id = sandbox_id(&row)?;
        match row.status {
            SandboxStatus::Running if self.index().contains_key(&id) => Ok((row, id)),
            SandboxStatus::Failed => Err(ApiError::Conflict(format!(
                "cannot {what} sandbox '{}': it has failed: {}",
                row.name,
                row.status_reason.clone().unwrap_or_default()
            ))),
            status => Err(ApiError::Conflict(format!(
                "cannot {what} sandbox '{}': it is {status} (a {what} needs a running sandbox, hot, warm or cold)",
                row.name
            ))),
        }
    }

    /// `POST /sandboxes/:id/checkpoints`: runs to the end even if the caller
    /// goes away.
    pub async fn create_checkpoint(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
        body: CreateCheckpoint,
    ) -> Result<Checkpoint, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        tokio::spawn(async move { this.create_checkpoint_inner(&user, &r, body).await })
            .await
            .map_err(internal)?
    }

    async fn create_checkpoint_inner(
        &self,
        user: &UserRecord,
        reference: &str,
        body: CreateCheckpoint,
    ) -> Result<Checkpoint, ApiError> {
        crate::validate::name("checkpoint", &body.name)?;
        let limit = self.config.defaults.max_checkpoints;
        let (store, uid) = (self.store.clone(), user.id.clone());
        let held = blocking(move || store.checkpoints(&uid)).await?;
        if held.iter().any(|c| c.name == body.name) {
            return Err(ApiError::Conflict(format!(
                "a checkpoint named '{}' already exists",
                body.name
            )));
        }
        if held.len() as u64 >= limit {
            return Err(ApiError::Forbidden(format!(
                "checkpoint quota reached: {} of {limit} checkpoints kept; delete one first",
                held.len()
            )));
        }
        let (row, id) = self.capturable(user, reference, "checkpoint").await?;
        let ck_id = format!("ck-{}", random_hex(6).map_err(internal)?);
        let dir = self.checkpoint_dir(&user.id, &ck_id);
        private_parent(&dir)?;
        let capture = {
            let _lock = self.locks.lock(&id).await;
            self.core.capture(&id, &dir, Durability::Durable).await?
        };
        let spec = &capture.meta.spec;
        let new = NewCheckpoint {
            id: ck_id,
            user_id: user.id.clone(),
            name: body.name.clone(),
            sandbox_id: row.id.clone(),
            sandbox_name: row.name.clone(),
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mb: u64::from(spec.memory_mb),
            disk_mb: spec.disk_mb.unwrap_or(self.config.defaults.disk_mb),
            bytes: capture.bytes,
        };
        let store = self.store.clone();
        let inserted = blocking(move || store.insert_checkpoint(&new, limit)).await;
        let ck = match inserted {
            Ok(ck) => ck,
            Err(e) => {
                // Lost a race for the name or the quota: the files go.
                let d = dir.clone();
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
                return Err(e);
            }
        };
        self.event(
            user,
            &row.id,
            "checkpoint_created",
            serde_json::json!({
                "checkpoint": ck.name,
                "paused_ms": capture.paused.as_millis() as u64,
                "bytes": ck.bytes,
            }),
        )
        .await;
        if let Err(e) = self.persist(&id).await {
            tracing::warn!(sandbox = %id, error = %e, "recording the state after a checkpoint");
        }
        Ok(checkpoint_view(&ck))
    }

    /// The caller's checkpoints.
    pub async fn list_checkpoints(&self, user: &UserRecord) -> Result<Vec<Checkpoint>, ApiError> {
        let (store, uid) = (self.store.clone(), user.id.clone());
        let rows = blocking(move || store.checkpoints(&uid)).await?;
        Ok(rows.iter().map(checkpoint_view).collect())
    }

    /// One of the caller's checkpoints.
    pub async fn get_checkpoint(
        &self,
        user: &UserRecord,
        reference: &str,
    ) -> Result<Checkpoint, ApiError> {
        Ok(checkpoint_view(
            &self.checkpoint_row(user, reference).await?,
        ))
    }

    /// Deletes a checkpoint and its files; a 409 while a sandbox made from
    /// it (or rolled back to it) exists.
    pub async fn delete_checkpoint(
        &self,
        user: &UserRecord,
        reference: &str,
    ) -> Result<(), ApiError> {
        let (store, uid, r) = (self.store.clone(), user.id.clone(), reference.to_string());
        let row = blocking(move || store.delete_checkpoint(&uid, &r)).await?;
        let dir = self.checkpoint_dir(&row.user_id, &row.id);
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(internal)?;
        if let Err(e) = removed {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(checkpoint = %row.id, error = %e, "removing a checkpoint's files");
            }
        }
        self.event(
            user,
            &row.sandbox_id,
            "checkpoint_deleted",
            serde_json::json!({"checkpoint": row.name}),
        )
        .await;
        Ok(())
    }

    /// `POST /sandboxes {"from": {"checkpoint"}}`: a new sandbox restored
    /// from the checkpoint. Image, shape, disk, env, files and init are the
    /// checkpoint's; asking for any of them is a 400.
    pub(super) async fn create_from_checkpoint(
        &self,
        user: &UserRecord,
        body: CreateSandbox,
    ) -> Result<(bool, Sandbox), ApiError> {
        let Some(from) = body.from.clone() else {
            return Err(ApiError::Internal("no checkpoint to create from".into()));
        };
        let fixed = [
            ("image", body.image.is_some()),
            ("cpus", body.cpus.is_some()),
            ("memory_mb", body.memory_mb.is_some()),
            ("disk_size_mb", body.disk_size_mb.is_some()),
            ("env", !body.env.is_empty()),
            ("secrets", !body.secrets.is_empty()),
            ("files", !body.files.is_empty()),
            ("init", body.init.is_some()),
            ("volumes", !body.volumes.is_empty()),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, given)| *given) {
            return Err(ApiError::BadRequest(format!(
                "'{field}' comes from the checkpoint; leave it out of a create with \"from\""
            )));
        }
        let ck = self.checkpoint_row(user, &from.checkpoint).await?;
        let capture = self.open_checkpoint(&ck).await?;
        let name = match body.name.clone() {
            Some(n) => n,
            None => format!("sb-{}", random_hex(3).map_err(internal)?),
        };
        super::check_labels(&body.labels)?;
        let mut spec = capture.meta.spec.clone();
        spec.name = name;
        spec.network_group = user.id.clone();
        if let Some(e) = &body.egress {
            spec.egress = crate::validate::egress(e)?;
        }
        let options = StartOptions {
            keep_hot: body.keep_hot,
            labels: body.labels.clone(),
            secrets: Vec::new(),
            existing: Existing::Return,
            shown_image: Some(ck.image.clone()),
        };
        let start = Start::Capture {
            capture: Box::new(capture),
            origin: Some(ck.id.clone()),
        };
        self.insert_and_start(user, spec, options, Vec::new(), start)
            .await
    }

    /// `POST /sandboxes/:id/restore`: rolls a sandbox back to a checkpoint.
    pub async fn restore_checkpoint(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
        body: RestoreSandbox,
    ) -> Result<Sandbox, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        tokio::spawn(async move { this.restore_checkpoint_inner(&user, &r, body).await })
            .await
            .map_err(internal)?
    }

    async fn restore_checkpoint_inner(
        &self,
        user: &UserRecord,
        reference: &str,
        body: RestoreSandbox,
    ) -> Result<Sandbox, ApiError> {
        let ck = self.checkpoint_row(user, &body.checkpoint).await?;
        let capture = self.open_checkpoint(&ck).await?;
        let (row, id) = self.capturable(user, reference, "restore").await?;
        let _lock = self.locks.lock(&id).await;
        let restored = self.core.restore_to(&id, capture).await;
        if let Err(e) = restored {
            // A rollback that ended the old VM and could not start the new
            // one leaves the sandbox failed (core says so); a refusal
            // before that leaves it as it was.
            if let Ok(rec) = self.core.get(&id) {
                if rec.state == bhatti_core::SandboxState::Failed {
                    let reason = rec.failure.unwrap_or_else(|| error_chain(&e));
                    self.mark_failed(user, &row.id, &reason).await;
                }
            }
            return Err(e.into());
        }
        let (store, rid, cid) = (self.store.clone(), row.id.clone(), ck.id.clone());
        blocking(move || store.set_sandbox_checkpoint(&rid, &cid)).await?;
        self.event(
            user,
            &row.id,
            "restored",
            serde_json::json!({"checkpoint": ck.name}),
        )
        .await;
        Ok(view(&self.persist(&id).await?))
    }

    /// `POST /sandboxes/:id/fork`: `count` new sandboxes restored from one
    /// capture of this one. Every child's row is made (quotas checked) as
    /// it starts; a child that fails is `failed` and the first failure is
    /// the answer.
    pub async fn fork(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
        body: ForkSandbox,
    ) -> Result<Vec<Sandbox>, ApiError> {
        let (this, user, r) = (self.clone(), user.clone(), reference.to_string());
        tokio::spawn(async move { this.fork_inner(&user, &r, body).await })
            .await
            .map_err(internal)?
    }

    async fn fork_inner(
        self: &Arc<Self>,
        user: &UserRecord,
        reference: &str,
        body: ForkSandbox,
    ) -> Result<Vec<Sandbox>, ApiError> {
        let count = body.count.unwrap_or(1);
        if !(1..=MAX_FORK_COUNT).contains(&count) {
            return Err(ApiError::BadRequest(format!(
                "count must be 1..={MAX_FORK_COUNT}"
            )));
        }
        let (row, id) = self.capturable(user, reference, "fork").await?;
        let names: Vec<String> = match (&body.name, count) {
            (Some(n), 1) => vec![n.clone()],
            (Some(n), _) => (1..=count).map(|k| format!("{n}-{k}")).collect(),
            (None, _) => (1..=count)
                .map(|k| format!("{}-fork-{k}", row.name))
                .collect(),
        };
        for n in &names {
            crate::validate::name("sandbox", n)?;
            if self.row(user, n).await.is_ok() {
                return Err(ApiError::Conflict(format!(
                    "a sandbox named '{n}' already exists"
                )));
            }
        }
        let scratch = self
            .core
            .config()
            .data_dir
            .join("captures")
            .join(format!("fork-{}", random_hex(6).map_err(internal)?));
        private_parent(&scratch)?;
        let capture = {
            let _lock = self.locks.lock(&id).await;
            self.core
                .capture(&id, &scratch, Durability::Scratch)
                .await?
        };
        self.event(
            user,
            &row.id,
            "forked",
            serde_json::json!({
                "children": names,
                "paused_ms": capture.paused.as_millis() as u64,
            }),
        )
        .await;
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let (this, user, capture) = (self.clone(), user.clone(), capture.clone());
            let mut spec = capture.meta.spec.clone();
            spec.name = name.clone();
            let options = StartOptions {
                keep_hot: false,
                labels: Default::default(),
                secrets: Vec::new(),
                existing: Existing::Conflict,
                shown_image: Some(row.image.clone()),
            };
            set.spawn(async move {
                let start = Start::Capture {
                    capture: Box::new(capture),
                    origin: None,
                };
                let r = this
                    .insert_and_start(&user, spec, options, Vec::new(), start)
                    .await;
                (i, r)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = set.join_next().await {
            results.push(joined.map_err(internal)?);
        }
        // Started VMs keep the memory image they mapped; the name goes.
        let dir = capture.dir.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(internal)?
        {
            tracing::warn!(error = %e, "removing a fork's capture");
        }
        results.sort_by_key(|(i, _)| *i);
        let mut children = Vec::new();
        for (_, r) in results {
            children.push(r?.1);
        }
        if let Err(e) = self.persist(&id).await {
            tracing::warn!(sandbox = %id, error = %e, "recording the state after a fork");
        }
        Ok(children)
    }
}
