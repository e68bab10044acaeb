//! ACME end to end against Debian's `pebble` (a test ACME server) and
//! `pebble-challtestsrv` (its DNS) in the test's network namespace: a
//! daemon on the fake engine orders its API certificate (TLS-ALPN-01 on
//! its own socket) and one for a published alias on the public socket;
//! the real `bhatti` binary, trusting pebble's root with `--ca-file`,
//! creates, execs, forwards a port and publishes; the publication answers
//! on `https://<alias>.<domain>`; certificates due for renewal are
//! ordered again and swapped in without a restart.
//!
//! Needs root (namespaces), pebble (scripts/test.sh installs it) and the
//! host build of lohar.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
/// pebble validates TLS-ALPN-01 on this port of the name's address.
const TLS_PORT: u16 = 5001;
const API_NAME: &str = "api.test";
const DOMAIN: &str = "pv.test";
const ALIAS: &str = "app";

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Kills and reaps on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !cond().await {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Answers every connection with one HTTP response naming `tag`.
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

/// A client trusting only `root`, `host` resolving to `addr`, reporting
/// the peer's certificate.
fn https_client(root: &[u8], host: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(root).unwrap()])
        // A new connection (and handshake) per request: the certificate
        // seen is the one served now.
        .pool_max_idle_per_host(0)
        .resolve(host, addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// GET `url`: status and body.
async fn get(http: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let resp = http.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.unwrap_or_default()))
}

/// The certificate `addr` serves for `name` (a verified handshake
/// trusting only `root`), DER.
async fn served_cert(root: &[u8], name: &str, addr: SocketAddr) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root) {
        roots.add(c.ok()?).ok()?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server = rustls_pki_types::ServerName::try_from(name.to_string()).ok()?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server, tcp))
        .await
        .ok()?
        .ok()?;
    let (_, conn) = tls.get_ref();
    Some(conn.peer_certificates()?.first()?.as_ref().to_vec())
}

/// The CLI in a mount namespace of its own whose /etc/hosts names the
/// test's hosts (the namespace's DNS is pebble's, which the CLI does not
/// ask).
fn cli(hosts: &Path, home: &Path, key: &str, root: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(hosts)
    .arg(BIN)
    .arg("--ca-file")
    .arg(root)
    .env("HOME", home)
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("BHATTI_CA_FILE")
    .env("BHATTI_URL", format!("https://{API_NAME}:{TLS_PORT}"))
    .env("BHATTI_TOKEN", key)
    .stdin(Stdio::null());
    c
}

fn ok(mut c: Command, args: &[&str]) -> String {
    let out = c.args(args).output().unwrap();
    assert!(out.status.success(), "bhatti {args:?}: {}", show(&out));
    String::from_utf8(out.stdout).unwrap()
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

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

#[test]
fn acme_certificates_from_pebble() {
    if !testkit::is_root() {
        return testkit::cannot_run("the ACME test needs root (namespaces)");
    }
    let (Some(pebble), Some(dns)) = (which("pebble"), which("pebble-challtestsrv")) else {
        return testkit::cannot_run("the ACME test needs pebble (scripts/test.sh installs it)");
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter("api::acme=info")
        .with_test_writer()
        .try_init();
    let _ns = testkit::Netns::enter("acme");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // pebble's own HTTPS certificate, from a CA of the test's.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let srv_key = rcgen::KeyPair::generate().unwrap();
        let srv = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&srv_key, &ca, &ca_key)
            .unwrap();
        std::fs::write(d.join("acme-ca.pem"), ca.pem()).unwrap();
        std::fs::write(d.join("pebble.crt"), srv.pem()).unwrap();
        std::fs::write(d.join("pebble.key"), srv_key.serialize_pem()).unwrap();
        std::fs::write(
            d.join("pebble.json"),
            serde_json::json!({"pebble": {
                "listenAddress": "127.0.0.1:14000",
                "managementListenAddress": "127.0.0.1:15000",
                "certificate": d.join("pebble.crt"),
                "privateKey": d.join("pebble.key"),
                "httpPort": 5002,
                "tlsPort": TLS_PORT,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }})
            .to_string(),
        )
        .unwrap();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        // Every name is 127.0.0.1 (the API), the alias 127.0.0.2 (the
        // public socket): both on the port pebble validates.
        let _dns = Proc(
            Command::new(&dns)
                .args([
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    "127.0.0.1:8053",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    "127.0.0.1:8055",
                ])
                .stdout(log("dns.log"))
                .stderr(log("dns.err"))
                .spawn()
                .unwrap(),
        );
        let _pebble = Proc(
            Command::new(&pebble)
                .arg("-config")
                .arg(d.join("pebble.json"))
                .args(["-dnsserver", "127.0.0.1:8053"])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log"))
                .stderr(log("pebble.err"))
                .spawn()
                .unwrap(),
        );
        let plain = reqwest::Client::new();
        wait_for("challtestsrv answers", Duration::from_secs(30), || {
            let plain = plain.clone();
            async move {
                plain
                    .post("http://127.0.0.1:8055/add-a")
                    .body(format!(
                        r#"{{"host":"{ALIAS}.{DOMAIN}","addresses":["127.0.0.2"]}}"#
                    ))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        let acme_ca = std::fs::read(d.join("acme-ca.pem")).unwrap();
        let mgmt = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&acme_ca).unwrap()])
            .build()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        let root = loop {
            if let Ok(r) = mgmt.get("https://127.0.0.1:15000/roots/0").send().await {
                let text = r.text().await.unwrap_or_default();
                if text.contains("BEGIN CERTIFICATE") {
                    break text;
                }
            }
            assert!(Instant::now() < end, "pebble serves no root");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let root_file = d.join("pebble-root.pem");
        std::fs::write(&root_file, &root).unwrap();

        let data = d.join("data");
        std::fs::create_dir(&data).unwrap();
        testkit::placeholder_images(&data);
        let text = format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:{TLS_PORT}\"\nengine = \"qemu-tcg\"\n\
             [defaults]\nauto_templates = false\nimage = \"tiny\"\nmemory_mb = 256\n\
             [thermal]\nwarm_after_secs = 3600\ncold_after_secs = 7200\n\
             [publish]\nlisten = \"127.0.0.2:{TLS_PORT}\"\ndomain = \"{DOMAIN}\"\n\
             [acme]\ndirectory_url = \"https://127.0.0.1:14000/dir\"\nca_file = \"{}\"\n\
             api_names = [\"{API_NAME}\"]\npublish_aliases = true\n\
             contact = [\"mailto:ops@{DOMAIN}\"]\n",
            data.display(),
            d.join("acme-ca.pem").display(),
        );
        let config = api::DaemonConfig::parse(&text).expect("test config");
        config.validate().expect("valid test config");
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let daemon = api::Daemon::start_with_engine(config, engine)
            .await
            .expect("daemon starts");
        assert!(daemon.api_tls() && daemon.public_tls());
        let api_addr = daemon.local_addr().unwrap();
        let public = daemon.public_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(daemon.serve(async {
            let _ = stopped.await;
        }));

        // The API's certificate arrives from pebble.
        let api_http = https_client(root.as_bytes(), API_NAME, api_addr);
        let health = format!("https://{API_NAME}:{TLS_PORT}/health");
        let end = Instant::now() + Duration::from_secs(90);
        let first_cert = loop {
            if let Ok((200, _)) = get(&api_http, &health).await {
                break served_cert(root.as_bytes(), API_NAME, api_addr)
                    .await
                    .expect("the served certificate");
            }
            assert!(
                Instant::now() < end,
                "the API serves no certificate from pebble: {}",
                std::fs::read_to_string(d.join("pebble.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(data.join("acme/certs/api.test.crt").is_file());

        // The CLI over it.
        let home = tempfile::tempdir().unwrap();
        let hosts = d.join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost {API_NAME}\n127.0.0.2 {ALIAS}.{DOMAIN}\n"),
        )
        .unwrap();
        let key = user(&data, "alice");
        let run = || cli(&hosts, home.path(), &key, &root_file);
        ok(run(), &["create", "--name", "web"]);
        assert_eq!(
            ok(run(), &["exec", "web", "--", "echo", "acme-exec"]),
            "acme-exec\n"
        );

        // A forwarded port (WSS).
        let port = guest_server("forwarded-over-acme").await;
        let mut fwd = run();
        let mut child = fwd
            .args(["forward", "web", &port.to_string(), "--local-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let _fwd = Proc(child);
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
        let mut tcp = tokio::net::TcpStream::connect(local).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&got).ends_with("forwarded-over-acme\n"));

        // A published alias gets its own certificate on first use.
        let port = guest_server("published-over-acme").await;
        let url = ok(
            run(),
            &["publish", "web", "-p", &port.to_string(), "--alias", ALIAS],
        );
        let host = format!("{ALIAS}.{DOMAIN}");
        assert_eq!(url.trim(), format!("https://{host}:{TLS_PORT}/"));
        let pub_http = https_client(root.as_bytes(), &host, public);
        wait_for("the alias answers over HTTPS", Duration::from_secs(90), || {
            let (http, url) = (pub_http.clone(), url.trim().to_string());
            async move {
                matches!(get(&http, &url).await, Ok((200, body)) if body == "published-over-acme\n")
            }
        })
        .await;
        assert!(data.join(format!("acme/certs/{host}.crt")).is_file());
        // An alias nobody published is not ordered.
        let nobody = https_client(root.as_bytes(), &format!("nobody.{DOMAIN}"), public);
        assert!(
            get(&nobody, &format!("https://nobody.{DOMAIN}:{TLS_PORT}/"))
                .await
                .is_err()
        );

        let _ = stop.send(());
        served.await.unwrap().unwrap();

        // Renewal: the same data dir, with every certificate due; the
        // stored ones are served at once, then replaced without a restart.
        let renewing = format!("{text}renew_before_days = 100000\ncheck_interval_secs = 5\n");
        let config = api::DaemonConfig::parse(&renewing).unwrap();
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let daemon = api::Daemon::start_with_engine(config, engine)
            .await
            .expect("daemon restarts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(daemon.serve(async {
            let _ = stopped.await;
        }));
        let (status, _) = get(&api_http, &health)
            .await
            .expect("the stored certificate");
        assert_eq!(status, 200);
        let stored = served_cert(root.as_bytes(), API_NAME, api_addr).await;
        assert_eq!(
            stored.as_ref(),
            Some(&first_cert),
            "the stored certificate is served after a restart"
        );
        wait_for(
            "a renewed certificate is served",
            Duration::from_secs(90),
            || {
                let (root, first) = (root.clone(), first_cert.clone());
                async move {
                    served_cert(root.as_bytes(), API_NAME, api_addr)
                        .await
                        .is_some_and(|cert| cert != first)
                }
            },
        )
        .await;
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    });
}
