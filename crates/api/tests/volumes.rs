//! Persistent volumes on real VMs (QEMU): data written in a volume by one
//! sandbox is there, intact, in another after the first is destroyed and
//! the daemon restarted; a read-only mount refuses writes and serves
//! reads; a cold cycle keeps the mounts; a volume grown while no VM uses
//! it is grown by the guest at its next boot. Three boots.
//!
//! And a volume's tar export, import and clone keep names (spaces, dot
//! files), subdirectories, symlinks, modes, owners and bytes; a bad tar is
//! a 400; a client gone mid-export leaves no utility VM. Seven boots.

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

/// Owners, modes, symlink targets and file hashes of the tree at `root`
/// (seen from inside the guest).
async fn tree(c: &Client, sb: &str, root: &str) -> String {
    sh(
        c,
        sb,
        &format!(
            "cd {root} && find . | sort | while IFS= read -r p; do \
               if [ -L \"$p\" ]; then echo \"L $p -> $(readlink \"$p\")\"; \
               else echo \"$(stat -c '%a %u %g' \"$p\") $p\"; fi; done; \
             find . -type f -exec sha256sum {{}} \\; | sort"
        ),
    )
    .await
}

/// The sha256 of every volume file under the data directory (the test
/// compares bytes; it never reads them as a file system).
fn volume_hashes(data: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for u in std::fs::read_dir(data.join("volumes")).unwrap().flatten() {
        for f in std::fs::read_dir(u.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            out.push(hex::encode(Sha256::digest(&bytes)));
        }
    }
    out.sort();
    out
}

/// The sandbox directories on disk (utility VMs included, while they run).
fn sandbox_dirs(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("sandboxes"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// The status of a `PUT path` sent by hand with header `header` and no
/// body bytes (the answer comes before any are needed).
async fn raw_put(c: &Client, path: &str, header: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = c.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n{header}\r\n\r\n",
        c.key
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{head}"))
}

#[test]
fn volumes_export_import_and_clone_keep_names_modes_links_and_bytes() {
    in_netns("api-volarc", || async {
        let data = data_dir();
        // Each export and import starts a VM: counted as creates.
        let d = TestDaemon::start(config(data.path(), "[limits]\ncreates_per_min = 1000\n")).await;
        let key = d.user("ada", 5);
        let c = d.client(&key);
        for (name, mb) in [("src", 64), ("dst", 64)] {
            let (s, v) = c
                .json(
                    Method::POST,
                    "/volumes",
                    Some(json!({"name": name, "size_mb": mb})),
                )
                .await;
            assert_eq!(s, 201, "{v}");
        }

        // Boot 1: w fills src.
        create(
            &c,
            json!({"name": "w", "volumes": [{"name": "src", "mount": "/data"}]}),
        )
        .await;
        sh(
            &c,
            "w",
            "cd /data && mkdir -p 'dir with space' sub/deep && \
             printf 'hello\\n' > 'dir with space/file one.txt' && \
             printf '#!/bin/sh\\necho hi\\n' > sub/deep/run.sh && chmod 750 sub/deep/run.sh && \
             head -c 300000 /dev/urandom > secret && chmod 600 secret && \
             echo dot > .hidden && ln -s sub/deep/run.sh link && chmod 2775 sub && sync",
        )
        .await;
        let want = tree(&c, "w", "/data").await;
        for needle in [
            "L ./link -> sub/deep/run.sh",
            "750 1000 1000 ./sub/deep/run.sh",
            "600 1000 1000 ./secret",
            "2775 1000 1000 ./sub",
            "./dir with space/file one.txt",
            "./.hidden",
        ] {
            assert!(want.contains(needle), "{needle} in {want}");
        }

        // Held read-write by a hot sandbox: no export, no clone, no
        // import (no VM is started for a refusal).
        let before = sandbox_dirs(data.path());
        let resp = c
            .req(Method::GET, "/volumes/src/archive")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409);
        let (s, v) = c
            .json(
                Method::POST,
                "/volumes/src/clone",
                Some(json!({"name": "cl"})),
            )
            .await;
        assert_eq!(s, 409, "{v}");
        let resp = c
            .req(Method::PUT, "/volumes/src/archive")
            .body(vec![0u8; 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409);
        assert_eq!(sandbox_dirs(data.path()), before);

        // Cold: clone is fine (nothing writes it now); export still waits
        // for the sandbox to go (it holds the volume read-write).
        let (s, v) = c.json(Method::POST, "/sandboxes/w/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let (s, v) = c
            .json(
                Method::POST,
                "/volumes/src/clone",
                Some(json!({"name": "cl"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["size_mb"], 64, "{v}");
        let (s, _) = c.json(Method::DELETE, "/sandboxes/w", None).await;
        assert_eq!(s, 204);

        // Boot 2: export src (a utility VM, gone when the stream ends).
        let resp = c
            .req(Method::GET, "/volumes/src/archive")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "application/x-tar"
        );
        let tar = resp.bytes().await.unwrap().to_vec();
        assert!(tar.len() > 300_000 && tar.len() % 512 == 0, "{}", tar.len());
        assert_eq!(&tar[257..262], b"ustar", "a tar header");
        assert_eq!(sandbox_dirs(data.path()), 0, "the utility VM is gone");
        let (_, list) = c.json(Method::GET, "/sandboxes", None).await;
        assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

        // Import: bounded by the volume's size and a stated length.
        assert_eq!(
            raw_put(
                &c,
                "/volumes/dst/archive",
                &format!("Content-Length: {}", (64u64 << 20) + 1)
            )
            .await,
            413
        );
        assert_eq!(
            raw_put(&c, "/volumes/dst/archive", "Transfer-Encoding: chunked").await,
            411
        );

        // Boot 3: import into dst.
        let resp = c
            .req(Method::PUT, "/volumes/dst/archive")
            .body(tar.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        assert_eq!(sandbox_dirs(data.path()), 0, "the utility VM is gone");

        // Boot 4: r sees dst and cl as w saw src.
        let src_bytes = volume_hashes(data.path());
        create(
            &c,
            json!({"name": "r", "volumes": [
                {"name": "dst", "mount": "/data"},
                {"name": "cl", "mount": "/clone"}
            ]}),
        )
        .await;
        assert_eq!(tree(&c, "r", "/data").await, want);
        assert_eq!(tree(&c, "r", "/clone").await, want);
        // A write to the clone: the source's file keeps its bytes.
        sh(&c, "r", "echo new > /clone/new; sync").await;
        let (s, _) = c.json(Method::DELETE, "/sandboxes/r", None).await;
        assert_eq!(s, 204);
        let after = volume_hashes(data.path());
        let src_hash = {
            // src and cl were byte-equal before r; the one left unchanged
            // is src (r never had it).
            let mut same = src_bytes.clone();
            same.dedup();
            assert_eq!(
                same.len() + 1,
                src_bytes.len(),
                "src and cl were equal: {src_bytes:?}"
            );
            let mut counts = std::collections::HashMap::new();
            for h in &src_bytes {
                *counts.entry(h.clone()).or_insert(0) += 1;
            }
            counts.into_iter().find(|(_, n)| *n == 2).unwrap().0
        };
        assert_eq!(
            after.iter().filter(|h| **h == src_hash).count(),
            1,
            "the source is unchanged, the clone changed: {after:?}"
        );

        // Boot 5: a tar that is not one is a 400 (the volume was emptied
        // first: a failed import leaves what it had unpacked).
        let resp = c
            .req(Method::PUT, "/volumes/dst/archive")
            .body(vec![b'x'; 10_000])
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("did not unpack"), "{text}");
        assert_eq!(sandbox_dirs(data.path()), 0, "the utility VM is gone");

        // Boots 6, 7: a client gone mid-export leaves no VM behind. The
        // volume holds more than the sockets buffer: the stream is cut.
        create(
            &c,
            json!({"name": "big", "volumes": [{"name": "cl", "mount": "/data"}]}),
        )
        .await;
        sh(&c, "big", "head -c 40000000 /dev/zero > /data/zeros; sync").await;
        let (s, _) = c.json(Method::DELETE, "/sandboxes/big", None).await;
        assert_eq!(s, 204);
        let mut cut = c
            .req(Method::GET, "/volumes/cl/archive")
            .send()
            .await
            .unwrap();
        assert_eq!(cut.status().as_u16(), 200);
        assert!(cut.chunk().await.unwrap().is_some());
        assert_eq!(sandbox_dirs(data.path()), 1, "the utility VM runs");
        let (s, v) = c
            .json(Method::PATCH, "/volumes/cl", Some(json!({"size_mb": 128})))
            .await;
        assert_eq!(s, 409, "busy while exported: {v}");
        let second = c
            .req(Method::GET, "/volumes/cl/archive")
            .send()
            .await
            .unwrap();
        assert_eq!(second.status().as_u16(), 409, "one export at a time");
        drop(cut);
        let mut left = sandbox_dirs(data.path());
        for _ in 0..120 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            left = sandbox_dirs(data.path());
        }
        assert_eq!(left, 0, "the cut export's VM is gone");
        let (s, v) = c
            .json(Method::PATCH, "/volumes/cl", Some(json!({"size_mb": 128})))
            .await;
        assert_eq!(s, 200, "free again: {v}");

        let (st, events) = c.json(Method::GET, "/events", None).await;
        assert_eq!(st, 200);
        for kind in ["volume_cloned", "volume_exported", "volume_imported"] {
            assert!(events.to_string().contains(kind), "{kind}: {events}");
        }
        d.stop().await;
    });
}
