//! Creates that restore instead of boot, on real VMs (QEMU): a user's
//! template of an image, made by `POST /images/:name/templates` and on
//! first use; a matching create restores from it (the guest's uptime is
//! older than the request) with an identity of its own, and works like
//! any sandbox (exec, files, publish, a cold cycle); `"boot": "fresh"` and
//! a create carrying env boot (the positive control of the uptime probe);
//! a checkpoint through the API and a sandbox made from it.

mod common;

use std::time::Instant;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn create_timed(c: &Client, body: Value) -> (Value, f64) {
    let t = Instant::now();
    let (s, v) = c.json(Method::POST, "/sandboxes", Some(body)).await;
    assert_eq!(s, 201, "{v}");
    (v, t.elapsed().as_secs_f64())
}

/// The guest's uptime, seconds.
async fn uptime(c: &Client, sb: &str) -> f64 {
    let out = sh(c, sb, "cut -d' ' -f1 /proc/uptime").await;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("uptime: {out:?}"))
}

#[test]
fn creates_restore_from_a_users_template_with_their_own_identity() {
    in_netns("api-tmpl", || async {
        let data = data_dir();
        let tweak = "[publish]\nlisten = \"127.0.0.1:0\"\n[limits]\ncreates_per_min = 1000\n";
        let d = TestDaemon::start(config(data.path(), tweak)).await;
        let public = d.public.expect("the public proxy is on");
        let alice = d.client(&d.user("alice", 6));
        let bob = d.client(&d.user("bob", 2));

        // Positive control: a boot's uptime is within the request.
        let (fresh, took) = create_timed(&alice, json!({"name": "fresh"})).await;
        let up = uptime(&alice, "fresh").await;
        println!("MEASURED boot create {took:.2}s, guest uptime at first exec {up:.2}s");
        assert!(
            up <= took + 1.0,
            "a booted guest is younger than its create: {up} > {took}"
        );

        // The template, made on request.
        let (s, t) = alice
            .json(
                Method::POST,
                "/images/tiny/templates",
                Some(json!({"memory_mb": 256})),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        assert_eq!(
            (t["image"].as_str(), t["memory_mb"].as_u64()),
            (Some("tiny"), Some(256))
        );
        let (s, v) = alice
            .json(Method::POST, "/images/nope/templates", Some(json!({})))
            .await;
        assert_eq!(s, 404, "{v}");

        // A matching create restores: older than its request.
        let (t1, took) = create_timed(&alice, json!({"name": "t1"})).await;
        let up = uptime(&alice, "t1").await;
        println!("MEASURED template create {took:.2}s, guest uptime at first exec {up:.2}s");
        assert!(
            up > took + 0.5,
            "restored, not booted: uptime {up}s, the create took {took}s"
        );
        assert_eq!(sh(&alice, "t1", "hostname").await.trim(), "t1");
        let ip = t1["ip"].as_str().unwrap().to_string();
        assert_ne!(Some(ip.as_str()), fresh["ip"].as_str());
        assert!(
            sh(&alice, "t1", "ip -4 -o addr show dev eth0")
                .await
                .contains(&format!("{ip}/")),
            "eth0 has its own address"
        );

        // It works like any sandbox: files, publish, a cold cycle.
        let resp = alice
            .req(Method::PUT, "/sandboxes/t1/files?path=/tmp/note.txt")
            .body("written through the API")
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        assert_eq!(
            sh(&alice, "t1", "cat /tmp/note.txt").await.trim(),
            "written through the API"
        );
        sh(&alice, "t1", "mkdir -p /tmp/www && echo from-template > /tmp/www/index.html && httpd -p 8080 -h /tmp/www").await;
        let (s, p) = alice
            .json(
                Method::POST,
                "/sandboxes/t1/publish",
                Some(json!({"port": 8080})),
            )
            .await;
        assert_eq!(s, 201, "{p}");
        let page = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{public}/t1-8080/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page, "from-template\n");
        let (s, v) = alice.json(Method::POST, "/sandboxes/t1/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        assert_eq!(
            sh(&alice, "t1", "cat /tmp/www/index.html").await.trim(),
            "from-template"
        );

        // "boot": "fresh", and a create carrying env, boot.
        let (_, took) = create_timed(&alice, json!({"name": "f2", "boot": "fresh"})).await;
        assert!(uptime(&alice, "f2").await <= took + 1.0);
        let (_, took) = create_timed(&alice, json!({"name": "f3", "env": {"A": "1"}})).await;
        assert!(uptime(&alice, "f3").await <= took + 1.0);
        assert_eq!(sh(&alice, "f3", "echo $A").await.trim(), "1");

        // Listed; in use while t1 (made from it) exists.
        let (s, list) = alice
            .json(Method::GET, "/images/tiny/templates", None)
            .await;
        assert_eq!(s, 200, "{list}");
        assert_eq!(list[0]["shape"], "1x256", "{list}");
        let (s, v) = alice
            .json(Method::DELETE, "/images/tiny/templates/1x256", None)
            .await;
        assert_eq!(s, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("t1"), "{v}");
        for (path, want) in [
            ("/images/tiny/templates/big", 400),
            ("/images/tiny/templates/2x512", 404),
            // The image name is a path component: never a way out.
            ("/images/..%2F..%2Ftiny/templates/1x256", 400),
            ("/images/..%2Fx/templates/1x256", 400),
        ] {
            assert_eq!(
                alice.json(Method::DELETE, path, None).await.0,
                want,
                "{path}"
            );
        }
        let (s, v) = alice.json(Method::DELETE, "/sandboxes/t1", None).await;
        assert_eq!(s, 204, "{v}");
        let (s, v) = alice
            .json(Method::DELETE, "/images/tiny/templates/1x256", None)
            .await;
        assert_eq!(s, 204, "{v}");
        let (_, list) = alice
            .json(Method::GET, "/images/tiny/templates", None)
            .await;
        assert_eq!(list, json!([]));

        // Another user has no template of alice's: bob boots.
        let (_, took) = create_timed(&bob, json!({"name": "b1"})).await;
        assert!(
            uptime(&bob, "b1").await <= took + 1.0,
            "bob's create booted"
        );
    });
}

#[test]
fn a_template_is_made_on_first_use() {
    in_netns("api-tmpl2", || async {
        let data = data_dir();
        let mut cfg = config(data.path(), "");
        cfg.defaults.auto_templates = true;
        let d = TestDaemon::start(cfg).await;
        let c = d.client(&d.user("erin", 3));
        let (_, took) = create_timed(&c, json!({"name": "first"})).await;
        assert!(uptime(&c, "first").await <= took + 1.0);
        // Made in the background after the first boot.
        let dir = d.data.join("templates");
        let deadline = Instant::now() + std::time::Duration::from_secs(180);
        loop {
            // In place (not still under its temporary name).
            let ready = walk(&dir)
                .iter()
                .any(|p| p.ends_with("/1x256/capture.json"));
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no template after the first boot: {:?}",
                walk(&dir)
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let (_, took) = create_timed(&c, json!({"name": "second"})).await;
        let up = uptime(&c, "second").await;
        assert!(
            up > took + 0.5,
            "the second create restored: uptime {up}s, took {took}s"
        );
        let (s, v) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(s, 200);
        assert_eq!(
            v.as_array().unwrap().len(),
            2,
            "the template's own VM is not the user's: {v}"
        );
    });
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
