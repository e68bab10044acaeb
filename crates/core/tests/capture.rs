//! Captures on real VMs (QEMU-TCG here): a checkpoint of a running sandbox,
//! a new sandbox restored from it with its own identity, a fork of three
//! sharing the captured memory copy-on-write, a cold cycle of a child, and
//! a rollback. One guest workload throughout: a shell counter and a Python
//! process holding a value in memory.
//!
//! Needs root and `qemu-system-x86_64`; otherwise prints `SKIP` (and fails under `scripts/test.sh`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_core::{
    CoreConfig, Durability, SandboxId, SandboxManager, SandboxRecord, SandboxSpec, ThermalPolicy,
    ThermalState,
};
use image::Tier;
use net::IpRoute;
use testkit::{images, Netns};

use common::skip;
use common::workload::{out, wait_for_dict, workload, START_WORKLOAD};

const GUEST_MIB: u32 = 256;

fn config(data: &Path) -> CoreConfig {
    let mut config = common::vm_config(data, "bhcp0", "10.233.0.0/24", "bc");
    config.thermal = ThermalPolicy {
        warm_after: Duration::from_secs(3600),
        cold_after: Duration::from_secs(3600),
        ..ThermalPolicy::default()
    };
    config
}

fn spec(name: &str) -> SandboxSpec {
    let mut s = SandboxSpec::new(name, Tier::Minimal.name());
    s.memory_mb = GUEST_MIB;
    s
}

/// Like `spec`, with the capture's shape (a new sandbox must have it).
fn child_spec(name: &str, of: &SandboxRecord) -> SandboxSpec {
    let mut s = of.spec.clone();
    s.name = name.into();
    s
}

/// Who the guest thinks it is: hostname, eth0's address and MAC.
async fn guest_identity(mgr: &SandboxManager, id: &SandboxId) -> (String, String, String) {
    let host = out(mgr, id, "hostname").await;
    let ip = out(
        mgr,
        id,
        "ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1",
    )
    .await;
    let mac = out(mgr, id, "cat /sys/class/net/eth0/address").await;
    (host, ip, mac)
}

/// Of the VMM `pid`, the guest-RAM mapping of a capture's memory image:
/// (resident KiB, KiB the guest has written and so owns, proportional KiB).
fn guest_ram_kib(pid: u32) -> (u64, u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut inside, mut rss, mut anon, mut pss) = (false, 0, 0, 0);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains("/snapshot/memory");
            continue;
        }
        if !inside {
            continue;
        }
        let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => rss += kib,
            "Anonymous:" => anon += kib,
            "Pss:" => pss += kib,
            _ => {}
        }
    }
    (rss, anon, pss)
}

#[test]
fn checkpoints_forks_and_rollbacks_carry_processes_memory_and_files() {
    if skip() {
        return;
    }
    images(Tier::Minimal);
    let _ns = Netns::enter("capture");
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mgr = SandboxManager::new(config(data.path()), Arc::new(IpRoute::default()))
            .expect("manager");
        let origin = mgr.create(spec("origin")).await.expect("create");
        let id = origin.id.clone();
        out(&mgr, &id, START_WORKLOAD).await;
        wait_for_dict(&mgr, &id).await;
        out(&mgr, &id, "echo before > /workspace/marker").await;
        let (pid0, c0, token, hits0, dpid) = workload(&mgr, &id).await;

        // A checkpoint of the running sandbox: it pauses for the copies only.
        let ck_dir = data.path().join("ck1");
        let ck = mgr.capture(&id, &ck_dir, Durability::Durable).await.expect("capture");
        println!(
            "MEASURED capture: paused {:?}, {} MiB on disk",
            ck.paused,
            ck.bytes >> 20
        );
        assert_eq!(mgr.get(&id).unwrap().thermal, ThermalState::Hot);
        out(&mgr, &id, "echo after > /workspace/marker").await;
        let (_, c1, _, hits1, _) = workload(&mgr, &id).await;
        assert!(c1 > c0, "the origin's counter goes on: {c0} -> {c1}");
        assert_eq!(hits1, hits0 + 1);

        // A new sandbox from it: the captured processes, memory and files,
        // its own identity.
        let t = Instant::now();
        let child = mgr
            .create_from_capture(
                SandboxId::generate().unwrap(),
                child_spec("from-ck", &origin),
                ck.clone(),
            )
            .await
            .expect("create from the checkpoint");
        println!("TIMING create from a checkpoint to agent ready {:?}", t.elapsed());
        let (cpid, cc, ctoken, chits, cdpid) = workload(&mgr, &child.id).await;
        assert_eq!(
            (cpid.as_str(), ctoken.as_str(), cdpid.as_str()),
            (pid0.as_str(), token.as_str(), dpid.as_str()),
            "the same processes, and the value held in Python's memory"
        );
        assert_eq!(chits, hits0 + 1, "the dict's count as captured, plus this query");
        assert!(cc >= c0, "the counter continues from {c0}: {cc}");
        assert_eq!(out(&mgr, &child.id, "cat /workspace/marker").await, "before");
        let att = child.network.clone().unwrap();
        assert_ne!(att.ip, origin.network.as_ref().unwrap().ip);
        assert_eq!(
            guest_identity(&mgr, &child.id).await,
            (
                "from-ck".to_string(),
                att.ip.to_string(),
                vmm::MacAddr(att.mac.0).to_string()
            )
        );
        // The origin is untouched.
        assert_eq!(out(&mgr, &id, "cat /workspace/marker").await, "after");
        assert_eq!(guest_identity(&mgr, &id).await.0, "origin");

        // A fork of three: copy-on-write memory, disks of their own.
        let names = ["fork-a", "fork-b", "fork-c"];
        let kids: Vec<(SandboxId, SandboxSpec)> = names
            .iter()
            .map(|n| (SandboxId::generate().unwrap(), child_spec(n, &origin)))
            .collect();
        let t = Instant::now();
        let (fork_capture, made) = mgr
            .fork(&id, kids, &data.path().join("fork-scratch"))
            .await
            .expect("fork");
        println!(
            "TIMING fork of 3 to all agents ready {:?} (origin paused {:?})",
            t.elapsed(),
            fork_capture.paused
        );
        assert!(!fork_capture.dir.exists(), "a fork's capture is removed");
        let made: Vec<SandboxRecord> = made.into_iter().map(|r| r.expect("child")).collect();
        let mut ips = std::collections::BTreeSet::new();
        for (kid, name) in made.iter().zip(names) {
            let (_, _, t, _, p) = workload(&mgr, &kid.id).await;
            assert_eq!((t.as_str(), p.as_str()), (token.as_str(), dpid.as_str()));
            let (h, ip, _) = guest_identity(&mgr, &kid.id).await;
            assert_eq!(h, name);
            assert_eq!(ip, kid.network.as_ref().unwrap().ip.to_string());
            ips.insert(ip);
        }
        assert_eq!(ips.len(), 3, "each child on its own address");
        out(&mgr, &made[0].id, "echo mine > /workspace/only-a").await;
        for other in [&made[1].id, &made[2].id, &id] {
            assert_eq!(
                out(&mgr, other, "test -e /workspace/only-a && echo seen || echo absent").await,
                "absent"
            );
        }
        let mut owned = 0;
        for kid in &made {
            let (rss, anon, pss) = guest_ram_kib(mgr.get(&kid.id).unwrap().vmm_pid.unwrap());
            println!(
                "MEASURED fork child {}: guest RAM resident {} MiB, written (own) {} MiB, proportional {} MiB",
                kid.spec.name,
                rss >> 10,
                anon >> 10,
                pss >> 10
            );
            owned += anon;
        }
        println!(
            "MEASURED fork of 3 x {GUEST_MIB} MiB guests: {} MiB of guest RAM copied by the children together (3x the guest would be {} MiB)",
            owned >> 10,
            3 * GUEST_MIB
        );
        assert!(
            owned < u64::from(GUEST_MIB) << 10,
            "the children together own {owned} KiB of guest RAM"
        );

        // A child goes cold and wakes with everything (its RAM now in a
        // file of its own).
        let a = &made[0].id;
        mgr.stop(a).await.expect("child to cold");
        assert_eq!(mgr.get(a).unwrap().thermal, ThermalState::Cold);
        let (_, _, t, _, p) = workload(&mgr, a).await;
        assert_eq!((t.as_str(), p.as_str()), (token.as_str(), dpid.as_str()));
        assert_eq!(out(&mgr, a, "cat /workspace/only-a").await, "mine");
        assert_eq!(guest_identity(&mgr, a).await.0, "fork-a");
        // And again: the cold cycle after that is an ordinary one.
        mgr.stop(a).await.expect("child to cold again");
        assert_eq!(out(&mgr, a, "cat /workspace/only-a").await, "mine");

        // Rollback: the origin returns to the checkpoint, keeping its identity.
        mgr.restore_to(&id, ck.clone()).await.expect("restore");
        assert_eq!(out(&mgr, &id, "cat /workspace/marker").await, "before");
        let (rpid, rc, rtoken, rhits, _) = workload(&mgr, &id).await;
        assert_eq!((rpid.as_str(), rtoken.as_str()), (pid0.as_str(), token.as_str()));
        assert_eq!(rhits, hits0 + 1, "the dict's memory is the checkpoint's");
        assert!(rc >= c0);
        let (h, ip, _) = guest_identity(&mgr, &id).await;
        assert_eq!((h.as_str(), ip), ("origin", origin.network.unwrap().ip.to_string()));

        for sb in mgr.list() {
            mgr.destroy(&sb.id).await.expect("destroy");
        }
        mgr.teardown_networks().unwrap();
    });
}
