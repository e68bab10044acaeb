//! Persistent volumes on real VMs (QEMU): data written in a volume by one
//! sandbox is there, intact, in another after the first is destroyed and
//! the daemon restarted; a read-only mount refuses writes and serves
//! reads; a cold cycle keeps the mounts; a volume grown while no VM uses
//! it is grown by the guest at its next boot. Three boots.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn put(c: &Client, sb: &str, path: &str, body: Vec<u8>) -> (u16, String) {
    let resp = c
        .req(Method::PUT, &format!("/sandboxes/{sb}/files?path={path}"))
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn sha_of(c: &Client, sb: &str, path: &str) -> String {
    let resp = c
        .req(Method::GET, &format!("/sandboxes/{sb}/files?path={path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    hex::encode(Sha256::digest(resp.bytes().await.unwrap()))
}

/// The size in MiB `df` shows for the file system at `path`.
async fn df_mb(c: &Client, sb: &str, path: &str) -> u64 {
    let out = sh(c, sb, &format!("df -k {path} | tail -n 1")).await;
    out.split_whitespace()
        .nth(1)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("df: {out:?}"))
        / 1024
}

/// The options `/proc/mounts` shows for mount point `path` (empty when
/// nothing is mounted there).
async fn mount_opts(c: &Client, sb: &str, path: &str) -> String {
    sh(
        c,
        sb,
        &format!("awk '$2 == \"{path}\" {{ print $3, $4 }}' /proc/mounts"),
    )
    .await
}

async fn create(c: &Client, body: Value) -> Value {
    let (s, v) = c.json(Method::POST, "/sandboxes", Some(body)).await;
    assert_eq!(s, 201, "{v}");
    v
}

#[test]
fn volume_data_outlives_sandboxes_and_restarts_read_only_mounts_refuse_writes() {
    in_netns("api-vols", || async {
        let data = data_dir();
        let d = TestDaemon::start(config(data.path(), "")).await;
        let key = d.user("vic", 5);
        let c = d.client(&key);
        for (name, mb) in [("data", 128), ("ref", 64)] {
            let (s, v) = c
                .json(
                    Method::POST,
                    "/volumes",
                    Some(json!({"name": name, "size_mb": mb})),
                )
                .await;
            assert_eq!(s, 201, "{v}");
        }

        // Boot 1: A writes into both volumes (read-write).
        create(
            &c,
            json!({"name": "a", "volumes": [
                {"name": "data", "mount": "/data"},
                {"name": "ref", "mount": "/srv/ref"}
            ]}),
        )
        .await;
        assert!(
            mount_opts(&c, "a", "/data")
                .await
                .starts_with("ext4 rw,nosuid,nodev"),
            "{}",
            mount_opts(&c, "a", "/data").await
        );
        let blob: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let want = hex::encode(Sha256::digest(&blob));
        for path in ["/data/blob", "/srv/ref/blob"] {
            let (s, t) = put(&c, "a", path, blob.clone()).await;
            assert_eq!(s, 200, "PUT {path}: {t}");
        }
        assert_eq!(sh(&c, "a", "sync; echo ok").await, "ok\n");
        let (s, _) = c.json(Method::DELETE, "/sandboxes/a", None).await;
        assert_eq!(s, 204);

        // A daemon restart in between.
        d.stop().await;
        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&key);

        // Boot 2: B finds A's data; ref is read-only to it.
        create(
            &c,
            json!({"name": "b", "volumes": [
                {"name": "data", "mount": "/data"},
                {"name": "ref", "mount": "/srv/ref", "read_only": true}
            ]}),
        )
        .await;
        assert_eq!(sha_of(&c, "b", "/data/blob").await, want);
        assert_eq!(sha_of(&c, "b", "/srv/ref/blob").await, want);
        assert!(
            mount_opts(&c, "b", "/srv/ref")
                .await
                .starts_with("ext4 ro,nosuid,nodev"),
            "{}",
            mount_opts(&c, "b", "/srv/ref").await
        );
        // Writes: refused on the read-only mount (EROFS), taken on the
        // read-write one (the positive control).
        let (s, v) = c.exec("b", &["sh", "-c", "echo x > /srv/ref/new"]).await;
        assert_eq!(s, 200, "{v}");
        assert_ne!(v["exit_code"], 0, "{v}");
        assert!(
            v["stderr"]
                .as_str()
                .unwrap()
                .contains("Read-only file system"),
            "{v}"
        );
        let (s, t) = put(&c, "b", "/srv/ref/new", b"x".to_vec()).await;
        assert!(s >= 400, "a file API write to a read-only mount: {s} {t}");
        assert_eq!(
            sh(&c, "b", "echo fresh > /data/fresh; sync; cat /data/fresh").await,
            "fresh\n"
        );
        assert!(df_mb(&c, "b", "/data").await <= 128);

        // A cold cycle keeps the mounts and their contents.
        let (s, v) = c.json(Method::POST, "/sandboxes/b/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        assert_eq!(sh(&c, "b", "cat /data/fresh").await, "fresh\n");
        assert_eq!(sha_of(&c, "b", "/srv/ref/blob").await, want);
        assert!(mount_opts(&c, "b", "/data").await.starts_with("ext4 rw"));

        // Boot 3: grown while B is cold (it gives up its snapshot), the
        // volume is filled by the guest when B boots from its disk.
        let (s, v) = c
            .json(
                Method::PATCH,
                "/volumes/data",
                Some(json!({"size_mb": 256})),
            )
            .await;
        assert_eq!(s, 409, "B is hot again after the cold cycle: {v}");
        let (s, v) = c.json(Method::POST, "/sandboxes/b/stop", None).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = c
            .json(
                Method::PATCH,
                "/volumes/data",
                Some(json!({"size_mb": 256})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let mb = df_mb(&c, "b", "/data").await;
        assert!(
            (200..=256).contains(&mb),
            "df shows {mb} MiB after the grow"
        );
        assert_eq!(sha_of(&c, "b", "/data/blob").await, want);
        assert_eq!(sh(&c, "b", "cat /data/fresh").await, "fresh\n");

        let (s, v) = c.json(Method::DELETE, "/volumes/data", None).await;
        assert_eq!(s, 409, "{v}");
        let (s, _) = c.json(Method::DELETE, "/sandboxes/b", None).await;
        assert_eq!(s, 204);
        for name in ["data", "ref"] {
            let (s, v) = c
                .json(Method::DELETE, &format!("/volumes/{name}"), None)
                .await;
            assert_eq!(s, 204, "{v}");
        }
        d.stop().await;
    });
}
