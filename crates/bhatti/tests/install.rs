//! The installer for real (docs/install.md): `scripts/release.sh` builds two
//! bundles (versions 1 and 2) from this build's bhatti, the static lohar
//! and the cached test images; a loopback HTTP server serves them inside a
//! network namespace of the test; `scripts/install.sh --server` installs
//! version 1 into a fresh root-owned layout (`--root`), the daemon answers
//! and a sandbox is used; installing version 2 over it keeps the sandbox
//! (cold, then woken with its file and its process); `scripts/uninstall.sh
//! --purge` leaves no file, unit, firewall rule, bridge, process, cgroup or
//! user. Also: a wrong checksum is refused before anything is installed, a
//! CLI-only install from a local file, and `systemd-analyze verify` on the
//! installed unit. Needs root, python3, curl, systemd-analyze and QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use image::Tier;
use testkit::{wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
const V1: &str = "0.0.1-it1";
const V2: &str = "0.0.2-it2";
const LISTEN: &str = "127.0.0.1:18700";
/// A background process in the guest; prints its pid.
const SLEEPER: &str =
    "setsid sh -c 'while true; do sleep 1; done' </dev/null >/dev/null 2>&1 & echo $!";

fn script(name: &str) -> PathBuf {
    testkit::workspace_root().join("scripts").join(name)
}

fn show(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn bash(script: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

fn bash_ok(script: &Path, args: &[&str]) -> String {
    let out = bash(script, args);
    assert!(
        out.status.success(),
        "{} {}: {}",
        script.display(),
        args.join(" "),
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn missing_tool() -> Option<&'static str> {
    [
        "python3",
        "curl",
        "systemd-analyze",
        "qemu-system-x86_64",
        "iptables",
        "nft",
        "useradd",
    ]
    .into_iter()
    .find(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `python3 -m http.server` on 127.0.0.1 (in the test's namespace).
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path, log: &Path) -> HttpServer {
        let child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let mut port = 0;
        wait_until(
            "the HTTP server says its port",
            Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                match text
                    .split(" port ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|p| p.parse().ok())
                {
                    Some(p) => {
                        port = p;
                        true
                    }
                    None => false,
                }
            },
        );
        HttpServer { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uninstalls (with `--purge`) whatever is still installed under `root`
/// when the test ends, failed or not, and removes the VMM user.
struct Cleanup {
    root: PathBuf,
    user: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let root = self.root.to_str().unwrap();
        if self
            .root
            .join("usr/local/lib/bhatti/install-state")
            .exists()
        {
            let out = bash(
                &script("uninstall.sh"),
                &["--root", root, "--purge", "--yes"],
            );
            if !out.status.success() {
                eprintln!("cleanup: uninstall.sh failed: {}", show(&out));
            }
        }
        let _ = Command::new("userdel").arg(&self.user).output();
    }
}

struct Cli {
    bin: PathBuf,
    home: PathBuf,
    key: String,
}

impl Cli {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(&self.bin)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env("BHATTI_URL", format!("http://{LISTEN}"))
            .env("BHATTI_TOKEN", &self.key)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "bhatti {}: {}",
            args.join(" "),
            show(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn inspect(&self, name: &str) -> api_types::Sandbox {
        serde_json::from_str(&self.ok(&["inspect", name, "--json"])).unwrap()
    }
}

/// Every file or link left under `dir` (directories aside).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => found.extend(files_under(&p)),
            _ => found.push(p),
        }
    }
    found
}

fn processes_naming(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(text) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

#[test]
fn release_install_upgrade_and_uninstall() {
    if !testkit::is_root() {
        testkit::cannot_run("the installer test needs root (users, firewall, VMs)");
        return;
    }
    if let Some(tool) = missing_tool() {
        testkit::cannot_run(&format!("the installer test needs {tool}"));
        return;
    }
    testkit::images(Tier::Tiny);
    // Durations of the phases, printed (never asserted on).
    let mut clock = std::time::Instant::now();
    let mut phase = |what: &str| {
        println!("phase {what}: {:.1} s", clock.elapsed().as_secs_f64());
        clock = std::time::Instant::now();
    };
    let images = testkit::image_cache().join("images");
    let lohar = testkit::static_lohar();
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");

    // Two bundles of this build, told apart by their version.
    for v in [V1, V2] {
        let out = Command::new("bash")
            .arg(script("release.sh"))
            .args(["--version", v, "--tiers", "tiny", "--out"])
            .arg(&dist)
            .arg("--images")
            .arg(&images)
            .args(["--bhatti", BIN, "--lohar"])
            .arg(&lohar)
            .env("BHATTI_RELEASE_GZIP", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "release.sh {v}: {}", show(&out));
        let name = format!("bhatti-{v}-linux-x86_64.tar.gz");
        assert!(dist.join(&name).is_file(), "no {name}: {}", show(&out));
        let sum = std::fs::read_to_string(dist.join(format!("{name}.sha256"))).unwrap();
        assert!(
            sum.ends_with(&format!("  {name}\n")),
            "checksum file: {sum}"
        );
    }
    let listing = testkit::run(
        "tar",
        &[
            "-tzf",
            dist.join(format!("bhatti-{V1}-linux-x86_64.tar.gz"))
                .to_str()
                .unwrap(),
        ],
    );
    for f in [
        "bin/bhatti",
        "bin/lohar",
        "images/kernel/vmlinux",
        "images/initramfs/initramfs.cpio",
        "images/tiny/rootfs.ext4",
        "share/bhatti.service",
        "share/config.toml",
        "install.sh",
        "uninstall.sh",
        "manifest.json",
        "SHA256SUMS",
    ] {
        let path = format!("bhatti-{V1}-linux-x86_64/{f}");
        assert!(
            listing.lines().any(|l| l == path),
            "{path} not in the bundle:\n{listing}"
        );
    }

    phase("release.sh x2");
    // Everything from here on lives in the test's namespace: the HTTP
    // server, the daemon, its bridges and firewall rules.
    let _netns = Netns::enter("install");
    let http = HttpServer::start(&dist, &tmp.path().join("http.log"));
    let url = |v: &str| {
        format!(
            "http://127.0.0.1:{}/bhatti-{v}-linux-x86_64.tar.gz",
            http.port
        )
    };
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let root_s = root.to_str().unwrap().to_owned();
    let user = format!("bhatti-it{}", std::process::id());
    let _cleanup = Cleanup {
        root: root.clone(),
        user: user.clone(),
    };
    let server_args = |v: &str| -> Vec<String> {
        [
            url(v).as_str(),
            "--server",
            "--yes",
            "--root",
            &root_s,
            "--listen",
            LISTEN,
            "--public-listen",
            "127.0.0.1:18701",
            "--vmm-user",
            &user,
            "--cgroup-parent",
            &user,
            "--admin-user",
            "ops",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // A wrong checksum is refused before anything is installed.
    let mut bad = server_args(V1);
    bad.extend(["--sha256".to_string(), "0".repeat(64)]);
    let out = bash(&script("install.sh"), &as_str(&bad));
    assert!(
        !out.status.success(),
        "a wrong checksum was accepted: {}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        show(&out)
    );
    assert!(
        files_under(&root).is_empty(),
        "left behind: {:?}",
        files_under(&root)
    );

    // Version 1.
    let text = bash_ok(&script("install.sh"), &as_str(&server_args(V1)));
    assert!(
        text.contains("the daemon answers on http://127.0.0.1:18700"),
        "{text}"
    );
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("admin key for ops (shown once): "))
        .unwrap_or_else(|| panic!("no admin key printed: {text}"))
        .trim()
        .to_string();
    let lib = root.join("usr/local/lib/bhatti");
    let data = root.join("var/lib/bhatti");
    let unit = root.join("etc/systemd/system/bhatti.service");
    let conf = root.join("etc/bhatti/config.toml");
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/bhatti")).unwrap(),
        lib.join("bhatti")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&data), 0o700, "data dir mode");
    assert_eq!(mode(&conf), 0o640, "config mode");
    let state = std::fs::read_to_string(lib.join("install-state")).unwrap();
    assert!(state.contains(&format!("version={V1}\n")), "{state}");
    assert!(state.contains(&format!("created_user={user}\n")), "{state}");
    testkit::run("getent", &["passwd", &user]);
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text.contains(&format!(
            "ExecStart={} serve --config {}",
            lib.join("bhatti").display(),
            conf.display()
        )),
        "{unit_text}"
    );
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=process",
        "Restart=on-failure",
    ] {
        assert!(
            unit_text.contains(line),
            "no {line} in the unit:\n{unit_text}"
        );
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        show(&verify)
    );

    let status = bash_ok(&lib.join("install.sh"), &["status", "--root", &root_s]);
    assert!(status.starts_with("running (pid "), "{status}");

    let cli = Cli {
        bin: root.join("usr/local/bin/bhatti"),
        home: tmp.path().join("home"),
        key,
    };
    std::fs::create_dir(&cli.home).unwrap();
    assert!(cli.ok(&["version"]).contains("server: bhatti"));
    cli.ok(&["create", "--name", "keep", "--image", "tiny"]);
    assert_eq!(
        cli.ok(&["exec", "keep", "--", "echo", "hello"]).trim(),
        "hello"
    );
    let out = cli.run(
        &["file", "write", "keep", "/workspace/note.txt"],
        Some("kept across upgrades\n"),
    );
    assert!(out.status.success(), "file write: {}", show(&out));
    let pid = cli
        .ok(&["exec", "keep", "--", "sh", "-c", SLEEPER])
        .trim()
        .to_string();
    assert!(pid.parse::<u32>().is_ok(), "background pid: {pid}");
    // SIGHUP (ExecReload) re-checks the config and leaves the daemon
    // running: unchanged, an unknown key (named), a changed value.
    let daemon_pid = std::fs::read_to_string(root.join("run/bhatti/bhatti.pid")).unwrap();
    let original = std::fs::read_to_string(&conf).unwrap();
    let log = root.join("var/log/bhatti/bhatti.log");
    for (config, says) in [
        (original.clone(), "is valid and unchanged".to_string()),
        (
            format!("bogus_key = 1\n{original}"),
            "unknown field `bogus_key`".to_string(),
        ),
        (
            format!("{original}\n[thermal]\nwarm_after_secs = 31\n"),
            "is valid and changed; restart to apply it".to_string(),
        ),
    ] {
        std::fs::write(&conf, &config).unwrap();
        testkit::run("kill", &["-HUP", daemon_pid.trim()]);
        wait_until(
            &format!("the daemon logs '{says}' after SIGHUP"),
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with("reload: ") && l.contains(&says))
            },
        );
        assert!(cli.ok(&["version"]).contains("server: bhatti"));
    }
    std::fs::write(&conf, &original).unwrap();

    phase("install v1 + sandbox use");
    // Version 2 over it: the daemon stops (the sandbox goes cold), the
    // files are replaced, the daemon starts and adopts the sandbox.
    let text = bash_ok(&script("install.sh"), &as_str(&server_args(V2)));
    assert!(
        text.contains(&format!("upgrading bhatti {V1} -> {V2}")),
        "{text}"
    );
    assert!(text.contains("config: keeping"), "{text}");
    assert!(text.contains("user ops exists"), "{text}");
    let state = std::fs::read_to_string(lib.join("install-state")).unwrap();
    assert!(state.contains(&format!("version={V2}\n")), "{state}");
    assert!(std::fs::read_to_string(lib.join("manifest.json"))
        .unwrap()
        .contains(V2));
    assert_eq!(
        cli.inspect("keep").thermal,
        "cold",
        "after the upgrade, before any use"
    );
    assert_eq!(
        cli.ok(&["exec", "keep", "--", "cat", "/workspace/note.txt"]),
        "kept across upgrades\n"
    );
    cli.ok(&["exec", "keep", "--", "kill", "-0", &pid]);
    assert_eq!(cli.inspect("keep").thermal, "hot");

    phase("upgrade to v2 + wake");
    // Uninstall without --purge: the data and (asked) the config stay,
    // nothing else; an install over them starts from where they were.
    bash_ok(
        &script("uninstall.sh"),
        &["--root", &root_s, "--keep-config", "--yes"],
    );
    let mut left = files_under(&root);
    left.retain(|p| !p.starts_with(&data) && p != &conf);
    assert!(left.is_empty(), "left besides data and config: {left:?}");
    assert!(data.join("bhatti.db").is_file(), "the database went");
    assert!(conf.is_file(), "the config went");
    assert!(
        processes_naming(&root_s).is_empty(),
        "{:?}",
        processes_naming(&root_s)
    );
    let mut again = server_args(V2);
    again.push("--no-start".into());
    let text = bash_ok(&script("install.sh"), &as_str(&again));
    assert!(
        text.contains(&format!("installing bhatti {V2} (server)")),
        "{text}"
    );
    assert!(text.contains("config: keeping"), "{text}");
    assert!(text.contains("not started (--no-start)"), "{text}");

    phase("uninstall --keep-config + reinstall --no-start");
    // Uninstall, data included.
    let text = bash_ok(
        &script("uninstall.sh"),
        &["--root", &root_s, "--purge", "--yes"],
    );
    assert!(text.contains("done"), "{text}");
    let left = files_under(&root);
    assert!(left.is_empty(), "files left under the root: {left:?}");
    assert!(!data.exists());
    for table in ["filter", "nat"] {
        let rules = testkit::run("iptables", &["-t", table, "-S"]);
        assert!(!rules.contains("BHATTI"), "iptables -t {table}:\n{rules}");
    }
    let tables = testkit::run("nft", &["list", "tables"]);
    assert!(!tables.contains("bhatti"), "nft tables:\n{tables}");
    let links = testkit::run("ip", &["-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "links other than lo:\n{links}");
    let procs = processes_naming(&root_s);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let passwd = Command::new("getent")
        .args(["passwd", &user])
        .output()
        .unwrap();
    assert!(!passwd.status.success(), "user {user} is still there");
    assert!(
        !Path::new("/sys/fs/cgroup").join(&user).exists(),
        "cgroup left"
    );

    phase("uninstall --purge");
    // The CLI only, from a local file.
    let cli_root = tmp.path().join("cli-root");
    std::fs::create_dir(&cli_root).unwrap();
    let file = dist.join(format!("bhatti-{V2}-linux-x86_64.tar.gz"));
    let text = bash_ok(
        &script("install.sh"),
        &[
            file.to_str().unwrap(),
            "--yes",
            "--root",
            cli_root.to_str().unwrap(),
        ],
    );
    assert!(
        text.contains(&format!("installing bhatti {V2} (cli)")),
        "{text}"
    );
    let out = Command::new(cli_root.join("usr/local/bin/bhatti"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        !cli_root.join("etc/bhatti").exists(),
        "a CLI install wrote a config"
    );
    assert!(
        !cli_root.join("var/lib/bhatti").exists(),
        "a CLI install made a data dir"
    );
    bash_ok(
        &script("uninstall.sh"),
        &["--root", cli_root.to_str().unwrap(), "--yes"],
    );
    let left = files_under(&cli_root);
    assert!(
        left.is_empty(),
        "files left after the CLI uninstall: {left:?}"
    );
    phase("cli-only install + uninstall");
}
