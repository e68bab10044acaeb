//! A volume's files as a tar stream, out (`GET /volumes/:name/archive`)
//! and in (`PUT`). The host never parses a file system a guest wrote, so
//! the tar is made and unpacked inside a VM: a short-lived utility VM of
//! the daemon's default image, with the volume attached (read-only to
//! export, read-write to import) and its commands run as root (every
//! owner and mode is read and restored). It has no store row: it is not
//! listed, not charged to the user's sandbox count, and a daemon restart
//! reaps it as an orphan. It is destroyed when the call ends, whatever
//! the end (an error, a client gone mid-stream).
//!
//! While one runs the volume is marked busy (as while it is cloned): no
//! sandbox may attach it read-write (an export, a clone) or at all (an
//! import), and it is not cloned, grown, deleted or archived again. The mark is taken before the
//! attachments are checked, and a create checks the marks after its row
//! (with its attachments) is in: one of the two always sees the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client::{ExecEvent, WriteOptions};
use bhatti_core::{CoreError, GuestExec, SandboxId, SandboxManager, SandboxSpec, VolumeSpec};
use proto::ExecRequest;
use store::{UserRecord, VolumeRow};
use tokio::io::AsyncRead;

use super::{guest_error, internal, Service};
use crate::error::{error_chain, ApiError};
use crate::keys::random_hex;
use crate::state::blocking;

/// What is being done to a volume now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Job {
    /// A utility VM reads it.
    Export,
    /// A utility VM writes it.
    Import,
    /// The host copies its file.
    Clone,
}

impl Job {
    fn writes(self) -> bool {
        self == Job::Import
    }

    fn doing(self) -> &'static str {
        match self {
            Job::Export => "exported",
            Job::Import => "imported",
            Job::Clone => "cloned",
        }
    }
}

/// Volumes busy now, by file: the job, and its utility VM if it has one.
pub(super) type VolumeJobs = Arc<Mutex<HashMap<PathBuf, (Job, Option<SandboxId>)>>>;

/// A volume's busy mark, cleared when dropped.
#[derive(Debug)]
pub(super) struct JobMark {
    jobs: VolumeJobs,
    volume: PathBuf,
}

impl Drop for JobMark {
    fn drop(&mut self) {
        lock(&self.jobs).remove(&self.volume);
    }
}

/// Where the utility VM mounts the volume.
const MOUNT: &str = "/mnt/volume";
/// Where an import's tar is put on the utility VM's own disk first.
const SCRATCH: &str = "/var/tmp/bhatti-import.tar";
/// The longest a tar may run (an export stalls with a stalled client).
const TAR_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most of tar's stderr kept for an error message.
const MAX_STDERR: usize = 4096;
/// The utility VM's own disk beyond an import's tar.
const SCRATCH_SLACK_MB: u64 = 64;

type Jobs = HashMap<PathBuf, (Job, Option<SandboxId>)>;

fn lock(jobs: &VolumeJobs) -> std::sync::MutexGuard<'_, Jobs> {
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

/// A utility VM and the volume's busy mark: destroyed and cleared by
/// [`UtilityVm::finish`], or, if dropped before (the caller went away),
/// by a task of its own.
#[derive(Debug)]
pub struct UtilityVm {
    core: SandboxManager,
    id: SandboxId,
    jobs: VolumeJobs,
    volume: PathBuf,
    create: Option<tokio::task::JoinHandle<Result<(), String>>>,
    done: bool,
}

impl UtilityVm {
    async fn cleanup(
        core: SandboxManager,
        id: SandboxId,
        create: Option<tokio::task::JoinHandle<Result<(), String>>>,
        jobs: VolumeJobs,
        volume: PathBuf,
    ) {
        // A destroy cancels a create still in progress; one that had not
        // registered the VM yet is waited for and destroyed after.
        let first = core.destroy(&id).await;
        if let Some(c) = create {
            let _ = c.await;
        }
        if first.is_err() {
            match core.destroy(&id).await {
                Ok(()) | Err(CoreError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %error_chain(&e), "destroying a utility VM")
                }
            }
        }
        lock(&jobs).remove(&volume);
    }

    /// Destroys the VM and clears the mark, before returning.
    pub async fn finish(mut self) {
        self.done = true;
        let create = self.create.take();
        Self::cleanup(
            self.core.clone(),
            self.id.clone(),
            create,
            self.jobs.clone(),
            self.volume.clone(),
        )
        .await;
    }
}

impl Drop for UtilityVm {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let create = self.create.take();
        let (core, id, jobs, volume) = (
            self.core.clone(),
            self.id.clone(),
            self.jobs.clone(),
            self.volume.clone(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(Self::cleanup(core, id, create, jobs, volume));
            }
            // No runtime: the process is ending; restart reaps the VM.
            Err(_) => {
                lock(&jobs).remove(&volume);
            }
        }
    }
}

/// An export under way: tar's output, then its end.
#[derive(Debug)]
pub struct VolumeExport {
    vm: Option<UtilityVm>,
    exec: GuestExec,
    stderr: Vec<u8>,
}

impl VolumeExport {
    /// The next piece of the tar; `Ok(None)` at its (successful) end. An
    /// error ends the stream: the archive is incomplete.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            match self.exec.next().await {
                Ok(ExecEvent::Stdout(d)) => return Ok(Some(d)),
                Ok(ExecEvent::Stderr(d)) => keep(&mut self.stderr, &d),
                Ok(ExecEvent::Exit(e)) => {
                    if let Some(vm) = self.vm.take() {
                        vm.finish().await;
                    }
                    if e.code == 0 {
                        return Ok(None);
                    }
                    return Err(format!(
                        "tar in the utility VM failed (exit {}{}): {}",
                        e.code,
                        if e.timed_out { ", timed out" } else { "" },
                        String::from_utf8_lossy(&self.stderr).trim()
                    ));
                }
                Err(e) => return Err(error_chain(&e)),
            }
        }
    }
}

fn keep(buf: &mut Vec<u8>, d: &[u8]) {
    let room = MAX_STDERR.saturating_sub(buf.len());
    buf.extend_from_slice(&d[..d.len().min(room)]);
}

impl Service {
    /// Destroys the utility VMs running now (at shutdown: they would
    /// otherwise be snapshotted with the sandboxes, for nothing).
    pub(super) async fn end_utility_vms(&self) {
        let ids: Vec<SandboxId> = lock(&self.volume_jobs)
            .values()
            .filter_map(|(_, id)| id.clone())
            .collect();
        for id in ids {
            if let Err(e) = self.core.destroy(&id).await {
                tracing::debug!(sandbox = %id, error = %error_chain(&e), "ending a utility VM");
            }
        }
    }

    /// 409 while a utility VM has volume `path`: `rw` for an attach that
    /// writes. Checked by creates after their row is in.
    pub(super) fn check_volume_jobs(&self, vols: &[VolumeSpec]) -> Result<(), ApiError> {
        let jobs = lock(&self.volume_jobs);
        for v in vols {
            if let Some((job, _)) = jobs.get(&v.path) {
                if job.writes() || !v.read_only {
                    return Err(ApiError::Conflict(format!(
                        "a volume to attach at {} is being {} now; try again when that ends",
                        v.mount,
                        job.doing()
                    )));
                }
            }
        }
        Ok(())
    }

    /// 409 while volume `path` has a utility VM (clone, grow, delete).
    pub(super) fn volume_idle(&self, path: &Path, name: &str) -> Result<(), ApiError> {
        match lock(&self.volume_jobs).get(path) {
            Some((job, _)) => Err(ApiError::Conflict(format!(
                "volume '{name}' is being {} now; try again when that ends",
                job.doing()
            ))),
            None => Ok(()),
        }
    }

    /// Marks volume `path` busy with `job` (a 409 if it is already),
    /// until the mark is dropped.
    pub(super) fn mark_volume(
        &self,
        path: &Path,
        name: &str,
        job: Job,
    ) -> Result<JobMark, ApiError> {
        let mut jobs = lock(&self.volume_jobs);
        if let Some((j, _)) = jobs.get(path) {
            return Err(ApiError::Conflict(format!(
                "volume '{name}' is being {} now; try again when that ends",
                j.doing()
            )));
        }
        jobs.insert(path.to_path_buf(), (job, None));
        Ok(JobMark {
            jobs: self.volume_jobs.clone(),
            volume: path.to_path_buf(),
        })
    }

    /// Starts a utility VM with volume `row` at [`MOUNT`] (read-only
    /// unless `writes`), its own disk `disk_mb`.
    async fn utility_vm(
        &self,
        user: &UserRecord,
        row: &VolumeRow,
        writes: bool,
        disk_mb: u64,
    ) -> Result<UtilityVm, ApiError> {
        let path = self.volume_path(row);
        let id = SandboxId::generate().map_err(internal)?;
        {
            let mut jobs = lock(&self.volume_jobs);
            if let Some((j, _)) = jobs.get(&path) {
                return Err(ApiError::Conflict(format!(
                    "volume '{}' is being {} now; try again when that ends",
                    row.name,
                    j.doing()
                )));
            }
            let job = if writes { Job::Import } else { Job::Export };
            jobs.insert(path.clone(), (job, Some(id.clone())));
        }
        let mut vm = UtilityVm {
            core: self.core.clone(),
            id: id.clone(),
            jobs: self.volume_jobs.clone(),
            volume: path.clone(),
            create: None,
            done: false,
        };
        let store = self.store.clone();
        let vid = row.id.clone();
        let uses = blocking(move || store.attachments_of_volume(&vid)).await?;
        let holder = if writes {
            uses.first()
        } else {
            uses.iter().find(|a| !a.read_only)
        };
        if let Some(a) = holder {
            vm.finish().await;
            return Err(ApiError::Conflict(format!(
                "volume '{}' is attached {}to sandbox '{}'; {} (destroy it first)",
                row.name,
                if a.read_only {
                    "read-only "
                } else {
                    "read-write "
                },
                a.sandbox_name,
                if writes {
                    "an import needs it attached nowhere"
                } else {
                    "an export needs it attached read-write nowhere"
                }
            )));
        }
        let defaults = &self.config.defaults;
        let name = format!("bhatti-util-{}", random_hex(4).map_err(internal)?);
        let mut spec = SandboxSpec::new(&name, defaults.image.clone());
        spec.cpus = 1;
        spec.memory_mb = u32::try_from(defaults.memory_mb).unwrap_or(256).min(512);
        spec.disk_mb = Some(disk_mb);
        spec.network_group = user.id.clone();
        spec.egress = net::Egress::None;
        spec.agent_as_root = true;
        spec.volumes = vec![VolumeSpec {
            path,
            uuid: row.uuid.clone(),
            mount: MOUNT.to_string(),
            read_only: !writes,
        }];
        // Its own task: a caller gone mid-create does not cut it short;
        // the drop of `vm` destroys what it made.
        let core = self.core.clone();
        vm.create = Some(tokio::spawn(async move {
            core.create_as(id, spec)
                .await
                .map(drop)
                .map_err(|e| error_chain(&e))
        }));
        let created = match vm.create.as_mut() {
            Some(h) => h.await.unwrap_or_else(|e| Err(e.to_string())),
            None => Ok(()),
        };
        vm.create = None;
        if let Err(e) = created {
            tracing::warn!(volume = %row.id, error = %e, "the utility VM did not start");
            vm.finish().await;
            return Err(ApiError::BadGateway(format!(
                "the utility VM for volume '{}' did not start: {}",
                row.name, e
            )));
        }
        Ok(vm)
    }

    /// `GET /volumes/:name/archive`: a utility VM with the volume
    /// read-only, running `tar -cf - .` in it; the caller streams the
    /// output. 409 while a sandbox holds the volume read-write.
    pub async fn export_volume(
        &self,
        user: &UserRecord,
        name: &str,
    ) -> Result<VolumeExport, ApiError> {
        let row = self.volume_row(user, name).await?;
        let vm = self
            .utility_vm(user, &row, false, bhatti_core::MIN_DISK_MB)
            .await?;
        let req = ExecRequest {
            argv: ["tar", "-C", MOUNT, "-cf", "-", "."]
                .map(String::from)
                .to_vec(),
            cwd: Some("/".into()),
            timeout_ms: Some(TAR_TIMEOUT.as_millis() as u64),
            ..Default::default()
        };
        let exec = match self.core.exec_stream(&vm.id, req).await {
            Ok(x) => x,
            Err(e) => {
                vm.finish().await;
                return Err(guest_error(e));
            }
        };
        self.volume_event(
            user,
            "volume_exported",
            serde_json::json!({"volume": row.name}),
        )
        .await;
        Ok(VolumeExport {
            vm: Some(vm),
            exec,
            stderr: Vec::new(),
        })
    }

    /// `PUT /volumes/:name/archive`: replaces the volume's files with the
    /// `size`-byte tar `body` (at most the volume's size, else 413). The
    /// tar goes to a utility VM's own disk, then, in the VM, the volume is
    /// emptied and the tar unpacked into it as root (owners by number,
    /// modes kept). 409 while any sandbox has the volume attached.
    pub async fn import_volume<R: AsyncRead + Unpin>(
        &self,
        user: &UserRecord,
        name: &str,
        size: u64,
        body: R,
    ) -> Result<api_types::Volume, ApiError> {
        let row = self.volume_row(user, name).await?;
        let most = row.size_mb << 20;
        if size > most {
            return Err(ApiError::PayloadTooLarge(format!(
                "an archive for volume '{}' may be at most its size, {most} bytes; got {size}",
                row.name
            )));
        }
        let vm = self
            .utility_vm(user, &row, true, row.size_mb + SCRATCH_SLACK_MB)
            .await?;
        let opts = WriteOptions {
            mode: Some(0o600),
            ..Default::default()
        };
        if let Err(e) = self
            .core
            .write_file_stream(&vm.id, SCRATCH, size, body, opts)
            .await
        {
            vm.finish().await;
            return Err(guest_error(e));
        }
        // Empty (every name, dot files too), unpack, flush. Tar drops a
        // leading `/`; whatever else the user's archive does stays in
        // this throwaway VM, which has only this volume (docs/state.md).
        let script = format!(
            "cd {MOUNT} && rm -rf -- ..?* .[!.]* * && \
             tar -xpf {SCRATCH} --numeric-owner -C {MOUNT} && rm -f {SCRATCH} && sync"
        );
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script],
            cwd: Some("/".into()),
            timeout_ms: Some(TAR_TIMEOUT.as_millis() as u64),
            ..Default::default()
        };
        let out = self.core.exec_capped(&vm.id, req, MAX_STDERR).await;
        vm.finish().await;
        let out = out.map_err(guest_error)?;
        if out.exit.code != 0 {
            return Err(ApiError::BadRequest(format!(
                "the archive did not unpack into volume '{}' (tar exit {}{}): {}; \
                 the volume may hold part of it",
                row.name,
                out.exit.code,
                if out.exit.timed_out {
                    ", timed out"
                } else {
                    ""
                },
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        self.volume_event(
            user,
            "volume_imported",
            serde_json::json!({"volume": row.name, "bytes": size}),
        )
        .await;
        self.volume_view(row).await
    }
}
