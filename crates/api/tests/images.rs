//! OCI images on real VMs: an image made here (the tiny tier's busybox
//! tree plus a user `app`, as a `docker save` archive whose config sets
//! Env, WorkingDir and User) is imported into the daemon's data dir and
//! booted with `POST /sandboxes {"image": …}`; its exec defaults are the
//! image's. A second image that says nothing and has no /etc/passwd boots
//! and runs commands as root in `/`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::json;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A data dir whose images/ links the shared cache's kernel, initramfs
/// and tiny tier, with its own images/oci/ (nothing is written into the
/// cache).
fn data_dir_with_own_oci() -> tempfile::TempDir {
    let tiny = testkit::images(image::Tier::Tiny);
    let cache = tiny
        .rootfs
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for d in ["kernel", "initramfs", "tiny"] {
        std::os::unix::fs::symlink(cache.join(d), images.join(d)).unwrap();
    }
    dir
}

/// Writes a docker-archive of the tiny tier's tree plus user `app`
/// (uid 1234, home /home/app, /srv/app its own) with `config` as the
/// image's run config.
fn make_archive(
    work: &Path,
    name: &str,
    config: serde_json::Value,
    with_passwd: bool,
) -> std::path::PathBuf {
    let tiny = testkit::images(image::Tier::Tiny);
    let root = work.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", root.display()))
        .arg(&tiny.rootfs));
    let _ = std::fs::remove_dir(root.join("lost+found"));
    let mut passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd.push_str("app:x:1234:1234:app:/home/app:/bin/sh\n");
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    let mut group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    group.push_str("app:x:1234:\n");
    std::fs::write(root.join("etc/group"), group).unwrap();
    for d in ["home/app", "srv/app"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::os::unix::fs::chown(root.join(d), Some(1234), Some(1234)).unwrap();
    }
    if !with_passwd {
        for f in ["etc/passwd", "etc/group", "etc/shadow"] {
            std::fs::remove_file(root.join(f)).unwrap();
        }
    }
    let staging = work.join(format!("{name}-archive"));
    std::fs::create_dir_all(staging.join("l0")).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(staging.join("l0/layer.tar"))
        .arg("."));
    let cfg = json!({
        "architecture": image::Arch::host_or_default().name(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    std::fs::write(staging.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        staging.join("manifest.json"),
        json!([{"Config": "config.json", "RepoTags": [format!("{name}:1")], "Layers": ["l0/layer.tar"]}])
            .to_string(),
    )
    .unwrap();
    let archive = work.join(format!("{name}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .arg("-cf")
        .arg(&archive)
        .args(["manifest.json", "config.json", "l0"]));
    archive
}

async fn exec(c: &Client, sandbox: &str, body: serde_json::Value) -> serde_json::Value {
    let (s, v) = c
        .json(
            Method::POST,
            &format!("/sandboxes/{sandbox}/exec"),
            Some(body),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    v
}

#[test]
fn a_sandbox_boots_from_an_oci_image_with_its_exec_defaults() {
    in_netns("oci-img", || async {
        let data = data_dir_with_own_oci();
        let work = tempfile::tempdir().unwrap();
        let layout = image::Layout::new(data.path());
        let oci = image::oci::OciImages::new(layout);
        let with = make_archive(
            work.path(),
            "withcfg",
            json!({
                "Env": ["GREETING=hello from oci", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"],
                "WorkingDir": "/srv/app",
                "User": "app",
                // Run at boot as the image's user, in its directory, with its env.
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo \"$(id -u) $(pwd) $GREETING\" > /tmp/cmd-proof; exec sleep 100000"],
            }),
            true,
        );
        image::oci::import_archive(&oci, &with, "app", Default::default()).unwrap();
        let bare = make_archive(work.path(), "bare", json!({}), false);
        image::oci::import_archive(&oci, &bare, "bare", Default::default()).unwrap();

        let d = TestDaemon::start(config(data.path(), "")).await;
        let c = d.client(&d.user("alice", 5));

        // An unknown image lists the ones there are.
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "x", "image": "nope"})),
            )
            .await;
        assert!((400..500).contains(&s), "{s} {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains("tiny") && msg.contains("app") && msg.contains("bare"),
            "{msg}"
        );

        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "o", "image": "app", "env": {"MINE": "spec"}})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let v = exec(
            &c,
            "o",
            json!({"cmd": ["sh", "-c", "id -u; id -g; pwd; echo \"$GREETING\"; echo \"$MINE\"; echo \"$HOME\"; touch here && ls -n here"]}),
        )
        .await;
        let out = v["stdout"].as_str().unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            &lines[..6],
            [
                "1234",
                "1234",
                "/srv/app",
                "hello from oci",
                "spec",
                "/home/app"
            ],
            "{out}"
        );
        assert!(
            lines[6].contains(" 1234 ") && lines[6].ends_with("here"),
            "{out}"
        );
        // The image's Entrypoint + Cmd ran at boot, as the image's user.
        let mut proof = String::new();
        for _ in 0..100 {
            let v = exec(
                &c,
                "o",
                json!({"cmd": ["sh", "-c", "cat /tmp/cmd-proof 2>/dev/null; true"]}),
            )
            .await;
            proof = v["stdout"].as_str().unwrap().to_owned();
            if !proof.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(proof, "1234 /srv/app hello from oci\n");
        // A request's own cwd and env still win.
        let v = exec(
            &c,
            "o",
            json!({"cmd": ["sh", "-c", "pwd; echo \"$GREETING\""], "cwd": "/tmp", "env": {"GREETING": "mine"}}),
        )
        .await;
        assert_eq!(v["stdout"], "/tmp\nmine\n");

        // An image that sets nothing: root, in `/`.
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "b", "image": "bare"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let v = exec(&c, "b", json!({"cmd": ["sh", "-c", "id -u; pwd"]})).await;
        assert_eq!(v["stdout"], "0\n/\n");

        // The tier is unchanged: uid 1000 in /workspace.
        let (s, v) = c
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "t", "image": "tiny"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let v = exec(&c, "t", json!({"cmd": ["sh", "-c", "id -u; pwd"]})).await;
        assert_eq!(v["stdout"], "1000\n/workspace\n");
        d.stop().await;
    });
}
