//! `bhatti config check` and how `bhatti serve` finds its config file:
//! the real binary, no VMs (nothing here needs root).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use testkit::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

/// `bhatti <args>` with `BHATTI_CONFIG` set to `env` (or removed) on the
/// child only.
fn bhatti(args: &[&str], env: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn");
    match env {
        Some(p) => cmd.env("BHATTI_CONFIG", p),
        None => cmd.env_remove("BHATTI_CONFIG"),
    };
    cmd.output().expect("running bhatti")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn check_prints_the_effective_config_of_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "good.toml",
        "listen = \"127.0.0.1:9911\"\n[thermal]\nwarm_after_secs = 7\n[network]\nallow_cidrs = [\"192.0.2.0/24\"]\n",
    );
    let out = bhatti(&["config", "check", "--config", f.to_str().unwrap()], None);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("good.toml (--config)"), "{stdout}");
    assert!(stdout.contains("warm_after_secs = 7"), "{stdout}");
    // Defaults not in the file are filled in.
    assert!(stdout.contains("cold_after_secs = 1800"), "{stdout}");
    assert!(stdout.contains("[confinement]"), "{stdout}");
    // The output is itself a valid config, equal to the file's.
    let printed = api::DaemonConfig::parse(&stdout).expect("the output parses");
    let mut want = api::DaemonConfig {
        listen: "127.0.0.1:9911".parse().unwrap(),
        ..Default::default()
    };
    want.thermal.warm_after_secs = 7;
    want.network.allow_cidrs = vec!["192.0.2.0/24".into()];
    assert_eq!(printed, want);
}

#[test]
fn check_refuses_an_unknown_key_naming_it_and_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "typo.toml",
        "[limits]\nexecs_per_min = 5\nexec_per_minute = 3\n",
    );
    let out = bhatti(&["config", "check", "--config", f.to_str().unwrap()], None);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("limits.exec_per_minute"), "{stderr}");
    assert!(stderr.contains("typo.toml"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing printed for a bad file");
    // An invalid value is an error naming its key.
    let f = write(
        dir.path(),
        "cidr.toml",
        "[network]\ndeny_cidrs = [\"10.0.0.0/33\"]\n",
    );
    let out = bhatti(&["config", "check", "--config", f.to_str().unwrap()], None);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("network.deny_cidrs"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_fails_on_a_missing_explicit_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let out = bhatti(
        &["config", "check", "--config", missing.to_str().unwrap()],
        None,
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(missing.to_str().unwrap()) && stderr.contains("--config"),
        "{stderr}"
    );
    let out = bhatti(&["config", "check"], Some(&missing));
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(missing.to_str().unwrap()) && stderr.contains("BHATTI_CONFIG"),
        "{stderr}"
    );
}

#[test]
fn flag_beats_bhatti_config_which_beats_the_default_path() {
    let dir = tempfile::tempdir().unwrap();
    let flag = write(dir.path(), "flag.toml", "[thermal]\nwarm_after_secs = 11\n");
    let env = write(dir.path(), "env.toml", "[thermal]\nwarm_after_secs = 22\n");
    let out = bhatti(&["config", "check"], Some(&env));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("warm_after_secs = 22") && stdout.contains("env.toml (BHATTI_CONFIG)"),
        "{stdout}"
    );
    let out = bhatti(
        &["config", "check", "--config", flag.to_str().unwrap()],
        Some(&env),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("warm_after_secs = 11") && stdout.contains("flag.toml (--config)"),
        "{stdout}"
    );
    // Neither: the default path, or the built-in defaults when it does
    // not exist (this test does not touch /etc; it checks whichever holds).
    let out = bhatti(&["config", "check"], None);
    let stdout = text(&out.stdout);
    let default = Path::new("/etc/bhatti/config.toml");
    if default.exists() {
        assert!(
            stdout.contains("/etc/bhatti/config.toml (default path)"),
            "{out:?}"
        );
    } else {
        assert!(out.status.success(), "{out:?}");
        assert!(
            stdout.contains("built-in defaults (/etc/bhatti/config.toml does not exist)"),
            "{stdout}"
        );
        assert!(stdout.contains("warm_after_secs = 30"), "{stdout}");
    }
}

/// `bhatti serve` with `args` and `env` must exit non-zero by itself,
/// and say `needles` on stderr.
fn serve_fails(args: &[&str], env: Option<&Path>, needles: &[&str]) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match env {
        Some(p) => cmd.env("BHATTI_CONFIG", p),
        None => cmd.env_remove("BHATTI_CONFIG"),
    };
    let mut child = cmd.spawn().expect("spawning bhatti serve");
    let mut status = None;
    wait_until("bhatti serve exits", Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert!(!status.unwrap().success(), "{out:?}");
    let stderr = text(&out.stderr);
    for n in needles {
        assert!(stderr.contains(n), "{n} in: {stderr}");
    }
}

#[test]
fn serve_stops_at_start_on_a_missing_or_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let m = missing.to_str().unwrap();
    // Port 0 and a private data dir: should the config be taken after
    // all, the daemon must not touch anything shared before failing.
    let data = dir.path().join("data");
    let common = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut args = vec!["--config", m];
    args.extend(common);
    serve_fails(&args, None, &[m, "--config", "does not exist"]);
    serve_fails(&common, Some(&missing), &[m, "BHATTI_CONFIG"]);
    let bad = write(dir.path(), "bad.toml", "[publish]\nlisten_addr = \"x\"\n");
    let mut args = vec!["--config", bad.to_str().unwrap()];
    args.extend(common);
    serve_fails(&args, None, &["bad.toml", "publish.listen_addr"]);
}
