//! `bhatti image import|list|rm|pull` as an admin runs them: exit codes,
//! what they print, errors named. (Pulling from a real registry is
//! crates/image/tests/oci.rs; this is the command around it.)

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

fn bhatti(data: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("BHATTI_REGISTRY_PASSWORD")
        .env_remove("BHATTI_REGISTRY_TOKEN")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A one-layer `docker save` archive, made with the tar tool.
fn archive(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hello"), "hi\n").unwrap();
    let a = dir.join("a");
    std::fs::create_dir_all(a.join("l0")).unwrap();
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(a.join("l0/layer.tar"))
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let arch = image::Arch::host_or_default().name();
    std::fs::write(
        a.join("config.json"),
        format!(r#"{{"architecture":"{arch}","os":"linux","config":{{"WorkingDir":"/etc"}}}}"#),
    )
    .unwrap();
    std::fs::write(
        a.join("manifest.json"),
        r#"[{"Config":"config.json","RepoTags":["hello:1"],"Layers":["l0/layer.tar"]}]"#,
    )
    .unwrap();
    let out = dir.join("Hello.Image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&a)
        .arg("-cf")
        .arg(&out)
        .args(["manifest.json", "config.json", "l0"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    out
}

#[test]
fn import_list_remove_and_pull_errors() {
    if !testkit::is_root() {
        testkit::cannot_run("image CLI test needs root (ownership in the image)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = archive(dir.path());

    // Named after the file (up to its first '.', lowercased).
    let out = bhatti(&data, &["image", "import", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("imported 'hello'") && stdout.contains("rootfs"),
        "{stdout}"
    );
    let out = bhatti(
        &data,
        &["image", "import", a.to_str().unwrap(), "--name", "h2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = bhatti(&data, &["image", "list"]);
    assert!(out.status.success());
    let list = text(&out.stdout);
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(
        rows[0].starts_with("h2 ") && rows[0].contains(" oci "),
        "{list}"
    );
    assert!(
        rows[1].starts_with("hello ") && rows[1].contains("import:"),
        "{list}"
    );

    let out = bhatti(&data, &["image", "rm", "h2"]);
    assert!(out.status.success());
    let out = bhatti(&data, &["image", "rm", "h2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no OCI image 'h2'"));
    let out = bhatti(&data, &["image", "ls"]);
    assert_eq!(text(&out.stdout).lines().count(), 2);

    // Errors: a name, a file, a reference, an unreachable registry (port 1
    // on loopback: nothing listens), credentials without a password.
    for (args, want) in [
        (
            vec!["image", "import", a.to_str().unwrap(), "--name", "tiny"],
            "invalid image name 'tiny'",
        ),
        (
            vec!["image", "import", "/nonexistent.tar"],
            "cannot open /nonexistent.tar",
        ),
        (
            vec!["image", "pull", "Bad//ref"],
            "invalid image reference 'Bad//ref'",
        ),
        (
            vec!["image", "pull", "--insecure", "127.0.0.1:1/x/y:1"],
            "cannot reach registry 127.0.0.1:1",
        ),
        (
            vec!["image", "pull", "127.0.0.1:1/x/y", "--username", "me"],
            "needs a password",
        ),
    ] {
        let out = bhatti(&data, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `bhatti image …` without `--data-dir`: through a daemon (`bhatti
/// serve`, in a network namespace of the test's): import as a task with
/// progress lines, list, inspect, pull failures with the daemon's
/// message and a non-zero exit, share refused to a non-admin, delete.
#[test]
fn image_commands_through_the_daemon() {
    if !testkit::is_root() {
        testkit::cannot_run("image CLI test needs root (namespaces, TAPs)");
        return;
    }
    let _ns = testkit::Netns::enter("imgcli");
    let dir = tempfile::tempdir().unwrap();
    let data = testkit::data_dir_with_images(image::Tier::Tiny);
    let config = data.path().join("bhatti.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n\
             [publish]\nlisten = \"127.0.0.1:0\"\n",
            data.path().display()
        ),
    )
    .unwrap();
    let log = data.path().join("serve.log");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Kill(
        Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(data.path().join("serve.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut url = String::new();
    testkit::wait_until(
        "bhatti serve listens",
        std::time::Duration::from_secs(120),
        || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            match t.lines().find_map(|l| l.split("serving on ").nth(1)) {
                Some(u) => {
                    url = u.trim().to_string();
                    true
                }
                None => false,
            }
        },
    );
    let out = Command::new(BIN)
        .args(["user", "create", "--name", "t", "--quiet", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = text(&out.stdout).trim().to_string();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("HOME", dir.path())
            .env("BHATTI_URL", &url)
            .env("BHATTI_TOKEN", &key)
            .env_remove("BHATTI_REGISTRY_PASSWORD")
            .env_remove("BHATTI_REGISTRY_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let a = archive(dir.path());

    let out = run(&["image", "import", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("imported 'hello'"), "{out:?}");
    // Not a terminal: progress as lines.
    assert!(text(&out.stderr).contains("    unpacking"), "{out:?}");
    let out = run(&["image", "list"]);
    let list = text(&out.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("tiny ") && l.contains(" tier ")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("hello ") && l.contains(" oci ") && l.contains(" t ")),
        "{list}"
    );
    let out = run(&["image", "inspect", "hello"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("/etc"), "{}", text(&out.stdout));

    for (args, want) in [
        (
            vec!["image", "pull", "--insecure", "127.0.0.1:1/x/y:1"],
            // A user's pull may not reach the daemon's host.
            "registry 127.0.0.1:1 may not be pulled from",
        ),
        (vec!["image", "pull", "Bad//ref"], "invalid image reference"),
        (vec!["image", "share", "hello"], "admin"),
        (vec!["image", "inspect", "nope"], "unknown image 'nope'"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = run(&["image", "rm", "hello"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!run(&["image", "inspect", "hello"]).status.success());
}

/// `bhatti bench image` at a tiny scale: it makes its image, serves it
/// from a registry in a namespace of its own, pulls it both ways, checks
/// both ext4 images and ends with the ratio line (never checked against a
/// time).
#[test]
fn bench_image_runs_at_a_tiny_scale() {
    if !testkit::is_root() {
        testkit::cannot_run("bench image needs root (a network namespace, layer ownership)");
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["bench", "image", "--source", "generated", "--size-mb", "4"])
        .args(["--iterations", "2", "--layers", "2", "--settle-secs", "0"])
        .arg("--data-dir")
        .arg(empty.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ns_name = format!("bhbench-img-{}", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("e2fsck -fn: bhatti's rootfs.ext4 is clean"),
        "{stdout}"
    );
    assert!(
        stdout.contains("e2fsck -fn: the tools' rootfs.ext4 is clean"),
        "{stdout}"
    );
    assert!(stdout.contains("2 gzip layers"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let ratio: f64 = last
        .strip_prefix("image_pull_vs_tools_ratio=")
        .unwrap_or_else(|| panic!("last line: {last}"))
        .parse()
        .unwrap();
    assert!(ratio > 0.0 && ratio.is_finite(), "{last}");
    // The inode counts of both images: the same tree (bhatti adds the five
    // mount points lohar needs when the image has none).
    let line = stdout
        .lines()
        .find(|l| l.starts_with("inodes used:"))
        .unwrap();
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        nums.len() == 2 && nums[0] >= nums[1] && nums[0] <= nums[1] + 5,
        "{line}"
    );
    // Nothing left behind: its namespace is gone.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!text(&ns.stdout).contains(&ns_name), "{}", text(&ns.stdout));
}
