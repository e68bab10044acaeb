//! Concurrency at the daemon on real VMs: destroys racing creates, and
//! creates racing each other for the last places of a quota.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

/// QEMU processes whose command line names `data` (this daemon's VMs).
fn vmms_of(data: &Path) -> Vec<u32> {
    let needle = data.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.starts_with("qemu") || cmd.contains("/qemu-system"))
                .then_some(())
                .filter(|_| cmd.contains(&needle))
                .map(|_| pid)
        })
        .collect()
}

/// Entries under `DATA/sandboxes`.
fn sandbox_dirs(data: &Path) -> Vec<String> {
    match std::fs::read_dir(data.join("sandboxes")) {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Rate limits out of the way: the races are the point.
const UNLIMITED: &str =
    "[limits]\ncreates_per_min = 10000\nexecs_per_min = 10000\nreads_per_min = 10000\n";

/// A user whose CPU and memory quotas leave room for 20 small sandboxes.
fn roomy_user(d: &TestDaemon) -> String {
    let store = store::Store::open(&d.data.join("bhatti.db")).unwrap();
    let quotas = api::users::Quotas {
        max_sandboxes: 40,
        max_cpus: 64,
        max_memory_mb: 16384,
        max_disk_mb: 1 << 20,
    };
    api::users::create_user(&store, "alice", quotas).unwrap().1
}

#[test]
fn destroys_racing_creates_leave_nothing_behind() {
    in_netns("api-race-destroy", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), UNLIMITED)).await;
        let c = d.client(&roomy_user(&d));
        let pairs = 20;
        let mut tasks = Vec::new();
        for i in 0..pairs {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("race-{i}");
                let body = json!({"name": name, "memory_mb": 128});
                let create = {
                    let c = c.clone();
                    tokio::spawn(
                        async move { c.json(Method::POST, "/sandboxes", Some(body)).await },
                    )
                };
                // Give the create a head start of 0-190 ms: some destroys
                // find no row yet, most find one being created.
                tokio::time::sleep(Duration::from_millis(10 * (i as u64 % 20))).await;
                let (ds, dv) = c
                    .json(Method::DELETE, &format!("/sandboxes/{name}"), None)
                    .await;
                assert!(ds == 204 || ds == 404, "destroy {name}: {ds} {dv}");
                let (cs, cv) = create.await.unwrap();
                // A create the destroy cancelled answers 409, never 502.
                assert!([200, 201, 409].contains(&cs), "create {name}: {cs} {cv}");
                (name, ds, cs)
            }));
        }
        let mut late = Vec::new();
        let mut outcomes = std::collections::BTreeMap::new();
        for t in tasks {
            let (name, ds, cs) = t.await.unwrap();
            *outcomes.entry((ds, cs)).or_insert(0) += 1;
            // The destroy came before the row existed: the create won
            // and its sandbox must be destroyable now.
            if ds == 404 {
                late.push((name, cs));
            }
        }
        eprintln!("(destroy, create) answers: {outcomes:?}");
        // Whatever is listed still owns its VM; nothing else runs.
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        let listed = list.as_array().unwrap().len();
        assert!(
            listed <= late.len(),
            "{listed} listed, {} late: {list}",
            late.len()
        );
        assert!(
            vmms_of(&d.data).len() <= listed,
            "VMMs {:?} with {listed} sandboxes listed",
            vmms_of(&d.data)
        );
        for (name, _) in &late {
            let (s, v) = c
                .json(Method::DELETE, &format!("/sandboxes/{name}"), None)
                .await;
            assert!(s == 204 || s == 404, "{name}: {s} {v}");
        }
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list, json!([]), "rows left");
        testkit::wait_until("every VMM has exited", Duration::from_secs(30), || {
            vmms_of(&d.data).is_empty()
        });
        assert_eq!(
            sandbox_dirs(&d.data),
            Vec::<String>::new(),
            "directories left"
        );
        d.stop().await;
    });
}

#[test]
fn parallel_creates_respect_the_quota() {
    in_netns("api-race-quota", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), UNLIMITED)).await;
        let c = d.client(&d.user("alice", 3));
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.json(
                        Method::POST,
                        "/sandboxes",
                        Some(json!({"name": format!("q-{i}"), "memory_mb": 128})),
                    )
                    .await
                })
            })
            .collect();
        let mut codes = Vec::new();
        for t in tasks {
            let (s, v) = t.await.unwrap();
            if s == 403 {
                assert!(v["error"].as_str().unwrap().contains("quota"), "{v}");
            }
            codes.push(s);
        }
        codes.sort();
        assert_eq!(codes, [201, 201, 201, 403, 403, 403, 403, 403, 403, 403]);
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.iter().all(|s| s["status"] == "running"), "{list:?}");
        assert_eq!(vmms_of(&d.data).len(), 3);
        for sb in list {
            let (s, _) = c
                .json(
                    Method::DELETE,
                    &format!("/sandboxes/{}", sb["id"].as_str().unwrap()),
                    None,
                )
                .await;
            assert_eq!(s, 204);
        }
        d.stop().await;
    });
}
