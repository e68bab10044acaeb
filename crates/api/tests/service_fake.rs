//! The service's status changes on the fake engine (`vmm::fake`): a real
//! daemon (HTTP, store, service, core, real network in a namespace the
//! test made) whose "VMs" are `lohar serve` processes on the host and
//! whose images are placeholders. Seconds, no QEMU.
//!
//! Shown through the API's JSON (status, thermal, status_reason) and the
//! host's processes: create and its failed boots (`failed` with a reason,
//! destroyable, a retry works); exec and files; stop, start and a wake by
//! exec; a restore that fails and `start?force=true`; a destroy during a
//! create; a graceful restart and a crash (orphans adopted or reaped).
//!
//! Needs root (namespaces, TAPs) and the host build of lohar (`cargo
//! build -p lohar`; see `testkit::host_lohar`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, TestDaemon};
use reqwest::Method;
use serde_json::Value;
use vmm::fake::{FakeEngine, Fault};

/// A daemon configuration over `data` whose thermal timers never fire
/// during a test (the tests move sandboxes themselves).
fn fake_config(data: &Path) -> api::DaemonConfig {
    common::config(
        data,
        "[thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n[limits]\ncreates_per_min = 1000\n",
    )
}

fn engine() -> FakeEngine {
    FakeEngine::new(testkit::host_lohar())
}

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    testkit::placeholder_images(&data);
    Setup { _dir: dir, data }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// The lohar processes (fake VMMs) of sandbox `id`.
fn lohars_of(data: &Path, id: &str) -> Vec<String> {
    processes_mentioning(&data.join("sandboxes").join(id).join("agent.sock"))
}

/// Every lohar under the data directory.
fn lohars(data: &Path) -> Vec<String> {
    processes_mentioning(&data.join("sandboxes"))
}

fn sandbox_dirs(data: &Path) -> Vec<String> {
    match std::fs::read_dir(data.join("sandboxes")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(c: &Client, id: &str) -> (u16, Value) {
    c.json(Method::GET, &format!("/sandboxes/{id}"), None).await
}

async fn show(c: &Client, id: &str) -> Value {
    let (s, v) = get(c, id).await;
    assert_eq!(s, 200, "GET {id}: {v}");
    v
}

async fn post(c: &Client, path: &str, body: Option<Value>) -> (u16, Value) {
    c.json(Method::POST, path, body).await
}

async fn delete(c: &Client, id: &str) -> u16 {
    let (s, v) = c
        .json(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert!(s == 204 || s >= 400, "DELETE {id}: {s} {v}");
    s
}

fn assert_state(v: &Value, status: &str, thermal: &str) {
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["thermal"], thermal, "{v}");
}

async fn write_file(c: &Client, id: &str, path: &str, body: &'static [u8]) {
    let resp = c
        .req(Method::PUT, &format!("/sandboxes/{id}/files?path={path}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "PUT {path}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["bytes"], body.len(), "{v}");
}

async fn read_file(c: &Client, id: &str, path: &str) -> (u16, Vec<u8>) {
    let resp = c
        .req(Method::GET, &format!("/sandboxes/{id}/files?path={path}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

/// The guest's working directory (the fake's `root/`): where its files go.
async fn home(c: &Client, id: &str) -> String {
    common::sh(c, id, "pwd").await.trim().to_string()
}

#[test]
fn create_exec_files_stop_start_and_wake() {
    common::in_netns("svcf-life", || async {
        let s = setup();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let (hs, health) = d.client("nobody").json(Method::GET, "/health", None).await;
        assert_eq!(hs, 200, "{health}");
        assert_eq!(health["engine"], "fake", "{health}");
        let key = d.user("alice", 5);
        let c = d.client(&key);

        let v = c.create("box").await;
        assert_state(&v, "running", "hot");
        assert!(v["status_reason"].is_null(), "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(lohars_of(&s.data, &id).len(), 1, "one VMM");

        // Exec, by id and by name.
        assert_eq!(common::sh(&c, &id, "echo hi").await, "hi\n");
        let (st, out) = c.exec("box", &["sh", "-c", "echo oops >&2; exit 3"]).await;
        assert_eq!(st, 200, "{out}");
        assert_eq!(out["exit_code"], 3, "{out}");
        assert_eq!(out["stderr"], "oops\n", "{out}");

        // Files through the API, seen by exec.
        let root = home(&c, &id).await;
        let path = format!("{root}/note.txt");
        write_file(&c, &id, &path, b"kept across cold\n").await;
        assert_eq!(
            common::sh(&c, "box", &format!("cat {path}")).await,
            "kept across cold\n"
        );
        let (rs, body) = read_file(&c, &id, &path).await;
        assert_eq!(rs, 200);
        assert_eq!(body, b"kept across cold\n");

        // Stop: cold, still `running` (wakes when used), no VMM.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "cold");
        assert_state(&show(&c, &id).await, "running", "cold");
        assert!(
            lohars_of(&s.data, &id).is_empty(),
            "a cold sandbox runs no VMM"
        );
        // Stopping a cold one again is no error.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "cold");

        // Start: hot again, its files there.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/start"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "hot");
        let (rs, body) = read_file(&c, &id, &path).await;
        assert_eq!((rs, body.as_slice()), (200, &b"kept across cold\n"[..]));

        // An exec wakes a cold sandbox.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "cold");
        assert_eq!(common::sh(&c, &id, "echo awake").await, "awake\n");
        assert_state(&show(&c, &id).await, "running", "hot");

        // Destroy: no row, no VMM, no directory.
        assert_eq!(delete(&c, &id).await, 204);
        assert_eq!(get(&c, &id).await.0, 404);
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        assert!(
            sandbox_dirs(&s.data).is_empty(),
            "{:?}",
            sandbox_dirs(&s.data)
        );
        d.stop().await;
    });
}

#[test]
fn a_create_whose_boot_fails_is_failed_destroyable_and_retried() {
    common::in_netns("svcf-boot", || async {
        let s = setup();
        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let key = d.user("bob", 1);
        let c = d.client(&key);

        // An image that is not there: a 404, and no row is kept.
        let (st, v) = post(
            &c,
            "/sandboxes",
            Some(serde_json::json!({"name": "box", "image": "nope"})),
        )
        .await;
        assert_eq!(st, 404, "{v}");
        assert_eq!(get(&c, "box").await.0, 404);
        assert_eq!(eng.stats().boots, 0);
        assert!(
            sandbox_dirs(&s.data).is_empty(),
            "{:?}",
            sandbox_dirs(&s.data)
        );

        for (fault, words) in [
            (Fault::BootFails, "injected fault"),
            (Fault::ExitDuringBoot, "exit"),
        ] {
            eng.inject(fault);
            let (st, v) = post(&c, "/sandboxes", Some(serde_json::json!({"name": "box"}))).await;
            assert_eq!(st, 502, "{fault:?}: {v}");
            assert!(
                v["error"].as_str().unwrap().contains("failed to start"),
                "{v}"
            );
            assert!(eng.pending().is_empty(), "the fault was used");

            let row = show(&c, "box").await;
            assert_state(&row, "failed", "cold");
            let reason = row["status_reason"].as_str().unwrap_or_default();
            assert!(
                reason.to_lowercase().contains(words),
                "{fault:?}: reason {reason:?}"
            );
            let id = row["id"].as_str().unwrap().to_string();
            assert!(
                lohars_of(&s.data, &id).is_empty(),
                "{fault:?}: a VMM is left"
            );

            // The failed row counts against the quota (it exists) ...
            let (st, v) = post(&c, "/sandboxes", Some(serde_json::json!({"name": "other"}))).await;
            assert_eq!(st, 403, "{v}");
            // ... cannot be started or used ...
            let (st, v) = post(&c, "/sandboxes/box/start", None).await;
            assert_eq!(st, 409, "{v}");
            let (st, v) = c.exec("box", &["true"]).await;
            assert_eq!(st, 503, "{v}");
            assert!(v["error"].as_str().unwrap().contains("failed"), "{v}");
            // ... and is destroyable, which frees the quota.
            assert_eq!(delete(&c, "box").await, 204);
            assert_eq!(get(&c, "box").await.0, 404);
            assert!(
                sandbox_dirs(&s.data).is_empty(),
                "{:?}",
                sandbox_dirs(&s.data)
            );

            // A retry works.
            let v = c.create("box").await;
            assert_state(&v, "running", "hot");
            assert_eq!(common::sh(&c, "box", "echo ok").await, "ok\n");
            assert_eq!(delete(&c, "box").await, 204);
        }
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        d.stop().await;
    });
}

#[test]
fn a_restore_that_fails_answers_502_and_start_force_recovers() {
    common::in_netns("svcf-rest", || async {
        let s = setup();
        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let key = d.user("carol", 5);
        let c = d.client(&key);
        let id = c.create("box").await["id"].as_str().unwrap().to_string();
        let root = home(&c, &id).await;
        let path = format!("{root}/f");
        write_file(&c, &id, &path, b"before\n").await;
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");

        eng.inject(Fault::RestoreFails);
        let (st, v) = post(&c, &format!("/sandboxes/{id}/start"), None).await;
        assert_eq!(st, 502, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("injected fault"),
            "{v}"
        );
        // Still cold, still the user's: a failed wake is not a failed
        // sandbox. Its breaker is open, and the row says so.
        let row = show(&c, &id).await;
        assert_state(&row, "running", "cold");
        assert!(
            lohars_of(&s.data, &id).is_empty(),
            "the failed restore's VMM is gone"
        );
        wait_for(
            "the row shows the open breaker",
            Duration::from_secs(10),
            || async {
                show(&c, &id).await["status_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("injected fault") && r.contains("force=true"))
            },
        )
        .await;
        // No retry loop: without force, 503 at once, nothing restored.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/start"), None).await;
        assert_eq!(st, 503, "{v}");
        let (st, v) = c.exec(&id, &["true"]).await;
        assert_eq!(st, 503, "{v}");
        assert_eq!(eng.stats().restores, 1, "{:?}", eng.stats());

        let (st, v) = post(&c, &format!("/sandboxes/{id}/start?force=true"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "hot");
        assert!(v["status_reason"].is_null(), "{v}");
        assert_eq!(
            common::sh(&c, &id, &format!("cat {path}")).await,
            "before\n"
        );
        assert_eq!(eng.stats().restores, 2, "{:?}", eng.stats());
        assert_eq!(delete(&c, &id).await, 204);
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        d.stop().await;
    });
}

#[test]
fn a_restore_that_spends_its_snapshot_boots_from_the_disk() {
    common::in_netns("svcf-spent", || async {
        let s = setup();
        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let key = d.user("erin", 5);
        let c = d.client(&key);
        let id = c.create("box").await["id"].as_str().unwrap().to_string();
        let root = home(&c, &id).await;
        let path = format!("{root}/f");
        write_file(&c, &id, &path, b"before\n").await;

        // Woken by a use: the exec answers, from a guest booted afresh.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        let boots = eng.stats().boots;
        eng.inject(Fault::RestoreFailsAfterStart);
        assert_eq!(
            common::sh(&c, &id, &format!("cat {path}")).await,
            "before\n"
        );
        assert_eq!(eng.stats().restores, 1, "{:?}", eng.stats());
        assert_eq!(eng.stats().boots, boots + 1, "{:?}", eng.stats());
        let row = show(&c, &id).await;
        assert_state(&row, "running", "hot");
        assert!(row["status_reason"].is_null(), "{row}");

        // Woken by a start: the same.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        eng.inject(Fault::RestoreFailsAfterStart);
        let (st, v) = post(&c, &format!("/sandboxes/{id}/start"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "hot");
        assert_eq!(eng.stats().restores, 2, "{:?}", eng.stats());
        assert_eq!(eng.stats().boots, boots + 2, "{:?}", eng.stats());
        assert_eq!(
            common::sh(&c, &id, &format!("cat {path}")).await,
            "before\n"
        );
        // Only the failed restores' VMMs went; one runs.
        assert_eq!(lohars_of(&s.data, &id).len(), 1, "{:?}", lohars(&s.data));
        assert_eq!(delete(&c, &id).await, 204);
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        d.stop().await;
    });
}

#[test]
fn delete_during_a_create_leaves_no_row_and_no_vmm() {
    common::in_netns("svcf-dcre", || async {
        let s = setup();
        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let key = d.user("dave", 5);
        let c = d.client(&key);

        eng.inject(Fault::AgentLate(Duration::from_secs(30)));
        let creator = {
            let c = c.clone();
            tokio::spawn(async move {
                post(&c, "/sandboxes", Some(serde_json::json!({"name": "slow"}))).await
            })
        };
        // The row is there, `creating`, and its VMM runs (its agent late).
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let (st, v) = get(&c, "slow").await;
            if st == 200 {
                assert_eq!(v["status"], "creating", "{v}");
                let id = v["id"].as_str().unwrap();
                if !lohars_of(&s.data, id).is_empty() {
                    break;
                }
            }
            assert!(
                Instant::now() < end,
                "no row and VMM for the create: {st} {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        assert_eq!(delete(&c, "slow").await, 204);
        // At once: the boot was ended, not left to its late agent.
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        let (st, v) = creator.await.unwrap();
        // The create lost to the destroy: a conflict, not a gateway error.
        assert_eq!(st, 409, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("destroyed while it was being created"),
            "{v}"
        );
        assert_eq!(get(&c, "slow").await.0, 404);
        let (st, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(st, 200);
        assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        assert!(
            sandbox_dirs(&s.data).is_empty(),
            "{:?}",
            sandbox_dirs(&s.data)
        );
        d.stop().await;
    });
}

#[test]
fn a_graceful_restart_adopts_cold_sandboxes_that_work() {
    common::in_netns("svcf-grst", || async {
        let s = setup();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let key = d.user("erin", 5);
        let c = d.client(&key);
        let mut boxes = Vec::new();
        for name in ["one", "two"] {
            let id = c.create(name).await["id"].as_str().unwrap().to_string();
            let path = format!("{}/{name}.txt", home(&c, &id).await);
            write_file(&c, &id, &path, b"acknowledged\n").await;
            boxes.push((id, path));
        }
        // One is cold already; shutdown takes the other cold.
        let (st, v) = post(&c, &format!("/sandboxes/{}/stop", boxes[0].0), None).await;
        assert_eq!(st, 200, "{v}");
        d.stop().await;
        assert!(
            lohars(&s.data).is_empty(),
            "shutdown left {:?}",
            lohars(&s.data)
        );

        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let c = d.client(&key);
        for (id, _) in &boxes {
            assert_state(&show(&c, id).await, "running", "cold");
        }
        assert_eq!(eng.stats().boots, 0, "adoption boots nothing");
        for (id, path) in &boxes {
            assert_eq!(
                common::sh(&c, id, &format!("cat {path}")).await,
                "acknowledged\n"
            );
            assert_state(&show(&c, id).await, "running", "hot");
        }
        assert_eq!(eng.stats().restores, 2, "{:?}", eng.stats());
        for (id, _) in &boxes {
            assert_eq!(delete(&c, id).await, 204);
        }
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        d.stop().await;
    });
}

#[test]
fn after_a_crash_orphans_are_adopted_or_reaped_and_rows_settled() {
    common::in_netns("svcf-crsh", || async {
        let s = setup();
        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let key = d.user("frank", 8);
        let c = d.client(&key);
        let id_of = |v: Value| v["id"].as_str().unwrap().to_string();
        let hot = id_of(c.create("hot").await);
        let path = format!("{}/kept.txt", home(&c, &hot).await);
        write_file(&c, &hot, &path, b"synced before the crash\n").await;
        let cold = id_of(c.create("cold").await);
        let (st, v) = post(&c, &format!("/sandboxes/{cold}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        let rowless = id_of(c.create("rowless").await);
        let mid = id_of(c.create("mid").await);
        eng.inject(Fault::BootFails);
        let (st, v) = post(
            &c,
            "/sandboxes",
            Some(serde_json::json!({"name": "broken"})),
        )
        .await;
        assert_eq!(st, 502, "{v}");
        let broken = show(&c, "broken").await;
        let broken_reason = broken["status_reason"].clone();
        assert_state(&broken, "failed", "cold");

        // The daemon dies with SIGKILL: its VMMs run on. One of them has no
        // row (a create cut short between VM and row), one a row still
        // `creating` (cut short before the row said running).
        eng.crash();
        d.crash().await;
        let db = store::Store::open(&s.data.join("bhatti.db")).unwrap();
        db.delete_sandbox(&rowless).unwrap();
        db.update_sandbox(
            &mid,
            &store::SandboxUpdate {
                status: Some(api_types::SandboxStatus::Creating),
                ..Default::default()
            },
        )
        .unwrap();
        drop(db);
        for id in [&hot, &rowless, &mid] {
            assert_eq!(lohars_of(&s.data, id).len(), 1, "{id} outlives its daemon");
        }
        // An operator's process that names a sandbox directory (here a
        // shell given a console log path) is no VMM: the reap spares it.
        let mut bystander = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 600")
            .arg(s.data.join("sandboxes").join(&hot).join("console.log"))
            .spawn()
            .unwrap();

        let eng = engine();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), eng.clone()).await;
        let c = d.client(&key);
        // The hot one's VMM was snapshotted and ended: adopted cold.
        assert_eq!(eng.stats().orphans_taken, 1, "{:?}", eng.stats());
        assert_state(&show(&c, &hot).await, "running", "cold");
        assert_state(&show(&c, &cold).await, "running", "cold");
        // The `creating` one's VMM is ended; its disk is there: `stopped`.
        let row = show(&c, &mid).await;
        assert_state(&row, "stopped", "cold");
        assert!(
            row["status_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("restarted"),
            "{row}"
        );
        // The failed one stays failed, for the same reason.
        let row = show(&c, "broken").await;
        assert_state(&row, "failed", "cold");
        assert_eq!(row["status_reason"], broken_reason);
        // The reap (done before the daemon answered) spared the bystander.
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "the reap killed a process that is not a VMM"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
        // No VMM runs; the row-less sandbox's directory is gone.
        wait_for("no VMM runs", Duration::from_secs(10), || async {
            lohars(&s.data).is_empty()
        })
        .await;
        assert!(
            !sandbox_dirs(&s.data).contains(&rowless),
            "{:?}",
            sandbox_dirs(&s.data)
        );
        let (st, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(st, 200);
        assert_eq!(list.as_array().unwrap().len(), 4, "{list}");

        // The snapshot taken of the orphan does not restore: the sandbox
        // boots from its disk instead, the acknowledged file intact.
        eng.inject(Fault::RestoreFails);
        assert_eq!(
            common::sh(&c, &hot, &format!("cat {path}")).await,
            "synced before the crash\n"
        );
        assert_eq!((eng.stats().restores, eng.stats().boots), (1, 1));
        let row = show(&c, &hot).await;
        assert_state(&row, "running", "hot");
        assert!(row["status_reason"].is_null(), "{row}");
        // The cold one wakes from its snapshot; the stopped one boots.
        assert_eq!(common::sh(&c, &cold, "echo up").await, "up\n");
        assert_eq!(common::sh(&c, &mid, "echo booted").await, "booted\n");
        assert_eq!((eng.stats().restores, eng.stats().boots), (2, 2));
        for id in [&hot, &cold, &mid] {
            let row = show(&c, id).await;
            assert_state(&row, "running", "hot");
            assert!(row["status_reason"].is_null(), "{row}");
            assert_eq!(lohars_of(&s.data, id).len(), 1);
        }
        for id in [&hot, &cold, &mid, &"broken".to_string()] {
            assert_eq!(delete(&c, id).await, 204);
        }
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        assert!(
            sandbox_dirs(&s.data).is_empty(),
            "{:?}",
            sandbox_dirs(&s.data)
        );
        d.stop().await;
    });
}

#[test]
fn the_ticker_takes_an_idle_sandbox_warm_then_cold_and_the_row_follows() {
    common::in_netns("svcf-tick", || async {
        let s = setup();
        let eng = engine();
        let config = common::config(
            &s.data,
            "[thermal]\nwarm_after_secs = 1\ncold_after_secs = 1\n[limits]\ncreates_per_min = 1000\n",
        );
        let d = TestDaemon::start_with_engine(config, eng.clone()).await;
        let key = d.user("gina", 5);
        let c = d.client(&key);
        let id = c.create("idle").await["id"].as_str().unwrap().to_string();
        let mut seen: Vec<String> = Vec::new();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let row = show(&c, &id).await;
            assert_eq!(row["status"], "running", "{row}");
            let t = row["thermal"].as_str().unwrap().to_string();
            if seen.last() != Some(&t) {
                seen.push(t.clone());
            }
            if t == "cold" {
                break;
            }
            assert!(Instant::now() < end, "never cold: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stats = eng.stats();
        assert!(
            stats.pauses >= 1 && stats.snapshots >= 1,
            "{stats:?} {seen:?}"
        );
        assert!(
            lohars_of(&s.data, &id).is_empty(),
            "a cold sandbox runs no VMM"
        );
        // Kept hot and used again, it wakes; the row says hot.
        let (st, v) = c
            .json(
                Method::PATCH,
                &format!("/sandboxes/{id}"),
                Some(serde_json::json!({"keep_hot": true})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(common::sh(&c, &id, "echo back").await, "back\n");
        assert_eq!(show(&c, &id).await["thermal"], "hot");
        assert_eq!(delete(&c, &id).await, 204);
        assert!(lohars(&s.data).is_empty(), "{:?}", lohars(&s.data));
        d.stop().await;
    });
}

/// A sandbox's TAP guard as nftables holds it: (its chain, its allow-list
/// set) — TAPs are `tu` and the guest address in hex, guard objects that
/// name in hex.
fn guard_of(ip: &str) -> (String, String) {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let tap = format!("tu{:08x}", u32::from(ip));
    let hex: String = tap.bytes().map(|b| format!("{b:02x}")).collect();
    let chain = testkit::run(
        "nft",
        &["list", "chain", "bridge", "bhatti", &format!("t_{hex}")],
    );
    let set = testkit::run(
        "nft",
        &["list", "set", "bridge", "bhatti", &format!("e_{hex}")],
    );
    (chain, set)
}

async fn patch(c: &Client, id: &str, body: Value) -> (u16, Value) {
    c.json(Method::PATCH, &format!("/sandboxes/{id}"), Some(body))
        .await
}

#[test]
fn egress_policies_are_checked_stored_shown_and_guard_the_tap_across_cold_and_restarts() {
    common::in_netns("svcf-egr", || async {
        let s = setup();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let key = d.user("gina", 5);
        let c = d.client(&key);

        // Bad policies: 400 with a reason, nothing created.
        let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        for (egress, says) in [
            (serde_json::json!("sometimes"), "unknown variant"),
            (serde_json::json!({"allow": ["10.1.2.5/24"]}), "host bits"),
            (
                serde_json::json!({"allow": ["a.*.example.org"]}),
                "wildcard",
            ),
            (serde_json::json!({"allow": ["2001:db8::1"]}), "IPv6"),
            (serde_json::json!({"allow": ["localhost"]}), "two labels"),
            (serde_json::json!({"allow": many}), "at most 64"),
            (
                serde_json::json!({"allow": "api.example.com"}),
                "invalid type",
            ),
        ] {
            let (st, v) = post(
                &c,
                "/sandboxes",
                Some(serde_json::json!({"name": "bad", "egress": egress})),
            )
            .await;
            assert_eq!(st, 400, "{egress}: {v}");
            let e = v["error"].as_str().unwrap();
            assert!(e.contains(says), "{egress}: {e}");
        }
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

        // An allow-list on create: normalised, shown, and the TAP's guard.
        let (st, v) = post(
            &c,
            "/sandboxes",
            Some(serde_json::json!({
                "name": "box",
                "egress": {"allow": ["API.example.com", "10.1.2.0/24", "203.0.113.7"]},
            })),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let allow = serde_json::json!({"allow": ["api.example.com", "10.1.2.0/24", "203.0.113.7"]});
        assert_eq!(v["egress"], allow, "{v}");
        let (id, ip) = (
            v["id"].as_str().unwrap().to_string(),
            v["ip"].as_str().unwrap().to_string(),
        );
        let (chain, set) = guard_of(&ip);
        assert!(
            chain.contains("ip daddr != @e_") && chain.contains("ip daddr != @d_"),
            "{chain}"
        );
        assert!(
            set.contains("10.1.2.0/24") && set.contains("203.0.113.7"),
            "{set}"
        );
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list[0]["egress"], allow, "{list}");

        // PATCH: none, at once; a bad PATCH changes nothing.
        let (st, v) = patch(&c, "box", serde_json::json!({"egress": "none"})).await;
        assert_eq!((st, &v["egress"]), (200, &serde_json::json!("none")), "{v}");
        let (chain, set) = guard_of(&ip);
        assert!(
            chain.contains("ip daddr != @e_") && !chain.contains("@d_"),
            "{chain}"
        );
        assert!(!set.contains("203.0.113.7"), "{set}");
        let (st, v) = patch(&c, "box", serde_json::json!({"egress": {"allow": ["*"]}})).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(show(&c, &id).await["egress"], "none");

        // Cold: the TAP stays, a PATCH reaches it; a wake keeps it.
        let (st, v) = post(&c, &format!("/sandboxes/{id}/stop"), None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "cold");
        let (st, v) = patch(
            &c,
            &id,
            serde_json::json!({"egress": {"allow": ["203.0.113.9"]}}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert!(guard_of(&ip).1.contains("203.0.113.9"));
        assert_eq!(common::sh(&c, &id, "echo awake").await, "awake\n");
        assert!(guard_of(&ip).1.contains("203.0.113.9"), "after a wake");

        // A restart: the adopted sandbox's new TAP is guarded with it.
        d.stop().await;
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let c = d.client(&key);
        let v = show(&c, &id).await;
        assert_eq!(
            v["egress"],
            serde_json::json!({"allow": ["203.0.113.9"]}),
            "{v}"
        );
        let (chain, set) = guard_of(&ip);
        assert!(
            set.contains("203.0.113.9") && chain.contains("ip daddr != @e_"),
            "{chain}{set}"
        );
        assert_eq!(common::sh(&c, &id, "echo back").await, "back\n");

        // Public again: no destination rule at all.
        let (st, v) = patch(&c, &id, serde_json::json!({"egress": "public"})).await;
        assert_eq!(
            (st, &v["egress"]),
            (200, &serde_json::json!("public")),
            "{v}"
        );
        let (chain, _) = guard_of(&ip);
        assert!(!chain.contains("daddr"), "{chain}");
        assert_eq!(delete(&c, &id).await, 204);
        d.stop().await;
    });
}

fn disk_len(data: &Path, id: &str) -> u64 {
    std::fs::metadata(data.join("sandboxes").join(id).join("disk.ext4"))
        .unwrap()
        .len()
}

#[test]
fn disk_sizes_are_checked_charged_and_grown_while_cold() {
    common::in_netns("svcf-disk", || async {
        let s = setup();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let key = d.user_with(
            "alice",
            api::users::Quotas {
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 4096,
                max_disk_mb: 5000,
            },
        );
        let c = d.client(&key);
        let create = |body: Value| {
            let c = c.clone();
            async move { c.json(Method::POST, "/sandboxes", Some(body)).await }
        };

        // Sizes: asked for, the default, and out of bounds.
        let (st, small) = create(serde_json::json!({"name": "small", "disk_size_mb": 1000})).await;
        assert_eq!(st, 201, "{small}");
        assert_eq!(small["disk_size_mb"], 1000, "{small}");
        let id = small["id"].as_str().unwrap().to_string();
        assert_eq!(disk_len(&s.data, &id), 1000 << 20);
        let (st, def) = create(serde_json::json!({"name": "def"})).await;
        assert_eq!(st, 201, "{def}");
        assert_eq!(def["disk_size_mb"], 2048, "the default: {def}");
        for (bad, why) in [
            (serde_json::json!(10), "disk_size_mb must be 64..=65536"),
            (serde_json::json!(65537), "disk_size_mb must be 64..=65536"),
            (serde_json::json!(-1), ""),
            (serde_json::json!("1G"), ""),
        ] {
            let (st, v) = create(serde_json::json!({"name": "bad", "disk_size_mb": bad})).await;
            assert_eq!(st, 400, "{bad}: {v}");
            assert!(v["error"].as_str().unwrap().contains(why), "{bad}: {v}");
        }
        // The quota: 3048 of 5000 MiB held.
        let (st, v) = create(serde_json::json!({"name": "big", "disk_size_mb": 2000})).await;
        assert_eq!(st, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("disk quota"), "{v}");
        assert_eq!(
            get(&c, "big").await.0,
            404,
            "a refused create leaves no row"
        );

        // Growing: not while hot, never smaller, within the quota; a cold
        // sandbox gives up its snapshot and boots from the larger disk.
        let (st, v) = patch(&c, "small", serde_json::json!({"disk_size_mb": 1500})).await;
        assert_eq!(st, 409, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("stop it first"),
            "{v}"
        );
        assert_eq!(disk_len(&s.data, &id), 1000 << 20);
        let kept = format!("{}/keep.txt", home(&c, &id).await);
        write_file(&c, &id, &kept, b"kept\n").await;
        let (st, v) = post(&c, "/sandboxes/small/stop", None).await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "cold");
        let snapshot = s.data.join("sandboxes").join(&id).join("snapshot");
        assert!(snapshot.is_dir(), "a cold sandbox has its snapshot");
        let (st, v) = patch(&c, "small", serde_json::json!({"disk_size_mb": 500})).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("only grow"), "{v}");
        let (st, v) = patch(&c, "small", serde_json::json!({"disk_size_mb": 4000})).await;
        assert_eq!(st, 403, "{v}");
        assert_state(&show(&c, "small").await, "running", "cold");
        assert_eq!(
            disk_len(&s.data, &id),
            1000 << 20,
            "a refused grow changes nothing"
        );
        let (st, v) = patch(&c, "small", serde_json::json!({"disk_size_mb": 2900})).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["disk_size_mb"], 2900, "{v}");
        assert_state(&v, "stopped", "cold");
        assert_eq!(disk_len(&s.data, &id), 2900 << 20);
        assert!(lohars_of(&s.data, &id).is_empty(), "no VMM while stopped");
        assert!(!snapshot.exists(), "the stale snapshot is gone");
        // The next command boots it from its disk.
        assert_eq!(common::sh(&c, "small", "echo up").await, "up\n");
        assert_eq!(read_file(&c, &id, &kept).await, (200, b"kept\n".to_vec()));
        assert_state(&show(&c, "small").await, "running", "hot");
        assert_eq!(show(&c, "small").await["disk_size_mb"], 2900);
        let (st, events) = c.json(Method::GET, "/events?sandbox=small", None).await;
        assert_eq!(st, 200, "{events}");
        assert!(events.to_string().contains("disk_grown"), "{events}");
        // The quota counts the grown disk: 4948 of 5000 held.
        let (st, v) = create(serde_json::json!({"name": "more", "disk_size_mb": 64})).await;
        assert_eq!(st, 403, "{v}");
        // And frees what a destroy gives back.
        assert_eq!(delete(&c, "def").await, 204);
        let (st, v) = create(serde_json::json!({"name": "more", "disk_size_mb": 64})).await;
        assert_eq!(st, 201, "{v}");

        // A restart keeps sizes and the quota's view of them.
        d.stop().await;
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let c = d.client(&key);
        assert_eq!(show(&c, "small").await["disk_size_mb"], 2900);
        assert_eq!(common::sh(&c, "small", "echo again").await, "again\n");
        d.stop().await;
    });
}

/// The volume files under the data directory.
fn volume_files(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(users) = std::fs::read_dir(data.join("volumes")) {
        for u in users.flatten() {
            for f in std::fs::read_dir(u.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
    }
    out
}

#[test]
fn volumes_are_checked_charged_shared_by_the_rules_and_kept_across_restarts() {
    common::in_netns("svcf-vols", || async {
        use std::os::unix::fs::PermissionsExt;
        let s = setup();
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let key = d.user_with(
            "vera",
            api::users::Quotas {
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 4096,
                max_disk_mb: 3000,
            },
        );
        let c = d.client(&key);
        let other = d.client(&d.user("otto", 5));
        let call = |m: Method, path: &'static str, body: Option<Value>| {
            let c = c.clone();
            async move { c.json(m, path, body).await }
        };
        let create = |body: Value| call(Method::POST, "/sandboxes", Some(body));

        // Create: names, sizes, the quota (sandbox disks and volumes share it).
        let (st, v) = call(
            Method::POST,
            "/volumes",
            Some(serde_json::json!({"name": "data", "size_mb": 500})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(
            (
                v["size_mb"].as_u64(),
                v["attachments"].as_array().map(Vec::len)
            ),
            (Some(500), Some(0))
        );
        let files = volume_files(&s.data);
        assert_eq!(files.len(), 1, "{files:?}");
        let meta = std::fs::metadata(&files[0]).unwrap();
        assert_eq!(meta.len(), 500 << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!files[0].starts_with(s.data.join("sandboxes")));
        for (body, code) in [
            (serde_json::json!({"name": "data", "size_mb": 64}), 409),
            (serde_json::json!({"name": "bad/name", "size_mb": 64}), 400),
            (serde_json::json!({"name": "tiny", "size_mb": 1}), 400),
            (
                serde_json::json!({"name": "x", "size_mb": 64, "extra": 1}),
                400,
            ),
            (serde_json::json!({"name": "huge", "size_mb": 2501}), 403),
        ] {
            let (st, v) = call(Method::POST, "/volumes", Some(body.clone())).await;
            assert_eq!(st, code, "{body}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
        let (st, v) = call(
            Method::POST,
            "/volumes",
            Some(serde_json::json!({"name": "ro", "size_mb": 100})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        // 600 of 3000 MiB held by volumes: a 2048 MiB default disk fits,
        // a 2500 MiB one does not.
        let (st, v) = create(serde_json::json!({"name": "big", "disk_size_mb": 2500})).await;
        assert_eq!(st, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("disk quota"), "{v}");

        // Attach rules: paths 400, unknown 404, another user's 404.
        for mount in [
            "data",
            "/",
            "/etc",
            "/usr/local",
            "/proc/x",
            "/a/../etc",
            "/var/lib/bhatti/x",
            "/data/",
        ] {
            let (st, v) = create(serde_json::json!({
                "name": "a", "disk_size_mb": 256,
                "volumes": [{"name": "data", "mount": mount}]
            }))
            .await;
            assert_eq!(st, 400, "{mount}: {v}");
        }
        let (st, v) = create(serde_json::json!({
            "name": "a", "disk_size_mb": 256,
            "volumes": [{"name": "data", "mount": "/d1"}, {"name": "data", "mount": "/d2"}]
        }))
        .await;
        assert_eq!(st, 400, "the same volume twice: {v}");
        let (st, v) = create(serde_json::json!({
            "name": "a", "disk_size_mb": 256,
            "volumes": [{"name": "nope", "mount": "/data"}]
        }))
        .await;
        assert_eq!(st, 404, "{v}");
        let (st, v) = other
            .json(
                Method::POST,
                "/sandboxes",
                Some(serde_json::json!({"name": "o", "volumes": [{"name": "data", "mount": "/data"}]})),
            )
            .await;
        assert_eq!(st, 404, "another user's volume: {v}");
        assert_eq!(other.json(Method::GET, "/volumes/data", None).await.0, 404);
        assert_eq!(get(&c, "a").await.0, 404, "refused creates leave no row");

        // a holds data read-write: nobody else gets it, rw or ro.
        let (st, a) = create(serde_json::json!({
            "name": "a", "disk_size_mb": 256,
            "volumes": [{"name": "data", "mount": "/data"}, {"name": "ro", "mount": "/ref", "read_only": true}]
        }))
        .await;
        assert_eq!(st, 201, "{a}");
        let a_id = a["id"].as_str().unwrap().to_string();
        for ro in [false, true] {
            let (st, v) = create(serde_json::json!({
                "name": "b", "disk_size_mb": 256,
                "volumes": [{"name": "data", "mount": "/data", "read_only": ro}]
            }))
            .await;
            assert_eq!(st, 409, "ro={ro}: {v}");
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("read-write to sandbox 'a'"),
                "{v}"
            );
        }
        // ro is shared read-only, never read-write.
        let (st, v) = create(serde_json::json!({
            "name": "b", "disk_size_mb": 256,
            "volumes": [{"name": "ro", "mount": "/ref"}]
        }))
        .await;
        assert_eq!(st, 409, "{v}");
        let (st, b) = create(serde_json::json!({
            "name": "b", "disk_size_mb": 256,
            "volumes": [{"name": "ro", "mount": "/ref", "read_only": true}]
        }))
        .await;
        assert_eq!(st, 201, "{b}");
        let (st, v) = call(Method::GET, "/volumes/ro", None).await;
        assert_eq!(st, 200, "{v}");
        let uses: Vec<_> = v["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["sandbox"].as_str().unwrap().to_string(),
                    u["mount"].as_str().unwrap().to_string(),
                    u["read_only"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            uses,
            vec![
                ("a".into(), "/ref".into(), true),
                ("b".into(), "/ref".into(), true)
            ]
        );

        // Clone: not of a volume a hot sandbox holds read-write; fine of
        // one held read-only; by the rules of create for the new name.
        let clone = |from: &'static str, body: Value| {
            let c = c.clone();
            async move {
                c.json(Method::POST, &format!("/volumes/{from}/clone"), Some(body))
                    .await
            }
        };
        let (st, v) = clone("data", serde_json::json!({"name": "data2"})).await;
        assert_eq!(st, 409, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("read-write to sandbox 'a'"),
            "{v}"
        );
        let before = volume_files(&s.data);
        let (st, v) = clone("ro", serde_json::json!({"name": "ro2"})).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(
            (v["name"].as_str(), v["size_mb"].as_u64()),
            (Some("ro2"), Some(100)),
            "{v}"
        );
        let copy = volume_files(&s.data)
            .into_iter()
            .find(|p| !before.contains(p))
            .expect("the clone's file");
        let orig = before
            .iter()
            .find(|p| std::fs::metadata(p).unwrap().len() == 100 << 20)
            .unwrap();
        assert!(
            std::fs::read(orig).unwrap() == std::fs::read(&copy).unwrap(),
            "the clone's bytes differ"
        );
        assert_eq!(
            std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for (from, body, code) in [
            ("nope", serde_json::json!({"name": "x"}), 404),
            ("ro", serde_json::json!({"name": "data"}), 409),
            ("ro", serde_json::json!({"name": "bad/name"}), 400),
            ("ro", serde_json::json!({"name": "x", "size_mb": 1}), 400),
        ] {
            let (st, v) = clone(from, body.clone()).await;
            assert_eq!(st, code, "{from} {body}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
        let (st, v) = other
            .json(
                Method::POST,
                "/volumes/ro/clone",
                Some(serde_json::json!({"name": "mine"})),
            )
            .await;
        assert_eq!(st, 404, "another user's volume: {v}");
        // Held: 500 + 100 + 100 of volumes, 2 x 256 of disks = 1212 of
        // 3000. A filler leaves 50 MiB: a clone of 100 is a 403.
        let (st, v) = call(
            Method::POST,
            "/volumes",
            Some(serde_json::json!({"name": "filler", "size_mb": 1738})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let files = volume_files(&s.data).len();
        let (st, v) = clone("ro", serde_json::json!({"name": "ro3"})).await;
        assert_eq!(st, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("disk quota"), "{v}");
        assert_eq!(
            volume_files(&s.data).len(),
            files,
            "a refused clone makes no file"
        );
        assert_eq!(c.json(Method::GET, "/volumes/ro3", None).await.0, 404);
        assert_eq!(c.json(Method::DELETE, "/volumes/filler", None).await.0, 204);
        // A volume and its clone share a file system UUID: not on one sandbox.
        let (st, v) = create(serde_json::json!({
            "name": "c", "disk_size_mb": 256,
            "volumes": [{"name": "ro", "mount": "/r1", "read_only": true},
                        {"name": "ro2", "mount": "/r2", "read_only": true}]
        }))
        .await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("copies"), "{v}");
        assert_eq!(c.json(Method::DELETE, "/volumes/ro2", None).await.0, 204);

        // Grow: not while a user runs hot; never smaller; within the quota.
        let (st, v) = call(
            Method::PATCH,
            "/volumes/data",
            Some(serde_json::json!({"size_mb": 600})),
        )
        .await;
        assert_eq!(st, 409, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("stop it first"),
            "{v}"
        );
        let (st, v) = post(&c, "/sandboxes/a/stop", None).await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = call(
            Method::PATCH,
            "/volumes/data",
            Some(serde_json::json!({"size_mb": 400})),
        )
        .await;
        assert_eq!(st, 400, "{v}");
        let (st, v) = call(
            Method::PATCH,
            "/volumes/data",
            Some(serde_json::json!({"size_mb": 5000})),
        )
        .await;
        assert_eq!(st, 403, "{v}");
        let (st, v) = call(
            Method::PATCH,
            "/volumes/data",
            Some(serde_json::json!({"size_mb": 700})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["size_mb"], 700);
        let data_file = volume_files(&s.data)
            .into_iter()
            .find(|p| std::fs::metadata(p).unwrap().len() == 700 << 20);
        assert!(data_file.is_some(), "{:?}", volume_files(&s.data));
        assert_state(&show(&c, "a").await, "stopped", "cold");
        assert!(lohars_of(&s.data, &a_id).is_empty());
        // A cold or stopped holder writes nothing: its volume clones.
        let (st, v) = clone("data", serde_json::json!({"name": "data2"})).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["size_mb"], 700, "{v}");
        assert_eq!(v["attachments"].as_array().map(Vec::len), Some(0), "{v}");
        assert_eq!(c.json(Method::DELETE, "/volumes/data2", None).await.0, 204);
        // The next command boots it again, volumes and all.
        assert_eq!(common::sh(&c, "a", "echo up").await, "up\n");

        // Delete: not while attached (running or not).
        let (st, v) = c.json(Method::DELETE, "/volumes/data", None).await;
        assert_eq!(st, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("'a'"), "{v}");
        assert_eq!(c.json(Method::DELETE, "/volumes/nope", None).await.0, 404);

        // A restart keeps volumes and attachments; the sandbox still works.
        d.stop().await;
        let d = TestDaemon::start_with_engine(fake_config(&s.data), engine()).await;
        let c = d.client(&key);
        let (st, v) = c.json(Method::GET, "/volumes", None).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
        let (_, v) = c.json(Method::GET, "/volumes/data", None).await;
        assert_eq!(v["attachments"][0]["sandbox"], "a", "{v}");
        assert_eq!(common::sh(&c, "a", "echo again").await, "again\n");
        assert_eq!(c.json(Method::DELETE, "/volumes/data", None).await.0, 409);

        // Destroy detaches; the volume survives and can go after.
        assert_eq!(delete(&c, "a").await, 204);
        let (_, v) = c.json(Method::GET, "/volumes/data", None).await;
        assert_eq!(v["attachments"].as_array().map(Vec::len), Some(0), "{v}");
        assert_eq!(volume_files(&s.data).len(), 2);
        let (st, v) = c.json(Method::DELETE, "/volumes/data", None).await;
        assert_eq!(st, 204, "{v}");
        assert_eq!(volume_files(&s.data).len(), 1);
        assert_eq!(c.json(Method::GET, "/volumes/data", None).await.0, 404);
        // ro still has b.
        assert_eq!(c.json(Method::DELETE, "/volumes/ro", None).await.0, 409);
        assert_eq!(delete(&c, "b").await, 204);
        assert_eq!(c.json(Method::DELETE, "/volumes/ro", None).await.0, 204);
        assert!(volume_files(&s.data).is_empty());
        let (st, events) = c.json(Method::GET, "/events", None).await;
        assert_eq!(st, 200, "{events}");
        for kind in [
            "volume_created",
            "volume_grown",
            "volume_cloned",
            "volume_deleted",
        ] {
            assert!(events.to_string().contains(kind), "{kind}: {events}");
        }
        d.stop().await;
    });
}

#[test]
fn checkpoints_forks_and_rollbacks_follow_their_rules() {
    common::in_netns("svcf-ckpt", || async {
        let s = setup();
        let eng = engine();
        let mut cfg = fake_config(&s.data);
        cfg.defaults.max_checkpoints = 2;
        let d = TestDaemon::start_with_engine(cfg, eng.clone()).await;
        let key = d.user_with(
            "carol",
            api::users::Quotas {
                max_sandboxes: 5,
                max_cpus: 16,
                max_memory_mb: 16384,
                max_disk_mb: 1 << 20,
            },
        );
        let c = d.client(&key);
        let other = d.client(&d.user("dave", 2));
        let (st, v) = post(&c, "/sandboxes", Some(serde_json::json!({"name": "dev"}))).await;
        assert_eq!(st, 201, "{v}");
        let dev_id = v["id"].as_str().unwrap().to_string();

        // Checkpoints: named, counted, the caller's own.
        let ck = |name: &str| {
            let c = c.clone();
            let body = serde_json::json!({ "name": name });
            async move { post(&c, "/sandboxes/dev/checkpoints", Some(body)).await }
        };
        let (st, c1) = ck("c1").await;
        assert_eq!(st, 201, "{c1}");
        assert_eq!(
            (c1["name"].as_str(), c1["sandbox"].as_str()),
            (Some("c1"), Some("dev"))
        );
        assert!(c1["bytes"].as_u64().unwrap() > 0, "{c1}");
        let c1_dir = s
            .data
            .join("checkpoints")
            .join(show_user_dir(&s.data))
            .join(c1["id"].as_str().unwrap());
        assert!(c1_dir.join("snapshot/manifest.json").is_file());
        assert_eq!(ck("c1").await.0, 409, "a name taken");
        assert_eq!(ck("not a name").await.0, 400);
        assert_eq!(ck("c2").await.0, 201);
        let (st, v) = ck("c3").await;
        assert_eq!(st, 403, "the checkpoint quota: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("checkpoint quota"),
            "{v}"
        );
        let (st, list) = c.json(Method::GET, "/checkpoints", None).await;
        assert_eq!((st, list.as_array().unwrap().len()), (200, 2), "{list}");
        assert_eq!(c.json(Method::GET, "/checkpoints/c1", None).await.0, 200);
        assert_eq!(c.json(Method::GET, "/checkpoints/nope", None).await.0, 404);
        assert_eq!(
            other.json(Method::GET, "/checkpoints/c1", None).await.0,
            404
        );
        assert_eq!(
            post(
                &other,
                "/sandboxes/dev/checkpoints",
                Some(serde_json::json!({"name": "x"}))
            )
            .await
            .0,
            404,
            "another user's sandbox"
        );

        // A new sandbox from a checkpoint; what comes from the checkpoint
        // cannot be asked for.
        let from = |body: Value| {
            let c = c.clone();
            async move { post(&c, "/sandboxes", Some(body)).await }
        };
        let (st, kid) =
            from(serde_json::json!({"name": "kid", "from": {"checkpoint": "c1"}})).await;
        assert_eq!(st, 201, "{kid}");
        assert_state(&kid, "running", "hot");
        assert_ne!(kid["id"], dev_id);
        let (st, v) = from(serde_json::json!({"name": "k2", "from": {"checkpoint": "nope"}})).await;
        assert_eq!(st, 404, "{v}");
        let (st, v) =
            from(serde_json::json!({"name": "k2", "image": "tiny", "from": {"checkpoint": "c1"}}))
                .await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("image"), "{v}");
        let (st, v) = other
            .json(
                Method::POST,
                "/sandboxes",
                Some(serde_json::json!({"name": "k3", "from": {"checkpoint": "c1"}})),
            )
            .await;
        assert_eq!(st, 404, "another user's checkpoint: {v}");
        let (st, v) = c
            .json(
                Method::POST,
                "/sandboxes/kid/exec",
                Some(serde_json::json!({"cmd": ["true"]})),
            )
            .await;
        assert_eq!(
            st, 200,
            "the new sandbox's agent answers with its own token: {v}"
        );

        // In use while a sandbox made from it exists.
        let (st, v) = c.json(Method::DELETE, "/checkpoints/c1", None).await;
        assert_eq!(st, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("kid"), "{v}");
        assert_eq!(delete(&c, "kid").await, 204);
        assert_eq!(c.json(Method::DELETE, "/checkpoints/c1", None).await.0, 204);
        assert!(!c1_dir.exists(), "its files go with it");
        assert_eq!(c.json(Method::DELETE, "/checkpoints/c1", None).await.0, 404);

        // Rollback.
        let (st, v) = post(
            &c,
            "/sandboxes/dev/restore",
            Some(serde_json::json!({"checkpoint": "c2"})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_state(&v, "running", "hot");
        let (st, _) = post(
            &c,
            "/sandboxes/dev/restore",
            Some(serde_json::json!({"checkpoint": "nope"})),
        )
        .await;
        assert_eq!(st, 404);

        // Forks: counted, named, each a full sandbox; a failed parent is a
        // 409 with its reason; the sandbox quota holds.
        for bad in [0, 17] {
            let (st, v) = post(
                &c,
                "/sandboxes/dev/fork",
                Some(serde_json::json!({"count": bad})),
            )
            .await;
            assert_eq!(st, 400, "count {bad}: {v}");
        }
        assert_eq!(
            post(&c, "/sandboxes/nope/fork", Some(serde_json::json!({})))
                .await
                .0,
            404
        );
        let (st, kids) = post(
            &c,
            "/sandboxes/dev/fork",
            Some(serde_json::json!({"count": 2})),
        )
        .await;
        assert_eq!(st, 201, "{kids}");
        let names: Vec<&str> = kids
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["dev-fork-1", "dev-fork-2"]);
        for k in kids.as_array().unwrap() {
            assert_state(k, "running", "hot");
            let (st, v) = c
                .json(
                    Method::POST,
                    &format!("/sandboxes/{}/exec", k["name"].as_str().unwrap()),
                    Some(serde_json::json!({"cmd": ["true"]})),
                )
                .await;
            assert_eq!(st, 200, "{v}");
        }
        let (st, v) = post(
            &c,
            "/sandboxes/dev/fork",
            Some(serde_json::json!({"count": 2})),
        )
        .await;
        assert_eq!(st, 409, "the names are taken: {v}");
        let (st, v) = post(
            &c,
            "/sandboxes/dev/fork",
            Some(serde_json::json!({"name": "more", "count": 3})),
        )
        .await;
        assert_eq!(st, 403, "4 of 5 sandboxes held, 3 more asked: {v}");
        assert!(v["error"].as_str().unwrap().contains("quota"), "{v}");
        assert!(
            std::fs::read_dir(s.data.join("captures"))
                .unwrap()
                .next()
                .is_none(),
            "a fork's capture is removed"
        );

        // A failed sandbox cannot be forked, and says why.
        for k in ["more-1", "more-2", "more-3"] {
            if get(&c, k).await.0 == 200 {
                assert_eq!(delete(&c, k).await, 204);
            }
        }
        eng.inject(Fault::BootFails);
        let (st, _) = post(
            &c,
            "/sandboxes",
            Some(serde_json::json!({"name": "broken"})),
        )
        .await;
        assert_eq!(st, 502);
        let (st, v) = post(&c, "/sandboxes/broken/fork", Some(serde_json::json!({}))).await;
        assert_eq!(st, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("failed"), "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("injected fault"),
            "the reason: {v}"
        );
    });
}

/// The one user directory under `DATA/checkpoints/`.
fn show_user_dir(data: &Path) -> String {
    let mut dirs: Vec<String> = std::fs::read_dir(data.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.remove(0)
}
