//! The fake engine: a [`Vmm`] whose "guest" is a real `lohar serve` process
//! on the host, so the orchestrator's lifecycle, thermal and recovery paths
//! run in milliseconds, without root, KVM or QEMU. Behind the cargo feature
//! `fake` (core's and api's dev-dependencies turn it on; the daemon never
//! has it), and never chosen by [`crate::select_engine`]: a test hands a
//! [`FakeEngine`] to the orchestrator as its [`Engine`].
//!
//! What each operation does:
//!
//! | `Vmm` | fake |
//! |---|---|
//! | boot | spawn `lohar serve --listen unix:WORK/agent.sock` (its pid is the VMM pid, its exit the VMM's exit), token and env from the spec's raw config drive, as lohar reads them in a VM |
//! | pause / resume | SIGSTOP / SIGCONT to lohar and every process under it |
//! | snapshot | stop them, write `vmstate` (what was recorded) and the manifest; stays paused |
//! | restore | check the manifest, start a new lohar on the same directories |
//! | shutdown / kill | the processes under lohar are killed (a VM's die with it), then lohar: SIGTERM, SIGTERM again, SIGKILL |
//! | snapshot_orphan | find the lohar an earlier process left (`WORK/fake/vmm.pid`, its command line must name this work directory), snapshot it, kill it |
//! | agent_socket | `WORK/agent.sock` |
//!
//! What a fake snapshot keeps, honestly: files. The guest's home and working
//! directory is `WORK/root/` (`HOME` too), and any file a command writes on
//! the host stays, across a snapshot, a restore and a boot. What it loses:
//! every process, their memory, PTY sessions and tunnels — a restore starts
//! a fresh agent, where a real restore resumes the same one. The guest sees
//! the host's filesystem and network and runs as the test's user. From the
//! config drive it takes the token, the env and the init command (run in
//! `root/`); its files and hostname are not applied (`lohar serve` writes
//! no files and sets no hostname). The other drives, the NIC and the memory
//! backing are accepted and ignored (reach the agent through
//! [`Vmm::agent_socket`]).
//!
//! Faults are injected through the engine a test holds
//! ([`FakeEngine::inject`]), never through globals: each test has its own
//! engine. Each fault is used once, by the next operation it applies to.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::process::Command;

use crate::error::{Result, VmmError};
use crate::process::slot::{open_serial_log, remove_stale, ProcessSlot, Shutdown};
use crate::process::{VmmExit, VmmProcess};
use crate::select::{EngineChoice, EngineKind};
use crate::snapshot::{
    SnapshotInfo, SnapshotKind, SnapshotManifest, SnapshotMemory, FORMAT_VERSION, STATE_FILE,
};
use crate::spec::VmSpec;
use crate::vmm::{Capabilities, Engine, Op, ShutdownPath, ShutdownReport, VmState, Vmm};

/// The agent's socket in the work directory.
pub const AGENT_SOCKET: &str = "agent.sock";
/// The fake's own files in the work directory (token, agent config, pid,
/// detached commands' logs).
pub const FAKE_DIR: &str = "fake";
/// The guest's home and working directory in the work directory: what a
/// fake snapshot keeps.
pub const ROOT_DIR: &str = "root";
/// The lohar pid, in [`FAKE_DIR`], for [`Vmm::snapshot_orphan`].
pub const PID_FILE: &str = "vmm.pid";
const TOKEN_FILE: &str = "token";
const CONFIG_FILE: &str = "agent.json";
/// As many as QEMU allows; the fake runs none.
const MAX_VCPUS: u32 = 255;
/// How long a stop or continue may take to show in `/proc`.
const SIGNAL_WAIT: Duration = Duration::from_secs(5);

/// A failure the next matching operation of a [`FakeEngine`]'s VMs shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next boot fails: lohar starts, is killed, and `boot` returns an
    /// error (a VMM that refuses its configuration).
    BootFails,
    /// The next boot succeeds but its VMM exits at once: lohar is given a
    /// token file that does not exist, says so on stderr and exits 1.
    ExitDuringBoot,
    /// The next boot's agent never answers: lohar starts stopped (a guest
    /// that hangs before its agent is up). Resume does not wake it.
    AgentSilent,
    /// The next boot's agent answers only after this long (lohar starts
    /// stopped and is continued then).
    AgentLate(Duration),
    /// The next snapshot fails after pausing (the VM stays paused, as a
    /// failed QEMU migration leaves it).
    SnapshotFails,
    /// The next restore fails before its guest runs: lohar starts and is
    /// killed, the snapshot is kept.
    RestoreFails,
    /// The next restore fails after its guest ran: the snapshot is spent
    /// (as QEMU's is), lohar is killed.
    RestoreFailsAfterStart,
    /// The next restore succeeds but its agent never answers.
    RestoreSilent,
}

impl Fault {
    fn applies_to(self, op: Op) -> bool {
        match self {
            Fault::BootFails | Fault::ExitDuringBoot | Fault::AgentSilent | Fault::AgentLate(_) => {
                op == Op::Boot
            }
            Fault::SnapshotFails => op == Op::Snapshot,
            Fault::RestoreFails | Fault::RestoreFailsAfterStart | Fault::RestoreSilent => {
                op == Op::Restore
            }
        }
    }
}

/// How often the VMs of one engine did each thing (started, not
/// necessarily succeeded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// `boot` calls that got past the state check.
    pub boots: u32,
    /// `restore` calls that got past the manifest check.
    pub restores: u32,
    /// `snapshot` calls that got past the state check.
    pub snapshots: u32,
    /// Pauses.
    pub pauses: u32,
    /// Resumes.
    pub resumes: u32,
    /// Orphans taken over by `snapshot_orphan`.
    pub orphans_taken: u32,
}

/// The test engine: makes [`FakeVmm`]s that run `lohar` and holds their
/// fault plan and counters. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct FakeEngine {
    state: Arc<EngineState>,
}

#[derive(Debug)]
struct EngineState {
    choice: EngineChoice,
    faults: Mutex<VecDeque<Fault>>,
    stats: Mutex<FakeStats>,
    /// Every lohar started, for [`FakeEngine::crash`].
    processes: Mutex<Vec<Weak<VmmProcess>>>,
    crashed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EngineState {
    fn take_fault(&self, op: Op) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| f.applies_to(op))?;
        faults.remove(i)
    }

    fn count(&self, f: impl FnOnce(&mut FakeStats)) {
        f(&mut lock(&self.stats));
    }
}

impl FakeEngine {
    /// An engine whose guests run `lohar` (the host build: `target/debug/lohar`,
    /// not the static one for the initramfs).
    pub fn new(lohar: impl Into<PathBuf>) -> FakeEngine {
        let binary = lohar.into();
        FakeEngine {
            state: Arc::new(EngineState {
                choice: EngineChoice {
                    kind: EngineKind::Fake,
                    arch: crate::select::Arch::host_or_default(),
                    reason: format!(
                        "fake engine for tests: each guest is {} serve on the host",
                        binary.display()
                    ),
                    binary,
                },
                faults: Mutex::new(VecDeque::new()),
                stats: Mutex::new(FakeStats::default()),
                processes: Mutex::new(Vec::new()),
                crashed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues `fault` for the next operation it applies to, on any VM of
    /// this engine.
    pub fn inject(&self, fault: Fault) {
        lock(&self.state.faults).push_back(fault);
    }

    /// Faults injected and not used yet.
    pub fn pending(&self) -> Vec<Fault> {
        lock(&self.state.faults).iter().copied().collect()
    }

    /// What the VMs of this engine did so far.
    pub fn stats(&self) -> FakeStats {
        *lock(&self.state.stats)
    }

    /// Simulates the daemon dying with SIGKILL: every lohar this engine
    /// started that still runs stops being supervised and keeps running,
    /// as an orphan for the next "daemon" to find; dropping their `Vmm`s
    /// no longer kills them. Make a new engine for what follows.
    pub fn crash(&self) {
        self.state.crashed.store(true, Ordering::SeqCst);
        for p in lock(&self.state.processes).drain(..) {
            if let Some(p) = p.upgrade() {
                p.disown();
            }
        }
    }
}

impl Engine for FakeEngine {
    fn choice(&self) -> &EngineChoice {
        &self.state.choice
    }

    fn new_vmm(&self, spec: VmSpec) -> Result<Box<dyn Vmm>> {
        Ok(Box::new(FakeVmm::new(self.state.clone(), spec)?))
    }
}

/// One fake VM: one `lohar serve` at a time.
#[derive(Debug)]
pub struct FakeVmm {
    engine: Arc<EngineState>,
    spec: VmSpec,
    /// Serialises lifecycle operations.
    ops: tokio::sync::Mutex<()>,
    slot: ProcessSlot,
    /// The agent was started stopped (a hung guest): resume leaves it.
    hung: AtomicBool,
}

impl FakeVmm {
    fn new(engine: Arc<EngineState>, spec: VmSpec) -> Result<Self> {
        spec.validate(MAX_VCPUS)?;
        Ok(FakeVmm {
            engine,
            spec,
            ops: tokio::sync::Mutex::new(()),
            slot: ProcessSlot::new("fake"),
            hung: AtomicBool::new(false),
        })
    }

    fn socket(&self) -> PathBuf {
        self.spec.work_dir.join(AGENT_SOCKET)
    }

    fn fake_dir(&self) -> PathBuf {
        self.spec.work_dir.join(FAKE_DIR)
    }

    fn root_dir(&self) -> PathBuf {
        self.spec.work_dir.join(ROOT_DIR)
    }

    fn lohar(&self) -> &Path {
        &self.engine.choice.binary
    }

    fn fault(&self, operation: &'static str) -> VmmError {
        VmmError::Fake {
            operation,
            reason: "injected fault".into(),
        }
    }

    /// Writes the agent's token and config from the spec's config drive and
    /// starts lohar. `broken` gives it a token file that does not exist.
    fn launch(&self, fresh: bool, broken: bool) -> Result<Arc<VmmProcess>> {
        self.spec.prepare_dirs()?;
        let (fake, root) = (self.fake_dir(), self.root_dir());
        for d in [&fake, &root] {
            std::fs::create_dir_all(d).map_err(|source| VmmError::Prepare {
                path: d.clone(),
                source,
            })?;
        }
        remove_stale(&self.socket())?;
        let drive = read_config_drive(&self.spec)?;
        let token = fake.join(TOKEN_FILE);
        write_private(&token, drive.token.as_bytes())?;
        let mut env = drive.env.clone();
        env.insert("HOME".into(), root.display().to_string());
        let config = serde_json::json!({
            "env": env,
            "run_as": "agent",
            "default_cwd": root,
            // Started on a boot, not on a restore (as in a VM), its
            // output kept beside the console.
            "init_command": drive.init.as_ref().filter(|_| fresh).map(|i| &i.argv),
            "init_cwd": root,
            "init_log": fake.join("init.log"),
            // The host's `sync` flushes every disk of the machine; the
            // orchestrator runs its own before a snapshot.
            "sync_before_exit": false,
            "detach_log_dir": fake,
        });
        let config_path = fake.join(CONFIG_FILE);
        write_private(&config_path, config.to_string().as_bytes())?;
        // lohar prints `LISTENING …` (and nothing else) on stdout: the
        // fake's console.
        let console = open_serial_log(&self.spec.serial_log, fresh)?;
        let mut cmd = Command::new(self.lohar());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", self.socket().display()))
            .arg("--token-file")
            .arg(if broken {
                fake.join("no-such-token")
            } else {
                token
            })
            .arg("--config")
            .arg(&config_path)
            // A restored "guest" learns its new token as a VM's does: a
            // line on its console input.
            .arg("--identity-stdin")
            .current_dir(&root);
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of
        // the parent. A subreaper keeps what its commands leave running in
        // the background (`cmd &`) under lohar, so it ends with the "VM".
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = self
            .slot
            .spawn(cmd, self.lohar(), Some(Stdio::from(console)), None, None)?;
        {
            let mut procs = lock(&self.engine.processes);
            procs.retain(|p| p.strong_count() > 0);
            procs.push(Arc::downgrade(&proc));
        }
        let pid_file = fake.join(PID_FILE);
        if let Err(e) = std::fs::write(&pid_file, proc.pid().to_string()) {
            proc.signal(libc::SIGKILL);
            return Err(VmmError::Prepare {
                path: pid_file,
                source: e,
            });
        }
        self.hung.store(false, Ordering::SeqCst);
        Ok(proc)
    }

    /// Starts lohar stopped: for ever (`hung`) or until `late` has passed.
    async fn start_stopped(&self, proc: &Arc<VmmProcess>, late: Option<Duration>) -> Result<()> {
        stop_tree(proc).await?;
        match late {
            None => self.hung.store(true, Ordering::SeqCst),
            Some(after) => {
                let weak = Arc::downgrade(proc);
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    if let Some(p) = weak.upgrade() {
                        p.signal(libc::SIGCONT);
                    }
                });
            }
        }
        Ok(())
    }

    /// Writes `vmstate` and the manifest for the lohar `pid`.
    fn write_snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        pid: u32,
        started: Instant,
    ) -> Result<SnapshotInfo> {
        std::fs::create_dir_all(dir).map_err(|source| VmmError::SnapshotIo {
            path: dir.to_path_buf(),
            source,
        })?;
        let state_path = dir.join(STATE_FILE);
        let state = serde_json::json!({
            "engine": "fake",
            "lohar_pid": pid,
            "root": self.root_dir(),
            "taken_unix_ms": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "kept": "files (the guest's home is root/; every host file stays)",
            "lost": "processes, their memory, sessions and tunnels: a restore starts a new agent",
        });
        let body = serde_json::to_vec_pretty(&state).map_err(|e| VmmError::SnapshotIo {
            path: state_path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_synced(&state_path, &body)?;
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            engine: EngineKind::Fake,
            kind,
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            memory: SnapshotMemory::InState,
            tap: self.spec.net.as_ref().map(|n| n.tap.clone()),
            state_bytes: body.len() as u64,
        };
        manifest.write(dir)?;
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            manifest,
            state_bytes: body.len() as u64,
            duration: started.elapsed(),
        })
    }

    /// Kills what runs under the current lohar (a VM's processes die with
    /// it); lohar itself is the caller's to end.
    fn kill_guest_processes(&self) {
        if let Some(pid) = self.slot.pid() {
            kill_descendants(pid);
        }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        // Dropping a `Vmm` kills its VMM (the process supervisor does
        // that for lohar); the processes under it go too, unless the
        // engine "crashed" and they are orphans on purpose.
        if !self.engine.crashed.load(Ordering::SeqCst) {
            self.kill_guest_processes();
        }
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn engine(&self) -> EngineKind {
        EngineKind::Fake
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            snapshot: true,
            diff_snapshot: false,
            lazy_memory: false,
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
        self.engine.count(|s| s.boots += 1);
        let fault = self.engine.take_fault(Op::Boot);
        let proc = self.launch(true, fault == Some(Fault::ExitDuringBoot))?;
        match fault {
            Some(Fault::BootFails) => {
                proc.signal(libc::SIGKILL);
                return Err(self.fault("boot"));
            }
            Some(Fault::AgentSilent) => self.start_stopped(&proc, None).await?,
            Some(Fault::AgentLate(after)) => self.start_stopped(&proc, Some(after)).await?,
            Some(Fault::ExitDuringBoot) | None => {}
            Some(
                f @ (Fault::SnapshotFails
                | Fault::RestoreFails
                | Fault::RestoreFailsAfterStart
                | Fault::RestoreSilent),
            ) => {
                unreachable!("{f:?} is not a boot fault")
            }
        }
        self.slot.set_state(next);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Pause)?;
        let proc = self.slot.live("pause")?;
        self.engine.count(|s| s.pauses += 1);
        stop_tree(&proc).await?;
        self.slot.set_state(next);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Resume)?;
        let proc = self.slot.live("resume")?;
        self.engine.count(|s| s.resumes += 1);
        if !self.hung.load(Ordering::SeqCst) {
            continue_tree(&proc).await?;
        }
        self.slot.set_state(next);
        Ok(())
    }

    async fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo> {
        if kind == SnapshotKind::Diff {
            return Err(VmmError::Unsupported {
                engine: EngineKind::Fake,
                operation: "diff snapshot",
            });
        }
        let _op = self.ops.lock().await;
        let from = self.slot.state();
        let next = self.slot.next_state(Op::Snapshot)?;
        let proc = self.slot.live("snapshot")?;
        self.engine.count(|s| s.snapshots += 1);
        let started = Instant::now();
        if from == VmState::Running {
            stop_tree(&proc).await?;
            self.slot.set_state(VmState::Paused);
        }
        if self.engine.take_fault(Op::Snapshot).is_some() {
            return Err(self.fault("snapshot"));
        }
        let info = self.write_snapshot(dir, kind, proc.pid(), started)?;
        self.slot.set_state(next);
        Ok(info)
    }

    async fn restore(&self, dir: &Path) -> Result<()> {
        let _op = self.ops.lock().await;
        let next = self.slot.next_state(Op::Restore)?;
        SnapshotManifest::read_for(dir, EngineKind::Fake, &self.spec)?;
        self.engine.count(|s| s.restores += 1);
        let fault = self.engine.take_fault(Op::Restore);
        // As QEMU's: the guest is about to run on the snapshot's state,
        // unless the snapshot is a capture (its memory mapped privately).
        let capture = matches!(self.spec.memory, crate::spec::MemoryBacking::Private { .. });
        if fault != Some(Fault::RestoreFails) && !capture {
            crate::snapshot::consume(dir)?;
        }
        let proc = self.launch(false, false)?;
        match fault {
            Some(Fault::RestoreFails | Fault::RestoreFailsAfterStart) => {
                proc.signal(libc::SIGKILL);
                return Err(self.fault("restore"));
            }
            Some(Fault::RestoreSilent) => self.start_stopped(&proc, None).await?,
            _ => {}
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
        self.kill_guest_processes();
        // The "guest" powers off: lohar on SIGTERM (continued, if paused,
        // so that it can act on it), unless it hangs.
        if !self.hung.load(Ordering::SeqCst) {
            esc.process().signal(libc::SIGTERM);
            esc.process().signal(libc::SIGCONT);
        }
        if let Some(report) = esc.wait(ShutdownPath::Guest).await {
            return Ok(report);
        }
        // The "VMM" quits whether its guest hangs or not.
        esc.process().signal(libc::SIGTERM);
        esc.process().signal(libc::SIGCONT);
        if let Some(report) = esc.wait(ShutdownPath::Vmm).await {
            return Ok(report);
        }
        esc.kill().await
    }

    async fn kill(&self) -> Result<VmmExit> {
        self.kill_guest_processes();
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

    async fn snapshot_orphan(&self, dir: &Path) -> Result<SnapshotInfo> {
        let _op = self.ops.lock().await;
        let state = self.slot.state();
        if state != VmState::Created {
            return Err(VmmError::InvalidState {
                operation: "take over",
                state,
            });
        }
        let fail = |reason: String| VmmError::Fake {
            operation: "take over",
            reason,
        };
        let pid_file = self.fake_dir().join(PID_FILE);
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| fail(format!("{}: {e}", pid_file.display())))?
            .trim()
            .parse()
            .map_err(|e| fail(format!("{}: {e}", pid_file.display())))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| fail(format!("lohar {pid} is gone: {e}")))?;
        let socket = self.socket().display().to_string();
        if !String::from_utf8_lossy(&cmdline).contains(&socket) {
            return Err(fail(format!("pid {pid} is not the lohar of {socket}")));
        }
        let started = Instant::now();
        signal_pid(pid, libc::SIGSTOP);
        signal_descendants(pid, libc::SIGSTOP).await;
        let result = self.write_snapshot(dir, SnapshotKind::Full, pid, started);
        // It ends either way, as QEMU is told to quit.
        kill_descendants(pid);
        signal_pid(pid, libc::SIGKILL);
        self.engine.count(|s| s.orphans_taken += 1);
        self.slot.set_state(VmState::Exited);
        result
    }

    fn agent_socket(&self) -> Option<PathBuf> {
        Some(self.socket())
    }
}

/// The config drive among the spec's drives (raw format, found by its
/// magic as lohar finds it), decoded.
fn read_config_drive(spec: &VmSpec) -> Result<proto::config_drive::ConfigDrive> {
    use proto::config_drive::{decode_raw, RAW_MAGIC};
    for d in &spec.drives {
        let mut head = [0u8; 8];
        let is_config = std::fs::File::open(&d.path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head == *RAW_MAGIC;
        if !is_config {
            continue;
        }
        let bytes = std::fs::read(&d.path).map_err(|source| VmmError::Prepare {
            path: d.path.clone(),
            source,
        })?;
        return decode_raw(&bytes).map_err(|e| VmmError::InvalidSpec {
            field: format!("drives[{}]", d.id),
            reason: format!("unreadable config drive: {e}"),
        });
    }
    Err(VmmError::InvalidSpec {
        field: "drives".into(),
        reason: "no raw config drive: the fake guest reads its agent token from it, as lohar does"
            .into(),
    })
}

fn write_private(path: &Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(body))
        .map_err(|source| VmmError::Prepare {
            path: path.to_path_buf(),
            source,
        })
}

fn write_synced(path: &Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    std::fs::File::create(path)
        .and_then(|mut f| {
            f.write_all(body)?;
            f.sync_all()
        })
        .map_err(|source| VmmError::SnapshotIo {
            path: path.to_path_buf(),
            source,
        })
}

/// The state letter of a process (`R`, `S`, `T`, `Z`, …), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Every process under `pid` (children, theirs, …), from one pass over
/// `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Processes come and go while we look.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// kill(2) on a process that is not our child (so not ours to reap); a
/// process that is gone already is fine.
fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a plain pid and signal; no memory is involved.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        tracing::debug!(pid, sig, error = %std::io::Error::last_os_error(), "signal");
    }
}

/// SIGKILL to everything under `pid`, until nothing new shows up.
fn kill_descendants(pid: u32) {
    for _ in 0..5 {
        let found = descendants(pid);
        // Zombies are dead already; they go with their parent.
        let live: Vec<u32> = found
            .into_iter()
            .filter(|&d| !matches!(proc_state(d), Some('Z') | None))
            .collect();
        if live.is_empty() {
            return;
        }
        for d in live {
            signal_pid(d, libc::SIGKILL);
        }
    }
}

/// Waits until `pid` is (or is no longer) stopped, or has exited.
async fn wait_stopped(proc: &VmmProcess, stopped: bool) -> Result<()> {
    let deadline = Instant::now() + SIGNAL_WAIT;
    loop {
        if let Some(exit) = proc.exit() {
            return Err(exit.to_error());
        }
        match proc_state(proc.pid()) {
            // Exited, not yet reaped: the next round reports the exit.
            Some('Z') | None => {}
            Some('T') if stopped => return Ok(()),
            Some(s) if !stopped && s != 'T' => return Ok(()),
            Some(_) => {}
        }
        if Instant::now() > deadline {
            return Err(VmmError::Timeout {
                what: if stopped {
                    "lohar to stop"
                } else {
                    "lohar to continue"
                },
                after: SIGNAL_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Signals every process under lohar and waits (a bounded while) until
/// each shows the stop or the continue; a process in uninterruptible sleep
/// may take longer, and is left to catch up.
async fn signal_descendants(pid: u32, sig: i32) {
    let stopped = sig == libc::SIGSTOP;
    let deadline = Instant::now() + SIGNAL_WAIT;
    // A command forking right now is caught by a later pass.
    loop {
        let pending: Vec<u32> = descendants(pid)
            .into_iter()
            .filter(|&d| match proc_state(d) {
                None | Some('Z') | Some('X') => false,
                Some(s) => (s == 'T') != stopped,
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tracing::debug!(pid, sig, ?pending, "processes under lohar did not follow");
            return;
        }
        for d in pending {
            signal_pid(d, sig);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Stops lohar (through its supervisor, so never a reaped pid), then
/// everything under it.
async fn stop_tree(proc: &VmmProcess) -> Result<()> {
    proc.signal(libc::SIGSTOP);
    wait_stopped(proc, true).await?;
    // Stopped, lohar starts nothing new.
    signal_descendants(proc.pid(), libc::SIGSTOP).await;
    Ok(())
}

/// Continues everything under lohar, then lohar.
async fn continue_tree(proc: &VmmProcess) -> Result<()> {
    signal_descendants(proc.pid(), libc::SIGCONT).await;
    proc.signal(libc::SIGCONT);
    wait_stopped(proc, false).await
}
