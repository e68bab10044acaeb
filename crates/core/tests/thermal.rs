//! Thermal tiers on real VMs (QEMU-TCG here): hot ⇄ warm ⇄ cold with the
//! guest's processes, memory and files intact, transparent wake, coalesced
//! wakes, the circuit breaker, the ticker, and a daemon restart with cold
//! sandboxes. Each test in a network namespace of its own.
//!
//! Needs root and `qemu-system-x86_64`; otherwise prints `SKIP` (and fails under `scripts/test.sh`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bhatti_core::{
    CoreConfig, CoreError, SandboxId, SandboxManager, SandboxSpec, Stopped, ThermalPolicy,
    ThermalState,
};
use image::Tier;
use net::IpRoute;
use testkit::{images, Netns};

use common::skip;
use common::workload::{out, sh, wait_for_dict, workload, START_WORKLOAD};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn config(data: &Path, bridge: &str, subnet: &str) -> CoreConfig {
    let mut config = common::vm_config(data, bridge, subnet, "bt");
    // No ticker unless a test starts one; the long timers keep a manual
    // tick from acting.
    config.thermal = ThermalPolicy {
        warm_after: Duration::from_secs(3600),
        cold_after: Duration::from_secs(3600),
        ..ThermalPolicy::default()
    };
    config
}

fn manager(config: CoreConfig) -> SandboxManager {
    SandboxManager::new(config, Arc::new(IpRoute::default())).expect("manager")
}

fn spec(name: &str, tier: Tier) -> SandboxSpec {
    let mut s = SandboxSpec::new(name, tier.name());
    s.memory_mb = 256;
    s
}

fn thermal(mgr: &SandboxManager, id: &SandboxId) -> ThermalState {
    mgr.get(id).expect("record").thermal
}

fn host_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn processes_memory_files_and_clock_survive_warm_cold_and_a_daemon_restart() {
    if skip() {
        return;
    }
    images(Tier::Minimal);
    let _ns = Netns::enter("th-state");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let cfg = config(data.path(), "bhth0", "10.231.0.0/24");
        let mgr = manager(cfg.clone());
        let rec = mgr
            .create(spec("keeper", Tier::Minimal))
            .await
            .expect("create");
        let id = rec.id.clone();
        out(&mgr, &id, START_WORKLOAD).await;
        wait_for_dict(&mgr, &id).await;
        out(&mgr, &id, "echo before-cold > /workspace/kept.txt").await;
        let (pid0, c0, token, hits0, dpid) = workload(&mgr, &id).await;

        // Warm: vCPUs stopped, VMM alive.
        let t = Instant::now();
        mgr.pause(&id).await.expect("pause");
        println!("TIMING pause {:?}", t.elapsed());
        assert_eq!(thermal(&mgr, &id), ThermalState::Warm);
        let (pid1, c1, token1, hits1, dpid1) = workload(&mgr, &id).await;
        assert_eq!(thermal(&mgr, &id), ThermalState::Hot, "an exec wakes it");
        assert_eq!(
            (pid1.as_str(), token1.as_str(), dpid1.as_str()),
            (pid0.as_str(), token.as_str(), dpid.as_str())
        );
        assert!(c1 > c0, "counter {c0} -> {c1}");
        assert_eq!(hits1, hits0 + 1, "the dict kept its count");

        // Cold: no VMM, device state on disk, RAM in the memory file.
        let t = Instant::now();
        mgr.stop(&id).await.expect("stop");
        println!("TIMING stop to cold {:?}", t.elapsed());
        let cold = mgr.get(&id).unwrap();
        assert_eq!(cold.thermal, ThermalState::Cold);
        assert_eq!(cold.vmm_pid, None);
        assert!(
            common::processes_mentioning(&cold.dir).is_empty(),
            "a VMM still runs: {:?}",
            common::processes_mentioning(&cold.dir)
        );
        let state = std::fs::metadata(cold.dir.join("snapshot/vmstate"))
            .unwrap()
            .len();
        let ram = std::fs::metadata(cold.dir.join("memory.ram"))
            .unwrap()
            .len();
        println!("MEASURED cold snapshot: {state} bytes of device state, memory file {ram} bytes");
        assert!(
            state > 0 && state < 4 << 20,
            "device state only: {state} bytes"
        );
        assert_eq!(ram, 256 << 20);

        let t = Instant::now();
        let (pid2, c2, token2, hits2, dpid2) = workload(&mgr, &id).await;
        println!("TIMING cold wake + 4 execs {:?}", t.elapsed());
        let woke = mgr.get(&id).unwrap();
        assert_eq!(woke.thermal, ThermalState::Hot);
        assert_eq!(woke.cold_wakes, 1);
        assert_eq!(
            (pid2.as_str(), token2.as_str(), dpid2.as_str()),
            (pid0.as_str(), token.as_str(), dpid.as_str())
        );
        assert!(c2 > c1, "counter {c1} -> {c2}");
        assert_eq!(hits2, hits1 + 1);
        assert_eq!(
            out(&mgr, &id, "cat /workspace/kept.txt").await,
            "before-cold"
        );
        // The guest read its clock between these two host readings (a
        // loaded host can take seconds to deliver the answer).
        let before = host_unix();
        let guest: u64 = out(&mgr, &id, "date +%s").await.parse().unwrap();
        let after = host_unix();
        assert!(
            guest + 2 >= before && guest <= after + 2,
            "guest clock {guest}, host {before}..{after}"
        );

        // Daemon restart: every sandbox to cold, a new manager adopts them.
        let t = Instant::now();
        let (stopped, failed) = mgr.stop_all().await;
        println!("TIMING stop_all {:?}", t.elapsed());
        assert!(failed.is_empty(), "{failed:?}");
        let released = match <[Stopped; 1]>::try_from(stopped) {
            Ok([Stopped::Cold(record)]) => record,
            other => panic!("expected one cold sandbox: {other:?}"),
        };
        assert_eq!(released.thermal, ThermalState::Cold);
        assert!(mgr.list().is_empty(), "shutdown forgets what it stopped");
        drop(mgr);
        let mgr = manager(cfg);
        let adopted = mgr.adopt_cold(released).await.expect("adopt");
        assert_eq!(adopted.thermal, ThermalState::Cold);
        let (pid3, c3, token3, hits3, dpid3) = workload(&mgr, &id).await;
        assert_eq!(
            (pid3.as_str(), token3.as_str(), dpid3.as_str()),
            (pid0.as_str(), token.as_str(), dpid.as_str())
        );
        assert!(c3 > c2);
        assert_eq!(hits3, hits2 + 1);
        assert_eq!(
            out(&mgr, &id, "cat /workspace/kept.txt").await,
            "before-cold"
        );
        mgr.destroy(&id).await.expect("destroy");
    });
}

#[test]
fn fifty_warm_and_twenty_cold_cycles_and_coalesced_wakes() {
    if skip() {
        return;
    }
    images(Tier::Tiny);
    let _ns = Netns::enter("th-cycle");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(config(data.path(), "bhth1", "10.232.0.0/24"));
        let id = mgr
            .create(spec("cycler", Tier::Tiny))
            .await
            .expect("create")
            .id;
        out(&mgr, &id, "echo 0 > /tmp/n").await;
        let bump = "n=$(( $(cat /tmp/n) + 1 )); echo $n > /tmp/n; echo $n";
        let mut pauses = Vec::new();
        for i in 1..=50u32 {
            let t = Instant::now();
            mgr.pause(&id)
                .await
                .unwrap_or_else(|e| panic!("pause {i}: {e}"));
            pauses.push(t.elapsed());
            assert_eq!(thermal(&mgr, &id), ThermalState::Warm);
            assert_eq!(out(&mgr, &id, bump).await, i.to_string(), "warm cycle {i}");
        }
        pauses.sort();
        println!("TIMING pause p50 {:?} max {:?}", pauses[25], pauses[49]);
        for i in 1..=20u32 {
            mgr.stop(&id)
                .await
                .unwrap_or_else(|e| panic!("stop {i}: {e}"));
            assert_eq!(thermal(&mgr, &id), ThermalState::Cold);
            let t = Instant::now();
            assert_eq!(
                out(&mgr, &id, bump).await,
                (50 + i).to_string(),
                "cold cycle {i}"
            );
            println!("TIMING cold wake+exec {i}: {:?}", t.elapsed());
        }
        assert_eq!(mgr.get(&id).unwrap().cold_wakes, 20);

        // Two concurrent execs on a cold sandbox: one restore.
        mgr.stop(&id).await.expect("stop");
        let (a, b) = tokio::join!(out(&mgr, &id, "echo a"), out(&mgr, &id, "echo b"));
        assert_eq!((a.as_str(), b.as_str()), ("a", "b"));
        assert_eq!(
            mgr.get(&id).unwrap().cold_wakes,
            21,
            "exactly one more restore"
        );
        mgr.destroy(&id).await.expect("destroy");
    });
}

#[test]
fn a_corrupt_snapshot_opens_the_breaker_and_a_forced_start_closes_it() {
    if skip() {
        return;
    }
    images(Tier::Tiny);
    let _ns = Netns::enter("th-break");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mgr = manager(config(data.path(), "bhth2", "10.233.0.0/24"));
        let id = mgr
            .create(spec("fragile", Tier::Tiny))
            .await
            .expect("create")
            .id;
        out(&mgr, &id, "echo kept > /tmp/mem-only").await;
        mgr.stop(&id).await.expect("stop");
        let state = mgr.get(&id).unwrap().dir.join("snapshot/vmstate");
        let good = std::fs::read(&state).unwrap();
        let mut bad = good.clone();
        bad[..64].fill(0xa5);
        std::fs::write(&state, &bad).unwrap();

        let t = Instant::now();
        let e = mgr.exec(&id, sh("true")).await.unwrap_err();
        println!("TIMING failed restore {:?}: {e}", t.elapsed());
        assert!(matches!(e, CoreError::Restore { .. }), "{e:?}");
        assert!(e.to_string().contains("Restoring sandbox"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(30), "no hang");
        assert!(mgr.breaker(&id).unwrap().is_some());
        assert_eq!(thermal(&mgr, &id), ThermalState::Cold);
        assert!(common::processes_mentioning(&mgr.get(&id).unwrap().dir).is_empty());
        // Open breaker: refused at once, no new attempt.
        let t = Instant::now();
        let e = mgr.exec(&id, sh("true")).await.unwrap_err();
        assert!(matches!(e, CoreError::BreakerOpen { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(1));
        // Even with the snapshot repaired, only a forced start tries again.
        std::fs::write(&state, &good).unwrap();
        assert!(matches!(
            mgr.start(&id, false).await,
            Err(CoreError::BreakerOpen { .. })
        ));
        mgr.start(&id, true).await.expect("forced start");
        assert!(mgr.breaker(&id).unwrap().is_none());
        assert_eq!(out(&mgr, &id, "cat /tmp/mem-only").await, "kept");
        mgr.destroy(&id).await.expect("destroy");
    });
}

#[test]
fn the_ticker_cools_idle_sandboxes_and_spares_busy_and_keep_hot_ones() {
    if skip() {
        return;
    }
    images(Tier::Tiny);
    let _ns = Netns::enter("th-tick");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut cfg = config(data.path(), "bhth3", "10.234.0.0/24");
        cfg.thermal = ThermalPolicy {
            warm_after: Duration::from_secs(1),
            cold_after: Duration::from_secs(2),
            tick: Duration::from_millis(200),
            ..ThermalPolicy::default()
        };
        let mgr = manager(cfg);
        let mut events = mgr.subscribe_thermal();
        let (a, b) = tokio::join!(
            mgr.create(spec("idle", Tier::Tiny)),
            mgr.create(spec("pinned", Tier::Tiny))
        );
        let (idle, pinned) = (a.expect("create").id, b.expect("create").id);
        mgr.set_keep_hot(&pinned, true).unwrap();
        mgr.touch(&idle);
        let ticker = mgr.spawn_thermal();

        // A command running longer than warm_after keeps the sandbox hot.
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        out(&mgr, &idle, "sleep 3").await;
        let ended = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;

        // Then it goes warm, then cold, by itself.
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen
            .iter()
            .any(|(i, k, _): &(SandboxId, &str, u64)| i == &idle && *k == "cold")
        {
            let ev = tokio::time::timeout_at(deadline.into(), events.recv())
                .await
                .expect("idle sandbox went cold in time")
                .expect("events");
            seen.push((ev.id.clone(), ev.kind.name(), ev.at_unix_ms));
        }
        let kinds: Vec<&str> = seen
            .iter()
            .filter(|(i, ..)| i == &idle)
            .map(|(_, k, _)| *k)
            .collect();
        assert_eq!(kinds, ["warm", "cold"]);
        let warm_at = seen.iter().find(|(_, k, _)| *k == "warm").unwrap().2;
        // Not while the command ran (it runs 3 s from after `started`; its
        // answer may reach the host after a pause that followed its end).
        assert!(
            warm_at >= started + 3000,
            "paused at {warm_at} during the exec ({started}..{ended})"
        );
        assert!(
            seen.iter().all(|(i, ..)| i != &pinned),
            "keep_hot was touched"
        );
        assert_eq!(thermal(&mgr, &pinned), ThermalState::Hot);
        assert_eq!(thermal(&mgr, &idle), ThermalState::Cold);
        // list/get never wake.
        for _ in 0..5 {
            assert_eq!(
                mgr.list().iter().find(|r| r.id == idle).unwrap().thermal,
                ThermalState::Cold
            );
            assert_eq!(thermal(&mgr, &idle), ThermalState::Cold);
        }
        assert_eq!(mgr.get(&idle).unwrap().cold_wakes, 0);
        ticker.abort();
        assert_eq!(out(&mgr, &idle, "echo awake").await, "awake");
        mgr.destroy(&idle).await.expect("destroy");
        mgr.destroy(&pinned).await.expect("destroy");
    });
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, …).
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // `pid (comm) S …`: the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .expect("state field")
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the VMM pid this test just read; its supervisor
    // has not reaped it (the test checked it runs).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

#[test]
fn a_hung_vmm_delays_no_other_sandbox_and_shutdown_kills_it_within_its_bound() {
    assert!(!skip(), "this test needs root and {}", common::QEMU);
    images(Tier::Tiny);
    let _ns = Netns::enter("th-hung");
    let data = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut cfg = config(data.path(), "bhth4", "10.235.0.0/24");
        cfg.thermal = ThermalPolicy {
            warm_after: Duration::from_secs(1),
            cold_after: Duration::from_secs(2),
            tick: Duration::from_millis(200),
            // Well below the QMP client's own 30 s timeout, so a transition
            // that waits for the stopped VMM is cut by this limit.
            transition_timeout: Duration::from_secs(4),
            agent_timeout: Duration::from_secs(1),
            sync_timeout: Duration::from_secs(2),
            ..ThermalPolicy::default()
        };
        // Room for `fine`'s sync and snapshot on a loaded TCG host.
        cfg.shutdown_timeout = Duration::from_secs(15);
        let mgr = manager(cfg.clone());
        let mut events = mgr.subscribe_thermal();
        let (a, b) = tokio::join!(
            mgr.create(spec("stuck", Tier::Tiny)),
            mgr.create(spec("fine", Tier::Tiny))
        );
        let (stuck, fine) = (a.expect("create").id, b.expect("create").id);
        out(&mgr, &stuck, "echo on-disk > /workspace/kept && sync").await;
        out(&mgr, &fine, "echo in-memory > /tmp/mem-only").await;

        // `stuck` goes warm, then its whole VMM is stopped: vCPUs, QMP,
        // everything. Control: the process runs before and is stopped after.
        mgr.pause(&stuck).await.expect("pause");
        let stuck_rec = mgr.get(&stuck).unwrap();
        let pid = stuck_rec.vmm_pid.expect("pid");
        assert_ne!(process_state(pid), 'T');
        signal(pid, libc::SIGSTOP);
        testkit::wait_until("the VMM is stopped", Duration::from_secs(10), || {
            process_state(pid) == 'T'
        });
        let stopped_at = Instant::now();
        // The manual pause's event is not the ticker's.
        while events.try_recv().is_ok() {}

        // From cold_after on, every tick's warm → cold of `stuck` waits for
        // the stopped VMM until transition_timeout cuts it. `fine` is kept
        // busy past the first of those, then left idle.
        let ticker = mgr.spawn_thermal();
        while stopped_at.elapsed() < Duration::from_secs(3) {
            mgr.touch(&fine);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let idle_from = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // Less than the 30 s a QMP call to the stopped VMM waits: a tick that
        // waited for `stuck` would miss this.
        let deadline = Instant::now() + Duration::from_secs(25);
        let mut kinds = Vec::new();
        while !kinds.contains(&"cold") {
            let ev = tokio::time::timeout_at(deadline.into(), events.recv())
                .await
                .expect("fine went warm and cold on schedule")
                .expect("events");
            assert_ne!(ev.id, stuck, "the stopped VMM moved: {ev:?}");
            assert!(ev.at_unix_ms >= idle_from, "{ev:?}");
            kinds.push(ev.kind.name());
        }
        assert_eq!(kinds, ["warm", "cold"]);
        assert_eq!(thermal(&mgr, &stuck), ThermalState::Warm);
        assert_eq!(process_state(pid), 'T');
        // Calls to the others answer normally (a restore from cold here).
        assert_eq!(out(&mgr, &fine, "cat /tmp/mem-only").await, "in-memory");
        assert_eq!(thermal(&mgr, &fine), ThermalState::Hot);

        // Shutdown: `fine` goes cold, `stuck` cannot and is killed, both
        // within the documented bound.
        ticker.abort();
        let bound = cfg.shutdown_timeout + bhatti_core::KILL_GRACE + Duration::from_secs(10);
        let (stopped, failed) = tokio::time::timeout(bound, mgr.stop_all())
            .await
            .expect("stop_all within its bound");
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(stopped.len(), 2, "{stopped:?}");
        let mut cold = None;
        let mut killed = None;
        for s in stopped {
            match s {
                Stopped::Cold(r) => {
                    assert_eq!(r.id, fine);
                    cold = Some(r);
                }
                Stopped::Killed { record, reason } => {
                    assert_eq!(record.id, stuck);
                    assert!(matches!(reason, CoreError::TimedOut { .. }), "{reason:?}");
                    killed = Some(record);
                }
            }
        }
        let (cold, killed) = (cold.expect("fine cold"), killed.expect("stuck killed"));
        assert_eq!(cold.thermal, ThermalState::Cold);
        assert_eq!(killed.vmm_pid, None);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "VMM {pid} left"
        );
        for dir in [&cold.dir, &killed.dir] {
            assert!(
                common::processes_mentioning(dir).is_empty(),
                "{:?}",
                common::processes_mentioning(dir)
            );
        }
        assert!(mgr.list().is_empty());
        assert!(
            !killed.dir.join("snapshot/manifest.json").exists(),
            "a snapshot of the killed VM is left to restore"
        );
        drop(mgr);

        // The next daemon: `fine` is adopted cold with its memory, `stuck`
        // boots again from its disk.
        let mgr = manager(cfg);
        mgr.adopt_cold(cold).await.expect("adopt");
        assert_eq!(out(&mgr, &fine, "cat /tmp/mem-only").await, "in-memory");
        let again = mgr.boot_existing(killed).await.expect("boot again");
        assert_eq!(again.id, stuck);
        assert_eq!(out(&mgr, &stuck, "cat /workspace/kept").await, "on-disk");
        mgr.destroy(&fine).await.expect("destroy");
        mgr.destroy(&stuck).await.expect("destroy");
    });
}
