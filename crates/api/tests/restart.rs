//! A daemon restart keeps users, secrets and sandboxes.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

#[test]
fn restart_keeps_users_secrets_and_sandboxes() {
    in_netns("api-restart", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let key = d.user("alice", 5);
        let c = d.client(&key);
        c.json(
            Method::POST,
            "/secrets",
            Some(json!({"name": "KEEP", "value": "kept-value"})),
        )
        .await;
        c.create("durable").await;
        let r = c
            .req(
                Method::PUT,
                "/sandboxes/durable/files?path=/workspace/note.txt",
            )
            .body("still here")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        d.stop().await;

        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&key);
        let (s, secrets) = c.json(Method::GET, "/secrets", None).await;
        assert_eq!(s, 200, "the key survives a restart");
        assert_eq!(secrets[0]["name"], "KEEP");
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        let sb = &list[0];
        // Shutdown took it to cold; the new daemon adopted it as cold and
        // listing did not wake it.
        assert_eq!(
            (sb["status"].as_str(), sb["thermal"].as_str()),
            (Some("running"), Some("cold")),
            "{sb}"
        );
        let ip_before = sb["ip"].clone();
        let (s, out) = c.exec("durable", &["cat", "/workspace/note.txt"]).await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(out["stdout"], "still here");
        let (_, sb) = c.json(Method::GET, "/sandboxes/durable", None).await;
        assert_eq!(
            (sb["status"].as_str(), &sb["ip"]),
            (Some("running"), &ip_before),
            "{sb}"
        );
        // The secret still decrypts: a new sandbox can use it.
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "again", "secrets": ["KEEP"]})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (_, out) = c.exec("again", &["sh", "-c", "echo $KEEP"]).await;
        assert_eq!(out["stdout"], "kept-value\n");
        d.stop().await;
    });
}
