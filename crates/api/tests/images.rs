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
    // skopeo checks the layers against the config's diff_ids.
    let diff_id = {
        use sha2::Digest;
        let bytes = std::fs::read(staging.join("l0/layer.tar")).unwrap();
        format!("sha256:{:x}", sha2::Sha256::digest(&bytes))
    };
    let cfg = json!({
        "architecture": image::Arch::host_or_default().name(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
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

/// Kills a child process when dropped.
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const REGISTRY: &str = "127.0.0.1:5000";

/// Debian's docker-registry on 127.0.0.1:5000 in the test's namespace
/// (the caller's thread is in it), storing under `dir`; once it answers.
fn start_registry(dir: &Path) -> Killed {
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
            dir.join("regdata").display()
        ),
    )
    .unwrap();
    let child = Killed(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{REGISTRY}/v2/"))
            .output()
            .unwrap();
        if out.stdout == b"200" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "docker-registry did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}

/// Polls a task of `c`'s to its end (the deadline only stops a hang).
async fn wait_task(c: &Client, task: &serde_json::Value) -> serde_json::Value {
    let id = task["id"].as_str().expect("a task id");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let (s, v) = c.json(Method::GET, &format!("/tasks/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        if v["state"] != "running" {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "task {id} never ended: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn post_task(c: &Client, path: &str, body: serde_json::Value) -> serde_json::Value {
    let (s, t) = c.json(Method::POST, path, Some(body)).await;
    assert_eq!(s, 202, "{path}: {t}");
    wait_task(c, &t).await
}

async fn import_api(c: &Client, name: &str, file: &Path) -> serde_json::Value {
    let resp = c
        .req(Method::POST, &format!("/images/import?name={name}"))
        .header("content-type", "application/x-tar")
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let t: serde_json::Value = resp.json().await.unwrap();
    wait_task(c, &t).await
}

async fn create(c: &Client, name: &str, image: &str) {
    let (s, v) = c
        .json(
            Method::POST,
            "/sandboxes",
            Some(json!({"name": name, "image": image})),
        )
        .await;
    assert_eq!(s, 201, "create {name} from {image}: {v}");
    assert_eq!(v["image"], image, "{v}");
}

/// The images API on real VMs, one daemon for every case: a pull from a
/// registry in the test's namespace (an image made here with ENV, WORKDIR
/// and USER, pushed by skopeo), booted with the image's env, cwd and
/// user; a second pull served from the blob cache (both times printed);
/// a missing tag and repository 404; docker-archive and OCI-layout
/// imports through the API, both booted; `save` of a sandbox, a new
/// sandbox from it has the file written before and the exec defaults;
/// another user 404 until an admin shares it; delete in use 409.
#[test]
fn images_api_pull_import_save_share_on_real_vms() {
    for tool in ["docker-registry", "skopeo", "curl"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .unwrap()
            .success()
        {
            testkit::cannot_run(&format!("the images API test needs {tool}"));
            return;
        }
    }
    in_netns("img-api", || async {
        let data = data_dir_with_own_oci();
        let work = tempfile::tempdir().unwrap();
        let _registry = start_registry(work.path());
        let archive = make_archive(
            work.path(),
            "withcfg",
            json!({
                "Env": ["GREETING=hello from oci", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"],
                "WorkingDir": "/srv/app",
                "User": "app",
            }),
            true,
        );
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(format!("docker://{REGISTRY}/team/app:1")));
        // The same image as an OCI layout, in a tar.
        let layout = work.path().join("layout");
        run(Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(format!("oci:{}:1", layout.display())));
        let layout_tar = work.path().join("layout.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&layout_tar)
            .arg("."));

        // The registry is on this namespace's loopback, which users' pulls
        // may not reach unless allowed.
        let mut cfg = config(
            data.path(),
            "[limits]\ncreates_per_min = 1000\n[network]\nallow_cidrs = [\"127.0.0.1\"]\n",
        );
        cfg.admins = vec!["root".into()];
        let d = TestDaemon::start(cfg).await;
        let alice = d.client(&d.user("alice", 10));
        let bob = d.client(&d.user("bob", 5));
        let root = d.client(&d.user("root", 5));

        // Pull, then pull again: the second is served from the cache.
        let started = std::time::Instant::now();
        let first = post_task(
            &alice,
            "/images/pull",
            json!({"ref": format!("{REGISTRY}/team/app:1"), "insecure": true, "name": "app"}),
        )
        .await;
        let t1 = started.elapsed();
        assert_eq!(first["state"], "succeeded", "{first}");
        let started = std::time::Instant::now();
        let second = post_task(
            &alice,
            "/images/pull",
            json!({"ref": format!("{REGISTRY}/team/app:1"), "insecure": true, "name": "app2"}),
        )
        .await;
        let t2 = started.elapsed();
        assert_eq!(second["state"], "succeeded", "{second}");
        println!(
            "pull through the API: first {:.2}s ({} bytes, {} from the cache), second {:.2}s ({} bytes, {} from the cache)",
            t1.as_secs_f64(),
            first["progress"]["bytes_done"],
            first["progress"]["bytes_cached"],
            t2.as_secs_f64(),
            second["progress"]["bytes_done"],
            second["progress"]["bytes_cached"],
        );
        assert!(
            first["progress"]["bytes_cached"].as_u64() < first["progress"]["bytes_done"].as_u64(),
            "{first}"
        );
        assert_eq!(
            second["progress"]["bytes_cached"], second["progress"]["bytes_done"],
            "{second}"
        );
        // The total is the manifest's, and a finished pull did all of it.
        for t in [&first, &second] {
            assert_eq!(
                t["progress"]["bytes_total"], t["progress"]["bytes_done"],
                "{t}"
            );
        }
        let img = &first["result"];
        assert_eq!(img["source"], format!("{REGISTRY}/team/app:1"), "{img}");
        assert_eq!(img["config"]["working_dir"], "/srv/app", "{img}");
        assert_eq!(img["config"]["user"], "app", "{img}");
        // A missing tag, a missing repository: 404 as the task's status.
        for r in ["team/app:nope", "team/none:1"] {
            let t = post_task(
                &alice,
                "/images/pull",
                json!({"ref": format!("{REGISTRY}/{r}"), "insecure": true, "name": "missing"}),
            )
            .await;
            assert_eq!(t["state"], "failed", "{t}");
            assert_eq!(t["failure"]["status"], 404, "{r}: {t}");
        }

        // A layer bigger than what is left of the user's disk quota (1 MiB
        // here; the layer is about 1 MiB and the config comes first): 413.
        let small = d.client(&d.user_with(
            "small",
            api::users::Quotas {
                max_sandboxes: 1,
                max_cpus: 1,
                max_memory_mb: 256,
                max_disk_mb: 1,
            },
        ));
        let t = post_task(
            &small,
            "/images/pull",
            json!({"ref": format!("{REGISTRY}/team/app:1"), "insecure": true}),
        )
        .await;
        assert_eq!(t["state"], "failed", "{t}");
        assert_eq!(t["failure"]["status"], 413, "{t}");
        assert!(
            t["failure"]["error"]
                .as_str()
                .unwrap()
                .contains("too large"),
            "{t}"
        );
        let (_, v) = small.json(Method::GET, "/images", None).await;
        assert_eq!(v.as_array().unwrap().len(), 1, "only the tier: {v}");

        // The pulled image boots with its env, cwd and user.
        create(&alice, "p", "app").await;
        let v = exec(
            &alice,
            "p",
            json!({"cmd": ["sh", "-c", "id -u; pwd; echo \"$GREETING\"; echo saved-before > /srv/app/note"]}),
        )
        .await;
        assert_eq!(v["stdout"], "1234\n/srv/app\nhello from oci\n", "{v}");
        let (s, v) = alice.json(Method::DELETE, "/images/app", None).await;
        assert_eq!(s, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("sandbox 'p'"), "{v}");

        // Imports through the API: docker-archive and OCI layout, booted.
        for (name, file) in [("dock", &archive), ("ocil", &layout_tar)] {
            let t = import_api(&alice, name, file).await;
            assert_eq!(t["state"], "succeeded", "{name}: {t}");
            create(&alice, name, name).await;
            let v = exec(&alice, name, json!({"cmd": ["sh", "-c", "id -un; pwd"]})).await;
            assert_eq!(v["stdout"], "app\n/srv/app\n", "{name}: {v}");
            let (s, v) = alice
                .json(Method::DELETE, &format!("/sandboxes/{name}"), None)
                .await;
            assert!(s == 200 || s == 204, "{v}");
        }

        // Save: a new sandbox from the saved image has the file and the
        // image's exec defaults.
        let t = post_task(&alice, "/sandboxes/p/save", json!({"name": "snap"})).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["result"]["source"], "save:p", "{t}");
        assert_eq!(t["result"]["config"]["user"], "app", "{t}");
        // p keeps running.
        let v = exec(&alice, "p", json!({"cmd": ["cat", "/srv/app/note"]})).await;
        assert_eq!(v["stdout"], "saved-before\n");
        create(&alice, "s", "snap").await;
        let v = exec(
            &alice,
            "s",
            json!({"cmd": ["sh", "-c", "cat note; id -u; echo \"$GREETING\""]}),
        )
        .await;
        assert_eq!(v["stdout"], "saved-before\n1234\nhello from oci\n", "{v}");

        // Bob: 404 until an admin shares it.
        let (s, v) = bob
            .json(
                Method::POST,
                "/sandboxes",
                Some(json!({"name": "b", "image": "snap"})),
            )
            .await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = root
            .json(Method::POST, "/images/snap/share?owner=alice", None)
            .await;
        assert_eq!(s, 200, "{v}");
        create(&bob, "b", "snap").await;
        let v = exec(&bob, "b", json!({"cmd": ["cat", "/srv/app/note"]})).await;
        assert_eq!(v["stdout"], "saved-before\n");
        d.stop().await;
    });
}
