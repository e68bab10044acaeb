//! The orchestrator's lifecycle, thermal and recovery paths on the fake
//! engine (`vmm::fake`): each "guest" is a real `lohar serve` on the host,
//! reached through its Unix socket; the network is `net::fake::FakeNetOps`;
//! the images are placeholders. No root, no QEMU, seconds.
//!
//! What the fake cannot show (a kernel, virtio, a real snapshot of process
//! memory) is the QEMU suites' (`vm.rs`, `thermal.rs`). Here: a failed step
//! at each stage of create leaves nothing behind; exec and files through the
//! guest surface; warm, cold and wake; wakes coalescing; the restore
//! breaker; the thermal tick; recovery of a cold sandbox and of an orphaned
//! VMM after a "crash"; destroy during a create; a VMM that dies; a guest
//! whose agent hangs (the ticker and shutdown are bounded around it).
//!
//! Needs the host build of lohar (`cargo build -p lohar`; see
//! `testkit::host_lohar`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_core::{
    CoreConfig, CoreError, Limits, SandboxId, SandboxManager, SandboxRecord, SandboxSpec,
    SandboxState, Stopped, ThermalEventKind, ThermalPolicy, ThermalState,
};
use net::fake::FakeNetOps;
use proto::{ExecRequest, FileRead};
use vmm::fake::{FakeEngine, Fault, ROOT_DIR};
use vmm::VmmError;

/// One manager over a fresh data directory, a fake network and a fake
/// engine of its own (faults never leak between tests).
struct Harness {
    _dir: tempfile::TempDir,
    data: PathBuf,
    ops: Arc<FakeNetOps>,
    engine: FakeEngine,
    mgr: SandboxManager,
}

fn config(data: &Path) -> CoreConfig {
    let mut config = CoreConfig::new(data);
    config.limits = Limits {
        max_cpus: 4,
        min_memory_mb: 128,
        max_memory_mb: 8192,
    };
    config.disk_bytes = 64 << 20;
    config.boot_timeout = Duration::from_secs(20);
    // No ticker runs; the long timers keep a manual tick from acting.
    config.thermal = ThermalPolicy {
        warm_after: Duration::from_secs(3600),
        cold_after: Duration::from_secs(3600),
        wake_timeout: Duration::from_secs(20),
        ..ThermalPolicy::default()
    };
    config
}

fn harness() -> Harness {
    harness_with(|_| {})
}

fn harness_with(tune: impl FnOnce(&mut CoreConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    common::image_dir(&data, None, "tiny", &[]);
    let ops = Arc::new(FakeNetOps::default());
    let engine = FakeEngine::new(testkit::host_lohar());
    let mut config = config(&data);
    tune(&mut config);
    let mgr = SandboxManager::with_engine(config, engine.clone(), ops.clone()).unwrap();
    Harness {
        _dir: dir,
        data,
        ops,
        engine,
        mgr,
    }
}

impl Harness {
    fn sandboxes(&self) -> PathBuf {
        self.data.join("sandboxes")
    }

    async fn create(&self, name: &str) -> SandboxRecord {
        self.mgr
            .create(SandboxSpec::new(name, "tiny"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
    }

    /// Nothing of any sandbox is left: no record, no TAP (the bridge
    /// stays), no address, no directory, no process.
    fn assert_clean(&self, what: &str) {
        assert!(self.mgr.list().is_empty(), "{what}: {:?}", self.mgr.list());
        assert_eq!(self.ops.links(), vec!["bhatti0".to_string()], "{what}");
        for n in self.mgr.networks() {
            assert!(n.pool().is_empty(), "{what}: addresses left");
        }
        assert!(
            common::dir_entries(&self.sandboxes()).is_empty(),
            "{what}: {:?}",
            common::dir_entries(&self.sandboxes())
        );
        let procs = common::processes_mentioning(&self.sandboxes());
        assert!(procs.is_empty(), "{what}: {procs:?}");
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(20_000),
        ..Default::default()
    }
}

async fn run(mgr: &SandboxManager, id: &SandboxId, script: &str) -> String {
    let out = mgr
        .exec(id, sh(script))
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert_eq!(
        out.exit.code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `cond` until it holds, or panics naming `what` after `deadline`.
async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !cond().await {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

fn thermal(mgr: &SandboxManager, id: &SandboxId) -> ThermalState {
    mgr.get(id).unwrap().thermal
}

fn id(s: &str) -> SandboxId {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_at_each_stage_of_create_leaves_nothing_behind() {
    // The image is missing: refused before anything is made.
    {
        let dir = tempfile::tempdir().unwrap();
        common::image_dir(dir.path(), None, "tiny", &["images/tiny/rootfs.ext4"]);
        let ops = Arc::new(FakeNetOps::default());
        let engine = FakeEngine::new(testkit::host_lohar());
        let mgr =
            SandboxManager::with_engine(config(dir.path()), engine.clone(), ops.clone()).unwrap();
        let e = mgr
            .create(SandboxSpec::new("box", "tiny"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, CoreError::Image(image::StoreError::NotBuilt { .. })),
            "{e:?}"
        );
        assert!(!ops.calls().iter().any(|c| c.starts_with("create_tap")));
        assert_eq!(engine.stats().boots, 0);
        assert!(mgr.list().is_empty());
        assert!(!dir.path().join("sandboxes").exists());
    }

    let h = harness();

    // Directory preparation: something in the way of the sandbox's disk.
    let sb = id("sb-00000000d15c");
    std::fs::create_dir_all(h.sandboxes().join(sb.as_str()).join("disk.ext4/in-the-way")).unwrap();
    let e = h
        .mgr
        .create_as(sb.clone(), SandboxSpec::new("box", "tiny"))
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Disk { .. }), "{e:?}");
    assert_eq!(h.engine.stats().boots, 0);
    h.assert_clean("directory preparation failed");

    // Network attach.
    h.ops.fail_next("create_tap");
    let e = h
        .mgr
        .create(SandboxSpec::new("box", "tiny"))
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Network { .. }), "{e:?}");
    assert_eq!(h.engine.stats().boots, 0);
    h.assert_clean("network attach failed");

    // The VMM refuses to boot.
    h.engine.inject(Fault::BootFails);
    let e = h
        .mgr
        .create(SandboxSpec::new("box", "tiny"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            CoreError::Vmm {
                source: VmmError::Fake {
                    operation: "boot",
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    h.assert_clean("VMM boot failed");

    // The VMM exits while the guest boots: its status and stderr are in
    // the error.
    h.engine.inject(Fault::ExitDuringBoot);
    let e = h
        .mgr
        .create(SandboxSpec::new("box", "tiny"))
        .await
        .unwrap_err();
    match &e {
        CoreError::VmmExited { reason, .. } => {
            assert!(reason.contains("exited with code 1"), "{reason}");
            assert!(reason.contains("token"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    h.assert_clean("VMM exited during boot");

    // The agent never answers: the boot timeout, and the VMM is killed.
    let h2 = harness_with(|c| c.boot_timeout = Duration::from_millis(1500));
    h2.engine.inject(Fault::AgentSilent);
    let e = h2
        .mgr
        .create(SandboxSpec::new("box", "tiny"))
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::BootTimeout { .. }), "{e:?}");
    h2.assert_clean("agent never answered");

    // Every fault was used, and the same name now works.
    assert!(h.engine.pending().is_empty() && h2.engine.pending().is_empty());
    for h in [&h, &h2] {
        let r = h.create("box").await;
        assert_eq!(r.state, SandboxState::Running);
        assert_eq!(run(&h.mgr, &r.id, "echo ok").await, "ok\n");
        h.mgr.destroy(&r.id).await.unwrap();
        h.assert_clean("destroyed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_files_through_the_guest_surface() {
    let h = harness();
    let r = h.create("files").await;
    assert_eq!(r.engine, vmm::EngineKind::Fake);
    assert!(r.boot.is_some());
    let root = r.dir.join(ROOT_DIR);
    // Commands run in the guest's home, with the spec's env.
    assert_eq!(
        run(&h.mgr, &r.id, "pwd").await,
        format!("{}\n", root.display())
    );
    let out = h
        .mgr
        .exec(&r.id, sh("echo oops >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.exit.code, 3);
    assert_eq!(out.stderr, b"oops\n");

    let path = root.join("dir/hello.txt").display().to_string();
    let opts = agent_client::WriteOptions {
        create_dirs: true,
        ..Default::default()
    };
    let n = h
        .mgr
        .write_file(&r.id, &path, b"hello,\nfake guest\n", opts)
        .await
        .unwrap();
    assert_eq!(n, 18);
    // `offset` and `limit` count lines.
    let content = h
        .mgr
        .read_file(
            &r.id,
            FileRead {
                path: path.clone(),
                offset: Some(1),
                limit: None,
                max_bytes: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(content.data, b"fake guest\n");
    assert_eq!(content.total_size, 18);
    let st = h.mgr.stat(&r.id, &path).await.unwrap();
    assert_eq!(st.size, 18);
    let listing = h
        .mgr
        .ls(&r.id, &root.join("dir").display().to_string())
        .await
        .unwrap();
    let names: Vec<_> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["hello.txt"]);
    assert_eq!(
        run(&h.mgr, &r.id, "cat dir/hello.txt").await,
        "hello,\nfake guest\n"
    );
    // A guest error is typed, not a dead VM.
    let e = h.mgr.stat(&r.id, "/no/such/file").await.unwrap_err();
    assert!(matches!(e, CoreError::Agent { .. }), "{e:?}");

    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_cold_and_wake_keep_files_and_report_each_step() {
    let h = harness();
    let mut events = h.mgr.subscribe_thermal();
    let r = h.create("thermal").await;
    let pid = r.vmm_pid.unwrap();
    run(&h.mgr, &r.id, "echo kept > note").await;
    let background: u32 = run(&h.mgr, &r.id, "sleep 1000 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .parse()
        .unwrap();

    // Hot → warm: the VMM stays, stopped.
    h.mgr.pause(&r.id).await.unwrap();
    assert_eq!(thermal(&h.mgr, &r.id), ThermalState::Warm);
    assert_eq!(h.mgr.get(&r.id).unwrap().vmm_pid, Some(pid));
    // A call wakes it.
    assert_eq!(run(&h.mgr, &r.id, "cat note").await, "kept\n");
    assert_eq!(thermal(&h.mgr, &r.id), ThermalState::Hot);
    assert!(alive(background), "warm keeps processes");

    // Hot → cold: snapshot written, VMM gone.
    h.mgr.stop(&r.id).await.unwrap();
    let cold = h.mgr.get(&r.id).unwrap();
    assert_eq!(cold.thermal, ThermalState::Cold);
    assert_eq!(cold.vmm_pid, None);
    assert_eq!(cold.state, SandboxState::Running);
    assert!(r
        .dir
        .join(bhatti_core::SNAPSHOT_DIR)
        .join(vmm::snapshot::MANIFEST)
        .is_file());
    assert!(!alive(pid));
    wait_for(
        "the guest's processes die with it",
        Duration::from_secs(10),
        || async { !alive(background) },
    )
    .await;
    assert!(common::processes_mentioning(&h.sandboxes()).is_empty());

    // Cold → hot on the next call: files kept (processes are not, on the fake).
    assert_eq!(run(&h.mgr, &r.id, "cat note").await, "kept\n");
    let woken = h.mgr.get(&r.id).unwrap();
    assert_eq!(woken.thermal, ThermalState::Hot);
    assert_eq!(woken.cold_wakes, 1);
    assert_ne!(woken.vmm_pid, Some(pid));
    // A used snapshot is no longer one.
    assert!(!r
        .dir
        .join(bhatti_core::SNAPSHOT_DIR)
        .join(vmm::snapshot::MANIFEST)
        .exists());

    let mut kinds = Vec::new();
    while let Ok(ev) = events.try_recv() {
        assert_eq!(ev.id, r.id);
        kinds.push(ev.kind);
    }
    assert!(
        matches!(
            kinds.as_slice(),
            [
                ThermalEventKind::Warm,
                ThermalEventKind::Hot {
                    from: ThermalState::Warm
                },
                ThermalEventKind::Cold { .. },
                ThermalEventKind::Hot {
                    from: ThermalState::Cold
                },
            ]
        ),
        "{kinds:?}"
    );
    let stats = h.engine.stats();
    assert_eq!((stats.pauses, stats.snapshots, stats.restores), (1, 1, 1));

    // Destroy from cold leaves nothing either.
    h.mgr.stop(&r.id).await.unwrap();
    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed from cold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wakes_coalesce_into_one_restore() {
    let h = harness();
    let r = h.create("coalesce").await;
    run(&h.mgr, &r.id, "echo 42 > answer").await;
    h.mgr.stop(&r.id).await.unwrap();
    let calls = (0..8).map(|_| {
        let (mgr, id) = (h.mgr.clone(), r.id.clone());
        tokio::spawn(async move { run(&mgr, &id, "cat answer").await })
    });
    for call in calls.collect::<Vec<_>>() {
        assert_eq!(call.await.unwrap(), "42\n");
    }
    assert_eq!(h.engine.stats().restores, 1);
    assert_eq!(h.mgr.get(&r.id).unwrap().cold_wakes, 1);
    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_opens_the_breaker_until_a_forced_start_unless_it_spent_the_snapshot() {
    let h = harness_with(|c| c.thermal.wake_timeout = Duration::from_millis(1500));
    let mut events = h.mgr.subscribe_thermal();
    let r = h.create("breaker").await;
    run(&h.mgr, &r.id, "echo safe > note").await;
    h.mgr.stop(&r.id).await.unwrap();

    h.engine.inject(Fault::RestoreFails);
    let e = h.mgr.exec(&r.id, sh("true")).await.unwrap_err();
    assert!(matches!(e, CoreError::Restore { .. }), "{e:?}");
    let reason = h.mgr.breaker(&r.id).unwrap().expect("breaker open");
    assert!(reason.contains("injected fault"), "{reason}");
    assert_eq!(thermal(&h.mgr, &r.id), ThermalState::Cold);
    assert!(common::processes_mentioning(&h.sandboxes()).is_empty());
    // Open: no automatic retry.
    let restores = h.engine.stats().restores;
    let e = h.mgr.exec(&r.id, sh("true")).await.unwrap_err();
    assert!(matches!(e, CoreError::BreakerOpen { .. }), "{e:?}");
    assert_eq!(h.engine.stats().restores, restores);
    // A plain start does not close it either.
    let e = h.mgr.start(&r.id, false).await.unwrap_err();
    assert!(matches!(e, CoreError::BreakerOpen { .. }), "{e:?}");

    // A forced start closes it and restores.
    h.mgr.start(&r.id, true).await.unwrap();
    assert_eq!(h.mgr.breaker(&r.id).unwrap(), None);
    assert_eq!(thermal(&h.mgr, &r.id), ThermalState::Hot);
    assert_eq!(run(&h.mgr, &r.id, "cat note").await, "safe\n");

    // A restored VMM whose agent never answers: killed. Its guest ran, so
    // the snapshot is spent: no breaker (a retry could not restore it), and
    // the sandbox comes back by booting from its disk.
    h.mgr.stop(&r.id).await.unwrap();
    h.engine.inject(Fault::RestoreSilent);
    let e = h.mgr.exec(&r.id, sh("true")).await.unwrap_err();
    match &e {
        CoreError::SnapshotSpent { reason, .. } => {
            assert!(reason.contains("did not answer"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.mgr.breaker(&r.id).unwrap(), None);
    assert!(common::processes_mentioning(&h.sandboxes()).is_empty());
    let restores = h.engine.stats().restores;
    let e = h.mgr.start(&r.id, true).await.unwrap_err();
    assert!(matches!(e, CoreError::SnapshotSpent { .. }), "{e:?}");
    assert!(common::processes_mentioning(&h.sandboxes()).is_empty());
    assert_eq!(h.engine.stats().restores, restores, "nothing to restore");
    let record = h.mgr.release(&r.id).await.unwrap();
    h.mgr.boot_existing(record).await.unwrap();
    assert_eq!(run(&h.mgr, &r.id, "cat note").await, "safe\n");

    let mut names = Vec::new();
    while let Ok(ev) = events.try_recv() {
        names.push(ev.kind.name());
    }
    assert_eq!(
        names,
        vec![
            "cold",
            "restore_failed",
            "breaker_closed",
            "hot",
            "cold",
            "restore_failed",
            "restore_failed"
        ]
    );
    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_leaves_the_sandbox_hot() {
    let h = harness();
    let r = h.create("snapfail").await;
    h.engine.inject(Fault::SnapshotFails);
    let e = h.mgr.stop(&r.id).await.unwrap_err();
    assert!(matches!(e, CoreError::Thermal { .. }), "{e:?}");
    let rec = h.mgr.get(&r.id).unwrap();
    assert_eq!(rec.thermal, ThermalState::Hot);
    assert_eq!(rec.vmm_pid, r.vmm_pid);
    assert_eq!(run(&h.mgr, &r.id, "echo still here").await, "still here\n");
    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tick_cools_idle_sandboxes_and_spares_busy_ones() {
    let h = harness_with(|c| {
        c.thermal.warm_after = Duration::from_millis(100);
        c.thermal.cold_after = Duration::from_millis(100);
    });
    let idle = h.create("idle").await;
    let busy = h.create("busy").await;
    // A running command keeps `busy` hot (the agent reports it).
    let _stream = h.mgr.exec_stream(&busy.id, sh("sleep 30")).await.unwrap();
    wait_for(
        "the idle sandbox goes warm",
        Duration::from_secs(10),
        || async {
            h.mgr.thermal_tick().await;
            thermal(&h.mgr, &idle.id) == ThermalState::Warm
        },
    )
    .await;
    assert_eq!(thermal(&h.mgr, &busy.id), ThermalState::Hot);
    wait_for(
        "the idle sandbox goes cold",
        Duration::from_secs(10),
        || async {
            h.mgr.thermal_tick().await;
            thermal(&h.mgr, &idle.id) == ThermalState::Cold
        },
    )
    .await;
    assert_eq!(thermal(&h.mgr, &busy.id), ThermalState::Hot);
    assert_eq!(h.mgr.get(&idle.id).unwrap().vmm_pid, None);
    drop(_stream);
    for id in [&idle.id, &busy.id] {
        h.mgr.destroy(id).await.unwrap();
    }
    h.assert_clean("destroyed");
}

/// A host-side call the agent does not count as activity (a download held
/// open by a slow reader) keeps its sandbox hot: pausing under it would
/// stall the stream, and freezing would end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_keeps_its_sandbox_hot() {
    let h = harness_with(|c| {
        c.thermal.warm_after = Duration::from_millis(100);
        c.thermal.cold_after = Duration::from_millis(100);
    });
    let idle = h.create("idle").await;
    let reading = h.create("reading").await;
    run(&h.mgr, &reading.id, "head -c 8388608 /dev/zero > /tmp/big").await;
    let mut download = h
        .mgr
        .read_file_stream(
            &reading.id,
            FileRead {
                path: "/tmp/big".into(),
                offset: None,
                limit: None,
                max_bytes: None,
            },
        )
        .await
        .unwrap();
    assert!(download.next_chunk().await.unwrap().is_some());
    // The control goes warm, then cold, over these ticks; the sandbox with
    // the download held open (its agent reports no command, no session)
    // stays hot through all of them.
    wait_for(
        "the idle sandbox goes cold",
        Duration::from_secs(10),
        || async {
            h.mgr.thermal_tick().await;
            thermal(&h.mgr, &idle.id) == ThermalState::Cold
        },
    )
    .await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        h.mgr.thermal_tick().await;
    }
    assert_eq!(thermal(&h.mgr, &reading.id), ThermalState::Hot);
    // The download finishes whole.
    let mut got = 0usize;
    while let Some(chunk) = download.next_chunk().await.unwrap() {
        got += chunk.len();
    }
    assert!(got > 0);
    drop(download);
    // Once nothing is in flight it cools like any other.
    wait_for(
        "the sandbox goes warm after its download",
        Duration::from_secs(10),
        || async {
            h.mgr.thermal_tick().await;
            thermal(&h.mgr, &reading.id) != ThermalState::Hot
        },
    )
    .await;
    for id in [&idle.id, &reading.id] {
        h.mgr.destroy(id).await.unwrap();
    }
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_crash_adopts_cold_sandboxes_and_orphaned_vmms() {
    let h = harness();
    let cold = h.create("cold").await;
    let hot = h.create("hot").await;
    run(&h.mgr, &cold.id, "echo cold-file > note").await;
    run(&h.mgr, &hot.id, "echo hot-file > note").await;
    h.mgr.stop(&cold.id).await.unwrap();
    let cold_rec = h.mgr.get(&cold.id).unwrap();
    let hot_rec = h.mgr.get(&hot.id).unwrap();
    let orphan = hot_rec.vmm_pid.unwrap();

    // The "daemon" dies with SIGKILL: its manager goes without cleaning
    // up, the hot sandbox's VMM runs on.
    h.engine.crash();
    let Harness {
        _dir,
        data,
        ops,
        mgr,
        ..
    } = h;
    drop(mgr);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(alive(orphan), "the orphan outlives its daemon");

    // The next "daemon": same data directory and host network, new engine.
    let engine = FakeEngine::new(testkit::host_lohar());
    let mgr = SandboxManager::with_engine(config(&data), engine.clone(), ops.clone()).unwrap();
    let adopted = mgr.adopt_cold(cold_rec.clone()).await.unwrap();
    assert_eq!(adopted.thermal, ThermalState::Cold);
    assert_eq!(
        adopted.network.as_ref().map(|a| a.ip),
        cold_rec.network.as_ref().map(|a| a.ip)
    );
    let adopted = mgr.adopt_orphan(hot_rec.clone()).await.unwrap();
    assert_eq!(adopted.thermal, ThermalState::Cold);
    assert_eq!(adopted.vmm_pid, None);
    assert_eq!(engine.stats().orphans_taken, 1);
    wait_for("the orphan is gone", Duration::from_secs(10), || async {
        !alive(orphan)
    })
    .await;
    assert_eq!(engine.stats().restores, 0, "adoption leaves them cold");

    // Both wake on use with their files.
    assert_eq!(run(&mgr, &cold.id, "cat note").await, "cold-file\n");
    assert_eq!(run(&mgr, &hot.id, "cat note").await, "hot-file\n");
    assert_eq!(engine.stats().restores, 2);

    // A record taken twice, or pointing at a VMM that is gone, is refused.
    let e = mgr.adopt_cold(cold_rec.clone()).await.unwrap_err();
    assert!(
        matches!(e, CoreError::IdTaken(ref i) if *i == cold.id),
        "{e:?}"
    );
    let gone = SandboxRecord {
        id: id("sb-0000000090e5"),
        dir: data.join("sandboxes/sb-0000000090e5"),
        vmm_pid: Some(orphan),
        ..hot_rec.clone()
    };
    let e = mgr.adopt_orphan(gone).await.unwrap_err();
    assert!(matches!(e, CoreError::Restore { .. }), "{e:?}");

    for id in [&cold.id, &hot.id] {
        mgr.destroy(id).await.unwrap();
    }
    assert!(mgr.list().is_empty());
    assert_eq!(ops.links(), vec!["bhatti0".to_string()]);
    assert!(common::dir_entries(&data.join("sandboxes")).is_empty());
    assert!(common::processes_mentioning(&data.join("sandboxes")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_a_create_leaves_nothing_behind() {
    let h = harness();
    h.engine
        .inject(Fault::AgentLate(Duration::from_millis(800)));
    let sb = id("sb-00000000dead");
    let create = {
        let (mgr, sb) = (h.mgr.clone(), sb.clone());
        tokio::spawn(async move { mgr.create_as(sb, SandboxSpec::new("racer", "tiny")).await })
    };
    wait_for(
        "the VMM of the create runs",
        Duration::from_secs(10),
        || async {
            h.engine.stats().boots == 1 && !common::processes_mentioning(&h.sandboxes()).is_empty()
        },
    )
    .await;
    assert_eq!(
        h.mgr.get(&sb).map(|r| r.state).ok(),
        Some(SandboxState::Creating)
    );
    let destroyed = h.mgr.destroy(&sb).await;
    let created = create.await.unwrap();
    // The destroy wins at once: the create, still waiting for its agent,
    // gives up and undoes itself; nothing remains.
    assert!(matches!(destroyed, Ok(())), "{destroyed:?}");
    assert!(
        matches!(created, Err(CoreError::Cancelled { ref id }) if *id == sb),
        "{created:?}"
    );
    h.assert_clean("destroyed during create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_fails_the_sandbox_and_destroy_cleans_up() {
    let h = harness();
    let r = h.create("doomed").await;
    let pid = r.vmm_pid.unwrap();
    // SAFETY: kill(2) on the fake VMM's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // Noticed without a guest call. (A call racing the reaper can see
    // "connection refused" first: a dead guest's socket refuses at once.)
    wait_for("the sandbox fails", Duration::from_secs(10), || async {
        h.mgr.get(&r.id).unwrap().state == SandboxState::Failed
    })
    .await;
    let e = h.mgr.exec(&r.id, sh("true")).await.unwrap_err();
    match &e {
        CoreError::VmmExited { reason, .. } => {
            assert!(reason.contains("killed by signal 9"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let rec = h.mgr.get(&r.id).unwrap();
    assert_eq!(rec.state, SandboxState::Failed);
    assert!(rec.failure.unwrap().contains("signal 9"));
    h.mgr.destroy(&r.id).await.unwrap();
    h.assert_clean("destroyed after death");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_delays_no_other_sandbox_and_shutdown_kills_it_within_its_bound() {
    let h = harness_with(|c| {
        c.thermal.warm_after = Duration::from_millis(200);
        c.thermal.cold_after = Duration::from_millis(200);
        c.thermal.tick = Duration::from_millis(50);
        // Long enough that a ticker which waited for the hung sandbox
        // would miss the deadline below.
        c.thermal.agent_timeout = Duration::from_secs(20);
        c.thermal.transition_timeout = Duration::from_secs(20);
        c.thermal.sync_timeout = Duration::from_secs(20);
        c.shutdown_timeout = Duration::from_secs(1);
    });
    let mut events = h.mgr.subscribe_thermal();
    // `stuck` sorts first: a ticker going through sandboxes one after the
    // other would wait for it before `fine`.
    let stuck = h
        .mgr
        .create_as(id("sb-000000000001"), SandboxSpec::new("stuck", "tiny"))
        .await
        .unwrap();
    let fine = h
        .mgr
        .create_as(id("sb-0000000000ff"), SandboxSpec::new("fine", "tiny"))
        .await
        .unwrap();
    let pid = stuck.vmm_pid.unwrap();
    // The agent of `stuck` hangs (its process stopped; the "VM" still
    // counts as hot). Control: it answers before, and not after.
    assert_eq!(run(&h.mgr, &stuck.id, "echo up").await, "up\n");
    // SAFETY: kill(2) on the fake VMM's pid, which runs (checked above).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let silent = tokio::time::timeout(
        Duration::from_millis(500),
        h.mgr.exec(&stuck.id, sh("true")),
    )
    .await;
    assert!(silent.is_err(), "the stopped agent answered: {silent:?}");

    let ticker = h.mgr.spawn_thermal();
    let mut kinds = Vec::new();
    while !kinds.contains(&"cold") {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("fine went warm and cold while stuck hung")
            .expect("events");
        assert_eq!(ev.id, fine.id, "{ev:?}");
        kinds.push(ev.kind.name());
    }
    assert_eq!(kinds, ["warm", "cold"]);
    assert_eq!(thermal(&h.mgr, &stuck.id), ThermalState::Hot);
    ticker.abort();

    // Shutdown: `fine` is cold already; `stuck` cannot sync within the
    // shutdown bound and is killed.
    let bound = Duration::from_secs(1) + bhatti_core::KILL_GRACE + Duration::from_secs(10);
    let (stopped, failed) = tokio::time::timeout(bound, h.mgr.stop_all())
        .await
        .expect("stop_all within its bound");
    assert!(failed.is_empty(), "{failed:?}");
    let (mut cold, mut killed) = (None, None);
    for s in stopped {
        match s {
            Stopped::Cold(r) => cold = Some(r),
            Stopped::Killed { record, reason } => {
                assert!(matches!(reason, CoreError::TimedOut { .. }), "{reason:?}");
                killed = Some(record);
            }
        }
    }
    let (cold, killed) = (cold.expect("fine cold"), killed.expect("stuck killed"));
    assert_eq!(
        (cold.id.clone(), killed.id.clone()),
        (fine.id.clone(), stuck.id.clone())
    );
    wait_for("the hung VMM is gone", Duration::from_secs(10), || async {
        !alive(pid)
    })
    .await;
    assert!(h.mgr.list().is_empty());
    assert_eq!(h.ops.links(), vec!["bhatti0".to_string()], "TAPs left");

    // Back: `fine` adopted cold, `stuck` booted again from its disk.
    h.mgr.adopt_cold(cold).await.unwrap();
    h.mgr.boot_existing(killed).await.unwrap();
    assert_eq!(run(&h.mgr, &fine.id, "echo back").await, "back\n");
    assert_eq!(run(&h.mgr, &stuck.id, "echo back").await, "back\n");
    for id in [&fine.id, &stuck.id] {
        h.mgr.destroy(id).await.unwrap();
    }
    h.assert_clean("destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_a_boot_from_disk_removes_the_kept_directory_too() {
    let h = harness();
    let r = h.create("again").await;
    run(&h.mgr, &r.id, "echo kept > note").await;
    // Shutdown forgets it, directory kept (cold, but booting from the
    // disk is what a `stopped` sandbox does).
    let (stopped, failed) = h.mgr.stop_all().await;
    assert!(failed.is_empty(), "{failed:?}");
    let record = match <[Stopped; 1]>::try_from(stopped) {
        Ok([Stopped::Cold(record)]) => record,
        other => panic!("{other:?}"),
    };
    assert!(record.dir.exists());
    h.engine
        .inject(Fault::AgentLate(Duration::from_millis(800)));
    let boots = h.engine.stats().boots;
    let boot = {
        let mgr = h.mgr.clone();
        tokio::spawn(async move { mgr.boot_existing(record).await })
    };
    wait_for(
        "the VMM of the boot runs",
        Duration::from_secs(10),
        || async {
            h.engine.stats().boots == boots + 1
                && h.mgr.get(&r.id).is_ok_and(|x| x.vmm_pid.is_some())
        },
    )
    .await;
    assert_eq!(h.mgr.get(&r.id).unwrap().state, SandboxState::Creating);
    h.mgr.destroy(&r.id).await.expect("the destroy wins");
    let booted = boot.await.unwrap();
    assert!(
        matches!(booted, Err(CoreError::Cancelled { ref id }) if *id == r.id),
        "{booted:?}"
    );
    h.assert_clean("destroyed during a boot from disk");
}
