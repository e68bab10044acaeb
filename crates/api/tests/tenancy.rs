//! Users, secrets, quotas, rate limits and bad input, on a real daemon.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

#[test]
fn users_cannot_see_or_touch_each_other() {
    in_netns("api-tenancy", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        let sb = alice.create("mine").await;
        let id = sb["id"].as_str().unwrap();
        let (s, out) = alice
            .json(
                Method::POST,
                "/secrets",
                Some(json!({"name": "A_SECRET", "value": "alice-only"})),
            )
            .await;
        assert_eq!(s, 201, "{out}");

        let (_, list) = bob.json(Method::GET, "/sandboxes", None).await;
        assert!(list.as_array().unwrap().is_empty());
        for (m, path) in [
            (Method::GET, format!("/sandboxes/{id}")),
            (Method::GET, "/sandboxes/mine".to_string()),
            (Method::PATCH, "/sandboxes/mine".to_string()),
            (Method::DELETE, "/sandboxes/mine".to_string()),
            (Method::GET, "/sandboxes/mine/sessions".to_string()),
            (
                Method::GET,
                "/sandboxes/mine/files?path=/etc/hostname".to_string(),
            ),
            (Method::DELETE, "/secrets/A_SECRET".to_string()),
        ] {
            let body = (m == Method::PATCH).then(|| json!({"keep_hot": true}));
            let (s, v) = bob.json(m.clone(), &path, body).await;
            assert_eq!(s, 404, "{m} {path}: {v}");
        }
        let (s, _) = bob.exec("mine", &["true"]).await;
        assert_eq!(s, 404);
        let (_, secrets) = bob.json(Method::GET, "/secrets", None).await;
        assert!(secrets.as_array().unwrap().is_empty());
        // Bob may use the same names for his own things.
        bob.create("mine").await;
        let (_, a) = alice.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(a.as_array().unwrap().len(), 1);
        // Alice's sandbox is untouched.
        let (s, out) = alice.exec("mine", &["true"]).await;
        assert_eq!((s, out["exit_code"].as_i64()), (200, Some(0)));
        d.stop().await;
    });
}

#[test]
fn secrets_reach_the_guest_and_never_come_back() {
    in_netns("api-secrets", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));
        let value = "s3cr3t-Zq8-value";
        let (s, created) = c
            .json(
                Method::POST,
                "/secrets",
                Some(json!({"name": "API_TOKEN", "value": value})),
            )
            .await;
        assert_eq!(s, 201);
        assert!(!created.to_string().contains(value));
        let (s, v) = c
            .json(
                Method::POST,
                "/secrets",
                Some(json!({"name": "bad-name", "value": "x"})),
            )
            .await;
        assert_eq!(s, 400, "{v}");

        let (s, sb) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "sec", "secrets": ["API_TOKEN"], "env": {"PLAIN": "yes"}})),
            )
            .await;
        assert_eq!(s, 201, "{sb}");
        let (_, out) = c.exec("sec", &["sh", "-c", "echo $API_TOKEN $PLAIN"]).await;
        assert_eq!(
            out["stdout"].as_str().unwrap().trim(),
            format!("{value} yes")
        );

        let mut seen = String::new();
        for path in ["/secrets", "/sandboxes", "/sandboxes/sec"] {
            let resp = c.req(Method::GET, path).send().await.unwrap();
            seen.push_str(&resp.text().await.unwrap());
        }
        seen.push_str(&sb.to_string());
        assert!(seen.contains("API_TOKEN"));
        assert!(
            !seen.contains(value),
            "a secret value leaked into an API response"
        );
        let logs = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
        assert!(
            !logs.contains(value),
            "a secret value leaked into the daemon's log"
        );
        for f in walk(&data.path().join("sandboxes")) {
            if f.extension().is_some_and(|e| e == "log") {
                let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
                assert!(
                    !text.contains(value),
                    "a secret value leaked into {}",
                    f.display()
                );
            }
        }
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "sec2", "secrets": ["NOPE"]})),
            )
            .await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("NOPE"));
        let (s, _) = c.json(Method::DELETE, "/secrets/API_TOKEN", None).await;
        assert_eq!(s, 204);
        d.stop().await;
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn quotas_rate_limits_and_bad_input_get_clear_errors() {
    in_netns("api-limits", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(
            data.path(),
            "[limits]\ncreates_per_min = 4\nmax_json_body = 65536\n",
        ))
        .await;
        let key = d.user("alice", 1);
        let c = d.client(&key);

        // Authentication.
        let anon = reqwest::Client::new();
        let r = anon
            .get(format!("{}/sandboxes", d.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().is_some());
        let wrong = d.client("bht_0000");
        assert_eq!(wrong.json(Method::GET, "/sandboxes", None).await.0, 401);
        let health = anon.get(format!("{}/health", d.url)).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let h: serde_json::Value = health.json().await.unwrap();
        assert_eq!(
            (h["engine"].as_str(), h["accelerator"].as_str()),
            (Some("qemu"), Some("tcg"))
        );

        // Bodies and values.
        let raw = |body: &'static str| {
            c.req(Method::POST, "/sandboxes")
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        for (body, what) in [
            ("{not json", "bad JSON"),
            (r#"{"name":"x","cpu":2}"#, "unknown field"),
        ] {
            let r = raw(body).await.unwrap();
            assert_eq!(r.status(), 400, "{what}");
            let v: serde_json::Value = r.json().await.unwrap();
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}");
        }
        let big = format!(
            r#"{{"name":"x","labels":{{"a":"{}"}}}}"#,
            "x".repeat(100_000)
        );
        let r = c
            .req(Method::POST, "/secrets")
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        for (m, path) in [
            (Method::GET, "/sandboxes/nope"),
            (Method::GET, "/nowhere"),
            (Method::POST, "/sandboxes/nope/exec"),
        ] {
            let body = (m == Method::POST).then(|| json!({"cmd": ["true"]}));
            let (s, v) = c.json(m.clone(), path, body).await;
            assert_eq!(s, 404, "{m} {path}: {v}");
        }

        // Rate limit: creates are charged before validation.
        for body in [
            json!({"name": "bad name"}),
            json!({"name": "x", "cpus": 0}),
            json!({"name": "x", "memory_mb": 1_000_000}),
        ] {
            let (s, v) = c.json(Method::POST, "/sandboxes", Some(body)).await;
            assert_eq!(s, 400, "{v}");
        }
        c.create("only").await;
        let r = c
            .req(Method::POST, "/sandboxes")
            .json(&json!({"name": "another"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");

        // Quota: alice may hold one sandbox (a fresh user, since the
        // create bucket above is empty).
        let d2key = d.user("carol", 1);
        let carol = d.client(&d2key);
        let (s, v) = carol
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "c1", "image": "no-such-image"})),
            )
            .await;
        // Unknown (or another user's private image): 404 with the list.
        assert_eq!(s, 404, "{v}");
        carol.create("c1").await;
        let (s, v) = carol
            .json(Method::POST, "/sandboxes", Some(json!({"name": "c2"})))
            .await;
        assert_eq!(s, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("quota"), "{v}");
        d.stop().await;
    });
}
