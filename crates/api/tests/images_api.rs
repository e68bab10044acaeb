//! The images API on the fake engine (`vmm::fake`: VMs are `lohar serve`
//! processes, images need only exist): ownership (two users' images of
//! one name; another user's private image is a 404 to inspect, create
//! from, delete; an admin's share makes it bootable, unshare ends that),
//! imports as tasks (progress, result, a task another user cannot see),
//! the statuses of bad input (malformed reference 400, unreachable
//! registry 502 naming it, bad credentials 400, hostile layers 400 with
//! nothing written outside, past the disk quota 413, no Content-Length
//! 411), deleting an image in use 409 naming its sandboxes, and the
//! unknown-image 404 listing only what the caller can use. Pulls from a
//! real registry, imports booted and `save` run on real VMs
//! (`tests/images.rs`).
//!
//! Needs root (namespaces, TAPs, ownership in images) and the host build
//! of lohar (`cargo build -p lohar`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, TestDaemon};
use reqwest::Method;
use serde_json::{json, Value};

fn fake_config(data: &Path) -> api::DaemonConfig {
    let mut c = common::config(
        data,
        // Pulls from 127.0.0.1 are allowed (the unreachable-registry case);
        // other loopback addresses are not.
        "[thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n[limits]\ncreates_per_min = 1000\n\
         [network]\nallow_cidrs = [\"127.0.0.1\"]\n",
    );
    c.admins = vec!["root".into()];
    c
}

/// A tar of `entries` (name, content; a name ending in '/' a directory;
/// `->target` a symlink), names written raw (hostile ones too).
fn tar_of(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_old();
        let raw = &mut h.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        let (kind, body): (_, &[u8]) = if name.ends_with('/') {
            (tar::EntryType::Directory, b"")
        } else if let Some(t) = data.strip_prefix("->") {
            let l = &mut h.as_old_mut().linkname;
            l.fill(0);
            l[..t.len()].copy_from_slice(t.as_bytes());
            (tar::EntryType::Symlink, b"")
        } else {
            (tar::EntryType::Regular, data.as_bytes())
        };
        h.set_entry_type(kind);
        h.set_mode(if name.ends_with('/') { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(body.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

/// A one-layer docker-archive whose layer is `layer` and whose config
/// sets `WorkingDir`.
fn archive(layer: &[u8], workdir: &str) -> Vec<u8> {
    let arch = image::Arch::host_or_default().name();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"WorkingDir":"{workdir}","Env":["A=1"]}}}}"#
    );
    let manifest = r#"[{"Config":"config.json","RepoTags":["x:1"],"Layers":["l0/layer.tar"]}]"#;
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
        ("l0/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn good_archive() -> Vec<u8> {
    archive(
        &tar_of(&[("etc/", ""), ("etc/hello", "hi\n"), ("srv/", "")]),
        "/srv",
    )
}

async fn import(c: &Client, name: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = c
        .req(Method::POST, &format!("/images/import?name={name}"))
        .header("content-type", "application/x-tar")
        .body(body)
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

/// Polls a task to its end (the deadline only stops a hang).
async fn wait_task(c: &Client, id: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let (s, v) = c.json(Method::GET, &format!("/tasks/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        if v["state"] != "running" {
            return v;
        }
        assert!(Instant::now() < end, "task {id} never ended: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn import_ok(c: &Client, name: &str, body: Vec<u8>) -> Value {
    let (s, t) = import(c, name, body).await;
    assert_eq!(s, 202, "{t}");
    assert_eq!(t["kind"], "import");
    let done = wait_task(c, t["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    done
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

fn oci_dirs(data: &Path) -> Vec<String> {
    let dir = data.join("images/oci");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "blobs")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn images_belong_to_users_and_bad_input_answers_4xx() {
    common::in_netns("imgapi", || async {
        let dir = tempfile::tempdir().unwrap();
        let data: PathBuf = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        testkit::placeholder_images(&data);
        // Files of a user's image without a row (its user was deleted) go
        // at start; a server image's (a name, not an id) stay.
        let oci = data.join("images/oci");
        for d in ["i.00000000deadbeef", "srv"] {
            std::fs::create_dir_all(oci.join(d)).unwrap();
            std::fs::write(oci.join(d).join("rootfs.ext4"), b"x").unwrap();
        }
        let d = TestDaemon::start_with_engine(
            fake_config(&data),
            vmm::fake::FakeEngine::new(testkit::host_lohar()),
        )
        .await;
        assert!(!oci.join("i.00000000deadbeef").exists());
        assert!(oci.join("srv/rootfs.ext4").exists());
        std::fs::remove_dir_all(oci.join("srv")).unwrap();
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        let carol = d.client(&d.user_with(
            "carol",
            api::users::Quotas {
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 4096,
                max_disk_mb: 600,
            },
        ));
        let root = d.client(&d.user("root", 5));

        let (s, v) = alice.json(Method::GET, "/images", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(names(&v), ["tiny"]);
        assert_eq!(v[0]["kind"], "tier");

        // Bad input answered at once.
        for (body, want) in [
            (json!({"ref": "Bad Ref!"}), "invalid"),
            (
                json!({"ref": "r.example/x:1", "name": "Bad Name"}),
                "invalid image name",
            ),
            (json!({"ref": "r.example/x:1", "name": "tiny"}), "tier"),
            (
                json!({"ref": "r.example/x:1", "username": "u"}),
                "credentials",
            ),
            (json!({"ref": "r.example/x:1", "nope": 1}), "unknown field"),
        ] {
            let (s, v) = alice
                .json(Method::POST, "/images/pull", Some(body.clone()))
                .await;
            assert_eq!(s, 400, "{body}: {v}");
            let e = v["error"].as_str().unwrap();
            assert!(e.to_lowercase().contains(want), "{body}: {e}");
        }
        // A registry at an address a sandbox may not reach (the host, its
        // LAN, the metadata service) is refused at once, 403 naming it;
        // 127.0.0.1, which the config allows, is the positive control
        // below (it is reached, and answers nothing).
        for (reference, why) in [
            ("169.254.169.254/latest/x:1", "link-local"),
            ("127.0.0.2:9/team/tool:1", "loopback"),
            ("10.1.2.3/team/tool:1", "private"),
            ("[::1]:9/team/tool:1", "IPv6"),
            ("[::ffff:169.254.169.254]:80/x:1", "link-local"),
        ] {
            let (s, v) = alice
                .json(
                    Method::POST,
                    "/images/pull",
                    Some(json!({"ref": reference, "insecure": true})),
                )
                .await;
            assert_eq!(s, 403, "{reference}: {v}");
            let e = v["error"].as_str().unwrap();
            assert!(
                e.contains("may not be pulled from") && e.contains(why),
                "{reference}: {e}"
            );
        }
        // An unreachable registry: the task fails with 502 naming it.
        let (s, t) = alice
            .json(
                Method::POST,
                "/images/pull",
                Some(json!({"ref": "127.0.0.1:9/team/tool:1", "insecure": true})),
            )
            .await;
        assert_eq!(s, 202, "{t}");
        assert_eq!(
            (t["kind"].as_str(), t["target"].as_str()),
            (Some("pull"), Some("tool"))
        );
        let done = wait_task(&alice, t["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "failed", "{done}");
        assert_eq!(done["failure"]["status"], 502, "{done}");
        let e = done["failure"]["error"].as_str().unwrap();
        assert!(e.contains("cannot reach registry 127.0.0.1:9"), "{e}");
        // Another user's task is not found.
        let (s, _) = bob
            .json(
                Method::GET,
                &format!("/tasks/{}", t["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 404);

        // An import, as a task: the image is alice's, private.
        let done = import_ok(&alice, "app", good_archive()).await;
        assert_eq!(done["result"]["name"], "app", "{done}");
        assert_eq!(done["result"]["owner"], "alice", "{done}");
        assert_eq!(done["result"]["shared"], false, "{done}");
        assert_eq!(done["result"]["config"]["working_dir"], "/srv", "{done}");
        assert!(
            done["progress"]["bytes_total"].as_u64().unwrap() > 0,
            "{done}"
        );
        let (s, v) = alice.json(Method::GET, "/images/app", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["kind"], "oci");
        assert_eq!(v["source"], "import");
        assert_eq!(v["config"]["env"], json!(["A=1"]), "{v}");
        assert!(v["digest"].as_str().unwrap().starts_with("sha256:"), "{v}");
        // A name alice has already: 409, at once.
        let (s, v) = import(&alice, "app", good_archive()).await;
        assert_eq!(s, 409, "{v}");

        // Bob: alice's private image does not exist for him.
        assert_eq!(bob.json(Method::GET, "/images/app", None).await.0, 404);
        assert_eq!(bob.json(Method::DELETE, "/images/app", None).await.0, 404);
        let (s, v) = bob
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "b", "image": "app"})),
            )
            .await;
        assert_eq!(s, 404, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("unknown image 'app'") && e.contains("tiny"),
            "{e}"
        );
        let (_, v) = bob.json(Method::GET, "/images", None).await;
        assert_eq!(names(&v), ["tiny"]);

        // Bob's own "app": no collision; each sees their own.
        import_ok(&bob, "app", good_archive()).await;
        let (_, v) = bob.json(Method::GET, "/images/app", None).await;
        assert_eq!(v["owner"], "bob", "{v}");
        let (_, v) = alice.json(Method::GET, "/images/app", None).await;
        assert_eq!(v["owner"], "alice", "{v}");
        assert_eq!(oci_dirs(&data).len(), 2, "{:?}", oci_dirs(&data));

        // Alice boots it; the sandbox shows the name; deleting it is a 409
        // naming the sandbox.
        let (s, v) = alice
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "a1", "image": "app"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["image"], "app", "{v}");
        let (s, v) = alice.json(Method::DELETE, "/images/app", None).await;
        assert_eq!(s, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("sandbox 'a1'"), "{v}");

        // Sharing: admins only; then carol can boot alice's image.
        let (s, _) = bob.json(Method::POST, "/images/app/share", None).await;
        assert_eq!(s, 403);
        let (s, _) = root.json(Method::POST, "/images/app/share", None).await;
        assert_eq!(s, 404, "root has no image 'app'");
        let (s, v) = root
            .json(Method::POST, "/images/app/share?owner=alice", None)
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["shared"], true);
        // Bob's own still wins for bob; a second shared "app" is refused.
        assert_eq!(
            bob.json(Method::GET, "/images/app", None).await.1["owner"],
            "bob"
        );
        let (s, v) = root
            .json(Method::POST, "/images/app/share?owner=bob", None)
            .await;
        assert_eq!(s, 409, "{v}");
        let (_, v) = carol.json(Method::GET, "/images", None).await;
        assert_eq!(names(&v), ["tiny", "app"]);
        let (s, v) = carol
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "c1", "image": "app", "disk_size_mb": 600})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        // Not carol's to delete.
        assert_eq!(carol.json(Method::DELETE, "/images/app", None).await.0, 403);
        let (s, v) = alice.json(Method::DELETE, "/images/app", None).await;
        assert_eq!(s, 409, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("1 sandboxes of other users"),
            "{v}"
        );
        let (s, v) = root
            .json(Method::DELETE, "/images/app/share?owner=alice", None)
            .await;
        assert_eq!((s, &v["shared"]), (200, &json!(false)), "{v}");
        let (s, _) = carol
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "c2", "image": "app"})),
            )
            .await;
        assert_eq!(s, 404);

        // Hostile layers: refused (400), nothing outside the staging root.
        let outside = data.join("images");
        for (what, layer) in [
            ("a ../ entry", tar_of(&[("../../../escaped-dotdot", "x")])),
            ("an absolute entry", tar_of(&[("/escaped-abs", "x")])),
            (
                "a write through an escaping symlink",
                tar_of(&[("link", "->/tmp"), ("link/escaped-sym", "x")]),
            ),
        ] {
            let (s, t) = import(&alice, "bad", archive(&layer, "/")).await;
            assert_eq!(s, 202, "{what}: {t}");
            let done = wait_task(&alice, t["id"].as_str().unwrap()).await;
            assert_eq!(done["state"], "failed", "{what}: {done}");
            assert_eq!(done["failure"]["status"], 400, "{what}: {done}");
            assert!(
                done["failure"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("refusing layer entry"),
                "{what}: {done}"
            );
        }
        for p in [
            Path::new("/escaped-abs").to_path_buf(),
            Path::new("/tmp/escaped-sym").to_path_buf(),
            outside.join("escaped-dotdot"),
            data.join("escaped-dotdot"),
            dir.path().join("escaped-dotdot"),
        ] {
            assert!(!p.exists(), "{} was written", p.display());
        }
        let (_, v) = alice.json(Method::GET, "/images", None).await;
        assert_eq!(
            names(&v),
            ["tiny", "app"],
            "a failed import leaves no image"
        );

        // Carol's disk quota (600 MiB) is all c1's: no room for an image.
        let (s, v) = import(&carol, "big", good_archive()).await;
        assert_eq!(s, 403, "{v}");
        assert!(v["error"].as_str().unwrap().contains("disk quota"), "{v}");
        // No Content-Length: 411.
        let body =
            reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
                good_archive(),
            )]));
        let resp = alice
            .req(Method::POST, "/images/import?name=chunked")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 411);
        // Larger than what is left of alice's quota: 413 before a byte is read.
        let status = {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut sock = tokio::net::TcpStream::connect(d.addr).await.unwrap();
            let head = format!(
                "POST /images/import?name=huge HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
                alice.key,
                1u64 << 50
            );
            sock.write_all(head.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = sock.read(&mut buf).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert!(status.starts_with("HTTP/1.1 413"), "{status}");
        // Destroyed sandboxes free the image; its directory goes.
        for (c, n) in [(&alice, "a1"), (&carol, "c1")] {
            let (s, v) = c
                .json(Method::DELETE, &format!("/sandboxes/{n}"), None)
                .await;
            assert!(s == 200 || s == 204, "{s} {v}");
        }
        let (s, v) = alice.json(Method::DELETE, "/images/app", None).await;
        assert_eq!(s, 204, "{v}");
        assert_eq!(alice.json(Method::GET, "/images/app", None).await.0, 404);
        assert_eq!(oci_dirs(&data).len(), 1, "{:?}", oci_dirs(&data));
        // The blob cache keeps only what the remaining image names: the
        // deleted images', the failed and hostile imports' blobs went.
        let left = &oci_dirs(&data)[0];
        let img: Value = serde_json::from_slice(
            &std::fs::read(data.join("images/oci").join(left).join("image.json")).unwrap(),
        )
        .unwrap();
        let mut named: Vec<String> = img["layers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(img.get("config_digest"))
            .map(|d| d.as_str().unwrap().trim_start_matches("sha256:").to_owned())
            .collect();
        named.sort();
        named.dedup();
        let mut blobs: Vec<String> = std::fs::read_dir(data.join("images/oci/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        blobs.sort();
        assert_eq!(blobs, named);
        // A tier is not deletable.
        assert_eq!(
            alice.json(Method::DELETE, "/images/tiny", None).await.0,
            400
        );
        d.stop().await;
    });
}
