//! The CLI end to end: the real `bhatti` binary against a real daemon
//! (`bhatti serve`, spawned as a process) with real QEMU-TCG VMs, each test
//! in its own network namespace. Needs root, the cached test images and
//! the static lohar (scripts/test.sh provides all three).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use api_types::{Health, Listing, Sandbox, SecretSummary, SessionSummary};
use image::Tier;
use testkit::{wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
const BOOT: Duration = Duration::from_secs(120);

/// A daemon process in the calling thread's network namespace, with a
/// user and a client home of its own.
struct Daemon {
    child: Child,
    data: tempfile::TempDir,
    home: tempfile::TempDir,
    url: String,
    key: String,
}

impl Daemon {
    /// Starts `bhatti serve` on port 0 and creates user `t`. Call after
    /// `Netns::enter` on the same thread.
    fn start() -> Daemon {
        assert!(
            testkit::is_root(),
            "the CLI suite needs root (namespaces, TAPs)"
        );
        let data = testkit::data_dir_with_images(Tier::Tiny);
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
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(data.path().join("serve.err")).unwrap())
            .spawn()
            .expect("spawning bhatti serve");
        let mut url = String::new();
        wait_until("bhatti serve says where it listens", BOOT, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "bhatti serve exited ({st}): {}",
                    std::fs::read_to_string(data.path().join("serve.err")).unwrap_or_default()
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
        let out = Command::new(BIN)
            .args(["user", "create", "--name", "t", "--quiet", "--data-dir"])
            .arg(data.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "user create: {out:?}");
        let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(key.starts_with("bht_"), "{key}");
        Daemon {
            child,
            data,
            home: tempfile::tempdir().unwrap(),
            url,
            key,
        }
    }

    /// `bhatti` with a clean client environment: its own HOME, and no
    /// URL or token unless `with_env`.
    fn cmd(&self, with_env: bool) -> Command {
        let mut c = Command::new(BIN);
        c.env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN")
            .stdin(Stdio::null());
        if with_env {
            c.env("BHATTI_URL", &self.url)
                .env("BHATTI_TOKEN", &self.key);
        }
        c
    }

    /// Runs `bhatti ARGS` with URL and token in the environment.
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(true).args(args).output().unwrap()
    }

    /// Runs `bhatti ARGS` with `input` on stdin.
    fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(true)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bhatti {}: {}",
            args.join(" "),
            show(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bhatti {a:?} --json: {e}: {text}"))
    }

    fn config_file(&self) -> PathBuf {
        self.home.path().join(".config/bhatti/config.toml")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.data.path().join("serve.err"));
            eprintln!("--- daemon log ---\n{}", log.unwrap_or_default());
        }
        // SIGTERM: the daemon shuts down gracefully; wait for it, bounded.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            eprintln!("warning: cannot stop the daemon: {e}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("warning: the daemon did not stop in 60 s; killing it");
                    if let Err(e) = self.child.kill() {
                        eprintln!("warning: cannot kill the daemon: {e}");
                    }
                    if let Err(e) = self.child.wait() {
                        eprintln!("warning: cannot reap the daemon: {e}");
                    }
                    break;
                }
            }
        }
    }
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn setup_refuses_a_bad_token_and_saves_a_good_one() {
    let _ns = Netns::enter("cli-setup");
    let d = Daemon::start();

    let out = d
        .cmd(false)
        .args(["setup", "--url", &d.url, "--token", "bht_not_a_real_key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).starts_with("bhatti: "), "{}", show(&out));
    assert!(
        stderr(&out).contains("refused this token"),
        "{}",
        show(&out)
    );
    assert!(!d.config_file().exists(), "a refused token was saved");

    // No token anywhere: a usage error that says how to fix it.
    let out = d
        .cmd(false)
        .args(["list", "--url", &d.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("bhatti setup"), "{}", show(&out));

    let out = d
        .cmd(false)
        .args(["setup", "--url", &d.url, "--token", &d.key])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let path = d.config_file();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&d.key) && text.contains(&d.url), "{text}");

    // The file alone is enough now.
    let out = d.cmd(false).arg("list").output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("NAME"),
        "{}",
        show(&out)
    );

    // Precedence: the environment beats the file, a flag beats the environment.
    let closed = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let out = d
        .cmd(false)
        .arg("list")
        .env("BHATTI_URL", &closed)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains(&format!("cannot connect to {closed}")),
        "{}",
        show(&out)
    );
    assert!(stderr(&out).contains("bhatti serve"), "{}", show(&out));
    let out = d
        .cmd(false)
        .args(["list", "--url", &d.url])
        .env("BHATTI_URL", &closed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let out = d
        .cmd(false)
        .args(["list"])
        .env("BHATTI_TOKEN", "bht_wrong")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the env token must win: {}",
        show(&out)
    );
}

#[test]
fn errors_and_version() {
    let _ns = Netns::enter("cli-err");
    let d = Daemon::start();

    let out = d.run(&["inspect", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("bhatti: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(
        err.contains("nope"),
        "the server's message names the sandbox: {err}"
    );

    for bad in [
        &["create", "--file", "nocolon"][..],
        &["create", "--env", "1X=y"],
        &["exec", "demo"],
        &["file", "write", "demo", "/x", "-", "--mode", "999"],
    ] {
        let out = d.run(bad);
        assert_eq!(out.status.code(), Some(2), "bhatti {bad:?}: {}", show(&out));
    }

    let v: serde_json::Value = d.json(&["version"]);
    let health: Health = serde_json::from_value(v["server"].clone()).expect("server health");
    assert_eq!(health.engine, "qemu");
    assert_eq!(v["client"], env!("CARGO_PKG_VERSION"));
    let text = d.ok(&["version"]);
    assert!(
        text.contains(&format!("server: bhatti {}", health.version)),
        "{text}"
    );

    let script = d.ok(&["completion", "bash"]);
    assert!(
        script.contains("bhatti") && script.contains("exec"),
        "{script}"
    );
}

#[test]
fn sandbox_lifecycle_through_the_cli() {
    let _ns = Netns::enter("cli-life");
    let d = Daemon::start();
    let local = d.home.path().join("hello.txt");
    std::fs::write(&local, "hello from the host\n").unwrap();
    let spec = format!("{}:/workspace/hello.txt", local.display());

    let init = "echo $FOO-$(id -u) > /workspace/init-proof; exec sleep 100000";
    let out = d.run(&[
        "create", "--name", "demo", "--env", "FOO=bar", "--file", &spec, "--label", "team=x",
        "--init", init,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name:") && text.contains("demo"), "{text}");
    let again = d.run(&["create", "--name", "demo"]);
    assert!(again.status.success(), "{}", show(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        show(&again)
    );

    let table = d.ok(&["list"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("demo "))
        .expect(&table);
    assert!(row.contains("running"), "{table}");
    let list: Vec<Sandbox> = d.json(&["list"]);
    assert_eq!(list.len(), 1);
    let sb: Sandbox = d.json(&["inspect", "demo"]);
    assert_eq!(
        (sb.name.as_str(), sb.labels["team"].as_str()),
        ("demo", "x")
    );
    // `--init` ran at boot, as root, with the sandbox's env.
    assert_eq!(sb.init.as_deref(), Some(init));
    assert!(
        d.ok(&["inspect", "demo"])
            .contains(&format!("init:      {init}\n")),
        "inspect shows it"
    );
    let proof = d.ok(&[
        "exec", "demo", "--", "sh", "-c",
        "i=0; until [ -s /workspace/init-proof ] || [ $i -ge 200 ]; do sleep 0.1; i=$((i+1)); done; cat /workspace/init-proof",
    ]);
    assert_eq!(proof, "bar-0\n");
    let out = d.run(&["create", "--name", "bad", "--init", " "]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("init must not be empty"),
        "{}",
        show(&out)
    );

    // Exit codes, stdout and stderr kept apart, env and boot-time files applied.
    let out = d.run(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo $FOO; cat /workspace/hello.txt; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bar\nhello from the host\n"
    );
    assert_eq!(stderr(&out), "err\n");
    let out = d.run(&[
        "exec",
        "demo",
        "-e",
        "X=1=2",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $X; pwd",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1=2\n/tmp\n",
        "{}",
        show(&out)
    );

    // Output is printed while the command runs: the command waits for a
    // file that the test creates only after reading the first line.
    let mut child = d
        .cmd(true)
        .args([
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        child.try_wait().unwrap().is_none(),
        "exec ended before its command"
    );
    d.ok(&["exec", "demo", "--", "touch", "/tmp/go"]);
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());

    let out = d.run(&["exec", "demo", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", show(&out));
    assert!(
        stderr(&out).contains("timed out after 1s"),
        "{}",
        show(&out)
    );

    // Files: binary-safe both ways, listed, lines selected.
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let out = d.run_with_stdin(&["file", "write", "demo", "/workspace/blob"], &blob);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.run(&["file", "read", "demo", "/workspace/blob"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        out.stdout == blob,
        "read back {} bytes, differing",
        out.stdout.len()
    );
    d.ok(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "printf 'a\\nb\\nc\\nd\\n' > /workspace/lines",
    ]);
    let mid = d.ok(&[
        "file",
        "read",
        "demo",
        "/workspace/lines",
        "--offset",
        "1",
        "--limit",
        "2",
    ]);
    assert_eq!(mid, "b\nc\n");
    let listing: Listing = d.json(&["file", "ls", "demo", "/workspace"]);
    let names: Vec<&str> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    for n in ["blob", "hello.txt", "lines"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let table = d.ok(&["file", "ls", "demo", "/workspace"]);
    assert!(
        table
            .lines()
            .any(|l| l.ends_with(" blob") && l.contains("68K")),
        "{table}"
    );

    // Secrets: from stdin, listed by name, never shown.
    let out = d.run_with_stdin(&["secret", "set", "GH_TOKEN"], b"s3cr3t-value\n");
    assert!(out.status.success(), "{}", show(&out));
    let secrets: Vec<SecretSummary> = d.json(&["secret", "list"]);
    assert_eq!(
        secrets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["GH_TOKEN"]
    );
    assert!(!d.ok(&["secret", "list"]).contains("s3cr3t"));
    d.ok(&["secret", "delete", "GH_TOKEN"]);
    assert!(d.json::<Vec<SecretSummary>>(&["secret", "list"]).is_empty());

    publish_and_unpublish(&d);
    share_links(&d);

    let out = d.run(&["destroy", "demo"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = d.run(&["inspect", "demo"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(d.json::<Vec<Sandbox>>(&["list"]).is_empty());
}

/// `bhatti share`: a link printed on stdout (the terminal page with the
/// token in its fragment) that `/share/info` accepts without an API key;
/// listed; revoked one by one or all at once (then refused); bad TTLs and
/// a bare `--revoke` are usage errors.
fn share_links(d: &Daemon) {
    // GET /share/info where the link points, with its token: the status.
    let info = |url: &str| -> u16 {
        use std::io::{Read, Write};
        let (page, token) = url
            .split_once("/share/#t=")
            .expect("a token in the fragment");
        let authority = page.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(authority).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "GET /share/info HTTP/1.0\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect(&answer)
    };
    let rw = d.ok(&["share", "demo", "--ttl", "1h"]).trim().to_string();
    assert!(rw.starts_with(&format!("{}/share/#t=bhs_", d.url)), "{rw}");
    assert_eq!(info(&rw), 200);
    let ro: api_types::ShareCreated = d.json(&["share", "demo", "--ttl", "90s", "--read-only"]);
    assert!(ro.share.read_only);
    assert!(
        ro.share.expires_at - ro.share.created_at <= 90_000,
        "{ro:?}"
    );
    let list: Vec<api_types::Share> = d.json(&["share", "demo", "--list"]);
    assert_eq!(list.len(), 2, "{list:?}");
    let table = d.ok(&["share", "demo", "--list"]);
    assert!(
        table.contains(&ro.share.id) && table.contains("read-only"),
        "{table}"
    );
    for (args, code, says) in [
        (&["share", "demo", "--ttl", "0"][..], 2, "at least 1s"),
        (&["share", "demo", "--ttl", "5y"], 2, "unit"),
        (&["share", "demo", "--ttl", "400d"], 1, "max_ttl_secs"),
        (&["share", "demo", "--revoke"], 2, "--all"),
        (
            &["share", "demo", "--revoke", "shr-nosuch"],
            1,
            "no share link",
        ),
        (&["share", "nosuch"], 1, "nosuch"),
    ] {
        let out = d.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            show(&out)
        );
    }
    // publish --shell: the same, on the public proxy.
    let out = d.run(&["publish", "demo", "--shell", "--ttl", "10m"]);
    assert!(out.status.success(), "{}", show(&out));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        public.contains("/share/#t=bhs_") && !public.starts_with(&d.url),
        "{public}"
    );
    assert!(
        stderr(&out).contains("published the terminal of demo"),
        "{}",
        show(&out)
    );
    assert_eq!(info(&public), 200);
    let out = d.run(&["publish", "demo", "--read-only"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    d.ok(&["share", "demo", "--revoke", &ro.share.id]);
    assert_eq!(
        d.json::<Vec<api_types::Share>>(&["share", "demo", "--list"])
            .len(),
        2,
        "the read-write and the public link are left"
    );
    d.ok(&["share", "demo", "--revoke", "--all"]);
    assert!(d
        .json::<Vec<api_types::Share>>(&["share", "demo", "--list"])
        .is_empty());
    // No token in the daemon's output (its log lines).
    for (url, name) in [
        (&rw, "serve.log"),
        (&public, "serve.log"),
        (&rw, "serve.err"),
        (&public, "serve.err"),
    ] {
        let token = url.split("#t=").nth(1).unwrap();
        let log = std::fs::read_to_string(d.data.path().join(name)).unwrap_or_default();
        assert!(!log.contains(token), "a share token in {name}");
    }
    assert_eq!(info(&rw), 401, "a revoked link");
    assert_eq!(info(&public), 401, "a revoked link");
}

/// `bhatti publish` prints a URL the public proxy answers on (no token),
/// `inspect` lists it, bad input is refused with a message and exit 1 (2
/// for a flag clap refuses), `unpublish` takes it away.
fn publish_and_unpublish(d: &Daemon) {
    d.ok(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo published-hello > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
    ]);
    let out = d.run(&["publish", "demo", "-p", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(url.ends_with("/demo-8080/"), "{url}");
    assert!(stderr(&out).contains("as 'demo-8080'"), "{}", stderr(&out));
    assert_eq!(
        http_get(&format!("{url}index.html")),
        (200, "published-hello\n".into())
    );
    assert!(d.ok(&["inspect", "demo"]).contains(&url));
    let sb: Sandbox = d.json(&["inspect", "demo"]);
    assert_eq!(sb.published[0].alias, "demo-8080");

    for (args, code, says) in [
        (
            &["publish", "demo", "-p", "8081", "--alias", "api"][..],
            1,
            "reserved",
        ),
        (
            &["publish", "demo", "-p", "8081", "--alias", "a_b"],
            1,
            "a-z",
        ),
        (
            &["publish", "demo", "-p", "8081", "--alias", "demo-8080"],
            1,
            "taken",
        ),
        (&["publish", "nosuch", "-p", "8081"], 1, "nosuch"),
        (&["publish", "demo", "-p", "0"], 2, "0"),
        (&["unpublish", "demo", "-p", "8081"], 1, "not published"),
    ] {
        let out = d.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", show(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", show(&out));
    }

    let out = d.run(&["unpublish", "demo", "-p", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(http_get(&format!("{url}index.html")).0, 404);
    assert!(d.json::<Sandbox>(&["inspect", "demo"]).published.is_empty());
}

/// A plain HTTP/1.0 GET of an `http://host:port/path` URL: status and body.
fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(authority).expect(url);
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect(&answer);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect(head);
    (status, body.to_string())
}

/// A tmux server of the test's own (own socket, so it starts inside the
/// test's namespace), removed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (scripts/test.sh installs it)");
        assert!(out.status.success(), "tmux {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A window running `cmd` in a shell; the window stays open after it.
    fn start(&self, name: &str, cmd: &str) {
        // After `cmd`: its exit code, then the terminal's icanon and echo
        // flags (a leading `-` means off), one per line.
        let script = format!(
            "{cmd}; echo EXITED=$?; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon\\|-*echo'; read _"
        );
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "100",
            "-y",
            "30",
            &script,
        ]);
    }

    fn screen(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-t", name])
    }

    fn wait_for(&self, name: &str, what: &str) -> String {
        let deadline = Duration::from_secs(60);
        let end = std::time::Instant::now() + deadline;
        loop {
            let last = self.screen(name);
            if last.contains(what) {
                return last;
            }
            assert!(
                std::time::Instant::now() < end,
                "{what:?} not on the screen of {name} after {deadline:?}:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let ok = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("warning: cannot stop the test's tmux server");
        }
    }
}

#[test]
fn shell_in_tmux_detaches_and_reattaches() {
    let _ns = Netns::enter("cli-shell");
    let d = Daemon::start();
    d.ok(&["create", "--name", "sh"]);
    let tmux = Tmux::new(d.home.path());
    let client = format!(
        "env HOME={} BHATTI_URL={} BHATTI_TOKEN={} {BIN}",
        d.home.path().display(),
        d.url,
        d.key
    );

    tmux.start("one", &format!("{client} shell sh"));
    // The guest shell's prompt (capture-pane trims its trailing space).
    tmux.wait_for("one", "/workspace $");
    tmux.keys("one", &["echo hello-$((6*7))", "Enter"]);
    tmux.wait_for("one", "hello-42");
    tmux.keys("one", &["C-\\"]);
    let screen = tmux.wait_for("one", "EXITED=");
    assert!(screen.contains("EXITED=0"), "{screen}");
    // The terminal is back in canonical mode, with echo, after raw mode.
    let after = tmux.wait_for("one", "icanon");
    assert!(
        after.lines().any(|l| l == "echo") && after.lines().any(|l| l == "icanon"),
        "terminal left in raw mode:\n{after}"
    );
    let hint = "reattach with: bhatti shell sh --session ";
    let line = screen.lines().find(|l| l.contains(hint)).expect(&screen);
    let session = line
        .split(hint)
        .nth(1)
        .unwrap()
        .trim_end_matches(']')
        .trim()
        .to_string();

    // The session lives on, detached.
    let mut listed = Vec::new();
    wait_until(
        "the session shows as detached",
        Duration::from_secs(30),
        || {
            listed = d.json::<Vec<SessionSummary>>(&["ps", "sh"]);
            listed.iter().any(|s| s.session == session && !s.attached)
        },
    );
    let table = d.ok(&["ps", "sh"]);
    assert!(table.lines().any(|l| l.starts_with(&session)), "{table}");

    // Reattaching replays the earlier output; the session's exit code is ours.
    tmux.start("two", &format!("{client} shell sh --session {session}"));
    tmux.wait_for("two", "hello-42");
    tmux.keys("two", &["stty size; exit 7", "Enter"]);
    let screen = tmux.wait_for("two", "EXITED=");
    assert!(
        screen.contains("30 100"),
        "the window size reached the guest:\n{screen}"
    );
    assert!(screen.contains("EXITED=7"), "{screen}");

    // A secret typed at the terminal is not echoed, and echo comes back.
    tmux.start("sec", &format!("{client} secret set TYPED"));
    tmux.wait_for("sec", "(not echoed)");
    tmux.keys("sec", &["hunter2-typed", "Enter"]);
    let screen = tmux.wait_for("sec", "EXITED=");
    assert!(screen.contains("EXITED=0"), "{screen}");
    assert!(
        !screen.contains("hunter2"),
        "the secret was echoed:\n{screen}"
    );
    let screen = tmux.wait_for("sec", "icanon");
    assert!(
        screen.lines().any(|l| l == "echo"),
        "echo not restored:\n{screen}"
    );
    let secrets: Vec<SecretSummary> = d.json(&["secret", "list"]);
    assert!(secrets.iter().any(|s| s.name == "TYPED"), "{secrets:?}");

    d.ok(&["destroy", "sh"]);
}

/// A `bhatti forward` process; SIGINT and reaped on drop.
struct Forwarder {
    child: Child,
    local: std::net::SocketAddr,
}

impl Forwarder {
    /// Starts `bhatti forward ARGS` and waits for its banner line.
    fn start(d: &Daemon, args: &[&str]) -> Forwarder {
        let mut child = d
            .cmd(true)
            .arg("forward")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let local = line
            .strip_prefix("Forwarding ")
            .and_then(|l| l.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no banner from bhatti forward {args:?}: {line:?}"));
        Forwarder { child, local }
    }

    /// One TCP exchange through the forwarded port: `send`, half-close,
    /// read to the end.
    fn exchange(&self, send: &[u8]) -> Vec<u8> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.local).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(send).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        if let Err(e) = s.read_to_end(&mut got) {
            panic!(
                "reading from {} after sending {:?}: {e} (got {:?})",
                self.local,
                String::from_utf8_lossy(send),
                String::from_utf8_lossy(&got)
            );
        }
        got
    }

    /// SIGINT; the exit status and what it wrote to stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (status, err)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.kill() {
                eprintln!("warning: cannot kill bhatti forward: {e}");
            }
            let _ = self.child.wait();
        }
    }
}

#[test]
fn ports_and_forward_through_the_cli() {
    let _ns = Netns::enter("cli-fwd");
    let d = Daemon::start();
    d.ok(&["create", "--name", "web"]);
    // An HTTP server and a line echo (not HTTP) in the sandbox.
    d.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello-forward > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && \
         (setsid nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &)",
    ]);
    wait_until("both servers listen", BOOT, || {
        let list: api_types::PortList = d.json(&["ports", "web"]);
        let ports: Vec<u16> = list.ports.iter().map(|p| p.port).collect();
        assert!(
            !ports.contains(&1024),
            "the agent's port is listed: {ports:?}"
        );
        ports.contains(&8080) && ports.contains(&7000)
    });
    let table = d.ok(&["ports", "web"]);
    assert!(table.starts_with("PORT"), "{table}");
    // busybox httpd listens on the IPv6 wildcard (dual stack).
    assert!(
        table.lines().any(|l| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols.len() == 3
                && cols[0] == "8080"
                && ["::", "0.0.0.0"].contains(&cols[1])
                && cols[2] == "tcp"
        }),
        "{table}"
    );
    let out = d.run(&["ports", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", show(&out));

    // HTTP through the default local port (the same number), two
    // connections at once.
    let web = Forwarder::start(&d, &["web", "8080"]);
    assert_eq!(web.local.to_string(), "127.0.0.1:8080");
    let answers: Vec<Vec<u8>> = std::thread::scope(|s| {
        let a = s.spawn(|| web.exchange(b"GET /index.html HTTP/1.0\r\n\r\n"));
        let b = s.spawn(|| web.exchange(b"GET /index.html HTTP/1.0\r\n\r\n"));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for got in answers {
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.") && got.ends_with("hello-forward\n"),
            "{got}"
        );
    }
    // Not HTTP: bytes both ways, on a port the system picked.
    let echo = Forwarder::start(&d, &["web", "7000", "--local-port", "0"]);
    assert_ne!(echo.local.port(), 0);
    assert_eq!(
        echo.exchange(b"ping over a tunnel\n"),
        b"ping over a tunnel\n"
    );
    // Nothing listening in the sandbox: the local connection closes and
    // the forwarder says why.
    let closed = Forwarder::start(&d, &["web", "9999", "--local-port", "0"]);
    assert!(closed.exchange(b"hello?").is_empty());
    let (status, err) = closed.stop();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("nothing is listening on port 9999"), "{err}");
    for f in [web, echo] {
        let (status, err) = f.stop();
        assert!(status.success(), "{status}: {err}");
    }

    // Refusals before listening: no such sandbox, a port in use.
    let out = d.run(&["forward", "nosuch", "80", "--local-port", "0"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", show(&out));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = d.run(&["forward", "web", "8080", "--local-port", &port]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("cannot listen on"), "{}", show(&out));
}

/// `bhatti volume clone`, `export` and `import`: a tar made on the host
/// goes in (from standard input) and comes out again (to a file and to
/// standard output) with its names and bytes; errors exit non-zero and
/// leave no partial file. Two utility VM boots.
#[test]
fn volume_clone_export_import_through_the_cli() {
    let _ns = Netns::enter("cli-vols");
    let d = Daemon::start();
    d.ok(&["volume", "create", "a", "--size", "64"]);
    let v: api_types::Volume = d.json(&["volume", "clone", "a", "b"]);
    assert_eq!((v.name.as_str(), v.size_mb), ("b", 64));
    let out = d.run(&["volume", "clone", "a", "b"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("'b'"), "{}", show(&out));

    // A tar made on the host from the host's own files.
    let src = d.home.path().join("src");
    std::fs::create_dir_all(src.join("sub dir")).unwrap();
    std::fs::write(src.join("sub dir/hello world.txt"), "hello, volume\n").unwrap();
    let tar = d.home.path().join("in.tar");
    let made = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(made.success());
    let bytes = std::fs::read(&tar).unwrap();
    let out = d.run_with_stdin(&["volume", "import", "b", "-", "--json"], &bytes);
    assert!(out.status.success(), "{}", show(&out));

    let exported = d.home.path().join("out.tar");
    let exported_s = exported.display().to_string();
    d.ok(&["volume", "export", "b", &exported_s]);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&exported)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(names.contains("./sub dir/hello world.txt"), "{names}");
    let content = Command::new("tar")
        .arg("-xOf")
        .arg(&exported)
        .arg("./sub dir/hello world.txt")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&content.stdout), "hello, volume\n");

    let missing = d.home.path().join("nope.tar");
    let out = d.run(&["volume", "export", "nope", &missing.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(!missing.exists() && !d.home.path().join("nope.tar.part").exists());
    let out = d.run(&["volume", "import", "b", "/no/such/file.tar"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}
