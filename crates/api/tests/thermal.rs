//! Thermal tiers through the API: the ticker (timers of 1–2 s from
//! `[thermal]`) moves an idle sandbox to warm and cold, list and inspect
//! never wake it, an exec does (the guest's processes intact), stop/start
//! (with `force`), keep_hot on create and by PATCH, events recorded, and a
//! graceful daemon restart with cold sandboxes; `init` on create (runs
//! at every boot, not on a wake).

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

async fn out(c: &Client, name: &str, script: &str) -> String {
    let (s, v) = c.exec(name, &["sh", "-c", script]).await;
    assert_eq!(s, 200, "{script}: {v}");
    assert_eq!(v["exit_code"], 0, "{script}: {v}");
    v["stdout"].as_str().unwrap().trim().to_string()
}

#[test]
fn idle_sandboxes_cool_down_and_wake_transparently_across_a_restart() {
    in_netns("api-thermal", || async {
        let data = data_dir();
        let tweak = "[thermal]\nwarm_after_secs = 1\ncold_after_secs = 2\n";
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let key = d.user("tess", 5);
        let c = d.client(&key);
        let sb = c.create("sleepy").await;
        let (s, pinned) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "pinned", "keep_hot": true})),
            )
            .await;
        assert_eq!(s, 201, "{pinned}");
        let counter = "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 & echo $!";
        let pid = out(&c, "sleepy", counter).await;

        // The ticker: warm after 1 s idle, cold 2 s later.
        wait_thermal(&c, "sleepy", "warm", Duration::from_secs(20)).await;
        wait_thermal(&c, "sleepy", "cold", Duration::from_secs(20)).await;
        // list and inspect never wake it.
        for _ in 0..5 {
            let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
            let me = list
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "sleepy")
                .unwrap()
                .clone();
            assert_eq!(me["thermal"], "cold", "{me}");
            assert!(me["thermal_since"].as_i64().unwrap() > 0);
            assert_eq!(thermal_of(&c, "sleepy").await, "cold");
        }
        let sid = sb["id"].as_str().unwrap();
        let user_id = {
            let store = store::Store::open(&data.path().join("bhatti.db")).unwrap();
            store.user_by_name("tess").unwrap().unwrap().id
        };
        let kinds = event_kinds(data.path(), &user_id, sid);
        // Nothing after the cold: the reads above did not wake it.
        assert_eq!(kinds.last().map(String::as_str), Some("cold"), "{kinds:?}");
        assert!(
            kinds.ends_with(&["warm".into(), "cold".into()]),
            "{kinds:?}"
        );

        // An exec wakes it: same process, still counting.
        let alive = format!("kill -0 {pid} && cat /tmp/count");
        let n1: u64 = out(&c, "sleepy", &alive).await.parse().unwrap();
        let n2: u64 = out(&c, "sleepy", &alive).await.parse().unwrap();
        assert!(n2 >= n1 && n1 > 0);
        let after = event_kinds(data.path(), &user_id, sid);
        assert_eq!(
            after[kinds.len()..].first().map(String::as_str),
            Some("hot"),
            "{after:?}"
        );

        // keep_hot: never cooled; PATCH turns it off.
        assert_eq!(thermal_of(&c, "pinned").await, "hot");
        let pid_kinds = event_kinds(data.path(), &user_id, pinned["id"].as_str().unwrap());
        assert!(!pid_kinds.contains(&"warm".to_string()), "{pid_kinds:?}");
        let (s, v) = c
            .json(
                Method::PATCH,
                "/sandboxes/pinned",
                Some(json!({"keep_hot": false})),
            )
            .await;
        assert_eq!((s, &v["keep_hot"]), (200, &json!(false)), "{v}");
        wait_thermal(&c, "pinned", "warm", Duration::from_secs(20)).await;

        // Explicit stop and start.
        let (s, v) = c.json(Method::POST, "/sandboxes/sleepy/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let (s, v) = c.json(Method::POST, "/sandboxes/sleepy/start", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("hot")), "{v}");
        let (s, v) = c
            .json(Method::POST, "/sandboxes/sleepy/start?force=maybe", None)
            .await;
        assert_eq!(s, 400, "{v}");

        // A graceful restart: both go cold and come back with their state.
        out(&c, "sleepy", "echo kept > /workspace/f").await;
        d.stop().await;
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let c = d.client(&key);
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        for s in list.as_array().unwrap() {
            assert_eq!(
                (s["status"].as_str(), s["thermal"].as_str()),
                (Some("running"), Some("cold")),
                "{s}"
            );
        }
        let n3: u64 = out(&c, "sleepy", &alive).await.parse().unwrap();
        assert!(n3 >= n2, "counter {n2} -> {n3}");
        assert_eq!(out(&c, "sleepy", "cat /workspace/f").await, "kept");
        assert_eq!(out(&c, "pinned", "echo ok").await, "ok");
        d.stop().await;
    });
}

/// Polls `script` in `name` until it prints something; that output.
async fn wait_out(c: &Client, name: &str, script: &str, what: &str) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let o = out(c, name, &format!("{script} 2>/dev/null || true")).await;
        if !o.is_empty() {
            return o;
        }
        assert!(
            std::time::Instant::now() < end,
            "{what}: nothing after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `init` on create: runs at every boot as root, detached in a session of
/// its own, with the sandbox's env and its output in the guest's log; a
/// wake from a snapshot (stop/start, a daemon restart) starts no second
/// copy, a boot from the disk starts it again. Bad values are 400s.
#[test]
fn the_init_command_runs_at_every_boot_and_not_on_a_wake() {
    in_netns("api-init", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let key = d.user("ivy", 5);
        let c = d.client(&key);

        for (bad, why) in [
            (json!(""), "must not be empty"),
            (json!("a\u{0}b"), "NUL"),
            (json!("x".repeat(8193)), "at most 8192"),
            (json!(["sleep", "1"]), "sequence"),
        ] {
            let (s, v) = c
                .json(
                    Method::POST,
                    "/sandboxes",
                    Some(json!({"name": "bad", "init": bad})),
                )
                .await;
            assert_eq!(s, 400, "{v}");
            assert!(v["error"].as_str().unwrap().contains(why), "{v}");
        }
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list, json!([]), "a refused create leaves nothing");

        // One line per run in /workspace (on the sandbox disk), then a
        // long-running process: the shell itself, turned into `sleep`.
        let init = "echo \"$(id -u) $$ $(cat /proc/sys/kernel/random/boot_id) $GREETING\" >> /workspace/init-runs; \
                    echo to-stdout; echo to-stderr >&2; exec sleep 100000";
        let (s, sb) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "booty", "env": {"GREETING": "hi"}, "init": init})),
            )
            .await;
        assert_eq!(s, 201, "{sb}");
        assert_eq!(sb["init"], init, "{sb}");
        let (_, shown) = c.json(Method::GET, "/sandboxes/booty", None).await;
        assert_eq!(shown["init"], init, "{shown}");

        // `uid pid boot_id greeting` per run.
        let runs = |text: &str| -> Vec<Vec<String>> {
            text.lines()
                .map(|l| l.split(' ').map(String::from).collect())
                .collect()
        };
        let first = runs(&wait_out(&c, "booty", "cat /workspace/init-runs", "the first run").await);
        assert_eq!(first.len(), 1, "{first:?}");
        let (pid, boot) = (first[0][1].clone(), first[0][2].clone());
        assert_eq!((first[0][0].as_str(), first[0][3].as_str()), ("0", "hi"));
        // Alive, root, the leader of its own session.
        let proc_of = |pid: &str| {
            format!("cat /proc/{pid}/comm; stat -c %u /proc/{pid}; cut -d' ' -f6 /proc/{pid}/stat")
        };
        assert_eq!(
            out(&c, "booty", &proc_of(&pid)).await,
            format!("sleep\n0\n{pid}")
        );
        let log = wait_out(
            &c,
            "booty",
            "grep -q to-stderr /var/log/bhatti-init.log && cat /var/log/bhatti-init.log",
            "the init log",
        )
        .await;
        assert!(
            log.contains(&format!("[bhatti] init started: pid {pid}")),
            "{log}"
        );
        assert!(
            log.contains("to-stdout\n") && log.contains("to-stderr"),
            "{log}"
        );
        // The sandbox user (commands run as uid 1000) reads it.
        assert_eq!(out(&c, "booty", "id -u").await, "1000");

        // Cold and hot again: restored, not booted; the same process runs on.
        let (s, v) = c.json(Method::POST, "/sandboxes/booty/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let (s, v) = c.json(Method::POST, "/sandboxes/booty/start", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("hot")), "{v}");
        assert_eq!(
            runs(&out(&c, "booty", "cat /workspace/init-runs").await),
            first
        );
        assert_eq!(
            out(&c, "booty", &proc_of(&pid)).await,
            format!("sleep\n0\n{pid}")
        );

        // A restart whose snapshot is lost: the sandbox is `stopped` and
        // boots from its disk when next used, which runs init again.
        d.stop().await;
        let snapshot = data
            .path()
            .join("sandboxes")
            .join(sb["id"].as_str().unwrap())
            .join("snapshot");
        assert!(snapshot.is_dir(), "{}", snapshot.display());
        std::fs::remove_dir_all(&snapshot).unwrap();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&key);
        let (_, v) = c.json(Method::GET, "/sandboxes/booty", None).await;
        assert_eq!(v["status"], "stopped", "{v}");
        assert_eq!(v["init"], init, "shown from the stored record: {v}");
        let all = wait_out(
            &c,
            "booty",
            "[ $(wc -l < /workspace/init-runs) -ge 2 ] && cat /workspace/init-runs",
            "the second run",
        )
        .await;
        let again = runs(&all);
        assert_eq!(again.len(), 2, "{again:?}");
        assert_eq!(again[0], first[0]);
        assert_eq!((again[1][0].as_str(), again[1][3].as_str()), ("0", "hi"));
        assert_ne!(again[1][2], boot, "a new boot");
        let pid2 = again[1][1].clone();
        assert_eq!(
            out(&c, "booty", &proc_of(&pid2)).await,
            format!("sleep\n0\n{pid2}")
        );
        // The log is on the disk too: both runs are in it.
        let log = out(
            &c,
            "booty",
            "grep -c 'init started' /var/log/bhatti-init.log",
        )
        .await;
        assert_eq!(log, "2");
        d.stop().await;
    });
}
