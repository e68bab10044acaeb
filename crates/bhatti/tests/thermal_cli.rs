//! Thermal tiers through the real binaries: `bhatti stop|start|edit`
//! against `bhatti serve`, and the daemon killed with SIGKILL while one
//! sandbox is cold, one warm and one hot, then started again on the same
//! data directory (every sandbox keeps its processes), then a graceful
//! restart. Needs root, the cached test images and the static lohar.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use api_types::Sandbox;
use image::Tier;
use testkit::{wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
const BOOT: Duration = Duration::from_secs(120);

/// Starts `bhatti serve` with `config`; returns it and its URL.
fn serve(data: &Path, config: &Path, n: u32) -> (Child, String) {
    let log = data.join(format!("serve{n}.log"));
    let err = data.join(format!("serve{n}.err"));
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawning bhatti serve");
    let mut url = String::new();
    wait_until("bhatti serve says where it listens", BOOT, || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "bhatti serve exited ({st}): {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match text.lines().find_map(|l| l.split("serving on ").nth(1)) {
            Some(u) => {
                url = u.trim().to_string();
                true
            }
            None => false,
        }
    });
    (child, url)
}

struct Cli {
    home: tempfile::TempDir,
    url: String,
    key: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env("BHATTI_URL", &self.url)
            .env("BHATTI_TOKEN", &self.key)
            .stdin(Stdio::null())
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bhatti {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn inspect(&self, name: &str) -> Sandbox {
        serde_json::from_str(&self.ok(&["inspect", name, "--json"])).unwrap()
    }

    fn sh(&self, name: &str, script: &str) -> String {
        self.ok(&["exec", name, "--", "sh", "-c", script])
            .trim()
            .to_string()
    }
}

const COUNTER: &str = "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 & echo $!";

#[test]
fn stop_start_edit_and_a_killed_daemon_with_cold_and_warm_sandboxes() {
    assert!(testkit::is_root(), "the CLI suite needs root");
    let _ns = Netns::enter("cli-thermal");
    let data = testkit::data_dir_with_images(Tier::Tiny);
    let config = data.path().join("bhatti.toml");
    // Warm after 1 s idle; cold only when asked (or at shutdown).
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [thermal]\nwarm_after_secs = 1\ncold_after_secs = 3600\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n",
            data.path().display()
        ),
    )
    .unwrap();
    let (mut daemon, url) = serve(data.path(), &config, 1);
    let out = Command::new(BIN)
        .args(["user", "create", "--name", "t", "--quiet", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "user create: {out:?}");
    let mut cli = Cli {
        home: tempfile::tempdir().unwrap(),
        url,
        key: String::from_utf8(out.stdout).unwrap().trim().to_string(),
    };

    cli.ok(&["create", "--name", "frozen"]);
    cli.ok(&["create", "--name", "dozing"]);
    cli.ok(&["create", "--name", "pinned", "--keep-hot"]);
    let frozen_pid = cli.sh("frozen", COUNTER);
    let dozing_pid = cli.sh("dozing", COUNTER);
    cli.sh("dozing", "echo on-disk > /workspace/f");
    cli.sh("frozen", "echo on-disk > /workspace/f");

    // stop / start / stop again, through the CLI.
    let out = cli.run(&["stop", "frozen"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("frozen is cold"));
    assert_eq!(cli.inspect("frozen").thermal, "cold");
    let out = cli.run(&["start", "frozen", "--force"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("frozen is hot"),
        "{out:?}"
    );
    cli.ok(&["stop", "frozen"]);
    // edit --keep-hot.
    assert!(cli.inspect("pinned").keep_hot);
    let edited: Sandbox =
        serde_json::from_str(&cli.ok(&["edit", "pinned", "--keep-hot", "false", "--json"]))
            .unwrap();
    assert!(!edited.keep_hot);
    cli.ok(&["edit", "pinned", "--keep-hot", "true"]);
    // dozing goes warm by itself; list never wakes anything.
    wait_until("dozing is warm", Duration::from_secs(30), || {
        cli.inspect("dozing").thermal == "warm"
    });
    let list = cli.ok(&["list", "--json"]);
    let list: Vec<Sandbox> = serde_json::from_str(&list).unwrap();
    let by = |n: &str| list.iter().find(|s| s.name == n).unwrap().thermal;
    assert_eq!(
        (by("frozen"), by("dozing"), by("pinned")),
        (
            api_types::Thermal::Cold,
            api_types::Thermal::Warm,
            api_types::Thermal::Hot
        )
    );

    // SIGKILL: no shutdown at all.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let (mut daemon, url) = serve(data.path(), &config, 2);
    cli.url = url;
    let list: Vec<Sandbox> = serde_json::from_str(&cli.ok(&["list", "--json"])).unwrap();
    assert_eq!(list.len(), 3);
    // The cold one comes back cold and wakes with its processes.
    assert_eq!(cli.inspect("frozen").thermal, "cold");
    let alive = format!("kill -0 {frozen_pid} && cat /tmp/count");
    let n: u64 = cli.sh("frozen", &alive).parse().unwrap();
    assert!(n > 0);
    assert_eq!(cli.sh("frozen", "cat /workspace/f"), "on-disk");
    // The warm and the hot one: their VMMs outlived the daemon; recovery
    // snapshotted them, so they too are cold and wake with their processes.
    assert_eq!(cli.inspect("dozing").thermal, "cold");
    assert_eq!(cli.inspect("pinned").thermal, "cold");
    let dozing_alive = format!("kill -0 {dozing_pid} && cat /tmp/count");
    let d: u64 = cli.sh("dozing", &dozing_alive).parse().unwrap();
    assert!(d > 0);
    assert_eq!(cli.sh("dozing", "cat /workspace/f"), "on-disk");
    assert_eq!(cli.sh("pinned", "echo ok"), "ok");

    // A graceful stop takes all three to cold; the next daemon wakes them.
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the daemon stops", Duration::from_secs(60), || {
        daemon.try_wait().unwrap().is_some()
    });
    let (mut daemon, url) = serve(data.path(), &config, 3);
    cli.url = url;
    for name in ["frozen", "dozing", "pinned"] {
        assert_eq!(cli.inspect(name).thermal, "cold", "{name}");
    }
    let m: u64 = cli.sh("frozen", &alive).parse().unwrap();
    assert!(m >= n, "counter {n} -> {m}");
    let e: u64 = cli.sh("dozing", &dozing_alive).parse().unwrap();
    assert!(e >= d, "counter {d} -> {e}");
    for name in ["frozen", "dozing", "pinned"] {
        cli.ok(&["destroy", name]);
    }
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the daemon stops", Duration::from_secs(60), || {
        daemon.try_wait().unwrap().is_some()
    });
}
