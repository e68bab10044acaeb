//! The Firecracker backend against a fake Firecracker.
//!
//! No `firecracker` binary exists on our CI hosts (and it needs hardware
//! KVM), so this test binary doubles as a fake one: run with `--api-sock`
//! it serves the subset of the Firecracker API we use on that Unix socket,
//! checks every body against the API's field names, records each request
//! in `requests.jsonl` beside the socket, writes its "guest console" to
//! stdout and exits on `SendCtrlAltDel`, like Firecracker. Not running as
//! root (confined), it also attaches to its TAP by name at
//! `PUT /network-interfaces`, as Firecracker does; and it answers
//! `PUT /probe` (not Firecracker's) with what it sees from the inside: its
//! uid, seccomp mode, which paths exist, whether it can open `/dev/kvm`,
//! `/dev/net/tun` and given TAPs. Without `--api-sock` it runs the tests
//! below (custom harness). The real-VM test is `firecracker_vm.rs`.

use std::future::Future;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmm::firecracker::api::{ApiClient, ApiError, Method};
use vmm::firecracker::model::*;
use vmm::firecracker::{boot_plan, FirecrackerConfig, FirecrackerVmm, RUN_DIR};
use vmm::{
    DriveSpec, ExitStatusKind, NetSpec, ShutdownPath, SnapshotKind, VmSpec, VmState, Vmm, VmmError,
};

// ---------------------------------------------------------------- fake server

/// One parsed request.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    body: Option<Value>,
}

/// A canned response: status and body (None = no body).
type Resp = (u16, Option<String>);

async fn read_request(s: &mut UnixStream) -> Result<Option<Req>> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec())?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().context("no request line")?.split(' ');
    let method = first.next().context("no method")?.to_string();
    let path = first.next().context("no path")?.to_string();
    ensure!(first.next() == Some("HTTP/1.1"), "not HTTP/1.1");
    let mut len = 0usize;
    for l in lines {
        let (k, v) = l.split_once(':').context("bad header")?;
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse()?;
        }
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "body cut short");
        body.extend_from_slice(&chunk[..n]);
    }
    let body = if len == 0 {
        None
    } else {
        Some(serde_json::from_slice(&body)?)
    };
    Ok(Some(Req { method, path, body }))
}

async fn write_response(s: &mut UnixStream, (status, body): Resp) -> Result<()> {
    let reason = if status < 300 { "OK" } else { "Bad Request" };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\n");
    match &body {
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => out.push_str("\r\n"),
    }
    s.write_all(out.as_bytes()).await?;
    Ok(())
}

/// Serves `handler` on `listener`, one request per connection.
async fn serve(listener: UnixListener, handler: Arc<dyn Fn(Req) -> Resp + Send + Sync>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Ok(Some(req)) = read_request(&mut s).await {
                let resp = handler(req);
                let _written = write_response(&mut s, resp).await;
            }
        });
    }
}

fn fault(msg: &str) -> Resp {
    (
        400,
        Some(serde_json::to_string(&json!({ "fault_message": msg })).unwrap()),
    )
}

/// Decodes a body into the API type, as Firecracker's deny_unknown_fields
/// parser would, turning a mismatch into the fault Firecracker returns.
fn parse<T: serde::de::DeserializeOwned>(req: &Req) -> Result<T, Resp> {
    let body = req
        .body
        .clone()
        .ok_or_else(|| fault("Empty request body"))?;
    serde_json::from_value(body).map_err(|e| {
        fault(&format!(
            "An error occurred when deserializing the json body of a request: {e}"
        ))
    })
}

#[derive(Default)]
struct FakeVm {
    configured: bool,
    started: bool,
    paused: bool,
    mem_mib: u32,
    quit: bool,
    /// The TAP it attached to, held open like Firecracker holds its own.
    tap: Option<OwnedFd>,
}

/// Attaches to the persistent TAP `name` as Firecracker does: opens
/// `/dev/net/tun` and `TUNSETIFF`s the name.
fn attach_tap(name: &str) -> std::io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads the ifreq we pass; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun.into())
}

fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// `PUT /probe`: what the fake sees from where it runs.
fn probe(vm: &FakeVm, body: &Value) -> Value {
    let strings = |k: &str| -> Vec<String> {
        body[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let exists: Vec<bool> = strings("paths")
        .iter()
        .map(|p| Path::new(p).exists())
        .collect();
    let taps: Vec<String> = strings("taps")
        .iter()
        .map(|t| outcome(attach_tap(t)))
        .collect();
    let create: Vec<String> = strings("create")
        .iter()
        .map(|p| outcome(std::fs::File::create(p)))
        .collect();
    let rw = |p: &str| outcome(std::fs::OpenOptions::new().read(true).write(true).open(p));
    // SAFETY: plain system calls returning integers.
    let (uid, euid, gid, seccomp) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0),
        )
    };
    json!({
        "uid": uid, "euid": euid, "gid": gid, "seccomp": seccomp,
        "exists": exists, "taps": taps, "create": create,
        "kvm": rw("/dev/kvm"), "tun": rw("/dev/net/tun"),
        "holds_tap": vm.tap.is_some(),
    })
}

/// The Firecracker API subset, with Firecracker's state rules.
fn fake_route(vm: &mut FakeVm, req: &Req) -> Result<Resp, Resp> {
    const PRE_BOOT: &str = "The requested operation is not supported after starting the microVM.";
    let m = req.method.as_str();
    let p = req.path.as_str();
    match (m, p) {
        ("GET", "/") => {
            let state = match (vm.started, vm.paused) {
                (false, _) => "Not started",
                (true, false) => "Running",
                (true, true) => "Paused",
            };
            let info = InstanceInfo {
                app_name: "Firecracker".into(),
                id: "anonymous-instance".into(),
                state: state.into(),
                vmm_version: "1.7.0-fake".into(),
            };
            Ok((200, Some(serde_json::to_string(&info).unwrap())))
        }
        ("PUT", "/machine-config") => {
            let mc: MachineConfiguration = parse(req)?;
            if vm.started {
                return Err(fault(PRE_BOOT));
            }
            vm.mem_mib = mc.mem_size_mib;
            vm.configured = true;
            Ok((204, None))
        }
        ("PUT", "/boot-source") => {
            let bs: BootSource = parse(req)?;
            if vm.started {
                return Err(fault(PRE_BOOT));
            }
            if std::fs::read(&bs.kernel_image_path)
                .unwrap_or_default()
                .starts_with(b"FAULT")
            {
                return Err(fault("Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image"));
            }
            vm.configured = true;
            Ok((204, None))
        }
        ("PUT", _) if p.starts_with("/drives/") => {
            let d: Drive = parse(req)?;
            if vm.started {
                return Err(fault(PRE_BOOT));
            }
            if p != format!("/drives/{}", d.drive_id) {
                return Err(fault(
                    "The id from the path does not match the id from the body!",
                ));
            }
            vm.configured = true;
            Ok((204, None))
        }
        ("PUT", _) if p.starts_with("/network-interfaces/") => {
            let n: NetworkInterface = parse(req)?;
            if vm.started {
                return Err(fault(PRE_BOOT));
            }
            if p != format!("/network-interfaces/{}", n.iface_id) {
                return Err(fault(
                    "The id from the path does not match the id from the body!",
                ));
            }
            // Firecracker opens its TAP here. As root the fake does not: a
            // TUNSETIFF of a name that does not exist would make a TAP on
            // the host.
            // SAFETY: geteuid(2) cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                let tap = attach_tap(&n.host_dev_name).map_err(|e| {
                    fault(&format!(
                        "Could not create the network device: Open tap device failed: {e}"
                    ))
                })?;
                vm.tap = Some(tap);
            }
            vm.configured = true;
            Ok((204, None))
        }
        ("PUT", "/actions") => {
            let a: InstanceActionInfo = parse(req)?;
            match a.action_type {
                ActionType::InstanceStart => {
                    if vm.started {
                        return Err(fault(PRE_BOOT));
                    }
                    vm.started = true;
                    println!("fake guest: booted");
                    let _flushed = std::io::stdout().flush();
                }
                ActionType::SendCtrlAltDel => vm.quit = true,
                ActionType::FlushMetrics => {}
            }
            Ok((204, None))
        }
        ("PATCH", "/vm") => {
            let v: Vm = parse(req)?;
            if !vm.started {
                return Err(fault(
                    "The requested operation is not supported before starting the microVM.",
                ));
            }
            vm.paused = v.state == VmRunState::Paused;
            Ok((204, None))
        }
        ("PUT", "/snapshot/create") => {
            let s: SnapshotCreateParams = parse(req)?;
            if !vm.paused {
                return Err(fault(
                    "Cannot save the microVM state: the microVM must be paused",
                ));
            }
            std::fs::write(&s.snapshot_path, b"fake microVM state")
                .map_err(|e| fault(&e.to_string()))?;
            let mem = std::fs::File::create(&s.mem_file_path).map_err(|e| fault(&e.to_string()))?;
            mem.set_len(u64::from(vm.mem_mib) << 20)
                .map_err(|e| fault(&e.to_string()))?;
            Ok((204, None))
        }
        ("PUT", "/snapshot/load") => {
            let l: SnapshotLoadParams = parse(req)?;
            if vm.started || vm.configured {
                return Err(fault("Loading a microVM snapshot not allowed after configuring boot-specific resources."));
            }
            // Firecracker opens both (read-only) and reads the state.
            for f in [&l.snapshot_path, &l.mem_backend.backend_path] {
                std::fs::File::open(f)
                    .map_err(|e| fault(&format!("Cannot open {}: {e}", f.display())))?;
            }
            std::fs::read(&l.snapshot_path).map_err(|e| fault(&e.to_string()))?;
            vm.started = true;
            vm.paused = !l.resume_vm;
            Ok((204, None))
        }
        ("PUT", "/probe") => Ok((
            200,
            Some(probe(vm, req.body.as_ref().unwrap_or(&Value::Null)).to_string()),
        )),
        _ => Err(fault("Invalid request method and/or path")),
    }
}

/// Entry point when this binary is run as `firecracker --api-sock …`.
fn fake_firecracker_main(args: &[String]) -> ! {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sock = PathBuf::from(arg("--api-sock").expect("--api-sock"));
    let log = arg("--log-path").map(PathBuf::from);
    if let Some(log) = &log {
        // Firecracker requires the log file to exist already.
        assert!(log.exists(), "log path {} does not exist", log.display());
    }
    eprintln!("fake firecracker starting on {}", sock.display());
    let record = sock.with_file_name("requests.jsonl");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = UnixListener::bind(&sock).expect("bind api socket");
        let vm = Arc::new(Mutex::new(FakeVm::default()));
        let quit = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (vm, quit) = (vm.clone(), quit.clone());
            Arc::new(move |req: Req| {
                let line = json!({"method": req.method, "path": req.path, "body": req.body});
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&record)
                    .unwrap();
                writeln!(f, "{line}").unwrap();
                let mut vm = vm.lock().unwrap();
                let resp = fake_route(&mut vm, &req).unwrap_or_else(|e| e);
                if vm.quit {
                    quit.notify_one();
                }
                resp
            })
        };
        tokio::select! {
            _ = serve(listener, handler) => {}
            _ = quit.notified() => {
                // Let the 204 reach the client, then "the guest rebooted".
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    std::process::exit(0)
}

// ---------------------------------------------------------------- tests

fn recorded(work: &Path) -> Vec<Value> {
    std::fs::read_to_string(work.join(RUN_DIR).join("requests.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn fc_config() -> FirecrackerConfig {
    FirecrackerConfig::new(std::env::current_exe().unwrap())
}

fn spec(dir: &Path) -> VmSpec {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF fake").unwrap();
    let disk = dir.join("base.img");
    std::fs::write(&disk, b"").unwrap();
    let mut s = VmSpec::new(&kernel, dir.join("w"));
    s.vcpus = 2;
    s.memory_mib = 64;
    s.cmdline = "console=ttyS0 reboot=k panic=1".into();
    s.drives = vec![DriveSpec {
        id: "base".into(),
        path: disk,
        read_only: true,
    }];
    s.net = Some(NetSpec {
        tap: "tap0".into(),
        mac: "02:00:00:00:00:01".parse().unwrap(),
    });
    s
}

async fn client_round_trips_and_typed_faults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("api.sock");
    let seen = Arc::new(Mutex::new(Vec::<Req>::new()));
    let handler = {
        let seen = seen.clone();
        Arc::new(move |req: Req| {
            seen.lock().unwrap().push(req.clone());
            match req.path.as_str() {
                "/" => (200, Some(r#"{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.7.0"}"#.into())),
                "/drives/bad" => fault("Unable to open the block device: No such file"),
                "/vm" => (204, None),
                "/not-json-fault" => (500, Some("internal oops".into())),
                _ => fault("Invalid request method and/or path"),
            }
        })
    };
    tokio::spawn(serve(UnixListener::bind(&sock)?, handler));
    let api = ApiClient::new(&sock);

    let info: InstanceInfo = api.get("/").await?;
    assert_eq!(info.state, "Running");
    api.patch(
        "/vm",
        &Vm {
            state: VmRunState::Paused,
        },
    )
    .await?;
    let drive = Drive {
        drive_id: "bad".into(),
        path_on_host: "/nope".into(),
        is_root_device: false,
        is_read_only: true,
    };
    match api.put("/drives/bad", &drive).await {
        Err(ApiError::Fault {
            status,
            fault_message,
        }) => {
            assert_eq!(status, 400);
            assert_eq!(
                fault_message,
                "Unable to open the block device: No such file"
            );
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    match api.request(Method::Get, "/not-json-fault", None).await {
        Err(ApiError::Fault {
            status: 500,
            fault_message,
        }) => assert_eq!(fault_message, "internal oops"),
        other => panic!("expected a fault, got {other:?}"),
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[1].method, "PATCH");
    assert_eq!(seen[1].body, Some(json!({"state": "Paused"})));
    assert_eq!(seen[2].method, "PUT");
    assert_eq!(
        seen[2].body,
        Some(
            json!({"drive_id": "bad", "path_on_host": "/nope", "is_root_device": false, "is_read_only": true})
        )
    );
    assert!(seen[0].body.is_none());

    // A server that is not there, and one that speaks nonsense.
    let e = ApiClient::new(dir.path().join("missing.sock"))
        .get::<Value>("/")
        .await
        .unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    let junk_sock = dir.path().join("junk.sock");
    let junk = UnixListener::bind(&junk_sock)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = junk.accept().await {
            let _req = read_request(&mut s).await;
            let _w = s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        }
    });
    let e = ApiClient::new(&junk_sock)
        .get::<Value>("/")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Malformed(_)), "{e:?}");
    Ok(())
}

async fn full_lifecycle_against_the_fake_binary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = spec(dir.path());
    let vm = FirecrackerVmm::new(fc_config(), s.clone())?;
    vm.boot().await?;
    assert_eq!(vm.state(), VmState::Running);
    // The console reaches the log through the daemon's copier.
    wait_for("the console is in the serial log", || {
        std::fs::read_to_string(&s.serial_log).is_ok_and(|l| l.contains("fake guest: booted"))
    })
    .await?;
    vm.pause().await?;
    vm.resume().await?;
    let snap = dir.path().join("snap");
    let info = vm.snapshot(&snap, SnapshotKind::Full).await?;
    assert_eq!(vm.state(), VmState::Paused);
    assert!(info.state_bytes > 0);
    let e = vm.snapshot(&snap, SnapshotKind::Diff).await.unwrap_err();
    assert!(matches!(e, VmmError::Unsupported { .. }), "{e}");

    let boot_requests = recorded(&s.work_dir);
    let shape: Vec<(String, String, Value)> = boot_requests
        .iter()
        .filter(|r| r["path"] != "/")
        .map(|r| {
            (
                r["method"].as_str().unwrap().into(),
                r["path"].as_str().unwrap().into(),
                r["body"].clone(),
            )
        })
        .collect();
    let kernel = s.kernel.to_str().unwrap();
    let disk = s.drives[0].path.to_str().unwrap();
    let state = snap.join("vmstate");
    let mem = snap.join("memory");
    assert_eq!(
        shape,
        vec![
            (
                "PUT".into(),
                "/machine-config".into(),
                json!({"vcpu_count": 2, "mem_size_mib": 64})
            ),
            (
                "PUT".into(),
                "/boot-source".into(),
                json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 reboot=k panic=1"})
            ),
            (
                "PUT".into(),
                "/drives/base".into(),
                json!({"drive_id": "base", "path_on_host": disk, "is_root_device": false, "is_read_only": true})
            ),
            (
                "PUT".into(),
                "/network-interfaces/eth0".into(),
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"})
            ),
            (
                "PUT".into(),
                "/actions".into(),
                json!({"action_type": "InstanceStart"})
            ),
            ("PATCH".into(), "/vm".into(), json!({"state": "Paused"})),
            ("PATCH".into(), "/vm".into(), json!({"state": "Resumed"})),
            ("PATCH".into(), "/vm".into(), json!({"state": "Paused"})),
            (
                "PUT".into(),
                "/snapshot/create".into(),
                json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem})
            ),
        ]
    );
    vm.kill().await?;

    // Restore onto another TAP: a fresh process, one load call with a
    // network override.
    let mut s2 = s.clone();
    s2.work_dir = dir.path().join("w2");
    s2.net.as_mut().unwrap().tap = "tap9".into();
    let restored = FirecrackerVmm::new(fc_config(), s2.clone())?;
    restored.restore(&snap).await?;
    assert_eq!(restored.state(), VmState::Running);
    let loads: Vec<Value> = recorded(&s2.work_dir)
        .into_iter()
        .filter(|r| r["path"] != "/")
        .collect();
    assert_eq!(
        loads,
        vec![json!({"method": "PUT", "path": "/snapshot/load", "body": {
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "enable_diff_snapshots": false,
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]
        }})]
    );
    // Graceful shutdown: Ctrl-Alt-Del makes Firecracker exit.
    let report = restored.shutdown(Duration::from_secs(10)).await?;
    assert_eq!(report.path, ShutdownPath::Guest);
    assert_eq!(report.exit.status, ExitStatusKind::Code(0));
    Ok(())
}

async fn an_api_fault_fails_boot_with_firecrackers_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = spec(dir.path());
    std::fs::write(&s.kernel, b"FAULT")?;
    let vm = FirecrackerVmm::new(fc_config(), s)?;
    let e = vm.boot().await.unwrap_err();
    match &e {
        VmmError::FirecrackerApi {
            method,
            path,
            source:
                ApiError::Fault {
                    status,
                    fault_message,
                },
        } => {
            assert_eq!(
                (*method, path.as_str(), *status),
                ("PUT", "/boot-source", 400)
            );
            assert!(
                fault_message.contains("failed to load ELF kernel image"),
                "{fault_message}"
            );
        }
        other => panic!("expected a Firecracker fault, got {other:?}"),
    }
    // The half-configured VMM does not linger.
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait_exit()).await??;
    assert_eq!(exit.status, ExitStatusKind::Signal(9));
    Ok(())
}

async fn kill_9_is_reported_with_the_stderr_tail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = FirecrackerVmm::new(fc_config(), spec(dir.path()))?;
    vm.boot().await?;
    let pid = vm.pid().context("pid")?;
    // SAFETY: plain kill(2) of our live child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait_exit()).await??;
    assert_eq!(exit.status, ExitStatusKind::Signal(9));
    let e = vm.pause().await.unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("VMM exited: killed by signal 9"), "{text}");
    assert!(
        text.contains("fake firecracker starting"),
        "stderr tail missing: {text}"
    );
    Ok(())
}

async fn restore_needs_a_fresh_vm_and_a_matching_snapshot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s = spec(dir.path());
    let vm = FirecrackerVmm::new(fc_config(), s.clone())?;
    let e = vm
        .restore(&dir.path().join("no-snapshot"))
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::SnapshotIo { .. }), "{e}");
    assert_eq!(vm.pid(), None, "nothing may start for a missing snapshot");
    let mut big = s.clone();
    big.vcpus = 40;
    let e = FirecrackerVmm::new(fc_config(), big).unwrap_err();
    assert!(e.to_string().contains("limit of 32"), "{e}");
    // The boot plan for this spec is what the lifecycle test saw.
    assert_eq!(boot_plan(&s, &fc_config()).len(), 5);
    Ok(())
}

// ---------------------------------------------------------------- confined

/// Asks the fake what it sees from the inside.
async fn probe_vm(vm: &FirecrackerVmm, paths: &[&Path], taps: &[&str]) -> Result<Value> {
    probe_create(vm, paths, taps, &[]).await
}

/// [`probe_vm`], also trying to create the files `create`.
async fn probe_create(
    vm: &FirecrackerVmm,
    paths: &[&Path],
    taps: &[&str],
    create: &[&Path],
) -> Result<Value> {
    let body = serde_json::to_vec(&json!({"paths": paths, "taps": taps, "create": create}))?;
    let r = vm.api().request(Method::Put, "/probe", Some(&body)).await?;
    Ok(serde_json::from_slice(&r.body)?)
}

fn dev_ino(p: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    (m.dev(), m.ino())
}

fn status_field(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The memory limit of `pid`'s cgroup, as the confinement's controllers
/// hold it (v1 `memory.limit_in_bytes` or v2 `memory.max`).
fn memory_limit(pid: u32, conf: &vmm::confine::Confinement) -> Result<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let file = match conf.cgroups() {
        vmm::confine::cgroup::CgroupHost::V1 { memory, .. } => {
            let line = cgroups
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == "memory"))
                })
                .context("no memory cgroup")?;
            let path = line.splitn(3, ':').nth(2).unwrap().trim_start_matches('/');
            memory.join(path).join("memory.limit_in_bytes")
        }
        vmm::confine::cgroup::CgroupHost::V2 { root } => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::/"))
                .context("no v2 cgroup")?;
            root.join(path).join("memory.max")
        }
    };
    Ok(std::fs::read_to_string(file)?.trim().to_string())
}

/// The owner `ip -d link` shows for a TAP (`user NAME`).
fn tap_owner(tap: &str) -> String {
    let out = testkit::run("ip", &["-d", "link", "show", "dev", tap]);
    out.split_whitespace()
        .skip_while(|w| *w != "user")
        .nth(1)
        .unwrap_or("none")
        .to_string()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        ensure!(
            std::time::Instant::now() < end,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The fake, launched confined exactly as Firecracker would be, from the
/// outside: not root, a root and mount namespace not the host's, a memory
/// limit, no `--no-seccomp`; from the inside: its uid, its files there and
/// another sandbox's absent, `/dev/kvm` and `/dev/net/tun` openable, its
/// own TAP attached and another sandbox's refused. A snapshot lands in the
/// snapshot directory as the VMM user's 0600 files the daemon reads; the
/// restore runs confined and loads them; the cgroup goes and the TAP is
/// the daemon's again after each exit. Then the same probes unconfined
/// (positive control) show root and the host's files.
async fn confined_fake_firecracker() -> Result<()> {
    let conf = match vmm::confine::Confinement::prepare(
        &vmm::ConfineConfig {
            cgroup_parent: "bhatti-test-fc".into(),
            ..Default::default()
        },
        vmm::EngineKind::Firecracker,
    )? {
        vmm::ConfineState::On(c) => c,
        other => anyhow::bail!("confinement is not on: {other}"),
    };
    testkit::run(
        "ip",
        &["tuntap", "add", "dev", "tfc0", "mode", "tap", "user", "0"],
    );
    testkit::run(
        "ip",
        &["tuntap", "add", "dev", "tfc1", "mode", "tap", "user", "0"],
    );
    let dir = tempfile::tempdir()?;
    // Another sandbox's directory, as the data dir has them side by side.
    let other = dir.path().join("other-sandbox");
    std::fs::create_dir(&other)?;
    let secret = other.join("disk.ext4");
    std::fs::write(&secret, b"someone else's disk")?;
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let mut s = spec(dir.path());
    s.net.as_mut().unwrap().tap = "tfc0".into();
    let config = fc_config().confined(Some(conf.clone()));
    let vm = FirecrackerVmm::new(config.clone(), s.clone())?;
    vm.boot().await?;
    let pid = vm.pid().context("pid")?;

    // From the outside.
    let uids = status_field(pid, "Uid:");
    ensure!(
        uids.iter().all(|u| *u == conf.uid.to_string()),
        "uids {uids:?}"
    );
    ensure!(status_field(pid, "Gid:").iter().all(|g| g != "0"));
    ensure!(
        dev_ino(&format!("/proc/{pid}/root/")) != dev_ino("/"),
        "its root is the host's"
    );
    ensure!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))?
            != std::fs::read_link("/proc/self/ns/mnt")?,
        "it shares the host's mount namespace"
    );
    let limit = memory_limit(pid, &conf)?;
    ensure!(
        limit == conf.limits(&s).memory_bytes.to_string(),
        "memory limit {limit}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    ensure!(
        cmdline.contains("--api-sock") && !cmdline.contains("seccomp"),
        "{cmdline}"
    );
    ensure!(
        tap_owner("tfc0") == conf.user,
        "tfc0 owner {}",
        tap_owner("tfc0")
    );
    ensure!(tap_owner("tfc1") == "root");

    // From the inside.
    let passwd = Path::new("/etc/passwd");
    let p = probe_vm(
        &vm,
        &[&s.kernel, &s.drives[0].path, &secret, passwd, &s.serial_log],
        &["tfc1"],
    )
    .await?;
    ensure!(
        p["uid"] == conf.uid && p["euid"] == conf.uid && p["gid"] == conf.gid,
        "{p}"
    );
    ensure!(
        p["exists"] == json!([true, true, false, false, false]),
        "{p}"
    );
    ensure!(p["kvm"] == "ok" && p["tun"] == "ok", "{p}");
    ensure!(p["holds_tap"] == true, "it did not attach its TAP: {p}");
    // Its API socket cannot be swapped: the run directory is root's now,
    // and only its out directory is its own.
    let run = s.work_dir.join(RUN_DIR);
    let c = probe_create(
        &vm,
        &[],
        &[],
        &[&run.join("planted"), &run.join("out").join("ok")],
    )
    .await?;
    ensure!(
        c["create"][0].as_str().unwrap_or("").contains("denied") && c["create"][1] == "ok",
        "{c}"
    );
    {
        // Nothing in it open to others: `find DATA -perm /o+rwx` stays empty.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(&run)?;
        ensure!(
            m.uid() == 0 && m.gid() == conf.gid,
            "{}:{}",
            m.uid(),
            m.gid()
        );
        ensure!(
            m.permissions().mode() & 0o777 == 0o710,
            "run dir mode {:o}",
            m.mode()
        );
        for f in [run.join("api.sock"), run.join("out").join("ok")] {
            let mode = std::fs::symlink_metadata(&f)?.permissions().mode();
            ensure!(mode & 0o077 == 0, "{}: mode {mode:o}", f.display());
        }
    }
    ensure!(
        p["taps"][0]
            .as_str()
            .unwrap_or("")
            .contains("not permitted"),
        "{p}"
    );

    // Snapshot: written inside, moved out by the daemon.
    vm.pause().await?;
    let snap = dir.path().join("snap");
    let info = vm.snapshot(&snap, SnapshotKind::Full).await?;
    ensure!(info.state_bytes > 0);
    for f in ["vmstate", "memory"] {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::symlink_metadata(snap.join(f))?;
        ensure!(m.is_file() && m.uid() == conf.uid, "{f}: uid {}", m.uid());
        ensure!(
            m.permissions().mode() & 0o777 == 0o600,
            "{f}: mode {:o}",
            m.mode()
        );
    }
    ensure!(std::fs::read(snap.join("vmstate"))? == b"fake microVM state");
    let cg = conf.cgroup_of(&s.work_dir);
    vm.kill().await?;
    wait_for("the cgroup goes", || cg.dirs().iter().all(|d| !d.exists())).await?;
    wait_for("the TAP is root's again", || tap_owner("tfc0") == "root").await?;

    // Restore, confined, from the moved files.
    let mut s2 = s.clone();
    s2.work_dir = dir.path().join("w2");
    s2.serial_log = s2.work_dir.join("serial.log");
    let restored = FirecrackerVmm::new(config.clone(), s2.clone())?;
    restored.restore(&snap).await?;
    let rpid = restored.pid().context("pid")?;
    ensure!(status_field(rpid, "Uid:")[0] == conf.uid.to_string());
    let p = probe_vm(
        &restored,
        &[
            &snap.join("vmstate"),
            &snap.join(vmm::snapshot::MANIFEST),
            &s.work_dir,
        ],
        &[],
    )
    .await?;
    ensure!(p["uid"] == conf.uid, "{p}");
    ensure!(p["exists"] == json!([true, false, false]), "{p}");
    let report = restored.shutdown(Duration::from_secs(10)).await?;
    ensure!(report.exit.status == ExitStatusKind::Code(0), "{report:?}");
    let cg2 = conf.cgroup_of(&s2.work_dir);
    wait_for("the restored VMM's cgroup goes", || {
        cg2.dirs().iter().all(|d| !d.exists())
    })
    .await?;

    // A diff onto anonymous memory cannot be made in the jail: refused.
    let diffy = FirecrackerVmm::new(
        FirecrackerConfig {
            track_dirty_pages: true,
            ..config.clone()
        },
        s.clone(),
    )?;
    let e = diffy
        .snapshot(&dir.path().join("diff"), SnapshotKind::Diff)
        .await
        .unwrap_err();
    ensure!(e.to_string().contains("confined diff snapshot"), "{e}");

    // Positive control: the same probes, unconfined.
    let mut s3 = s.clone();
    s3.work_dir = dir.path().join("w3");
    s3.serial_log = s3.work_dir.join("serial.log");
    let free = FirecrackerVmm::new(fc_config(), s3.clone())?;
    free.boot().await?;
    let fpid = free.pid().context("pid")?;
    ensure!(status_field(fpid, "Uid:")[0] == "0");
    ensure!(dev_ino(&format!("/proc/{fpid}/root/")) == dev_ino("/"));
    let p = probe_vm(&free, &[&s3.kernel, &secret, passwd], &[]).await?;
    ensure!(
        p["uid"] == 0 && p["exists"] == json!([true, true, true]),
        "{p}"
    );
    free.kill().await?;
    Ok(())
}

/// Runs [`confined_fake_firecracker`] in a network namespace of its own
/// (for its TAPs), on a thread that entered it. Needs root.
async fn a_confined_fake_firecracker_sees_only_its_jail() -> Result<()> {
    if !testkit::is_root() {
        testkit::cannot_run("firecracker confinement: needs root");
        return Ok(());
    }
    tokio::task::spawn_blocking(|| {
        std::thread::spawn(|| {
            let _ns = testkit::Netns::enter("fcjail");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(confined_fake_firecracker())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the confined test panicked"))?
    })
    .await?
}

// ---------------------------------------------------------------- harness

type TestFn = fn() -> Pin<Box<dyn Future<Output = Result<()>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--api-sock") {
        fake_firecracker_main(&args);
    }
    let tests: &[(&str, TestFn)] = &[
        ("client_round_trips_and_typed_faults", || {
            Box::pin(client_round_trips_and_typed_faults())
        }),
        ("full_lifecycle_against_the_fake_binary", || {
            Box::pin(full_lifecycle_against_the_fake_binary())
        }),
        ("an_api_fault_fails_boot_with_firecrackers_message", || {
            Box::pin(an_api_fault_fails_boot_with_firecrackers_message())
        }),
        ("kill_9_is_reported_with_the_stderr_tail", || {
            Box::pin(kill_9_is_reported_with_the_stderr_tail())
        }),
        ("restore_needs_a_fresh_vm_and_a_matching_snapshot", || {
            Box::pin(restore_needs_a_fresh_vm_and_a_matching_snapshot())
        }),
        ("a_confined_fake_firecracker_sees_only_its_jail", || {
            Box::pin(a_confined_fake_firecracker_sees_only_its_jail())
        }),
    ];
    // `cargo test NAME` passes NAME; flags (--nocapture, …) are ignored.
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if !filters.is_empty() && !filters.iter().any(|flt| name.contains(flt.as_str())) {
            continue;
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), f()).await })
        }));
        match run.unwrap_or_else(|_| Ok(Err(anyhow::anyhow!("panicked")))) {
            Ok(Ok(())) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Ok(Err(e)) => {
                println!("test {name} ... FAILED: {e:#}");
                failed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED: timed out after 60s");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
