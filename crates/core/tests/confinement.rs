//! VMM confinement on real VMs (QEMU TCG here), in a test-made network
//! namespace: every VMM runs as the unprivileged VMM user, under QEMU's
//! seccomp filter, with a root of its own and a memory-limited cgroup; a
//! sandbox goes cold and wakes (snapshot → restore → exec) under all of
//! it; cgroups go with their VMM; a guest flooding its console as root
//! leaves a serial log no larger than the cap.
//!
//! Needs root, QEMU, mount namespaces and cgroup controllers: without them
//! it fails (it does not skip).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_core::{SandboxId, SandboxManager, SandboxSpec, SandboxState};
use image::Tier;
use net::IpRoute;
use proto::ExecRequest;
use testkit::{images, Netns};

/// What `vmm::process::console` keeps at most.
const CONSOLE_CAP: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn out(mgr: &SandboxManager, id: &SandboxId, script: &str) -> String {
    let o = mgr.exec(id, sh(script)).await.expect("exec");
    assert_eq!(
        o.exit.code,
        0,
        "{script}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn dev_ino(p: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    (m.dev(), m.ino())
}

/// The memory cgroup's limit file of `pid` (v1 `memory.limit_in_bytes`
/// or v2 `memory.max`), from `/proc/<pid>/cgroup` and the mounts.
fn memory_limit_file(pid: u32) -> PathBuf {
    let cgroups = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let mounts = read(Path::new("/proc/self/mountinfo"));
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == "memory") {
            let point = mounts
                .lines()
                .filter_map(|l| l.split_once(" - "))
                .find(|(_, r)| {
                    r.starts_with("cgroup ")
                        && r.split(' ')
                            .nth(2)
                            .unwrap_or("")
                            .split(',')
                            .any(|o| o == "memory")
                })
                .and_then(|(l, _)| l.split(' ').nth(4))
                .expect("a v1 memory hierarchy");
            return Path::new(point)
                .join(path.trim_start_matches('/'))
                .join("memory.limit_in_bytes");
        }
    }
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::/"))
        .expect("a cgroup");
    let point = mounts
        .lines()
        .filter_map(|l| l.split_once(" - "))
        .find(|(_, r)| r.starts_with("cgroup2 "))
        .and_then(|(l, _)| l.split(' ').nth(4))
        .expect("a cgroup2 mount");
    Path::new(point).join(path).join("memory.max")
}

/// Checks one VMM process; returns its memory cgroup's directory.
fn assert_confined(pid: u32, memory_mb: u64) -> PathBuf {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let uids = field("Uid:");
    assert!(
        uids.iter().all(|u| u != "0"),
        "VMM {pid} has uid 0: {uids:?}"
    );
    assert!(
        field("Gid:").iter().all(|g| g != "0"),
        "VMM {pid} has gid 0"
    );
    assert_eq!(field("Seccomp:"), ["2"], "VMM {pid} has no seccomp filter");
    assert_ne!(
        dev_ino(&format!("/proc/{pid}/root/")),
        dev_ino("/"),
        "VMM {pid}'s root is the host's"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "VMM {pid} shares the host's mount namespace"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}/root/etc/passwd")).exists(),
        "VMM {pid} sees the host's /etc"
    );
    let limit_file = memory_limit_file(pid);
    let limit: u64 = read(&limit_file).trim().parse().expect("a number");
    assert!(
        limit >= memory_mb << 20 && limit <= (memory_mb + 1024) << 20,
        "{}: {limit} is not guest RAM ({memory_mb} MiB) plus a bounded overhead",
        limit_file.display()
    );
    let uid: u32 = uids[0].parse().unwrap();
    println!(
        "VMM {pid}: uid {uid}, Seccomp 2, own root and mount namespace, {} = {limit}",
        limit_file.display()
    );
    limit_file.parent().unwrap().to_path_buf()
}

#[test]
fn confined_vmms_snapshot_restore_and_cap_their_console() {
    assert!(testkit::is_root(), "this test needs root");
    images(Tier::Minimal);
    let _ns = Netns::enter("core-confine");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let config = common::vm_config(data.path(), "bhcf0", "10.219.0.0/24", "bc");
        assert!(config.confinement.enabled, "confinement is on by default");
        let mgr = SandboxManager::new(config, Arc::new(IpRoute::default())).expect("manager");
        let reason = &mgr.engine().reason;
        assert!(reason.contains("VMM confinement on"), "{reason}");

        let mut spec = SandboxSpec::new("conf", "minimal");
        spec.memory_mb = 256;
        let rec = mgr.create(spec).await.expect("create");
        let pid = rec.vmm_pid.expect("a VMM pid");
        let cgroup = assert_confined(pid, 256);
        assert_eq!(out(&mgr, &rec.id, "whoami").await, "lohar");
        out(&mgr, &rec.id, "echo kept > /workspace/marker && sync").await;

        // Cold (snapshot, VMM killed: its cgroup goes), then an exec wakes
        // it (restore into a new confined VMM).
        mgr.stop(&rec.id).await.expect("stop (cold)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cgroup.exists() {
            assert!(Instant::now() < deadline, "{} outlived its VMM", cgroup.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!Path::new(&format!("/proc/{pid}/status")).exists() || {
            read(Path::new(&format!("/proc/{pid}/status"))).contains("State:\tZ")
        });
        assert_eq!(out(&mgr, &rec.id, "cat /workspace/marker").await, "kept");
        let woke = mgr.get(&rec.id).unwrap();
        assert_eq!(woke.state, SandboxState::Running);
        let pid2 = woke.vmm_pid.expect("a VMM pid after the wake");
        assert_ne!(pid, pid2);
        let cgroup2 = assert_confined(pid2, 256);

        // The guest floods its console as root. Through QEMU's emulated
        // UART under TCG the console carries a few hundred KB/s, so the
        // flood is bounded by time (the writer is ended after the log has
        // been cut several times) rather than by 500 MB.
        let log = rec.dir.join("serial.log");
        let flood = "i=0; pad=$(printf '%0960d' 0); \
                     while [ $i -lt 500000 ]; do echo \"flood $i $pad\"; i=$((i+1)); done > /dev/console";
        let writer = {
            let mgr = mgr.clone();
            let id = rec.id.clone();
            tokio::spawn(async move {
                mgr.exec(&id, sh(&format!("sudo sh -c '{flood}'"))).await
            })
        };
        let started = Instant::now();
        let mut max_seen = 0u64;
        let mut last_line = 0u64;
        // Until at least 6 MiB (6 cuts of the log) went through.
        while last_line < 6 * 1024 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the flood did not get through: last line {last_line}"
            );
            assert!(!writer.is_finished(), "the flood ended early: {:?}", writer.await);
            let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            max_seen = max_seen.max(size);
            assert!(size <= CONSOLE_CAP, "serial log is {size} bytes");
            let text = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if let Some(n) = text
                .lines()
                .rev()
                .find_map(|l| l.trim_start().strip_prefix("flood ")?.split(' ').next()?.parse().ok())
            {
                last_line = n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
        assert!(
            !text.contains("flood 0 "),
            "the log still holds the flood's start: it was not cut"
        );
        println!(
            "MEASURED console flood: {} KiB written in {secs:.1} s ({:.0} KiB/s); serial log at most {max_seen} bytes (cap {CONSOLE_CAP})",
            last_line,
            last_line as f64 / secs
        );
        writer.abort();
        // The error path still reads the console's tail: kill the VMM and
        // look at the error.
        // SAFETY: kill(2) of the VMM this test's manager started.
        assert_eq!(unsafe { libc::kill(pid2 as i32, libc::SIGKILL) }, 0);
        let err = loop {
            match mgr.exec(&rec.id, sh("true")).await {
                Err(e) => break e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let text = format!("{err:?}");
        assert!(text.contains("flood"), "no console tail in the error: {text}");
        mgr.destroy(&rec.id).await.expect("destroy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cgroup2.exists() {
            assert!(Instant::now() < deadline, "{} outlived its VMM", cgroup2.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(std::fs::metadata(&log).is_err(), "the sandbox dir is gone");
        mgr.teardown_networks().unwrap();
    });
}
