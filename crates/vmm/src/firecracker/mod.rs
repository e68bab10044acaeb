//! Firecracker backend: `firecracker --api-sock`, configured and driven
//! over its HTTP API.
//!
//! Boot is a fixed sequence of `PUT`s ([`boot_plan`], a pure function) and
//! `InstanceStart`; pause/resume are `PATCH /vm`; snapshots are
//! `PUT /snapshot/create` and a fresh process with `PUT /snapshot/load`
//! (file memory backend, mapped lazily). Firecracker writes the guest serial
//! console to its stdout, which we point at the spec's serial log; its own
//! log goes to `firecracker.log` in the work directory and its tail is
//! attached to errors with the stderr tail. Its API socket is in
//! [`RUN_DIR`] of the work directory, made afresh at every launch.
//!
//! Confined ([`FirecrackerConfig::confinement`], see [`crate::confine`]),
//! Firecracker runs as the VMM user in its own mount namespace holding its
//! VM's files at their host paths, [`RUN_DIR`] (its own, read-write), its
//! log, and `/dev/kvm` and `/dev/net/tun` nodes of its own; in its cgroup;
//! with its built-in seccomp filters (it is never given `--no-seccomp`).
//! The VM's TAP is made the VMM user's while it runs. Once its API answers,
//! [`RUN_DIR`] becomes root's (the socket cannot be swapped; group the
//! VMM's, 0710) with
//! [`OUT_DIR`] the VMM user's: a snapshot is written there and then moved
//! by the daemon into the snapshot directory (which is not in the jail); a
//! restore binds the snapshot's files read-only.

pub mod api;
pub mod model;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use crate::confine::jail::{Bind, KVM_NODE, TUN_NODE};
use crate::confine::{set_tap_owner, which, Confinement, CGROUP_REMOVE_WITHIN};
use crate::error::{Result, VmmError};
use crate::process::console::{capped_console, CONSOLE_CAP};
use crate::process::slot::{remove_stale, wait_ready, Attempt, ProcessSlot, Shutdown};
use crate::process::{ExitHook, VmmExit, VmmProcess};
use crate::select::EngineKind;
use crate::snapshot::{
    SnapshotInfo, SnapshotKind, SnapshotManifest, SnapshotMemory, FORMAT_VERSION, MEMORY_FILE,
    STATE_FILE,
};
use crate::spec::{MemoryBacking, VmSpec};
use crate::vmm::{Capabilities, Op, ShutdownPath, ShutdownReport, VmState, Vmm};
use api::{ApiClient, ApiError};
use model::*;

/// Firecracker's vCPU limit.
const MAX_VCPUS: u32 = 32;
/// Directory of the work directory holding the API socket (and, confined,
/// the snapshot files Firecracker writes before the daemon moves them):
/// made afresh at every launch, the VMM user's when confined.
pub const RUN_DIR: &str = "fc";
/// Name of the API socket in [`RUN_DIR`].
pub const API_SOCKET: &str = "api.sock";
/// Directory of [`RUN_DIR`] a confined Firecracker writes snapshots into
/// (the VMM user's; [`RUN_DIR`] itself is root's once the API answers).
pub const OUT_DIR: &str = "out";
/// Name of Firecracker's log file in the work directory.
pub const LOG_FILE: &str = "firecracker.log";
/// The guest NIC's id (one NIC per VM).
pub const IFACE_ID: &str = "eth0";
/// How long Firecracker may take to serve its API.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run Firecracker.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// Track dirty pages so that diff snapshots are possible (costs some
    /// guest write performance).
    pub track_dirty_pages: bool,
    /// Run confined (see [`crate::confine`]); `None`: as the daemon's
    /// user, in its namespace.
    pub confinement: Option<Arc<Confinement>>,
}

impl FirecrackerConfig {
    /// Full snapshots only, unconfined.
    pub fn new(binary: PathBuf) -> Self {
        FirecrackerConfig {
            binary,
            track_dirty_pages: false,
            confinement: None,
        }
    }

    /// The same, confined by `confinement`.
    pub fn confined(mut self, confinement: Option<Arc<Confinement>>) -> Self {
        self.confinement = confinement;
        self
    }
}

/// The arguments Firecracker is started with: its API socket and its log.
/// Nothing here turns its seccomp filters off (`--no-seccomp`) or replaces
/// them (`--seccomp-filter`): its built-in filters always apply.
pub fn command_args(spec: &VmSpec) -> Vec<OsString> {
    let run = spec.work_dir.join(RUN_DIR);
    vec![
        "--api-sock".into(),
        run.join(API_SOCKET).into(),
        "--log-path".into(),
        spec.work_dir.join(LOG_FILE).into(),
        "--level".into(),
        "Warning".into(),
    ]
}

/// What a confined Firecracker needs in its jail besides the spec's files
/// (which [`Confinement`] binds): a few `/dev` nodes, [`RUN_DIR`]
/// read-write, its log, its binary when outside `/usr`, and the snapshot
/// files a restore loads (read-only). `/dev/kvm` and `/dev/net/tun` are
/// not bound: the jail gets nodes of its own ([`KVM_NODE`], [`TUN_NODE`]).
pub fn confined_binds(spec: &VmSpec, binary: &Path, restore: &[PathBuf]) -> Vec<Bind> {
    let file = |path: PathBuf, read_only: bool| Bind {
        path,
        dir: false,
        read_only,
    };
    let mut binds: Vec<Bind> = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
        .iter()
        .map(|d| file(d.into(), false))
        .collect();
    binds.push(Bind {
        path: spec.work_dir.join(RUN_DIR),
        dir: true,
        read_only: false,
    });
    binds.push(file(spec.work_dir.join(LOG_FILE), false));
    if !binary.starts_with("/usr/") {
        binds.push(file(binary.to_path_buf(), true));
    }
    for r in restore {
        if spec.memory.file() != Some(r.as_path()) {
            binds.push(file(r.clone(), true));
        }
    }
    binds
}

/// Moves a file a confined Firecracker wrote in its [`RUN_DIR`] to `to`
/// (outside its jail), and checks that what arrived is a regular file of
/// the VMM user (the VMM could have put a link there instead), mode 0600.
fn move_out(from: &Path, to: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| VmmError::SnapshotIo {
        path: to.to_path_buf(),
        source,
    };
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let meta = std::fs::symlink_metadata(from).map_err(io)?;
            if !meta.is_file() {
                return Err(io(std::io::Error::other(format!(
                    "{} is not a regular file",
                    from.display()
                ))));
            }
            std::fs::copy(from, to).map_err(io)?;
            std::os::unix::fs::lchown(to, Some(uid), None).map_err(io)?;
            std::fs::remove_file(from).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    // `to` is out of the VMM's reach now: what it is stays what it is.
    let meta = std::fs::symlink_metadata(to).map_err(io)?;
    if !meta.is_file() || meta.uid() != uid {
        if let Err(e) = std::fs::remove_file(to) {
            tracing::warn!(path = %to.display(), error = %e, "removing a bad snapshot file");
        }
        return Err(io(std::io::Error::other(
            "Firecracker left no regular file of the VMM user there",
        )));
    }
    // Whatever mode it was made with, a sandbox file is 0600.
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)
}

/// One API call of the boot sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootCall {
    /// `PUT /machine-config`.
    MachineConfig(MachineConfiguration),
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /drives/{id}`.
    Drive(Drive),
    /// `PUT /network-interfaces/{id}`.
    Network(NetworkInterface),
    /// `PUT /actions` with `InstanceStart`.
    Start(InstanceActionInfo),
}

impl BootCall {
    /// The request path.
    pub fn path(&self) -> String {
        match self {
            BootCall::MachineConfig(_) => "/machine-config".into(),
            BootCall::BootSource(_) => "/boot-source".into(),
            BootCall::Drive(d) => format!("/drives/{}", d.drive_id),
            BootCall::Network(n) => format!("/network-interfaces/{}", n.iface_id),
            BootCall::Start(_) => "/actions".into(),
        }
    }

    /// Sends it.
    pub async fn send(&self, api: &ApiClient) -> Result<(), ApiError> {
        let path = self.path();
        match self {
            BootCall::MachineConfig(b) => api.put(&path, b).await,
            BootCall::BootSource(b) => api.put(&path, b).await,
            BootCall::Drive(b) => api.put(&path, b).await,
            BootCall::Network(b) => api.put(&path, b).await,
            BootCall::Start(b) => api.put(&path, b).await,
        }
    }
}

/// The API calls that configure and start `spec`, in order.
pub fn boot_plan(spec: &VmSpec, config: &FirecrackerConfig) -> Vec<BootCall> {
    let mut calls = vec![
        BootCall::MachineConfig(MachineConfiguration {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            smt: None,
            track_dirty_pages: config.track_dirty_pages.then_some(true),
        }),
        BootCall::BootSource(BootSource {
            kernel_image_path: spec.kernel.clone(),
            boot_args: Some(spec.cmdline.clone()).filter(|c| !c.trim().is_empty()),
            initrd_path: spec.initrd.clone(),
        }),
    ];
    calls.extend(spec.drives.iter().map(|d| {
        BootCall::Drive(Drive {
            drive_id: d.id.clone(),
            path_on_host: d.path.clone(),
            is_root_device: false,
            is_read_only: d.read_only,
        })
    }));
    if let Some(net) = &spec.net {
        calls.push(BootCall::Network(NetworkInterface {
            iface_id: IFACE_ID.into(),
            host_dev_name: net.tap.clone(),
            guest_mac: Some(net.mac.to_string()),
        }));
    }
    calls.push(BootCall::Start(InstanceActionInfo {
        action_type: ActionType::InstanceStart,
    }));
    calls
}

/// The `PUT /snapshot/load` body for restoring `manifest` into `spec`.
pub fn load_params(
    dir: &Path,
    manifest: &SnapshotManifest,
    spec: &VmSpec,
    config: &FirecrackerConfig,
) -> Result<SnapshotLoadParams> {
    let mem = match &manifest.memory {
        SnapshotMemory::File { path } => path.clone(),
        other => {
            return Err(VmmError::SnapshotMismatch {
                dir: dir.to_path_buf(),
                reason: format!("Firecracker needs a memory file, the manifest has {other:?}"),
            })
        }
    };
    let network_overrides = match (&manifest.tap, &spec.net) {
        (Some(old), Some(new)) if *old != new.tap => vec![NetworkOverride {
            iface_id: IFACE_ID.into(),
            host_dev_name: new.tap.clone(),
        }],
        (Some(_), Some(_)) | (None, None) => Vec::new(),
        (Some(_), None) | (None, Some(_)) => {
            return Err(VmmError::SnapshotMismatch {
                dir: dir.to_path_buf(),
                reason: "the snapshot and the spec disagree on having a NIC".into(),
            })
        }
    };
    Ok(SnapshotLoadParams {
        snapshot_path: dir.join(STATE_FILE),
        mem_backend: MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: mem,
        },
        enable_diff_snapshots: config.track_dirty_pages,
        resume_vm: true,
        network_overrides,
    })
}

/// One VM on Firecracker.
#[derive(Debug)]
pub struct FirecrackerVmm {
    config: FirecrackerConfig,
    spec: VmSpec,
    api: ApiClient,
    ops: tokio::sync::Mutex<()>,
    slot: ProcessSlot,
}

impl FirecrackerVmm {
    /// Validates `spec` for Firecracker. Starts nothing.
    pub fn new(config: FirecrackerConfig, spec: VmSpec) -> Result<Self> {
        spec.validate(MAX_VCPUS)?;
        let api = ApiClient::new(spec.work_dir.join(RUN_DIR).join(API_SOCKET));
        Ok(FirecrackerVmm {
            config,
            spec,
            api,
            ops: tokio::sync::Mutex::new(()),
            slot: ProcessSlot::new("Firecracker"),
        })
    }

    /// The API client (for calls this crate does not wrap).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Maps an API failure; an unreachable API of a dead VMM becomes its
    /// exit status and stderr.
    async fn api_result<T>(
        &self,
        method: &'static str,
        path: &str,
        r: Result<T, ApiError>,
    ) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_unreachable() {
                    if let Some(err) = self.slot.exited_error().await {
                        return Err(err);
                    }
                }
                Err(VmmError::FirecrackerApi {
                    method,
                    path: path.into(),
                    source: e,
                })
            }
        }
    }

    async fn patch_vm(&self, state: VmRunState) -> Result<()> {
        let r = self.api.patch("/vm", &Vm { state }).await;
        self.api_result("PATCH", "/vm", r).await
    }

    /// Spawns Firecracker and waits until its API answers. `restore` are
    /// the snapshot files it will load (bound into its jail when confined).
    async fn launch(&self, fresh_console: bool, restore: &[PathBuf]) -> Result<Arc<VmmProcess>> {
        self.spec.prepare_dirs()?;
        // Nothing an earlier VMM left in its run directory is kept.
        let run = self.spec.work_dir.join(RUN_DIR);
        let prep = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VmmError::Prepare { path, source }
        };
        match std::fs::remove_dir_all(&run) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(prep(&run)(e)),
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&run)
                .map_err(prep(&run))?;
        }
        let sock = self.api.socket().to_path_buf();
        remove_stale(&sock)?;
        let log = self.spec.work_dir.join(LOG_FILE);
        // Firecracker opens the log path without creating it.
        std::fs::File::create(&log).map_err(prep(&log))?;
        // Firecracker writes the guest console to its stdout: a pipe the
        // daemon copies into the capped serial log.
        let console = capped_console(
            &self.spec.serial_log,
            fresh_console,
            CONSOLE_CAP,
            Default::default(),
        )?;
        let mut cmd = Command::new(&self.config.binary);
        cmd.args(command_args(&self.spec))
            .current_dir(&self.spec.work_dir);
        let on_exit = match &self.config.confinement {
            Some(conf) => Some(self.confine(conf, &mut cmd, &run, &log, restore)?),
            None => None,
        };
        let proc = self
            .slot
            .spawn(cmd, &self.config.binary, Some(console), Some(log), on_exit)
            .inspect_err(|_| {
                if let Some(conf) = &self.config.confinement {
                    if let Err(e) = conf.cgroup_of(&self.spec.work_dir).remove(Duration::ZERO) {
                        tracing::warn!(error = %e, "removing the cgroup of a VMM that did not start");
                    }
                }
            })?;
        let api = &self.api;
        let ready = wait_ready(&proc, API_READY_TIMEOUT, "Firecracker's API socket", || async {
            match api.get::<InstanceInfo>("/").await {
                Ok(info) => {
                    tracing::debug!(version = %info.vmm_version, state = %info.state, "Firecracker API up");
                    Attempt::Ready(())
                }
                Err(e) if e.is_unreachable() => Attempt::NotYet,
                Err(e) => Attempt::Failed(VmmError::FirecrackerApi {
                    method: "GET",
                    path: "/".into(),
                    source: e,
                }),
            }
        })
        .await;
        if let Err(e) = ready.and_then(|()| self.lock_run_dir(&run)) {
            proc.signal(libc::SIGKILL);
            return Err(e);
        }
        Ok(proc)
    }

    /// Confined, once the API socket exists: [`RUN_DIR`] becomes root's
    /// (`root:<VMM group> 0710`), so the VMM user can no longer replace the
    /// socket the daemon connects to (with a link to another socket), and
    /// gets [`OUT_DIR`] of its own to write snapshots into.
    fn lock_run_dir(&self, run: &Path) -> Result<()> {
        let Some(conf) = &self.config.confinement else {
            return Ok(());
        };
        let err = |source| VmmError::Confine {
            what: format!("locking {}", run.display()),
            source,
        };
        // SAFETY: geteuid(2) cannot fail.
        let uid = unsafe { libc::geteuid() };
        std::os::unix::fs::lchown(run, Some(uid), Some(conf.gid)).map_err(err)?;
        std::fs::set_permissions(run, std::os::unix::fs::PermissionsExt::from_mode(0o710))
            .map_err(err)?;
        let out = run.join(OUT_DIR);
        std::fs::create_dir(&out).map_err(err)?;
        conf.own_dir(&out)
    }

    /// Prepares a confined launch: the run directory, log and snapshot
    /// files the VMM user's, its cgroup and jail (with its own `/dev/kvm`
    /// and `/dev/net/tun`), its TAP the VMM user's until it exits. Returns
    /// the hook that removes the cgroup and takes the TAP back.
    fn confine(
        &self,
        conf: &Arc<Confinement>,
        cmd: &mut Command,
        run: &Path,
        log: &Path,
        restore: &[PathBuf],
    ) -> Result<ExitHook> {
        conf.own_dir(run)?;
        conf.own(log)?;
        for f in restore {
            if self.spec.memory.file() != Some(f.as_path()) {
                conf.own(f)?;
            }
        }
        let binary = which(&self.config.binary);
        let extra = confined_binds(&self.spec, &binary, restore);
        let vc = conf.for_vm(&self.spec, &extra, &[KVM_NODE, TUN_NODE])?;
        let cg = vc.cgroup.clone();
        let tap = self.spec.net.as_ref().map(|n| n.tap.clone());
        if let Some(tap) = &tap {
            if let Err(e) = set_tap_owner(tap, conf.uid) {
                if let Err(e) = cg.remove(Duration::ZERO) {
                    tracing::warn!(error = %e, "removing the cgroup of a VMM that did not start");
                }
                return Err(e);
            }
        }
        // SAFETY: geteuid(2) cannot fail.
        let daemon_uid = unsafe { libc::geteuid() };
        let hook: ExitHook = Box::new(move || {
            if let Err(e) = cg.remove(CGROUP_REMOVE_WITHIN) {
                tracing::warn!(error = %e, "removing a VMM's cgroup");
            }
            // The TAP goes back to the daemon's user: no other VMM (same
            // user) may attach to it while this sandbox has none running.
            if let Some(tap) = tap {
                // Only if it is still there (a destroyed sandbox's is not):
                // TUNSETIFF would make a new one.
                let exists = std::ffi::CString::new(tap.as_str())
                    // SAFETY: a NUL-terminated name; no memory is kept.
                    .is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0);
                if exists {
                    if let Err(e) = set_tap_owner(&tap, daemon_uid) {
                        tracing::warn!(tap, error = %e, "taking a TAP back from the VMM user");
                    }
                }
            }
        });
        let vc = Arc::new(vc);
        // SAFETY: `apply_in_child` makes only async-signal-safe system
        // calls on data prepared above (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || vc.apply_in_child());
        }
        Ok(hook)
    }
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    fn engine(&self) -> EngineKind {
        EngineKind::Firecracker
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            snapshot: true,
            diff_snapshot: self.config.track_dirty_pages,
            lazy_memory: true,
            device_state_only_snapshot: false,
            guest_shutdown: true,
        }
    }

    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn state(&self) -> VmState {
        self.slot.state()
    }

    fn pid(&self) -> Option<u32> {
        self.slot.pid()
    }

    async fn boot(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Boot)?;
        let proc = self.launch(true, &[]).await?;
        for call in boot_plan(&self.spec, &self.config) {
            let r = call.send(&self.api).await;
            if let Err(e) = self.api_result("PUT", &call.path(), r).await {
                proc.signal(libc::SIGKILL);
                return Err(e);
            }
        }
        self.slot.set_state(next);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Pause)?;
        self.patch_vm(VmRunState::Paused).await?;
        self.slot.set_state(next);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Resume)?;
        self.patch_vm(VmRunState::Resumed).await?;
        self.slot.set_state(next);
        Ok(())
    }

    async fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo> {
        if kind == SnapshotKind::Diff && !self.config.track_dirty_pages {
            return Err(VmmError::Unsupported {
                engine: EngineKind::Firecracker,
                operation: "diff snapshot without dirty page tracking",
            });
        }
        // Confined, anonymous memory is written to a fresh file in the
        // jail: a diff onto an earlier memory file cannot be made there.
        if kind == SnapshotKind::Diff
            && self.config.confinement.is_some()
            && self.spec.memory.file().is_none()
        {
            return Err(VmmError::Unsupported {
                engine: EngineKind::Firecracker,
                operation: "confined diff snapshot without a memory file in the spec",
            });
        }
        let _op = self.ops.lock().await;
        let from = self.slot.state();
        let next = self.slot.next_state(Op::Snapshot)?;
        let started = std::time::Instant::now();
        if from == VmState::Running {
            self.patch_vm(VmRunState::Paused).await?;
            self.slot.set_state(VmState::Paused);
        }
        std::fs::create_dir_all(dir).map_err(|source| VmmError::SnapshotIo {
            path: dir.to_path_buf(),
            source,
        })?;
        let mem = self
            .spec
            .memory
            .file()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join(MEMORY_FILE));
        let state = dir.join(STATE_FILE);
        // A confined Firecracker sees only its jail: it writes into its run
        // directory (the memory file of the spec is in the jail already)
        // and the daemon moves the files out.
        let run = self.spec.work_dir.join(RUN_DIR).join(OUT_DIR);
        let (state_out, mem_out) = match &self.config.confinement {
            Some(_) => (
                run.join(STATE_FILE),
                match self.spec.memory.file() {
                    Some(f) => f.to_path_buf(),
                    None => run.join(MEMORY_FILE),
                },
            ),
            None => (state.clone(), mem.clone()),
        };
        let params = SnapshotCreateParams {
            snapshot_type: Some(match kind {
                SnapshotKind::Full => SnapshotType::Full,
                SnapshotKind::Diff => SnapshotType::Diff,
            }),
            snapshot_path: state_out.clone(),
            mem_file_path: mem_out.clone(),
        };
        let r = self.api.put("/snapshot/create", &params).await;
        self.api_result("PUT", "/snapshot/create", r).await?;
        if let Some(conf) = &self.config.confinement {
            move_out(&state_out, &state, conf.uid)?;
            if mem_out != mem {
                move_out(&mem_out, &mem, conf.uid)?;
            }
        }
        // Verify before anyone kills this VMM on the strength of it.
        let len = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|source| VmmError::SnapshotIo {
                    path: p.to_path_buf(),
                    source,
                })
        };
        let state_bytes = len(&state)?;
        let mem_bytes = len(&mem)?;
        if state_bytes == 0 || mem_bytes < u64::from(self.spec.memory_mib) << 20 {
            return Err(VmmError::SnapshotIo {
                path: dir.to_path_buf(),
                source: std::io::Error::other(format!(
                    "Firecracker wrote {state_bytes} state bytes and {mem_bytes} memory bytes"
                )),
            });
        }
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            engine: EngineKind::Firecracker,
            kind,
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            memory: SnapshotMemory::File { path: mem },
            tap: self.spec.net.as_ref().map(|n| n.tap.clone()),
            state_bytes,
        };
        manifest.write(dir)?;
        self.slot.set_state(next);
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            manifest,
            state_bytes,
            duration: started.elapsed(),
        })
    }

    async fn restore(&self, dir: &Path) -> Result<()> {
        if matches!(self.spec.memory, MemoryBacking::Private { .. }) {
            // Firecracker maps a snapshot's memory privately anyway; a
            // restore from a capture is not wired (nor testable here) yet.
            return Err(VmmError::Unsupported {
                engine: EngineKind::Firecracker,
                operation: "restore from a capture (fork, checkpoint, template)",
            });
        }
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Restore)?;
        let manifest = SnapshotManifest::read_for(dir, EngineKind::Firecracker, &self.spec)?;
        let params = load_params(dir, &manifest, &self.spec, &self.config)?;
        let files = [
            params.snapshot_path.clone(),
            params.mem_backend.backend_path.clone(),
        ];
        let proc = self.launch(false, &files).await?;
        let r = self.api.put("/snapshot/load", &params).await;
        if let Err(e) = self.api_result("PUT", "/snapshot/load", r).await {
            proc.signal(libc::SIGKILL);
            return Err(e);
        }
        self.slot.set_state(next);
        Ok(())
    }

    async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport> {
        let _op = self.ops.lock().await;
        let esc = match self.slot.begin_shutdown(grace)? {
            Shutdown::Done(report) => return Ok(report),
            Shutdown::Running(esc) => esc,
        };
        let ctrl_alt_del = InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        };
        if let Err(e) = self.api.put("/actions", &ctrl_alt_del).await {
            tracing::debug!(error = %e, "SendCtrlAltDel");
        }
        if let Some(report) = esc.wait(ShutdownPath::Guest).await {
            return Ok(report);
        }
        esc.process().signal(libc::SIGTERM);
        if let Some(report) = esc.wait(ShutdownPath::Vmm).await {
            return Ok(report);
        }
        esc.kill().await
    }

    async fn kill(&self) -> Result<VmmExit> {
        self.slot.kill().await
    }

    async fn wait_exit(&self) -> Result<VmmExit> {
        self.slot.wait_exit().await
    }

    fn exit(&self) -> Option<VmmExit> {
        self.slot.exit()
    }

    async fn send_console(&self, bytes: &[u8]) -> Result<()> {
        self.slot.write_console(bytes).await
    }

    fn stderr_tail(&self) -> Option<String> {
        self.slot.stderr_tail()
    }

    /// Not wired for Firecracker yet (its API socket would allow it; the
    /// memory file has to be written, unlike QEMU's shared one). The daemon
    /// then kills the orphan and the sandbox boots again from its disk.
    async fn snapshot_orphan(&self, _dir: &Path) -> Result<SnapshotInfo> {
        Err(VmmError::Unsupported {
            engine: EngineKind::Firecracker,
            operation: "take over an orphaned VMM",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DriveSpec, MemoryBacking, NetSpec};
    use serde_json::json;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("/k/vmlinux", "/run/vm");
        s.vcpus = 2;
        s.memory_mib = 512;
        s.cmdline = "console=ttyS0 reboot=k".into();
        s.initrd = Some("/k/initrd".into());
        s.drives = vec![
            DriveSpec {
                id: "base".into(),
                path: "/img/base".into(),
                read_only: true,
            },
            DriveSpec {
                id: "rw".into(),
                path: "/run/vm/rw".into(),
                read_only: false,
            },
        ];
        s.net = Some(NetSpec {
            tap: "tap3".into(),
            mac: "02:00:00:00:00:03".parse().unwrap(),
        });
        s
    }

    /// Every body, as the JSON Firecracker receives, against the swagger's
    /// field names.
    #[test]
    fn boot_plan_bodies_match_the_api() {
        let plan = boot_plan(&spec(), &FirecrackerConfig::new("fc".into()));
        let wire: Vec<(String, serde_json::Value)> = plan
            .iter()
            .map(|c| {
                let v = match c {
                    BootCall::MachineConfig(b) => serde_json::to_value(b),
                    BootCall::BootSource(b) => serde_json::to_value(b),
                    BootCall::Drive(b) => serde_json::to_value(b),
                    BootCall::Network(b) => serde_json::to_value(b),
                    BootCall::Start(b) => serde_json::to_value(b),
                };
                (c.path(), v.unwrap())
            })
            .collect();
        assert_eq!(
            wire,
            vec![
                (
                    "/machine-config".into(),
                    json!({"vcpu_count": 2, "mem_size_mib": 512})
                ),
                (
                    "/boot-source".into(),
                    json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 reboot=k", "initrd_path": "/k/initrd"})
                ),
                (
                    "/drives/base".into(),
                    json!({"drive_id": "base", "path_on_host": "/img/base", "is_root_device": false, "is_read_only": true})
                ),
                (
                    "/drives/rw".into(),
                    json!({"drive_id": "rw", "path_on_host": "/run/vm/rw", "is_root_device": false, "is_read_only": false})
                ),
                (
                    "/network-interfaces/eth0".into(),
                    json!({"iface_id": "eth0", "host_dev_name": "tap3", "guest_mac": "02:00:00:00:00:03"})
                ),
                ("/actions".into(), json!({"action_type": "InstanceStart"})),
            ]
        );
        let tracked = boot_plan(
            &spec(),
            &FirecrackerConfig {
                track_dirty_pages: true,
                ..FirecrackerConfig::new("fc".into())
            },
        );
        assert_eq!(
            tracked[0],
            BootCall::MachineConfig(MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 512,
                smt: None,
                track_dirty_pages: Some(true)
            })
        );
    }

    /// Firecracker's own seccomp filters stay on: no argument turns them
    /// off or swaps them, confined or not.
    #[test]
    fn command_line_keeps_seccomp_on() {
        let args = command_args(&spec());
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "--api-sock",
                "/run/vm/fc/api.sock",
                "--log-path",
                "/run/vm/firecracker.log",
                "--level",
                "Warning"
            ]
        );
        assert!(!text.iter().any(|a| a.contains("seccomp")), "{text:?}");
    }

    /// The jail of a confined Firecracker: its run directory read-write,
    /// its log, its binary when outside /usr, snapshot files read-only
    /// (the spec's memory file is bound by the confinement already), and
    /// no host /dev/kvm or /dev/net/tun (it gets nodes of its own).
    #[test]
    fn confined_binds_hold_only_the_vms_own_paths() {
        let mut s = spec();
        s.memory = MemoryBacking::File {
            path: "/run/vm/memory.ram".into(),
        };
        let binds = confined_binds(
            &s,
            Path::new("/opt/fc/firecracker"),
            &[
                "/run/vm/snapshot/vmstate".into(),
                "/run/vm/memory.ram".into(),
            ],
        );
        let show: Vec<(String, bool, bool)> = binds
            .iter()
            .map(|b| (b.path.display().to_string(), b.dir, b.read_only))
            .collect();
        assert_eq!(
            show,
            [
                ("/dev/null".into(), false, false),
                ("/dev/zero".into(), false, false),
                ("/dev/random".into(), false, false),
                ("/dev/urandom".into(), false, false),
                ("/run/vm/fc".into(), true, false),
                ("/run/vm/firecracker.log".into(), false, false),
                ("/opt/fc/firecracker".into(), false, true),
                ("/run/vm/snapshot/vmstate".into(), false, true),
            ]
        );
        let under_usr = confined_binds(&s, Path::new("/usr/bin/firecracker"), &[]);
        assert!(under_usr
            .iter()
            .all(|b| !b.path.starts_with("/usr") && !b.path.ends_with("kvm")));
    }

    #[test]
    fn other_bodies_match_the_api() {
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmRunState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmRunState::Resumed
            })
            .unwrap(),
            json!({"state": "Resumed"})
        );
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type": "SendCtrlAltDel"})
        );
        assert_eq!(
            serde_json::to_value(SnapshotCreateParams {
                snapshot_type: Some(SnapshotType::Full),
                snapshot_path: "/s/vmstate".into(),
                mem_file_path: "/s/memory".into(),
            })
            .unwrap(),
            json!({"snapshot_type": "Full", "snapshot_path": "/s/vmstate", "mem_file_path": "/s/memory"})
        );
    }

    #[test]
    fn load_params_override_a_changed_tap() {
        let mut s = spec();
        s.memory = MemoryBacking::Anonymous;
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            engine: EngineKind::Firecracker,
            kind: SnapshotKind::Full,
            vcpus: 2,
            memory_mib: 512,
            memory: SnapshotMemory::File {
                path: "/s/memory".into(),
            },
            tap: Some("tap-old".into()),
            state_bytes: 1,
        };
        let p = load_params(
            Path::new("/s"),
            &manifest,
            &s,
            &FirecrackerConfig::new("fc".into()),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                "enable_diff_snapshots": false,
                "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap3"}]
            })
        );
        let same = SnapshotManifest {
            tap: Some("tap3".into()),
            ..manifest.clone()
        };
        let p = load_params(
            Path::new("/s"),
            &same,
            &s,
            &FirecrackerConfig::new("fc".into()),
        )
        .unwrap();
        assert!(serde_json::to_value(&p)
            .unwrap()
            .get("network_overrides")
            .is_none());
        s.net = None;
        assert!(load_params(
            Path::new("/s"),
            &manifest,
            &s,
            &FirecrackerConfig::new("fc".into())
        )
        .is_err());
        let in_state = SnapshotManifest {
            memory: SnapshotMemory::InState,
            ..manifest
        };
        assert!(load_params(
            Path::new("/s"),
            &in_state,
            &spec(),
            &FirecrackerConfig::new("fc".into())
        )
        .is_err());
    }
}
