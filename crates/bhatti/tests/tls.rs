//! HTTPS end to end, with certificates from files: a CA and server
//! certificates made here with `rcgen`, a daemon on the fake engine
//! (`vmm::fake`: each sandbox a real `lohar serve` on the host) serving the
//! API and the public proxy over TLS, and the real `bhatti` binary as the
//! client.
//!
//! - `tls_api_public_proxy_and_cli`: the CLI with `--ca-file` creates,
//!   execs, opens a shell (WSS, in tmux) and forwards a port (WSS); a
//!   published port answers on `https://<alias>.<domain>` through the
//!   public socket, whose plain-HTTP twin redirects there (308); plain
//!   HTTP to either HTTPS port gets a 400 saying to use https://; the CLI
//!   without the CA fails naming `--ca-file` (a plain request and the
//!   shell's WebSocket); `bhatti mcp` (stdio) lists over HTTPS; the API's certificate
//!   files replaced under the running daemon are served to the next
//!   connection.
//! - `serve_refuses_bad_certificate_files`: `bhatti serve` with a missing
//!   certificate, an unreadable one (a directory), or a key of another
//!   certificate exits non-zero naming the file, before anything else.
//!
//! - `sighup_rereads_certificates`: `bhatti serve` (the binary, QEMU-TCG
//!   engine, no VM started) survives SIGHUP; a SIGHUP over a half-renewed
//!   pair logs the error naming the file and keeps serving the old
//!   certificate; over a complete pair, the new one is served.
//!
//! Needs root (a network namespace), tmux, the host build of lohar and
//! the cached test images (the SIGHUP case).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
const DOMAIN: &str = "pv.test";

/// A CA and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A server certificate for `names` and its key, PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).unwrap();
    }
}

/// Writes `text` to `path` the way a renewal would: a new file renamed
/// over the old.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn user(data: &Path, name: &str) -> String {
    let store = store::Store::open(&data.join("bhatti.db")).unwrap();
    let quotas = api::users::Quotas {
        max_sandboxes: 5,
        max_cpus: 8,
        max_memory_mb: 4096,
        max_disk_mb: 1 << 20,
    };
    api::users::create_user(&store, name, quotas).unwrap().1
}

/// The client side: the binary with its own HOME, URL and token, and the
/// CA file unless `ca` is `None`.
struct Cli {
    home: tempfile::TempDir,
    url: String,
    key: String,
    ca: PathBuf,
}

impl Cli {
    fn cmd(&self, ca: Option<&Path>) -> Command {
        let mut c = Command::new(BIN);
        c.env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("BHATTI_CA_FILE")
            .env("BHATTI_URL", &self.url)
            .env("BHATTI_TOKEN", &self.key)
            .stdin(Stdio::null());
        if let Some(ca) = ca {
            c.arg("--ca-file").arg(ca);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(Some(&self.ca)).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "bhatti {args:?}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Answers every connection with one HTTP response naming `tag`, then
/// closes: stands in for a server in the sandbox (the fake engine's
/// guest is the host, in the test's namespace).
async fn guest_server(tag: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{tag}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    port
}

/// A plain-HTTP request to `addr`; the whole answer.
async fn plain_request(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut got))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// A client trusting only `ca` (PEM file), no redirects, `host` resolving
/// to `addr`.
fn https_client(ca: &Path, host: &str, addr: SocketAddr) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, addr)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A `bhatti forward` process, killed on drop.
struct Forwarder {
    child: std::process::Child,
    local: SocketAddr,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmux server of the test's own, removed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
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

    fn wait_for(&self, name: &str, what: &str) -> String {
        let deadline = Duration::from_secs(60);
        let end = Instant::now() + deadline;
        loop {
            let screen = self.tmux(&["capture-pane", "-p", "-t", name]);
            if screen.contains(what) {
                return screen;
            }
            assert!(
                Instant::now() < end,
                "{what:?} not on the screen of {name} after {deadline:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

#[test]
fn tls_api_public_proxy_and_cli() {
    if !testkit::is_root() {
        return testkit::cannot_run("the TLS test needs root (a network namespace)");
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        return testkit::cannot_run("the TLS test needs tmux (scripts/test.sh installs it)");
    }
    let _ns = testkit::Netns::enter("tls");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        testkit::placeholder_images(&data);
        let pki = dir.path().join("pki");
        std::fs::create_dir(&pki).unwrap();
        let ca = Ca::new("bhatti test CA");
        let ca_file = pki.join("ca.pem");
        ca.write(&ca_file);
        let (api_cert, api_key) = (pki.join("api.crt"), pki.join("api.key"));
        let (c, k) = ca.issue(&["127.0.0.1", "localhost"]);
        std::fs::write(&api_cert, c).unwrap();
        std::fs::write(&api_key, k).unwrap();
        let (pub_cert, pub_key) = (pki.join("pub.crt"), pki.join("pub.key"));
        let (c, k) = ca.issue(&[&format!("*.{DOMAIN}"), DOMAIN]);
        std::fs::write(&pub_cert, c).unwrap();
        std::fs::write(&pub_key, k).unwrap();

        let text = format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n\
             [thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [publish]\nlisten = \"127.0.0.1:0\"\ndomain = \"{DOMAIN}\"\n\
             [publish.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nredirect_listen = \"127.0.0.1:0\"\n",
            data.display(),
            api_cert.display(),
            api_key.display(),
            pub_cert.display(),
            pub_key.display(),
        );
        let config = api::DaemonConfig::parse(&text).expect("test config");
        config.validate().expect("valid test config");
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let daemon = api::Daemon::start_with_engine(config, engine)
            .await
            .expect("daemon starts");
        let api_addr = daemon.local_addr().unwrap();
        let public = daemon.public_addr().expect("the public proxy is on");
        let redirect = daemon.redirect_addr().expect("the redirect socket is on");
        assert!(daemon.api_tls() && daemon.public_tls());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(daemon.serve(async {
            let _ = stopped.await;
        }));
        let cli = Cli {
            home: tempfile::tempdir().unwrap(),
            url: format!("https://{api_addr}"),
            key: user(&data, "alice"),
            ca: ca_file.clone(),
        };

        // Plain HTTP to the HTTPS ports: a clear 400, not a hang.
        for addr in [api_addr, public] {
            let got = plain_request(addr, "x", "/health").await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
            assert!(got.contains("this port speaks HTTPS"), "{got}");
        }

        // Without the CA: refused, saying how to pass one; with it, fine.
        let out = cli.cmd(None).arg("list").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--ca-file") && err.contains("not trust"),
            "{}",
            show(&out)
        );
        cli.ok(&["list"]);

        // Create and exec over HTTPS.
        cli.ok(&["create", "--name", "web"]);
        let out = cli.ok(&["exec", "web", "--", "sh", "-c", "echo over-$((40+2))"]);
        assert_eq!(out, "over-42\n");

        // A shell over WSS, in a terminal.
        let tmux = Tmux {
            socket: cli.home.path().join("tmux.sock"),
        };
        let client = format!(
            "env HOME={} BHATTI_URL={} BHATTI_TOKEN={} BHATTI_CA_FILE={} {BIN}",
            cli.home.path().display(),
            cli.url,
            cli.key,
            ca_file.display()
        );
        tmux.tmux(&[
            "new-session",
            "-d",
            "-s",
            "sh",
            "-x",
            "100",
            "-y",
            "30",
            &format!("{client} shell web; echo EXITED=$?; read _"),
        ]);
        // Typed before the prompt shows is fine: the terminal queues it.
        tmux.tmux(&["send-keys", "-t", "sh", "echo shell-$((6*7))", "Enter"]);
        tmux.wait_for("sh", "shell-42");
        tmux.tmux(&["send-keys", "-t", "sh", "exit", "Enter"]);
        let screen = tmux.wait_for("sh", "EXITED=");
        assert!(screen.contains("EXITED=0"), "{screen}");

        // The shell's WebSocket without the CA: the same advice.
        let out = cli.cmd(None).args(["shell", "web"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--ca-file"),
            "{}",
            show(&out)
        );

        // `bhatti mcp` (stdio) is a client of the API too.
        let mut mcp = cli
            .cmd(Some(&ca_file))
            .arg("mcp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = mcp.stdin.take().unwrap();
            for line in [
                r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_sandboxes","arguments":{}}}"#,
            ] {
                writeln!(stdin, "{line}").unwrap();
            }
        }
        let out = tokio::task::spawn_blocking(move || mcp.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let listed = text
            .lines()
            .find(|l| l.contains(r#""id":2"#))
            .unwrap_or_else(|| panic!("no answer to the tool call: {}", show(&out)));
        assert!(
            listed.contains("web") && !listed.contains(r#""isError":true"#),
            "{listed}"
        );

        // A forwarded port over WSS.
        let port = guest_server("forwarded-hello").await;
        let mut child = cli
            .cmd(Some(&ca_file))
            .args(["forward", "web", &port.to_string(), "--local-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let local: SocketAddr = line
            .strip_prefix("Forwarding ")
            .and_then(|l| l.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no banner from bhatti forward: {line:?}"));
        let fwd = Forwarder { child, local };
        let got = plain_request(fwd.local, "localhost", "/").await;
        assert!(got.ends_with("forwarded-hello\n"), "{got}");
        drop(fwd);

        // Published: https://<alias>.<domain> through the public socket.
        let port = guest_server("published-hello").await;
        let out = cli.ok(&["publish", "web", "-p", &port.to_string()]);
        let url = out.trim().to_string();
        let alias = format!("web-{port}");
        let host = format!("{alias}.{DOMAIN}");
        assert_eq!(url, format!("https://{host}:{}/", public.port()));
        let http = https_client(&ca_file, &host, public);
        let resp = http.get(format!("{url}index.html")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "published-hello\n");
        // Plain HTTP on the redirect socket: to the same host and path
        // over HTTPS.
        let got = plain_request(redirect, &format!("{host}:{}", redirect.port()), "/a?b=1").await;
        assert!(got.starts_with("HTTP/1.1 308 "), "{got}");
        let location = format!("location: https://{host}:{}/a?b=1\r\n", public.port());
        assert!(got.to_ascii_lowercase().contains(&location), "{got}");

        // Renewal: new files under the running daemon, from another CA;
        // the next connection gets them.
        let ca2 = Ca::new("bhatti test CA 2");
        let ca2_file = pki.join("ca2.pem");
        ca2.write(&ca2_file);
        let health = |ca: PathBuf| {
            let host = "localhost".to_string();
            async move {
                https_client(&ca, &host, api_addr)
                    .get(format!("https://localhost:{}/health", api_addr.port()))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        };
        assert_eq!(health(ca_file.clone()).await.unwrap(), 200);
        assert!(health(ca2_file.clone()).await.is_err(), "CA 2 is not in use yet");
        let (c, k) = ca2.issue(&["127.0.0.1", "localhost"]);
        replace(&api_key, &k);
        replace(&api_cert, &c);
        assert_eq!(health(ca2_file.clone()).await.unwrap(), 200);
        assert!(health(ca_file.clone()).await.is_err(), "the old certificate is gone");
        let out = cli.cmd(Some(&ca2_file)).args(["exec", "web", "--", "true"]).output().unwrap();
        assert!(out.status.success(), "{}", show(&out));

        let _ = stop.send(());
        served.await.unwrap().unwrap();
    });
}

/// Runs `bhatti serve` with `[tls]` naming `cert` and `key`; it must exit
/// non-zero at once.
fn serve_fails(dir: &Path, cert: &Path, key: &Path) -> String {
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n[publish]\nlisten = \"none\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dir.join("data").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        !dir.join("data").exists(),
        "nothing is touched before the certificates are checked"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_refuses_bad_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("bad-input CA");
    let (c1, k1) = ca.issue(&["localhost"]);
    let (_, k2) = ca.issue(&["localhost"]);
    let cert = d.join("server.crt");
    let key = d.join("server.key");
    let other_key = d.join("other.key");
    std::fs::write(&cert, c1).unwrap();
    std::fs::write(&key, k1).unwrap();
    std::fs::write(&other_key, k2).unwrap();

    let missing = d.join("missing.crt");
    let err = serve_fails(d, &missing, &key);
    assert!(err.contains("missing.crt"), "{err}");
    let err = serve_fails(d, &cert, &d.join("missing.key"));
    assert!(err.contains("missing.key"), "{err}");
    // Unreadable: a directory (root reads any file whatever its mode).
    let unreadable = d.join("unreadable.crt");
    std::fs::create_dir(&unreadable).unwrap();
    let err = serve_fails(d, &unreadable, &key);
    assert!(
        err.contains("unreadable.crt") && err.contains("cannot read"),
        "{err}"
    );
    let err = serve_fails(d, &cert, &other_key);
    assert!(
        err.contains("other.key") && err.contains("does not match") && err.contains("server.crt"),
        "{err}"
    );
    // Positive control: the matching pair passes `bhatti config check`,
    // which reads the files as serve does.
    let config = d.join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[tls]") && text.contains("server.key"),
        "{text}"
    );
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            other_key.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("other.key"),
        "{}",
        show(&out)
    );
}

#[test]
fn sighup_rereads_certificates() {
    if !testkit::is_root() {
        return testkit::cannot_run("the SIGHUP test needs root (a network namespace)");
    }
    let _ns = testkit::Netns::enter("tls-hup");
    let data = testkit::data_dir_with_images(image::Tier::Tiny);
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hup CA 1");
    let ca_file = pki.path().join("ca.pem");
    ca.write(&ca_file);
    let (cert, key) = (pki.path().join("api.crt"), pki.path().join("api.key"));
    let (c, k) = ca.issue(&["127.0.0.1"]);
    std::fs::write(&cert, c).unwrap();
    std::fs::write(&key, k).unwrap();
    let config = pki.path().join("bhatti.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\n[publish]\nlisten = \"none\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            data.path().display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let (log, err) = (pki.path().join("serve.log"), pki.path().join("serve.err"));
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut url = String::new();
    testkit::wait_until(
        "bhatti serve says where it listens",
        Duration::from_secs(120),
        || {
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
        },
    );
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let addr: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let health = |ca: &Path| {
        rt.block_on(async {
            https_client(ca, "127.0.0.1", addr)
                .get(format!("{url}/health"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    assert_eq!(health(&ca_file).unwrap(), 200);

    // Half-renewed (a new certificate, the old key), then SIGHUP: the
    // error names the file, the daemon lives on with the old pair.
    let ca2 = Ca::new("hup CA 2");
    let ca2_file = pki.path().join("ca2.pem");
    ca2.write(&ca2_file);
    let (c2, k2) = ca2.issue(&["127.0.0.1"]);
    replace(&cert, &c2);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    testkit::wait_until(
        "the failed reload is logged",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&err)
                .unwrap_or_default()
                .contains("TLS reload failed")
        },
    );
    let logged = std::fs::read_to_string(&err).unwrap();
    assert!(
        logged.contains("api.key") && logged.contains("does not match"),
        "{logged}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the daemon"
    );
    // Now the key: SIGHUP; the new certificate is served.
    replace(&key, &k2);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    testkit::wait_until(
        "the new certificate is served",
        Duration::from_secs(30),
        || health(&ca2_file).is_ok_and(|s| s == 200),
    );
    assert!(health(&ca_file).is_err());
    assert!(child.try_wait().unwrap().is_none());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
}
