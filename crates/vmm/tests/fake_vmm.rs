//! The fake engine on its own: a real `lohar serve` (the host build) as the
//! guest, reached through `Vmm::agent_socket`; pause, snapshot, restore,
//! shutdown, the orphan take-over and each injected fault. No root, no
//! hypervisor; seconds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_client::{AgentClient, Endpoint};
use proto::config_drive::{encode_raw, ConfigDrive};
use proto::ExecRequest;
use vmm::fake::{FakeEngine, Fault, AGENT_SOCKET, ROOT_DIR};
use vmm::{
    DriveSpec, Engine, EngineKind, ExitStatusKind, ShutdownPath, SnapshotKind, VmSpec, VmState,
    Vmm, VmmError,
};

const TOKEN: &str = "fake-engine-token-0123456789";

/// A spec in `dir` with a placeholder kernel, a disk that is not a config
/// drive, and a raw config drive carrying the token and some env.
fn spec(dir: &Path) -> VmSpec {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let config = dir.join("config.img");
    let drive = ConfigDrive {
        hostname: "fake".into(),
        token: TOKEN.into(),
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        files: Vec::new(),
        init: None,
        volumes: Vec::new(),
        exec_defaults: None,
        agent_as_root: false,
    };
    std::fs::write(&config, encode_raw(&drive).unwrap()).unwrap();
    let mut s = VmSpec::new(kernel, dir.join("w"));
    s.drives = vec![
        DriveSpec {
            id: "disk".into(),
            path: disk,
            read_only: false,
        },
        DriveSpec {
            id: "config".into(),
            path: config,
            read_only: true,
        },
    ];
    s
}

fn engine() -> FakeEngine {
    FakeEngine::new(testkit::host_lohar())
}

fn client(vm: &dyn Vmm) -> AgentClient {
    let sock = vm.agent_socket().expect("the fake has an agent socket");
    AgentClient::new(Endpoint::Unix(sock), TOKEN)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(20_000),
        ..Default::default()
    }
}

/// Polls `cond` until it holds, or panics naming `what` after `deadline`.
async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + deadline;
    while !cond().await {
        assert!(
            std::time::Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the agent answers a ping (or panics after 20 s).
async fn ready(c: &AgentClient) {
    wait_for(
        "the fake agent answers",
        Duration::from_secs(20),
        || async { c.deadline(Duration::from_millis(500)).ping().await.is_ok() },
    )
    .await;
}

async fn run(c: &AgentClient, script: &str) -> String {
    let out = c.exec(sh(script)).await.expect("exec");
    assert_eq!(
        out.exit.code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next()),
            Some('Z') | Some('X') | None
        ),
        Err(_) => false,
    }
}

fn state_letter(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

async fn gone(pid: u32) {
    wait_for(
        "the process is gone",
        Duration::from_secs(10),
        || async move { !alive(pid) },
    )
    .await;
}

#[tokio::test]
async fn boot_exec_pause_resume_shutdown() {
    let d = tempfile::tempdir().unwrap();
    let engine = engine();
    assert_eq!(engine.kind(), EngineKind::Fake);
    let vm = engine.new_vmm(spec(d.path())).unwrap();
    assert_eq!(vm.state(), VmState::Created);
    vm.boot().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    let pid = vm.pid().unwrap();
    assert_eq!(
        vm.agent_socket().unwrap(),
        d.path().join("w").join(AGENT_SOCKET)
    );
    let c = client(&*vm);
    ready(&c).await;
    let root = d.path().join("w").join(ROOT_DIR);
    // Home, working directory and the config drive's env.
    assert_eq!(
        run(&c, "pwd; echo $HOME; echo $GREETING").await,
        format!("{}\n{}\nhello\n", root.display(), root.display())
    );
    // lohar's stdout is the console.
    let console = std::fs::read_to_string(&vm.spec().serial_log).unwrap();
    assert!(console.starts_with("LISTENING unix:"), "{console:?}");

    // A background command: paused with the guest, killed with it.
    let child: u32 = run(&c, "sleep 1000 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(alive(child));
    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(state_letter(pid), Some('T'));
    assert_eq!(
        state_letter(child),
        Some('T'),
        "processes under lohar stop too"
    );
    let e = c
        .deadline(Duration::from_millis(300))
        .exec(sh("true"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("did not finish within"), "{e}");
    vm.resume().await.unwrap();
    assert_eq!(state_letter(child), Some('S'));
    assert_eq!(run(&c, "echo again").await, "again\n");
    assert_eq!(engine.stats().pauses, 1);
    assert_eq!(engine.stats().resumes, 1);

    let report = vm.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.path, ShutdownPath::Guest);
    assert_eq!(report.exit.status, ExitStatusKind::Signal(libc::SIGTERM));
    assert_eq!(vm.state(), VmState::Exited);
    assert_eq!(vm.pid(), None);
    gone(pid).await;
    gone(child).await;
}

#[tokio::test]
async fn snapshot_keeps_files_and_loses_processes() {
    let d = tempfile::tempdir().unwrap();
    let engine = engine();
    let s = spec(d.path());
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    let c = client(&*vm);
    ready(&c).await;
    let child: u32 = run(&c, "echo kept > note; sleep 1000 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .parse()
        .unwrap();
    let snap = d.path().join("snapshot");
    assert!(matches!(
        vm.snapshot(&snap, SnapshotKind::Diff).await,
        Err(VmmError::Unsupported { .. })
    ));
    let info = vm.snapshot(&snap, SnapshotKind::Full).await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(info.manifest.engine, EngineKind::Fake);
    assert!(info.state_bytes > 0);
    assert_eq!(
        std::fs::metadata(snap.join(vmm::snapshot::STATE_FILE))
            .unwrap()
            .len(),
        info.state_bytes
    );
    let exit = vm.kill().await.unwrap();
    assert_eq!(exit.status, ExitStatusKind::Signal(9));
    gone(child).await;

    // A new VM object restores it; QEMU's snapshot does not restore here.
    // A mismatched spec is refused and the snapshot kept.
    let mut other = s.clone();
    other.memory_mib += 1;
    let e = engine
        .new_vmm(other)
        .unwrap()
        .restore(&snap)
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::SnapshotMismatch { .. }), "{e}");
    let vm2 = engine.new_vmm(s.clone()).unwrap();
    vm2.restore(&snap).await.unwrap();
    assert_eq!(vm2.state(), VmState::Running);
    // The guest runs on it: the snapshot is spent.
    assert!(!snap.join(vmm::snapshot::MANIFEST).exists());
    let c2 = client(&*vm2);
    ready(&c2).await;
    assert_eq!(run(&c2, "cat note").await, "kept\n");
    assert!(!alive(child), "a fake restore starts no old process");
    assert_eq!(engine.stats().snapshots, 1);
    assert_eq!(engine.stats().restores, 1);
    // The console continues across the restore.
    let console = std::fs::read_to_string(&s.serial_log).unwrap();
    assert_eq!(console.matches("LISTENING").count(), 2, "{console:?}");

    vm2.kill().await.unwrap();
}

#[tokio::test]
async fn injected_faults() {
    let d = tempfile::tempdir().unwrap();
    let engine = engine();
    let s = spec(d.path());

    engine.inject(Fault::BootFails);
    let vm = engine.new_vmm(s.clone()).unwrap();
    let e = vm.boot().await.unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::Fake {
                operation: "boot",
                ..
            }
        ),
        "{e}"
    );
    let exit = vm.wait_exit().await.unwrap();
    assert_eq!(exit.status, ExitStatusKind::Signal(9));
    assert!(engine.pending().is_empty());

    engine.inject(Fault::ExitDuringBoot);
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), vm.wait_exit())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, ExitStatusKind::Code(1));
    assert!(exit.stderr_tail.contains("token"), "{}", exit.stderr_tail);
    assert_eq!(vm.state(), VmState::Exited);

    engine.inject(Fault::AgentSilent);
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    let pid = vm.pid().unwrap();
    assert_eq!(state_letter(pid), Some('T'));
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    assert_eq!(state_letter(pid), Some('T'), "a hung guest stays hung");
    assert!(client(&*vm)
        .deadline(Duration::from_millis(300))
        .ping()
        .await
        .is_err());
    // The "VMM" still quits.
    let report = vm.shutdown(Duration::from_millis(200)).await.unwrap();
    assert_eq!(report.path, ShutdownPath::Vmm);

    engine.inject(Fault::AgentLate(Duration::from_millis(300)));
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    assert_eq!(state_letter(vm.pid().unwrap()), Some('T'));
    ready(&client(&*vm)).await;

    engine.inject(Fault::SnapshotFails);
    let snap = d.path().join("snap");
    let e = vm.snapshot(&snap, SnapshotKind::Full).await.unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::Fake {
                operation: "snapshot",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        vm.state(),
        VmState::Paused,
        "a failed snapshot leaves it paused"
    );
    assert!(!snap.join(vmm::snapshot::MANIFEST).exists());
    vm.resume().await.unwrap();
    ready(&client(&*vm)).await;
    vm.snapshot(&snap, SnapshotKind::Full).await.unwrap();
    vm.kill().await.unwrap();

    engine.inject(Fault::RestoreFails);
    let vm = engine.new_vmm(s.clone()).unwrap();
    let e = vm.restore(&snap).await.unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::Fake {
                operation: "restore",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        vm.wait_exit().await.unwrap().status,
        ExitStatusKind::Signal(9)
    );

    // Failed before the guest ran: the snapshot is kept.
    assert!(snap.join(vmm::snapshot::MANIFEST).is_file());

    engine.inject(Fault::RestoreFailsAfterStart);
    let vm = engine.new_vmm(s.clone()).unwrap();
    let e = vm.restore(&snap).await.unwrap_err();
    assert!(matches!(e, VmmError::Fake { .. }), "{e}");
    assert!(!snap.join(vmm::snapshot::MANIFEST).exists(), "spent");
    vm.wait_exit().await.unwrap();

    vm_of_snapshot(&engine, &s, &snap).await;
    engine.inject(Fault::RestoreSilent);
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.restore(&snap).await.unwrap();
    assert_eq!(state_letter(vm.pid().unwrap()), Some('T'));
    vm.kill().await.unwrap();
    assert!(engine.pending().is_empty());
    assert_eq!(engine.stats().boots, 5);
    assert_eq!(engine.stats().restores, 3);
}

/// Boots a VM of `s`, snapshots it into `snap` and kills it.
async fn vm_of_snapshot(engine: &FakeEngine, s: &VmSpec, snap: &Path) {
    let vm = engine.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    ready(&client(&*vm)).await;
    vm.snapshot(snap, SnapshotKind::Full).await.unwrap();
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn an_orphan_is_taken_over_after_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let s = spec(d.path());
    let first = engine();
    let vm = first.new_vmm(s.clone()).unwrap();
    vm.boot().await.unwrap();
    let pid = vm.pid().unwrap();
    let c = client(&*vm);
    ready(&c).await;
    run(&c, "echo before > note").await;
    let child: u32 = run(&c, "sleep 1000 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .parse()
        .unwrap();
    // The "daemon" dies: its VMM runs on.
    first.crash();
    drop(vm);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid) && alive(child), "the orphan outlives its Vmm");

    let second = engine();
    let snap = d.path().join("snapshot");
    let vm = second.new_vmm(s.clone()).unwrap();
    let info = vm.snapshot_orphan(&snap).await.unwrap();
    assert_eq!(info.manifest.engine, EngineKind::Fake);
    assert_eq!(vm.state(), VmState::Exited);
    gone(pid).await;
    gone(child).await;
    assert_eq!(second.stats().orphans_taken, 1);
    // Nothing left to take over.
    let e = second
        .new_vmm(s.clone())
        .unwrap()
        .snapshot_orphan(&d.path().join("again"))
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Fake { .. }), "{e}");

    let vm = second.new_vmm(s.clone()).unwrap();
    vm.restore(&snap).await.unwrap();
    let c = client(&*vm);
    ready(&c).await;
    assert_eq!(run(&c, "cat note").await, "before\n");
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn a_spec_without_a_config_drive_or_lohar_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let mut s = spec(d.path());
    s.drives.pop();
    let e = engine().new_vmm(s).unwrap().boot().await.unwrap_err();
    assert!(matches!(e, VmmError::InvalidSpec { .. }), "{e}");

    let e = FakeEngine::new(PathBuf::from("/nonexistent/lohar"))
        .new_vmm(spec(d.path()))
        .unwrap()
        .boot()
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Spawn { .. }), "{e}");
    // The engine choice path refuses the fake kind.
    let choice = vmm::EngineChoice {
        kind: EngineKind::Fake,
        arch: vmm::Arch::host_or_default(),
        binary: testkit::host_lohar(),
        reason: "test".into(),
    };
    assert!(vmm::new_vmm(&choice, spec(d.path())).is_err());
}
