//! QEMU backend: `qemu-system-x86_64 -M microvm` (amd64 guests) or
//! `qemu-system-aarch64 -M virt` (arm64 guests), driven over QMP.
//!
//! The VMM is a tokio child (never `-daemonize`d) so we reap it and learn
//! how it ended. Pause/resume are QMP `stop`/`cont`. Snapshots are QMP
//! migrations to a file descriptor we pass with `getfd` (works on QEMU 7.2,
//! which has no `file:` URI, and needs no shell): with guest RAM in a shared
//! memory file and `x-ignore-shared`, only device state is written and a
//! restore maps the same file lazily.

pub mod cmdline;
pub mod qmp;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::Command;

use crate::confine::jail::Bind;
use crate::confine::{open_tap, which, Confinement, CGROUP_REMOVE_WITHIN};
use crate::error::{Result, VmmError};
use crate::process::console::{capped_console, ConsoleCounter, CONSOLE_CAP};
use crate::process::slot::{remove_stale, wait_ready, Attempt, ProcessSlot, Shutdown};
use crate::process::{ExitHook, VmmExit, VmmProcess};
use crate::select::EngineKind;
use crate::snapshot::{
    SnapshotInfo, SnapshotKind, SnapshotManifest, SnapshotMemory, FORMAT_VERSION, STATE_FILE,
};
use crate::spec::{MemoryBacking, VmSpec};
use crate::vmm::{Capabilities, Op, ShutdownPath, ShutdownReport, VmState, Vmm};
use cmdline::{Launch, Passed, QMP_SOCKET};
use qmp::{
    MigrateUri, MigrationCapability, QmpClient, QmpError, SetCapabilities, SetParameters,
    StatusInfo,
};

/// QEMU's vCPU limit for microvm is far above what we hand out; keep a sane
/// cap so a typo does not ask for 4 billion.
const MAX_VCPUS: u32 = 255;
/// How long QEMU may take to open its QMP socket.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a snapshot save or load may run.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Name under which the snapshot file descriptor is registered.
const SNAPSHOT_FD: &str = "bhatti-snapshot";

/// Hardware-assisted or emulated CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// `-accel kvm -cpu host`.
    Kvm,
    /// `-accel tcg`.
    Tcg,
}

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-x86_64` or `qemu-system-aarch64`.
    pub binary: PathBuf,
    /// The guests' architecture (decides the machine line).
    pub arch: crate::select::Arch,
    /// KVM or TCG.
    pub accel: Accel,
    /// Host TSC in kHz, appended to the guest command line as
    /// `tsc_early_khz=` (without it ~30% of microvm boots hang).
    pub tsc_khz: Option<u64>,
    /// Run confined (see [`crate::confine`]); `None`: as the daemon's
    /// user, in its namespace.
    pub confinement: Option<Arc<Confinement>>,
}

impl QemuConfig {
    /// A config for amd64 guests on `binary` and `accel` with the host's
    /// TSC frequency, unconfined.
    pub fn new(binary: PathBuf, accel: Accel) -> Self {
        Self::for_arch(binary, accel, crate::select::Arch::Amd64)
    }

    /// A config for `arch` guests (amd64: with the host's TSC frequency),
    /// unconfined.
    pub fn for_arch(binary: PathBuf, accel: Accel, arch: crate::select::Arch) -> Self {
        QemuConfig {
            binary,
            arch,
            accel,
            tsc_khz: match arch {
                crate::select::Arch::Amd64 => crate::tsc::host_tsc_khz(),
                crate::select::Arch::Arm64 => None,
            },
            confinement: None,
        }
    }

    /// The same, confined by `confinement`.
    pub fn confined(mut self, confinement: Option<Arc<Confinement>>) -> Self {
        self.confinement = confinement;
        self
    }

    fn engine(&self) -> EngineKind {
        match self.accel {
            Accel::Kvm => EngineKind::QemuKvm,
            Accel::Tcg => EngineKind::QemuTcg,
        }
    }
}

/// One VM on QEMU.
#[derive(Debug)]
pub struct QemuVmm {
    config: QemuConfig,
    spec: VmSpec,
    /// Serialises lifecycle operations; holds the QMP session.
    ops: tokio::sync::Mutex<Option<QmpClient>>,
    /// State and process, readable without waiting for an operation.
    slot: ProcessSlot,
    /// Console bytes the guest has written (kept or not).
    console: Arc<ConsoleCounter>,
}

impl QemuVmm {
    /// Validates `spec` for QEMU. Starts nothing.
    pub fn new(config: QemuConfig, spec: VmSpec) -> Result<Self> {
        spec.validate(MAX_VCPUS)?;
        Ok(QemuVmm {
            config,
            spec,
            ops: tokio::sync::Mutex::new(None),
            slot: ProcessSlot::new("QEMU"),
            console: Arc::default(),
        })
    }

    /// The full argument vector QEMU is (or would be) started with
    /// (unconfined: a confined QEMU gets descriptors instead of the QMP
    /// path and the TAP name).
    pub fn command_line(&self, launch: Launch) -> Vec<std::ffi::OsString> {
        cmdline::build(&self.spec, &self.config, launch, Passed::default())
    }

    /// Tests (feature `fake`): what a daemon killed with SIGKILL leaves —
    /// the QMP connection closed, the QEMU running on, unsupervised (and its
    /// console pipe's reader still here, as a restarted daemon's would not
    /// be: harmless).
    #[cfg(feature = "fake")]
    #[doc(hidden)]
    pub async fn simulate_daemon_crash(self) {
        drop(self.ops.lock().await.take());
        if let Some(p) = self.slot.process() {
            p.disown();
        }
    }

    /// Bytes of guest console output so far, including those the capped
    /// serial log no longer holds.
    pub fn console_bytes(&self) -> u64 {
        self.console.bytes()
    }

    /// [`Vmm::snapshot_orphan`]: the VM must not have been started by this
    /// value; afterwards it counts as exited.
    async fn take_over_and_snapshot(&self, dir: &Path) -> Result<SnapshotInfo> {
        {
            let mut qmp = self.ops.lock().await;
            let state = self.slot.state();
            if state != VmState::Created || qmp.is_some() {
                return Err(VmmError::InvalidState {
                    operation: "take over",
                    state,
                });
            }
            let sock = self.spec.work_dir.join(QMP_SOCKET);
            let c = QmpClient::connect(&sock)
                .await
                .map_err(|source| VmmError::Qmp {
                    command: "connect".into(),
                    source,
                })?;
            *qmp = Some(c);
            self.slot.set_state(VmState::Running);
        }
        let result = self.snapshot(dir, SnapshotKind::Full).await;
        let mut qmp = self.ops.lock().await;
        if let Some(mut c) = qmp.take() {
            // QEMU may close the socket before answering.
            if let Err(e) = c.run::<()>("quit", None).await {
                tracing::debug!(error = %e, "quit after taking over");
            }
        }
        self.slot.set_state(VmState::Exited);
        if let Some(conf) = &self.config.confinement {
            // That QEMU was not our child: its cgroup goes once it is empty.
            let cg = conf.cgroup_of(&self.spec.work_dir);
            match tokio::task::spawn_blocking(move || cg.remove(CGROUP_REMOVE_WITHIN)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "removing an adopted VMM's cgroup"),
                Err(e) => tracing::warn!(error = %e, "removing an adopted VMM's cgroup"),
            }
        }
        result
    }

    /// QMP `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        let mut qmp = self.ops.lock().await;
        let c = self.session(&mut qmp, "query-status")?;
        let r = c.query_status().await;
        self.qmp_result("query-status", r).await
    }

    fn session<'a>(
        &self,
        qmp: &'a mut Option<QmpClient>,
        operation: &'static str,
    ) -> Result<&'a mut QmpClient> {
        let state = self.slot.state();
        match qmp.as_mut() {
            Some(c) if state != VmState::Exited => Ok(c),
            _ => Err(self
                .slot
                .exit()
                .map(|e| e.to_error())
                .unwrap_or(VmmError::InvalidState { operation, state })),
        }
    }

    /// Maps a QMP failure: a dropped connection means QEMU died, and the
    /// caller gets its exit status and stderr rather than "broken pipe".
    async fn qmp_result<T>(&self, command: &str, r: Result<T, QmpError>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_disconnect() {
                    if let Some(err) = self.slot.exited_error().await {
                        return Err(err);
                    }
                }
                Err(VmmError::Qmp {
                    command: command.to_string(),
                    source: e,
                })
            }
        }
    }

    async fn cmd(&self, c: &mut QmpClient, command: &str) -> Result<()> {
        let r = c.run::<()>(command, None).await;
        self.qmp_result(command, r).await
    }

    async fn cmd_args<A: serde::Serialize + Sync>(
        &self,
        c: &mut QmpClient,
        command: &str,
        args: &A,
    ) -> Result<()> {
        let r = c.run(command, Some(args)).await;
        self.qmp_result(command, r).await
    }

    /// Starts QEMU and connects QMP. On failure the process is killed and
    /// the error says why (its exit and stderr if it died).
    async fn launch(&self, launch: Launch) -> Result<(Arc<VmmProcess>, QmpClient)> {
        self.spec.prepare_dirs()?;
        let sock = self.spec.work_dir.join(QMP_SOCKET);
        remove_stale(&sock)?;
        // The console goes through the daemon into the capped log: a fresh
        // boot starts it empty, a restore continues it.
        let console = capped_console(
            &self.spec.serial_log,
            launch == Launch::Boot,
            CONSOLE_CAP,
            self.console.clone(),
        )?;
        let mut cmd = Command::new(&self.config.binary);
        cmd.current_dir(&self.spec.work_dir);
        let (passed, held, on_exit) = match &self.config.confinement {
            Some(conf) => self.confine(conf, &sock, &mut cmd)?,
            None => (Passed::default(), Vec::new(), None),
        };
        cmd.args(cmdline::build(&self.spec, &self.config, launch, passed));
        let proc = self
            .slot
            .spawn(cmd, &self.config.binary, Some(console), None, on_exit)
            .inspect_err(|_| {
                if let Some(conf) = &self.config.confinement {
                    if let Err(e) = conf.cgroup_of(&self.spec.work_dir).remove(Duration::ZERO) {
                        tracing::warn!(error = %e, "removing the cgroup of a VMM that did not start");
                    }
                }
            })?;
        // The child has its copies.
        drop(held);
        match connect_qmp(&sock, &proc).await {
            Ok(c) => Ok((proc, c)),
            Err(e) => {
                proc.signal(libc::SIGKILL);
                Err(e)
            }
        }
    }

    /// Prepares a confined launch: the VM's files for the VMM user, its
    /// cgroup, the QMP socket and the TAP opened here and passed, and the
    /// child's jail and privilege drop. Returns the descriptors (to keep
    /// open until the spawn) and the hook removing the cgroup.
    fn confine(
        &self,
        conf: &Confinement,
        sock: &Path,
        cmd: &mut Command,
    ) -> Result<(Passed, Vec<OwnedFd>, Option<ExitHook>)> {
        let mut extra: Vec<Bind> = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
            .iter()
            .map(|d| Bind {
                path: d.into(),
                dir: false,
                read_only: false,
            })
            .collect();
        if self.config.accel == Accel::Kvm {
            extra.push(Bind {
                path: "/dev/kvm".into(),
                dir: false,
                read_only: false,
            });
        }
        let binary = which(&self.config.binary);
        if !binary.starts_with("/usr/") {
            extra.push(Bind {
                path: binary,
                dir: false,
                read_only: true,
            });
        }
        let mut vc = conf.for_vm(&self.spec, &extra, &[])?;
        if self.config.accel == Accel::Kvm {
            vc.allow_device(Path::new("/dev/kvm"))?;
        }
        let listener =
            std::os::unix::net::UnixListener::bind(sock).map_err(|source| VmmError::Confine {
                what: format!("binding {}", sock.display()),
                source,
            })?;
        let mut passed = Passed {
            qmp: Some(listener.as_raw_fd()),
            tap: None,
        };
        vc.keep_fd(listener.as_raw_fd());
        let mut held: Vec<OwnedFd> = vec![listener.into()];
        if let Some(net) = &self.spec.net {
            let tap = open_tap(&net.tap)?;
            passed.tap = Some(tap.as_raw_fd());
            vc.keep_fd(tap.as_raw_fd());
            held.push(tap);
        }
        let cg = vc.cgroup.clone();
        let hook: ExitHook = Box::new(move || {
            if let Err(e) = cg.remove(CGROUP_REMOVE_WITHIN) {
                tracing::warn!(error = %e, "removing a VMM's cgroup");
            }
        });
        let vc = Arc::new(vc);
        // SAFETY: `apply_in_child` makes only async-signal-safe system
        // calls on data prepared above (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || vc.apply_in_child());
        }
        Ok((passed, held, Some(hook)))
    }

    /// Polls `query-migrate` until the job ends.
    async fn wait_migration(&self, c: &mut QmpClient, operation: &'static str) -> Result<()> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        let mut interval = Duration::from_micros(500);
        loop {
            let r = c.query_migrate().await;
            let info = self.qmp_result("query-migrate", r).await?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Migration {
                        operation,
                        message: info
                            .error_desc
                            .unwrap_or_else(|| info.status.unwrap_or_default()),
                    })
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(VmmError::Timeout {
                    what: "the migration job",
                    after: MIGRATION_TIMEOUT,
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(20));
        }
    }

    /// `x-ignore-shared` is part of the stream's format: on when the
    /// saving VM's RAM was a shared file (left out of the stream), so a
    /// save sets it from the spec and a load from the manifest.
    fn set_capabilities(ignore_shared: bool) -> SetCapabilities {
        SetCapabilities {
            capabilities: vec![MigrationCapability {
                capability: "x-ignore-shared",
                state: ignore_shared,
            }],
        }
    }
}

/// Connects to QEMU's QMP socket as soon as it accepts, or reports the
/// VMM's exit if it dies first.
async fn connect_qmp(sock: &Path, proc: &VmmProcess) -> Result<QmpClient> {
    wait_ready(proc, QMP_READY_TIMEOUT, "QEMU's QMP socket", || async {
        match QmpClient::connect(sock).await {
            Ok(c) => Attempt::Ready(c),
            Err(QmpError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Attempt::NotYet
            }
            Err(e) => Attempt::Failed(VmmError::Qmp {
                command: "connect".into(),
                source: e,
            }),
        }
    })
    .await
}

#[async_trait]
impl Vmm for QemuVmm {
    fn engine(&self) -> EngineKind {
        self.config.engine()
    }

    fn capabilities(&self) -> Capabilities {
        let shared_mem = self.spec.memory.file().is_some();
        Capabilities {
            pause: true,
            snapshot: true,
            diff_snapshot: false,
            lazy_memory: shared_mem,
            device_state_only_snapshot: shared_mem,
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
        let mut qmp = self.ops.lock().await;
        let next = self.slot.next_state(Op::Boot)?;
        let (_proc, client) = self.launch(Launch::Boot).await?;
        *qmp = Some(client);
        self.slot.set_state(next);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let mut qmp = self.ops.lock().await;
        let next = self.slot.next_state(Op::Pause)?;
        let c = self.session(&mut qmp, "pause")?;
        self.cmd(c, "stop").await?;
        self.slot.set_state(next);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let mut qmp = self.ops.lock().await;
        let next = self.slot.next_state(Op::Resume)?;
        let c = self.session(&mut qmp, "resume")?;
        self.cmd(c, "cont").await?;
        self.slot.set_state(next);
        Ok(())
    }

    async fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo> {
        if kind == SnapshotKind::Diff {
            return Err(VmmError::Unsupported {
                engine: self.engine(),
                operation: "diff snapshot",
            });
        }
        let mut qmp = self.ops.lock().await;
        let from = self.slot.state();
        let next = self.slot.next_state(Op::Snapshot)?;
        let c = self.session(&mut qmp, "snapshot")?;
        let started = std::time::Instant::now();
        if from == VmState::Running {
            self.cmd(c, "stop").await?;
            self.slot.set_state(VmState::Paused);
        }
        std::fs::create_dir_all(dir).map_err(|source| VmmError::SnapshotIo {
            path: dir.to_path_buf(),
            source,
        })?;
        let state_path = dir.join(STATE_FILE);
        let io = |source| VmmError::SnapshotIo {
            path: state_path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&state_path)
            .map_err(io)?;
        // Whether RAM is the shared file is asked of QEMU, not assumed from
        // the spec: a VM restored from a capture runs on a private mapping,
        // and one adopted after a restart may be such a VM.
        let shared = match self.spec.memory.file() {
            None => false,
            Some(_) => {
                let args = serde_json::json!({
                    "path": format!("/objects/{}", cmdline::MEM_ID),
                    "property": "share",
                });
                let r = c.execute::<_, bool>("qom-get", Some(&args)).await;
                self.qmp_result("qom-get", r).await?
            }
        };
        let caps = Self::set_capabilities(shared);
        self.cmd_args(c, "migrate-set-capabilities", &caps).await?;
        // The default (128 MiB/s) makes a RAM-carrying save crawl; this is a
        // local file, so let it go as fast as the disk does.
        self.cmd_args(
            c,
            "migrate-set-parameters",
            &SetParameters {
                max_bandwidth: 1 << 40,
            },
        )
        .await?;
        let r = c.send_fd(SNAPSHOT_FD, &file).await;
        self.qmp_result("getfd", r).await?;
        let uri = MigrateUri {
            uri: format!("fd:{SNAPSHOT_FD}"),
        };
        self.cmd_args(c, "migrate", &uri).await?;
        self.wait_migration(c, "snapshot").await?;
        file.sync_all().map_err(io)?;
        let state_bytes = file.metadata().map_err(io)?.len();
        drop(file);
        if state_bytes == 0 {
            return Err(io(std::io::Error::other("QEMU wrote an empty state file")));
        }
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            engine: self.engine(),
            kind,
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            memory: match self.spec.memory.file() {
                Some(path) if shared => SnapshotMemory::SharedFile {
                    path: path.to_path_buf(),
                },
                _ => SnapshotMemory::InState,
            },
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
        let mut qmp = self.ops.lock().await;
        let next = self.slot.next_state(Op::Restore)?;
        let manifest = SnapshotManifest::read_for(dir, self.engine(), &self.spec)?;
        let mismatch = |reason: String| VmmError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            reason,
        };
        // Which memory the restored guest runs on, and whether that spends
        // the snapshot.
        let spends = match (&manifest.memory, &self.spec.memory) {
            (SnapshotMemory::InState, MemoryBacking::Anonymous) => true,
            // RAM comes from the stream into a new shared file: from then on
            // the VM is like any booted one.
            (SnapshotMemory::InState, MemoryBacking::File { path }) => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| VmmError::SnapshotIo {
                        path: path.clone(),
                        source,
                    })?;
                true
            }
            // The guest runs on the snapshot's own memory file.
            (SnapshotMemory::SharedFile { path }, MemoryBacking::File { path: mine })
                if path == mine =>
            {
                true
            }
            // A capture: its memory image mapped copy-on-write, never
            // written, so the capture serves any number of restores.
            (SnapshotMemory::File { path }, MemoryBacking::Private { path: mine }) if path == mine => {
                false
            }
            (theirs, mine) => {
                return Err(mismatch(format!(
                    "snapshot memory is {theirs:?}, the spec's is {mine:?}: QEMU needs the same memory backing"
                )))
            }
        };
        let ignore_shared = !matches!(manifest.memory, SnapshotMemory::InState);
        // QEMU has no network override: the TAP name is host-side only, so
        // another TAP is fine, but the NIC itself must be there or not.
        if manifest.tap.is_some() != self.spec.net.is_some() {
            return Err(mismatch(
                "the snapshot and the spec disagree on having a NIC".into(),
            ));
        }
        let state_path = dir.join(STATE_FILE);
        let file = std::fs::File::open(&state_path).map_err(|source| VmmError::SnapshotIo {
            path: state_path.clone(),
            source,
        })?;
        let (proc, mut client) = self.launch(Launch::Incoming).await?;
        let result = async {
            let c = &mut client;
            let caps = Self::set_capabilities(ignore_shared);
            self.cmd_args(c, "migrate-set-capabilities", &caps).await?;
            let r = c.send_fd(SNAPSHOT_FD, &file).await;
            self.qmp_result("getfd", r).await?;
            let uri = MigrateUri {
                uri: format!("fd:{SNAPSHOT_FD}"),
            };
            self.cmd_args(c, "migrate-incoming", &uri).await?;
            self.wait_migration(c, "restore").await?;
            // Loaded, and stopped (`-S`). The guest writes its memory file
            // once it runs: from here on the saved device state no longer
            // matches it. (A load that failed kept the snapshot: the guest
            // never ran.)
            if spends {
                crate::snapshot::consume(dir)?;
            }
            // The migration stream carries the source's run state, and a
            // snapshot is taken with the vCPUs stopped: start them.
            let r = c.query_status().await;
            let st = self.qmp_result("query-status", r).await?;
            if !st.running {
                if !matches!(st.status.as_str(), "paused" | "postmigrate" | "prelaunch") {
                    return Err(VmmError::Migration {
                        operation: "restore",
                        message: format!("QEMU is {} after loading the snapshot", st.status),
                    });
                }
                self.cmd(c, "cont").await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                *qmp = Some(client);
                self.slot.set_state(next);
                Ok(())
            }
            Err(e) => {
                proc.signal(libc::SIGKILL);
                Err(e)
            }
        }
    }

    async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport> {
        let mut qmp = self.ops.lock().await;
        let esc = match self.slot.begin_shutdown(grace)? {
            Shutdown::Done(report) => return Ok(report),
            Shutdown::Running(esc) => esc,
        };
        // Each request may fail because QEMU is already going; the exit is
        // what counts, so failures are logged and the next step decides.
        if let Some(c) = qmp.as_mut() {
            if let Err(e) = c.run::<()>("system_powerdown", None).await {
                tracing::debug!(error = %e, "system_powerdown");
            }
        }
        if let Some(report) = esc.wait(ShutdownPath::Guest).await {
            return Ok(report);
        }
        if let Some(c) = qmp.as_mut() {
            if let Err(e) = c.run::<()>("quit", None).await {
                tracing::debug!(error = %e, "quit");
            }
        }
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

    /// Takes over a QEMU that an earlier process started with this same
    /// spec and then lost (a daemon killed with SIGKILL leaves its VMMs
    /// running): connects to the QMP socket in the work directory, saves a
    /// full snapshot into `dir` (guest memory stays in the shared memory
    /// file) and tells that QEMU to quit.
    async fn snapshot_orphan(&self, dir: &Path) -> Result<SnapshotInfo> {
        self.take_over_and_snapshot(dir).await
    }
}
