//! The sandbox lifecycle on real VMs: QEMU (TCG on this machine) booting
//! the Debian cloud kernel, lohar as PID 1, each test in a network
//! namespace of its own (bridges, TAPs and 10.x addresses live there).
//!
//! Needs root and `qemu-system-x86_64`; otherwise prints `SKIP` (and
//! fails under `scripts/test.sh`). Images come from testkit's shared cache (built on first use).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_client::{SessionEvent, WriteOptions};
use bhatti_core::{CoreError, SandboxId, SandboxManager, SandboxSpec, SandboxState};
use image::{ConfigFile, Tier};
use net::{IpRoute, NetOps, NetworkConfig};
use proto::{ErrorCode, ExecRequest, FileRead};
use testkit::{images, Netns};

use common::skip;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A manager over a fresh data directory in the current namespace, reading
/// images from the shared cache.
fn manager(data: &Path, bridge: &str, subnet: &str, tap_prefix: &str) -> SandboxManager {
    let config = common::vm_config(data, bridge, subnet, tap_prefix);
    SandboxManager::new(config, Arc::new(IpRoute::default())).expect("manager")
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

fn taps(prefix: &str) -> Vec<String> {
    IpRoute::default().list_links(prefix).expect("ip link")
}

/// Destroys `id` and checks that nothing of it is left: no process naming
/// its directory, no TAP, no directory, no record, no address.
async fn destroy_and_check(mgr: &SandboxManager, id: &SandboxId) {
    let rec = mgr.get(id).expect("record");
    let att = rec.network.clone().expect("attached");
    let started = Instant::now();
    mgr.destroy(id).await.expect("destroy");
    println!("TIMING destroy {id}: {} ms", started.elapsed().as_millis());
    assert!(
        common::processes_mentioning(&rec.dir).is_empty(),
        "processes left: {:?}",
        common::processes_mentioning(&rec.dir)
    );
    if let Some(pid) = rec.vmm_pid {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "VMM {pid} still exists"
        );
    }
    assert!(!taps("").contains(&att.tap), "TAP {} left", att.tap);
    assert!(!rec.dir.exists(), "{} left", rec.dir.display());
    assert!(matches!(mgr.get(id), Err(CoreError::NotFound(_))));
    assert!(!mgr.networks()[0].pool().is_allocated(att.ip));
}

async fn session_output(mgr: &SandboxManager, id: &SandboxId, argv: &[&str]) -> String {
    let mut s = mgr
        .open_session(
            id,
            ExecRequest {
                argv: argv.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
        .expect("session");
    let mut out = Vec::new();
    loop {
        match s.next().await.expect("session event") {
            SessionEvent::Output(d) => out.extend_from_slice(&d),
            SessionEvent::Exit(e) => {
                assert_eq!(e.code, 0);
                break;
            }
            SessionEvent::TakenOver(by) => panic!("session taken over by {by}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// uname, exec, files and a session through the manager.
async fn pass_through(mgr: &SandboxManager, id: &SandboxId, shell: &str) {
    let rec = mgr.get(id).unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    let release = out(mgr, id, "uname -r").await;
    assert_eq!(release, rec.kernel_release);
    assert!(release.ends_with("-cloud-amd64"), "{release}");
    assert!(
        out(mgr, id, "cat /proc/version").await.contains("Debian"),
        "not the Debian kernel"
    );
    // The spec's env and files reached the guest.
    assert_eq!(out(mgr, id, "echo $FROM_SPEC").await, "spec-env");
    let greeting = mgr
        .read_file(
            id,
            FileRead {
                path: "/home/lohar/greeting".into(),
                offset: None,
                limit: None,
                max_bytes: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(greeting.data, b"hello from the config drive\n");

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let n = mgr
        .write_file(id, "/workspace/blob.bin", &data, WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let back = mgr
        .read_file(
            id,
            FileRead {
                path: "/workspace/blob.bin".into(),
                offset: None,
                limit: None,
                max_bytes: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(back.data, data);
    assert_eq!(
        mgr.stat(id, "/workspace/blob.bin").await.unwrap().size,
        100_000
    );
    let names: Vec<String> = mgr
        .ls(id, "/workspace")
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"blob.bin".to_string()), "{names:?}");
    assert_eq!(
        out(mgr, id, "md5sum < /workspace/blob.bin | cut -c1-8")
            .await
            .len(),
        8
    );

    // A failing command is a result, not an error; a missing file is the
    // agent's typed error.
    let o = mgr.exec(id, sh("exit 7")).await.unwrap();
    assert_eq!(o.exit.code, 7);
    let e = mgr.stat(id, "/nope").await.unwrap_err();
    match &e {
        CoreError::Agent { source, .. } => {
            assert_eq!(source.agent_code(), Some(ErrorCode::NotFound), "{e}")
        }
        other => panic!("{other:?}"),
    }

    let tty = session_output(mgr, id, &[shell, "-c", "echo in-a-session; tty"]).await;
    assert!(tty.contains("in-a-session"), "{tty:?}");
    assert!(tty.contains("/dev/pts/"), "{tty:?}");
}

fn spec(name: &str, tier: Tier) -> SandboxSpec {
    let mut s = SandboxSpec::new(name, tier.name());
    s.memory_mb = 256;
    s.env.insert("FROM_SPEC".into(), "spec-env".into());
    s.files.push(ConfigFile {
        path: "/home/lohar/greeting".into(),
        content: "hello from the config drive\n".into(),
        mode: 0o644,
        owner: 1000,
    });
    s
}

#[test]
fn two_tiny_sandboxes_have_separate_disks_and_destroy_leaves_nothing() {
    if skip() {
        return;
    }
    images(Tier::Tiny);
    let _ns = Netns::enter("core-two");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(data.path(), "bhvm0", "10.210.0.0/24", "bt");
        let started = Instant::now();
        let (a, b) = tokio::join!(
            mgr.create(spec("alpha", Tier::Tiny)),
            mgr.create(spec("beta", Tier::Tiny))
        );
        let (a, b) = (a.expect("create alpha"), b.expect("create beta"));
        println!(
            "TIMING two tiny sandboxes created in parallel: {} ms (alpha {:?}, beta {:?})",
            started.elapsed().as_millis(),
            a.boot,
            b.boot
        );
        assert_ne!(a.dir, b.dir);
        let (aa, ba) = (a.network.clone().unwrap(), b.network.clone().unwrap());
        // Parallel creates: either may get the lower address.
        let mut ips = [aa.ip, ba.ip];
        ips.sort();
        assert_eq!(
            ips,
            [Ipv4Addr::new(10, 210, 0, 2), Ipv4Addr::new(10, 210, 0, 3)]
        );
        assert_eq!(taps("bt"), {
            let mut v = vec![aa.tap.clone(), ba.tap.clone()];
            v.sort();
            v
        });
        assert!(matches!(
            mgr.create(spec("alpha", Tier::Tiny)).await,
            Err(CoreError::NameTaken(_))
        ));
        assert_eq!(out(&mgr, &a.id, "hostname").await, "alpha");
        assert_eq!(out(&mgr, &b.id, "hostname").await, "beta");

        pass_through(&mgr, &a.id, "/bin/sh").await;

        // Separate disks: what alpha writes, beta does not see.
        out(&mgr, &a.id, "echo mine > /workspace/only-in-alpha && sync").await;
        assert_eq!(
            out(&mgr, &a.id, "cat /workspace/only-in-alpha").await,
            "mine"
        );
        let o = mgr
            .exec(&b.id, sh("test -e /workspace/only-in-alpha"))
            .await
            .unwrap();
        assert_eq!(o.exit.code, 1, "beta sees alpha's file");
        assert!(mgr.stat(&b.id, "/workspace/blob.bin").await.is_err());

        destroy_and_check(&mgr, &a.id).await;
        // beta is untouched by alpha's destroy.
        assert_eq!(out(&mgr, &b.id, "echo still-here").await, "still-here");
        assert!(matches!(
            mgr.exec(&a.id, sh("true")).await,
            Err(CoreError::NotFound(_))
        ));
        destroy_and_check(&mgr, &b.id).await;
        assert!(taps("bt").is_empty());
        assert!(common::dir_entries(&data.path().join("sandboxes")).is_empty());
        assert!(mgr.list().is_empty());
    });
}

#[test]
fn minimal_sandbox_exec_files_and_session() {
    if skip() {
        return;
    }
    images(Tier::Minimal);
    let _ns = Netns::enter("core-min");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(data.path(), "bhvm0", "10.212.0.0/24", "bt");
        let rec = mgr
            .create(spec("mini", Tier::Minimal))
            .await
            .expect("create");
        println!("TIMING minimal create: {:?}", rec.boot);
        pass_through(&mgr, &rec.id, "/bin/bash").await;
        assert_eq!(
            out(&mgr, &rec.id, "bash -c 'echo $BASH_VERSION' | cut -c1").await,
            "5"
        );
        destroy_and_check(&mgr, &rec.id).await;
        assert!(taps("bt").is_empty());
    });
}

#[test]
fn a_killed_vmm_is_reported_dead_and_a_boot_timeout_cleans_up() {
    if skip() {
        return;
    }
    images(Tier::Tiny);
    let _ns = Netns::enter("core-kill");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(data.path(), "bhvm0", "10.214.0.0/24", "bt");
        let rec = mgr
            .create(spec("victim", Tier::Tiny))
            .await
            .expect("create");
        let pid = rec.vmm_pid.expect("pid");
        assert!(common::processes_mentioning(&rec.dir)
            .iter()
            .any(|p| p.starts_with(&format!("{pid}:"))));
        // SAFETY: plain kill(2) on the VMM pid this test just read; the
        // supervisor reaps it, so the pid is not reused before we look.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let e = mgr.exec(&rec.id, sh("true")).await.unwrap_err();
        match &e {
            CoreError::VmmExited { reason, .. } => {
                assert!(reason.contains("killed by signal 9"), "{reason}")
            }
            other => panic!("expected VmmExited, got {other:?}"),
        }
        assert!(e.is_dead());
        let r = mgr.get(&rec.id).unwrap();
        assert_eq!(r.state, SandboxState::Failed);
        assert!(r.failure.unwrap().contains("signal 9"));
        // Still dead on the next call, with the same reason.
        assert!(matches!(
            mgr.stat(&rec.id, "/").await,
            Err(CoreError::VmmExited { .. })
        ));
        destroy_and_check(&mgr, &rec.id).await;

        // A second network in the same namespace, with a deadline no TCG
        // guest can meet: the create fails with the console tail and
        // leaves nothing.
        let mut config = mgr.config().clone();
        config.network = NetworkConfig {
            bridge: "bhvm1".into(),
            subnet: "10.215.0.0/24".parse().unwrap(),
            tap_prefix: "bu".into(),
            dns: None,
        };
        config.boot_timeout = Duration::from_millis(300);
        let impatient = SandboxManager::new(config, Arc::new(IpRoute::default())).unwrap();
        let e = impatient
            .create(spec("slow", Tier::Tiny))
            .await
            .unwrap_err();
        match &e {
            CoreError::BootTimeout { after, .. } => {
                assert_eq!(*after, Duration::from_millis(300))
            }
            other => panic!("expected BootTimeout, got {other:?}"),
        }
        assert!(taps("bu").is_empty());
        assert!(impatient.list().is_empty());
        assert!(impatient.networks()[0].pool().is_empty());
        assert!(common::dir_entries(&data.path().join("sandboxes")).is_empty());
        assert!(common::processes_mentioning(data.path()).is_empty());
    });
}

#[test]
fn bad_input_starts_nothing_in_a_real_namespace() {
    if skip() {
        return;
    }
    let tiny = images(Tier::Tiny);
    let _ns = Netns::enter("core-bad");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(data.path(), "bhvm0", "10.216.0.0/24", "bt");
        let bad = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut s = spec("bad", Tier::Tiny);
            f(&mut s);
            s
        };
        for s in [
            bad(&|s| s.cpus = 0),
            bad(&|s| s.cpus = 4096),
            bad(&|s| s.memory_mb = 0),
            bad(&|s| s.memory_mb = u32::MAX),
            bad(&|s| s.image = "no-such-image".into()),
        ] {
            let e = mgr.create(s.clone()).await.unwrap_err();
            assert!(
                matches!(e, CoreError::InvalidSpec(_) | CoreError::Image(_)),
                "{s:?}: {e:?}"
            );
        }
        // Images with the kernel or the rootfs missing.
        for missing in ["images/kernel/vmlinux", "images/tiny/rootfs.ext4"] {
            let images_dir = tempfile::tempdir().unwrap();
            common::image_dir(
                images_dir.path(),
                Some(&testkit::image_cache()),
                "tiny",
                &[missing],
            );
            let mut config = mgr.config().clone();
            config.image_dir = images_dir.path().to_path_buf();
            let other = SandboxManager::new(config, Arc::new(IpRoute::default())).unwrap();
            let e = other.create(spec("bad", Tier::Tiny)).await.unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, CoreError::Image(_)), "{e:?}");
            assert!(text.contains(missing.rsplit('/').next().unwrap()), "{text}");
        }
        assert!(taps("bt").is_empty());
        assert!(!data.path().join("sandboxes").exists());
        assert!(common::processes_mentioning(data.path()).is_empty());
        assert!(mgr.list().is_empty());
        assert!(!tiny.kernel_release.is_empty());
    });
}

#[test]
fn a_destroy_during_create_wins_and_leaves_nothing() {
    assert!(!skip(), "this test needs root and {}", common::QEMU);
    images(Tier::Tiny);
    let _ns = Netns::enter("core-cancel");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(data.path(), "bhvm0", "10.217.0.0/24", "bt");
        let id = SandboxId::generate().unwrap();
        let create = tokio::spawn({
            let (mgr, id) = (mgr.clone(), id.clone());
            async move { mgr.create_as(id, spec("doomed", Tier::Tiny)).await }
        });
        // Wait until its VMM runs and its agent has not answered yet.
        let deadline = Instant::now() + Duration::from_secs(60);
        let rec = loop {
            match mgr.get(&id) {
                Ok(r) if r.vmm_pid.is_some() => break r,
                Ok(r) => assert_eq!(r.state, SandboxState::Creating),
                Err(CoreError::NotFound(_)) => {}
                Err(e) => panic!("{e:?}"),
            }
            assert!(Instant::now() < deadline, "the VMM never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(
            rec.state,
            SandboxState::Creating,
            "the agent answered before the destroy could race the boot"
        );
        let pid = rec.vmm_pid.unwrap();
        let att = rec.network.clone().expect("attached");
        // The control: the VMM, its TAP and its directory exist.
        assert!(
            common::processes_mentioning(&rec.dir)
                .iter()
                .any(|p| p.starts_with(&format!("{pid}:"))),
            "VMM {pid} not found"
        );
        assert_eq!(taps("bt"), vec![att.tap.clone()]);
        assert!(rec.dir.exists());

        mgr.destroy(&id).await.expect("the destroy wins");
        let created = create.await.expect("create task");
        assert!(
            matches!(created, Err(CoreError::Cancelled { ref id }) if *id == rec.id),
            "{created:?}"
        );
        assert!(
            common::processes_mentioning(&rec.dir).is_empty(),
            "processes left: {:?}",
            common::processes_mentioning(&rec.dir)
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "VMM {pid} still exists"
        );
        assert!(taps("bt").is_empty());
        assert!(!rec.dir.exists(), "{} left", rec.dir.display());
        assert!(matches!(mgr.get(&id), Err(CoreError::NotFound(_))));
        assert!(mgr.list().is_empty());
        assert!(mgr.networks()[0].pool().is_empty());
        // A second destroy finds nothing.
        assert!(matches!(
            mgr.destroy(&id).await,
            Err(CoreError::NotFound(_))
        ));
    });
}
