//! Thermal tiers through the API: the ticker (timers of 1–2 s from
//! `[thermal]`) moves an idle sandbox to warm and cold, list and inspect
//! never wake it, an exec does (the guest's processes intact), stop/start
//! (with `force`), keep_hot on create and by PATCH, events recorded, and a
//! graceful daemon restart with cold sandboxes.

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
