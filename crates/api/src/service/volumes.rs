//! Persistent volumes: a user's ext4 disks that outlive sandboxes
//! (`docs/state.md`). The host makes the file (`mkfs.ext4` of an empty,
//! sparse file) and later only lengthens it; it never mounts or reads what
//! a guest wrote in one. Each is charged to the user's disk quota, checked
//! in the transaction that records it.

use std::collections::HashSet;
use std::path::PathBuf;

use api_types::{CreateVolume, SandboxStatus, Volume, VolumeAttach, VolumeUse};
use bhatti_core::{SandboxId, ThermalState, VolumeSpec};
use store::{NewAttachment, NewVolume, UserRecord, VolumeRow};

use super::{internal, Service};
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;
use crate::state::blocking;

/// Most volumes one sandbox may attach.
pub const MAX_VOLUMES: usize = proto::config_drive::MAX_VOLUMES;

impl Service {
    /// `DATA/volumes/<user id>/<volume id>.ext4`: never under a sandbox
    /// directory (destroy removes those).
    pub(super) fn volume_path(&self, row: &VolumeRow) -> PathBuf {
        self.config
            .data_dir
            .join("volumes")
            .join(&row.user_id)
            .join(format!("{}.ext4", row.id))
    }

    pub(super) async fn volume_row(
        &self,
        user: &UserRecord,
        name: &str,
    ) -> Result<VolumeRow, ApiError> {
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), name.to_string());
        blocking(move || store.volume(&uid, &key))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no volume '{name}'")))
    }

    pub(super) async fn volume_view(&self, row: VolumeRow) -> Result<Volume, ApiError> {
        let store = self.store.clone();
        let vid = row.id.clone();
        let uses = blocking(move || store.attachments_of_volume(&vid)).await?;
        Ok(Volume {
            name: row.name,
            size_mb: row.size_mb,
            created_at: row.created_at,
            updated_at: row.updated_at,
            attachments: uses
                .into_iter()
                .map(|a| VolumeUse {
                    sandbox: a.sandbox_name,
                    mount: a.mount,
                    read_only: a.read_only,
                })
                .collect(),
        })
    }

    fn check_volume_size(&self, mb: u64) -> Result<(), ApiError> {
        let (least, most) = (bhatti_core::MIN_DISK_MB, bhatti_core::MAX_DISK_MB);
        if !(least..=most).contains(&mb) {
            return Err(ApiError::BadRequest(format!(
                "size_mb must be {least}..={most}, got {mb}"
            )));
        }
        Ok(())
    }

    /// `POST /volumes`: records the volume (quota checked), then makes its
    /// file; a file that cannot be made takes the row with it.
    pub async fn create_volume(
        &self,
        user: &UserRecord,
        body: CreateVolume,
    ) -> Result<Volume, ApiError> {
        crate::validate::name("volume", &body.name)?;
        self.check_volume_size(body.size_mb)?;
        let id = format!("vol-{}", random_hex(8).map_err(internal)?);
        let u = random_hex(16).map_err(internal)?;
        // A version-4 UUID (the variant and version bits set).
        let mut b = hex::decode(&u).map_err(internal)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(&b);
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        );
        let new = NewVolume {
            id,
            user_id: user.id.clone(),
            name: body.name.clone(),
            size_mb: body.size_mb,
            uuid,
        };
        let store = self.store.clone();
        let row = blocking(move || store.insert_volume(&new)).await?;
        let path = self.volume_path(&row);
        let (p, size, uuid) = (path.clone(), row.size_mb << 20, row.uuid.clone());
        let made = tokio::task::spawn_blocking(move || image::create_volume(&p, size, &uuid))
            .await
            .map_err(internal)?;
        if let Err(e) = made {
            tracing::warn!(volume = %row.id, error = %e, "making the volume file failed");
            let store = self.store.clone();
            let (uid, name) = (user.id.clone(), row.name.clone());
            if let Err(e) = blocking(move || store.delete_volume(&uid, &name)).await {
                tracing::error!(volume = %row.id, error = %e, "forgetting the failed volume");
            }
            return Err(ApiError::Internal(format!(
                "cannot make the volume file: {}",
                error_chain(&e)
            )));
        }
        self.volume_event(
            user,
            "volume_created",
            serde_json::json!({"volume": row.name, "size_mb": row.size_mb}),
        )
        .await;
        self.volume_view(row).await
    }

    pub async fn list_volumes(&self, user: &UserRecord) -> Result<Vec<Volume>, ApiError> {
        let store = self.store.clone();
        let uid = user.id.clone();
        let rows = blocking(move || store.volumes_of(&uid)).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.volume_view(r).await?);
        }
        Ok(out)
    }

    pub async fn get_volume(&self, user: &UserRecord, name: &str) -> Result<Volume, ApiError> {
        let row = self.volume_row(user, name).await?;
        self.volume_view(row).await
    }

    /// `DELETE /volumes/:name`: refused (409) while any sandbox, running
    /// or not, has it attached.
    pub async fn delete_volume(&self, user: &UserRecord, name: &str) -> Result<(), ApiError> {
        if let Ok(row) = self.volume_row(user, name).await {
            self.volume_idle(&self.volume_path(&row), name)?;
        }
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), name.to_string());
        let row = blocking(move || store.delete_volume(&uid, &key)).await?;
        let path = self.volume_path(&row);
        let removed = tokio::task::spawn_blocking(move || image::remove_volume(&path))
            .await
            .map_err(internal)?;
        if let Err(e) = removed {
            // The row is gone (nothing can attach it again): the file is
            // only wasted space now.
            tracing::warn!(volume = %row.id, error = %error_chain(&e), "removing the volume file");
        }
        self.volume_event(
            user,
            "volume_deleted",
            serde_json::json!({"volume": row.name}),
        )
        .await;
        Ok(())
    }

    /// `PATCH /volumes/:name {"size_mb"}`: volumes only grow, and only
    /// while no sandbox using it runs hot or warm (a cold one gives up its
    /// snapshot first and is `stopped` after, as for a disk grow). The
    /// guest grows the file system at its next mount.
    pub async fn grow_volume(
        &self,
        user: &UserRecord,
        name: &str,
        mb: u64,
    ) -> Result<Volume, ApiError> {
        self.check_volume_size(mb)?;
        let row = self.volume_row(user, name).await?;
        if mb < row.size_mb {
            return Err(ApiError::BadRequest(format!(
                "volumes only grow: '{}' has {} MiB, asked for {mb}",
                row.name, row.size_mb
            )));
        }
        if mb == row.size_mb {
            return self.volume_view(row).await;
        }
        self.volume_idle(&self.volume_path(&row), name)?;
        // Each user's sandbox lock for the whole grow: none of them
        // starts while its volume's file changes.
        let (locks, ids) = self
            .quiet_users(
                user,
                &row,
                false,
                "a volume grows while no VM using it runs",
            )
            .await?;
        for id in ids.iter().filter(|id| self.index().contains_key(*id)) {
            let Ok(sb) = self.row(user, id.as_str()).await else {
                continue;
            };
            self.release_held_vm(
                id,
                &sb,
                "a volume it uses grew; it boots again at the next command",
            )
            .await?;
        }
        let store = self.store.clone();
        let (uid, key) = (user.id.clone(), name.to_string());
        let grown = blocking(move || store.set_volume_size(&uid, &key, mb, |_| Ok(()))).await?;
        let path = self.volume_path(&grown);
        let done = tokio::task::spawn_blocking(move || image::grow_volume(&path, mb << 20))
            .await
            .map_err(internal)?;
        drop(locks);
        if let Err(e) = done {
            let store = self.store.clone();
            let (uid, key, before) = (user.id.clone(), name.to_string(), row.size_mb);
            if let Err(e) =
                blocking(move || store.set_volume_size(&uid, &key, before, |_| Ok(()))).await
            {
                tracing::error!(volume = %row.id, error = %e, "restoring the recorded size");
            }
            return Err(ApiError::Internal(format!(
                "cannot grow the volume file: {}",
                error_chain(&e)
            )));
        }
        self.volume_event(
            user,
            "volume_grown",
            serde_json::json!({"volume": row.name, "size_mb": mb}),
        )
        .await;
        self.volume_view(grown).await
    }

    /// Locks (in id order) the sandboxes using volume `row` — only those
    /// holding it read-write when `only_rw` — and checks none runs a VM
    /// that writes it: hot or warm, or still being created, is a 409
    /// (`why` says what waits). Cold, stopped and failed ones are fine.
    /// The locks keep it so until dropped.
    async fn quiet_users(
        &self,
        user: &UserRecord,
        row: &VolumeRow,
        only_rw: bool,
        why: &str,
    ) -> Result<(Vec<tokio::sync::OwnedMutexGuard<()>>, Vec<SandboxId>), ApiError> {
        let store = self.store.clone();
        let vid = row.id.clone();
        let uses = blocking(move || store.attachments_of_volume(&vid)).await?;
        let mut ids: Vec<SandboxId> = uses
            .iter()
            .filter(|a| !(only_rw && a.read_only))
            .map(|a| a.sandbox_id.parse().map_err(internal))
            .collect::<Result<_, _>>()?;
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.dedup();
        let mut locks = Vec::with_capacity(ids.len());
        for id in &ids {
            locks.push(self.locks.lock(id).await);
        }
        let how = if only_rw { "read-write " } else { "" };
        for id in &ids {
            let Ok(sb) = self.row(user, id.as_str()).await else {
                continue;
            };
            if sb.status == SandboxStatus::Running && self.index().contains_key(id) {
                let thermal = self.core.get(id).map(|r| r.thermal)?;
                if thermal != ThermalState::Cold {
                    return Err(ApiError::Conflict(format!(
                        "volume '{}' is attached {how}to sandbox '{}', which is {}: stop it first \
                         (POST /sandboxes/{}/stop); {why}",
                        row.name,
                        sb.name,
                        super::persistence::thermal(thermal),
                        sb.name
                    )));
                }
            } else if sb.status == SandboxStatus::Creating {
                return Err(ApiError::Conflict(format!(
                    "volume '{}' is attached {how}to sandbox '{}', which is {}",
                    row.name, sb.name, sb.status
                )));
            }
        }
        Ok((locks, ids))
    }

    /// `POST /volumes/:name/clone {"name"}`: a new volume of the same
    /// size (quota checked with the insert) whose file is a copy of the
    /// source's, made on the host as bytes (holes kept, a reflink where
    /// the file system has them). A 409 while a sandbox holding the source
    /// read-write runs hot or warm: its content moves under the copy.
    pub async fn clone_volume(
        &self,
        user: &UserRecord,
        name: &str,
        body: api_types::CloneVolume,
    ) -> Result<Volume, ApiError> {
        crate::validate::name("volume", &body.name)?;
        let src = self.volume_row(user, name).await?;
        // Busy while copied: not imported into, nor attached read-write
        // by a new sandbox.
        let _mark = self.mark_volume(&self.volume_path(&src), name, super::archive::Job::Clone)?;
        let (locks, _) = self
            .quiet_users(
                user,
                &src,
                true,
                "a volume is cloned while no VM writing it runs",
            )
            .await?;
        let new = NewVolume {
            id: format!("vol-{}", random_hex(8).map_err(internal)?),
            user_id: user.id.clone(),
            name: body.name.clone(),
            size_mb: src.size_mb,
            // The copy's file system has the source's UUID (the host does
            // not rewrite it): lohar's by-UUID fallback refuses the two on
            // one sandbox (serials tell them apart under QEMU).
            uuid: src.uuid.clone(),
        };
        let store = self.store.clone();
        let row = blocking(move || store.insert_volume(&new)).await?;
        let (from, to) = (self.volume_path(&src), self.volume_path(&row));
        let made = tokio::task::spawn_blocking(move || image::clone_volume(&from, &to))
            .await
            .map_err(internal)?;
        drop(locks);
        let failed = made.err().map(|e| {
            tracing::warn!(volume = %row.id, error = %error_chain(&e), "cloning the volume file failed");
            ApiError::Internal(format!("cannot copy the volume file: {}", error_chain(&e)))
        });
        if let Some(err) = failed {
            let store = self.store.clone();
            let (uid, name) = (user.id.clone(), row.name.clone());
            if let Err(e) = blocking(move || store.delete_volume(&uid, &name)).await {
                tracing::error!(volume = %row.id, error = %e, "forgetting the failed clone");
            }
            let path = self.volume_path(&row);
            let _ = tokio::task::spawn_blocking(move || image::remove_volume(&path)).await;
            return Err(err);
        }
        self.volume_event(
            user,
            "volume_cloned",
            serde_json::json!({"volume": row.name, "from": src.name, "size_mb": row.size_mb}),
        )
        .await;
        self.volume_view(row).await
    }

    /// The attachments of a new sandbox, checked (400 for a bad mount or
    /// list, 404 for an unknown volume) and resolved to what core needs.
    /// Sharing (409) is checked when the row is inserted.
    pub(super) async fn volume_specs(
        &self,
        user: &UserRecord,
        asked: &[VolumeAttach],
    ) -> Result<Vec<(NewAttachment, VolumeSpec)>, ApiError> {
        if asked.len() > MAX_VOLUMES {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_VOLUMES} volumes per sandbox, got {}",
                asked.len()
            )));
        }
        let (mut names, mut mounts) = (HashSet::new(), HashSet::new());
        for a in asked {
            crate::validate::name("volume", &a.name)?;
            if let Err(reason) = proto::config_drive::check_mount(&a.mount) {
                return Err(ApiError::BadRequest(format!(
                    "mount path '{}' of volume '{}' {reason}",
                    a.mount, a.name
                )));
            }
            if !names.insert(a.name.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "volume '{}' is listed twice",
                    a.name
                )));
            }
            if !mounts.insert(a.mount.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "two volumes on one mount path '{}'",
                    a.mount
                )));
            }
        }
        let mut out: Vec<(NewAttachment, VolumeSpec)> = Vec::with_capacity(asked.len());
        for a in asked {
            let row = self.volume_row(user, &a.name).await?;
            if let Some((twin, _)) = out.iter().find(|(_, v)| v.uuid == row.uuid) {
                return Err(ApiError::BadRequest(format!(
                    "volumes '{}' and '{}' are copies of one another (one file system \
                     UUID): attach one of them",
                    twin.volume, a.name
                )));
            }
            out.push((
                NewAttachment {
                    volume: a.name.clone(),
                    mount: a.mount.clone(),
                    read_only: a.read_only,
                },
                VolumeSpec {
                    path: self.volume_path(&row),
                    uuid: row.uuid.clone(),
                    mount: a.mount.clone(),
                    read_only: a.read_only,
                },
            ));
        }
        Ok(out)
    }

    pub(super) async fn volume_event(
        &self,
        user: &UserRecord,
        kind: &str,
        detail: serde_json::Value,
    ) {
        let store = self.store.clone();
        let (uid, k) = (user.id.clone(), kind.to_string());
        if let Err(e) = blocking(move || store.record_event(&uid, None, &k, &detail)).await {
            tracing::warn!(error = %e, "cannot record a volume event");
        }
    }
}
