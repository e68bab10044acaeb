//! Real QEMU VMs: boot a Debian cloud kernel with no root filesystem and
//! watch it panic, pause and resume it over QMP, kill it, snapshot and
//! restore it. Needs `qemu-system-x86` and `lz4` (apt) and the kernel
//! package from Debian's registry (fetched once, cached).
#![cfg(feature = "qemu")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{p50, read, wait_until};
use vmm::qemu::{Accel, QemuConfig, QemuVmm};
use vmm::select::{HostProbe, KvmSupport};
use vmm::{
    ExitStatusKind, MemoryBacking, ShutdownPath, SnapshotKind, VmSpec, VmState, Vmm, VmmError,
};

const BOOT_LIMIT: Duration = Duration::from_secs(120);
const BANNER: &str = "Linux version";
const NO_ROOT: &str = "VFS: Unable to mount root fs";

fn qemu_config() -> QemuConfig {
    let probe = HostProbe::host();
    let binary = probe.qemu(vmm::Arch::Amd64).unwrap_or_else(|e| {
        panic!("QEMU is required for these tests (apt-get install qemu-system-x86): {e}")
    });
    let accel = match probe.kvm() {
        KvmSupport::Hardware(_) => Accel::Kvm,
        KvmSupport::PvmOnly | KvmSupport::Unavailable(_) => Accel::Tcg,
    };
    QemuConfig::new(binary, accel)
}

/// A spec for `kernel` in `dir` with the given extra command line.
fn spec(dir: &Path, kernel: &Path, cmdline: &str) -> VmSpec {
    let mut s = VmSpec::new(kernel, dir.join("work"));
    s.memory_mib = 256;
    s.cmdline = format!("console=ttyS0 {cmdline}");
    s
}

/// Boots and waits until the serial log contains `marker`.
async fn boot_until(vm: &QemuVmm, marker: &str) -> Result<()> {
    vm.boot().await?;
    let log = vm.spec().serial_log.clone();
    wait_until(marker, BOOT_LIMIT, || {
        read(&log).contains(marker) || vm.exit().is_some()
    })
    .await?;
    anyhow::ensure!(
        vm.exit().is_none(),
        "VMM exited early: {:?}\n{}",
        vm.exit(),
        read(&log)
    );
    Ok(())
}

#[tokio::test]
async fn boots_to_a_kernel_panic_and_the_exit_is_reaped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::vmlinux(), "panic=-1"),
    )?;
    let started = Instant::now();
    vm.boot().await?;
    assert_eq!(vm.state(), VmState::Running);
    assert!(vm.pid().is_some());
    let exit = tokio::time::timeout(BOOT_LIMIT, vm.wait_exit()).await??;
    let elapsed = started.elapsed();
    let log = read(&vm.spec().serial_log);
    assert!(log.contains(BANNER), "no banner in the serial log:\n{log}");
    assert!(
        log.contains(NO_ROOT),
        "no root-fs panic in the serial log:\n{log}"
    );
    assert!(
        log.contains("tsc_early_khz="),
        "tsc_early_khz missing from the guest command line"
    );
    // -no-reboot: the guest's panic reboot ends QEMU cleanly.
    assert_eq!(exit.status, ExitStatusKind::Code(0), "{exit:?}");
    assert_eq!(vm.state(), VmState::Exited);
    assert_eq!(vm.pid(), None);
    println!("MEASURED qemu ELF vmlinux boot → kernel panic → VMM exit: {elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn a_bzimage_boots_too() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::bzimage(), "panic=-1"),
    )?;
    let started = Instant::now();
    vm.boot().await?;
    let exit = tokio::time::timeout(BOOT_LIMIT, vm.wait_exit()).await??;
    let log = read(&vm.spec().serial_log);
    assert!(log.contains(BANNER) && log.contains(NO_ROOT), "{log}");
    assert_eq!(exit.status, ExitStatusKind::Code(0));
    println!(
        "MEASURED qemu bzImage boot → kernel panic → VMM exit: {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn pause_and_resume_over_qmp() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // rootdelay keeps the kernel alive, waiting, long enough to play with.
    let vm = QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1"),
    )?;
    boot_until(&vm, "Waiting 600 sec before mounting root device").await?;
    let st = vm.query_status().await?;
    assert!(st.running && st.status == "running", "{st:?}");

    vm.pause().await?;
    assert_eq!(vm.state(), VmState::Paused);
    let st = vm.query_status().await?;
    assert!(!st.running && st.status == "paused", "{st:?}");
    vm.resume().await?;
    assert_eq!(vm.state(), VmState::Running);
    let st = vm.query_status().await?;
    assert!(st.running, "{st:?}");

    let (mut stops, mut conts) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        vm.pause().await?;
        stops.push(t.elapsed());
        let t = Instant::now();
        vm.resume().await?;
        conts.push(t.elapsed());
    }
    assert!(vm.query_status().await?.running);
    println!(
        "MEASURED qmp stop p50 {:?}, cont p50 {:?} (50 each)",
        p50(&mut stops),
        p50(&mut conts)
    );
    Ok(())
}

#[tokio::test]
async fn kill_9_is_observed_with_status_and_later_calls_say_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = std::sync::Arc::new(QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1"),
    )?);
    boot_until(&vm, "Waiting 600 sec").await?;
    let waiter = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.wait_exit().await })
    };
    let pid = vm.pid().expect("running VM has a pid");
    // SAFETY: plain kill(2) of our own child, which is alive (pid() is Some
    // only before it is reaped).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let exit = tokio::time::timeout(Duration::from_secs(30), waiter).await???;
    assert_eq!(exit.status, ExitStatusKind::Signal(9));
    assert_eq!(vm.state(), VmState::Exited);
    let err = vm.pause().await.unwrap_err();
    assert!(err.is_exited(), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("VMM exited: killed by signal 9"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn qemu_dying_mid_operation_reports_its_exit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1"),
    )?;
    boot_until(&vm, "Waiting 600 sec").await?;
    let pid = vm.pid().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    // Whether the QMP write fails or the state check sees the exit first,
    // the answer is the exit, not a socket error.
    let err = vm.query_status().await.unwrap_err();
    assert!(err.is_exited(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_bad_kernel_fails_with_qemus_own_words() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("not-a-kernel");
    std::fs::write(&garbage, vec![0x5au8; 8192])?;
    let vm = QemuVmm::new(qemu_config(), spec(dir.path(), &garbage, ""))?;
    let err = vm.boot().await.unwrap_err();
    match &err {
        VmmError::Exited {
            status,
            stderr_tail,
        } => {
            assert_eq!(*status, ExitStatusKind::Code(1));
            assert!(stderr_tail.contains("kernel"), "{stderr_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Exited);
    Ok(())
}

#[tokio::test]
async fn invalid_specs_fail_before_anything_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = spec(dir.path(), &dir.path().join("no-such-vmlinux"), "");
    let err = QemuVmm::new(qemu_config(), s.clone()).unwrap_err();
    assert!(
        matches!(&err, VmmError::InvalidSpec { field, .. } if field == "kernel"),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-vmlinux"), "{err}");

    s.kernel = common::vmlinux();
    s.vcpus = 0;
    let err = QemuVmm::new(qemu_config(), s.clone()).unwrap_err();
    assert!(
        matches!(&err, VmmError::InvalidSpec { field, .. } if field == "vcpus"),
        "{err}"
    );
    // The factory validates the same way.
    let choice = vmm::EngineChoice {
        kind: vmm::EngineKind::QemuTcg,
        arch: vmm::Arch::host_or_default(),
        binary: qemu_config().binary,
        reason: "test".into(),
    };
    assert!(vmm::new_vmm(&choice, s.clone()).is_err());
    // Nothing was created on disk.
    assert!(!s.work_dir.exists());
    Ok(())
}

#[tokio::test]
async fn operations_out_of_order_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = QemuVmm::new(qemu_config(), spec(dir.path(), &common::vmlinux(), ""))?;
    let e = vm.pause().await.unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::InvalidState {
                state: VmState::Created,
                ..
            }
        ),
        "{e}"
    );
    let e = vm
        .snapshot(dir.path(), SnapshotKind::Diff)
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Unsupported { .. }), "{e}");
    assert!(vm.wait_exit().await.is_err());
    Ok(())
}

#[tokio::test]
async fn shutdown_escalates_to_quit_when_the_guest_ignores_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = QemuVmm::new(
        qemu_config(),
        spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1"),
    )?;
    boot_until(&vm, "Waiting 600 sec").await?;
    // A kernel with no userspace does not act on the ACPI power button.
    let report = vm.shutdown(Duration::from_millis(500)).await?;
    assert_eq!(report.path, ShutdownPath::Vmm, "{report:?}");
    assert_eq!(report.exit.status, ExitStatusKind::Code(0));
    Ok(())
}

/// Snapshot during the kernel's rootdelay, kill the VMM, restore into a new
/// QEMU with a new serial log: the guest continues where it was (it panics
/// on the missing root without printing its boot banner again).
async fn snapshot_and_restore(memory_file: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = spec(dir.path(), &common::vmlinux(), "rootdelay=2 panic=-1");
    if memory_file {
        s.memory = MemoryBacking::File {
            path: dir.path().join("guest.mem"),
        };
    }
    let vm = QemuVmm::new(qemu_config(), s.clone())?;
    boot_until(&vm, "Waiting 2 sec before mounting root device").await?;
    let snap = dir.path().join("snap");
    let info = vm.snapshot(&snap, SnapshotKind::Full).await?;
    assert_eq!(vm.state(), VmState::Paused);
    assert!(
        !read(&vm.spec().serial_log).contains(NO_ROOT),
        "snapshot taken too late"
    );
    let killed = vm.kill().await?;
    assert_eq!(killed.status, ExitStatusKind::Signal(9));

    let mut s2 = s.clone();
    s2.serial_log = dir.path().join("restored-serial.log");
    let restored = QemuVmm::new(qemu_config(), s2)?;
    let t = Instant::now();
    restored.restore(&snap).await?;
    let restore_time = t.elapsed();
    assert_eq!(restored.state(), VmState::Running);
    // A guest restored onto the snapshot's own memory file spends it; one
    // whose RAM was loaded from the state file leaves it as it was.
    assert_eq!(
        snap.join(vmm::snapshot::MANIFEST).exists(),
        !memory_file,
        "spent exactly when the restored guest runs on the snapshot's memory file"
    );
    assert!(restored.query_status().await?.running);
    let exit = tokio::time::timeout(BOOT_LIMIT, restored.wait_exit()).await??;
    let log = read(&restored.spec().serial_log);
    assert!(
        log.contains(NO_ROOT),
        "restored guest did not continue:\n{log}"
    );
    assert!(!log.contains(BANNER), "restored guest booted again:\n{log}");
    assert_eq!(exit.status, ExitStatusKind::Code(0));
    println!(
        "MEASURED qemu snapshot (memory file: {memory_file}): save {:?}, {} state bytes; restore to running {:?}",
        info.duration, info.state_bytes, restore_time
    );
    if memory_file {
        assert!(
            info.state_bytes < 4 << 20,
            "x-ignore-shared should leave RAM out: {}",
            info.state_bytes
        );
    } else {
        assert!(
            info.state_bytes > 4 << 20,
            "RAM should be in the state: {}",
            info.state_bytes
        );
    }
    Ok(())
}

#[tokio::test]
async fn snapshot_restore_with_a_shared_memory_file() -> Result<()> {
    snapshot_and_restore(true).await
}

#[tokio::test]
async fn snapshot_restore_with_ram_in_the_state_file() -> Result<()> {
    snapshot_and_restore(false).await
}

#[tokio::test]
async fn restore_refuses_a_mismatched_spec_before_starting_qemu() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1");
    let vm = QemuVmm::new(qemu_config(), s.clone())?;
    boot_until(&vm, "Waiting 600 sec").await?;
    let snap = dir.path().join("snap");
    vm.snapshot(&snap, SnapshotKind::Full).await?;
    vm.kill().await?;
    let mut other = s.clone();
    other.memory_mib = 512;
    let r = QemuVmm::new(qemu_config(), other)?;
    let e = r.restore(&snap).await.unwrap_err();
    assert!(matches!(e, VmmError::SnapshotMismatch { .. }), "{e}");
    assert_eq!(r.pid(), None);
    Ok(())
}

/// A QEMU an earlier process started and lost (a daemon killed with
/// SIGKILL): `Vmm::snapshot_orphan` on a fresh VM object with the same spec
/// snapshots it through its QMP socket and makes it quit, and the snapshot
/// restores.
#[tokio::test]
async fn an_orphaned_qemu_is_snapshotted_and_ended() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = spec(dir.path(), &common::vmlinux(), "rootdelay=5 panic=-1");
    s.memory = MemoryBacking::File {
        path: dir.path().join("guest.mem"),
    };
    let config = qemu_config();
    // The earlier process's QEMU: the same command line, not supervised
    // by any VM object here.
    let earlier = QemuVmm::new(config.clone(), s.clone())?;
    std::fs::create_dir_all(&s.work_dir)?;
    let mut orphan = std::process::Command::new(&config.binary)
        .args(earlier.command_line(vmm::qemu::cmdline::Launch::Boot))
        .current_dir(&s.work_dir)
        .stdin(std::process::Stdio::null())
        // The console is QEMU's stdout: the earlier daemon copied it into
        // the serial log.
        .stdout(std::fs::File::create(&s.serial_log)?)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    drop(earlier);
    let log = s.serial_log.clone();
    wait_until("the orphan's guest waits for root", BOOT_LIMIT, || {
        read(&log).contains("Waiting 5 sec")
    })
    .await?;

    let vm: Box<dyn Vmm> = Box::new(QemuVmm::new(config.clone(), s.clone())?);
    let snap = dir.path().join("snap");
    let info = vm.snapshot_orphan(&snap).await?;
    assert_eq!(vm.state(), VmState::Exited);
    assert!(info.state_bytes > 0);
    wait_until("the orphan quits", Duration::from_secs(20), || {
        matches!(orphan.try_wait(), Ok(Some(_)))
    })
    .await?;
    // Nothing left to take over.
    let again = QemuVmm::new(config.clone(), s.clone())?;
    assert!(again
        .snapshot_orphan(&dir.path().join("again"))
        .await
        .is_err());

    let mut s2 = s.clone();
    s2.serial_log = dir.path().join("restored-serial.log");
    let restored = QemuVmm::new(config, s2)?;
    restored.restore(&snap).await?;
    let exit = tokio::time::timeout(BOOT_LIMIT, restored.wait_exit()).await??;
    let log = read(&restored.spec().serial_log);
    assert!(
        log.contains(NO_ROOT),
        "restored guest did not continue:\n{log}"
    );
    assert!(!log.contains(BANNER), "restored guest booted again:\n{log}");
    assert_eq!(exit.status, ExitStatusKind::Code(0));
    Ok(())
}

/// The confinement these tests run under: the default user, a cgroup
/// parent of their own, the default jail mount point.
fn confinement() -> std::sync::Arc<vmm::confine::Confinement> {
    let config = vmm::ConfineConfig {
        cgroup_parent: "bhatti-test-vmm".into(),
        ..Default::default()
    };
    let kind = match qemu_config().accel {
        Accel::Kvm => vmm::EngineKind::QemuKvm,
        Accel::Tcg => vmm::EngineKind::QemuTcg,
    };
    match vmm::confine::Confinement::prepare(&config, kind)
        .expect("confinement needs root, mount namespaces and cgroups")
    {
        vmm::ConfineState::On(c) => c,
        other => panic!("confinement is not on: {other}"),
    }
}

/// `(st_dev, st_ino)` of a path.
fn dev_ino(p: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    (m.dev(), m.ino())
}

/// What every confined VMM must show: not root, QEMU's seccomp filter, a
/// root that is not the host's, a mount namespace of its own, and a memory
/// cgroup with the VM's limit.
fn assert_confined(pid: u32, conf: &vmm::confine::Confinement, spec: &VmSpec) {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let uids = field("Uid:");
    assert!(uids.iter().all(|u| u != "0"), "a uid is 0: {uids:?}");
    assert_eq!(uids[0], conf.uid.to_string());
    assert!(field("Gid:").iter().all(|g| g != "0"));
    assert_eq!(field("Seccomp:"), ["2"], "seccomp filter mode");
    assert_ne!(
        dev_ino(&format!("/proc/{pid}/root/")),
        dev_ino("/"),
        "the VMM's root is the host's"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the VMM shares the host's mount namespace"
    );
    // Only its own files: the host's /etc and /tmp are not there.
    assert!(!Path::new(&format!("/proc/{pid}/root/etc/passwd")).exists());
    let limits = conf.limits(spec);
    let cgroups = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let name = vmm::confine::Confinement::cgroup_name(&spec.work_dir);
    match conf.cgroups() {
        vmm::confine::cgroup::CgroupHost::V1 { memory, .. } => {
            let line = cgroups
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == "memory"))
                })
                .unwrap_or_else(|| panic!("no memory cgroup in {cgroups}"));
            let path = line.splitn(3, ':').nth(2).unwrap().trim_start_matches('/');
            assert!(path.ends_with(&name), "{path} is not {name}");
            let limit = read(&memory.join(path).join("memory.limit_in_bytes"));
            assert_eq!(limit.trim(), limits.memory_bytes.to_string());
        }
        vmm::confine::cgroup::CgroupHost::V2 { root } => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::/"))
                .unwrap_or_else(|| panic!("no v2 cgroup in {cgroups}"));
            assert!(path.ends_with(&name), "{path} is not {name}");
            let limit = read(&root.join(path).join("memory.max"));
            assert_eq!(limit.trim(), limits.memory_bytes.to_string());
        }
    }
}

/// A confined QEMU (unprivileged user, own mount namespace and root,
/// seccomp, cgroup limits) boots, snapshots, is killed (its cgroup goes),
/// restores confined into a new QEMU and continues; an orphaned confined
/// QEMU is taken over through its QMP socket.
#[tokio::test]
async fn a_confined_qemu_boots_snapshots_and_restores() -> Result<()> {
    let conf = confinement();
    let dir = tempfile::tempdir()?;
    let mut s = spec(dir.path(), &common::vmlinux(), "rootdelay=3 panic=-1");
    s.memory = MemoryBacking::File {
        path: s.work_dir.join("guest.mem"),
    };
    let config = qemu_config().confined(Some(conf.clone()));
    let vm = QemuVmm::new(config.clone(), s.clone())?;
    boot_until(&vm, "Waiting 3 sec before mounting root device").await?;
    let pid = vm.pid().unwrap();
    assert_confined(pid, &conf, &s);
    let cg = conf.cgroup_of(&s.work_dir);
    assert!(cg.dirs().iter().all(|d| d.exists()));

    let snap = dir.path().join("snap");
    vm.snapshot(&snap, SnapshotKind::Full).await?;
    vm.kill().await?;
    assert!(
        cg.dirs().iter().all(|d| !d.exists()),
        "the cgroup outlived its VMM: {:?}",
        cg.dirs()
    );

    let mut s2 = s.clone();
    s2.serial_log = dir.path().join("restored-serial.log");
    let restored = QemuVmm::new(config.clone(), s2)?;
    restored.restore(&snap).await?;
    assert_confined(restored.pid().unwrap(), &conf, &s);
    let exit = tokio::time::timeout(BOOT_LIMIT, restored.wait_exit()).await??;
    let log = read(&restored.spec().serial_log);
    assert!(
        log.contains(NO_ROOT),
        "restored guest did not continue:\n{log}"
    );
    assert!(!log.contains(BANNER), "restored guest booted again:\n{log}");
    assert_eq!(exit.status, ExitStatusKind::Code(0));
    wait_until(
        "the cgroup goes with the VMM",
        Duration::from_secs(10),
        || cg.dirs().iter().all(|d| !d.exists()),
    )
    .await?;
    Ok(())
}

/// A confined QEMU whose daemon is gone (simulated: its VM object is
/// forgotten, so nothing supervises it) is snapshotted through its QMP
/// socket by a new VM object, quits, and its cgroup is removed.
#[tokio::test]
async fn an_orphaned_confined_qemu_is_taken_over() -> Result<()> {
    let conf = confinement();
    let dir = tempfile::tempdir()?;
    let mut s = spec(dir.path(), &common::vmlinux(), "rootdelay=600 panic=-1");
    s.memory = MemoryBacking::File {
        path: s.work_dir.join("guest.mem"),
    };
    let config = qemu_config().confined(Some(conf.clone()));
    let earlier = QemuVmm::new(config.clone(), s.clone())?;
    boot_until(&earlier, "Waiting 600 sec").await?;
    let pid = earlier.pid().unwrap();
    // Its daemon dies: the QMP connection closes, nothing supervises it.
    earlier.simulate_daemon_crash().await;
    let vm = QemuVmm::new(config.clone(), s.clone())?;
    let info = vm.snapshot_orphan(&dir.path().join("snap")).await?;
    assert!(info.state_bytes > 0);
    wait_until("the orphan quits", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || read(Path::new(&format!("/proc/{pid}/status"))).contains("State:\tZ")
    })
    .await?;
    let cg = conf.cgroup_of(&s.work_dir);
    assert!(cg.dirs().iter().all(|d| !d.exists()), "{:?}", cg.dirs());
    Ok(())
}
