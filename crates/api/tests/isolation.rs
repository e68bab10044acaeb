//! Issue 11's "must show", with real VMs: a hostile guest (root through
//! `sudo`) reaches nothing it should not. The test's namespace is the
//! host; a second namespace behind a veth pair is the world, holding a
//! metadata address, a LAN host and a public host on its loopback (each
//! with a listener) and the DNS upstream. The host has a listener on its
//! own uplink address, one on `[::]`, and a Docker-style DNAT'd port.
//! Nothing leaves these namespaces. One daemon and its sandboxes serve
//! every case.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::*;
use reqwest::Method;

const METADATA: &str = "169.254.169.254";
const LAN: &str = "192.168.77.1";
const PUBLIC: &str = "203.0.113.10";
/// A second public host: what an allow-list holding a name must not reach.
const PUBLIC2: &str = "203.0.113.20";
/// The host's own (non-bridge) address, on its uplink.
const UPLINK: &str = "198.51.100.1";
/// The world's end of the uplink: router and DNS upstream.
const WORLD: &str = "198.51.100.2";

/// The probes a guest runs (python3 on `minimal`). Every probe prints one
/// word and exits 0 for "got through", 1 for "did not"; anything else is a
/// broken probe, not a refusal.
const PROBE: &str = r#"
import os, socket, struct, sys, time, random
def tcp(host, port, src=None):
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    if src: s.bind((src, 0))
    try:
        if fam == socket.AF_INET6:
            addr, _, scope = host.partition('%')
            s.connect((addr, int(port), 0, socket.if_nametoindex(scope) if scope else 0))
        else:
            s.connect((host, int(port)))
        print('open'); return 0
    except OSError as e:
        print('closed', e); return 1
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def ping(dst, src=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2)
    if src: s.bind((src, 0))
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4242, 1) + b'bhatti'
    body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    s.sendto(body, (dst, 0))
    end = time.time() + 2
    while time.time() < end:
        try: data, a = s.recvfrom(256)
        except OSError: break
        if a[0] == dst and data[20] == 0: print('reply'); return 0
    print('no reply'); return 1
def mac_of(dev):
    return bytes.fromhex(open('/sys/class/net/%s/address' % dev).read().strip().replace(':', ''))
def arp(spa, target, sha=None):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind(('eth0', 0)); s.settimeout(0.5)
    own = mac_of('eth0'); sha = bytes.fromhex(sha.replace(':', '')) if sha else own
    pkt = b'\xff' * 6 + sha + b'\x08\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 1) \
        + sha + socket.inet_aton(spa) + b'\0' * 6 + socket.inet_aton(target)
    s.send(pkt)
    end = time.time() + 2
    while time.time() < end:
        try: f = s.recv(128)
        except OSError: continue
        if f[12:14] == b'\x08\x06' and f[20:22] == b'\x00\x02' and f[28:32] == socket.inet_aton(target) \
                and f[38:42] == socket.inet_aton(spa):
            print('reply'); return 0
    print('no reply'); return 1
def query(name, qid=None):
    qid = random.randrange(65536) if qid is None else qid
    q = struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0)
    for l in name.split('.'): q += bytes([len(l)]) + l.encode()
    return q + b'\0' + struct.pack('!HH', 1, 1)
def dns(server, name, src=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    if src: s.bind((src, 0))
    s.sendto(query(name), (server, 53))
    try: data, _ = s.recvfrom(1500)
    except OSError: print('no answer'); return 1
    n = struct.unpack('!H', data[6:8])[0]
    print('answer' if n else 'empty', socket.inet_ntoa(data[-4:]) if n else data[3] & 15); return 0
def hold(host, port, out):
    s = socket.create_connection((host, int(port)), timeout=3)
    n = 0
    def say(text):
        open(out + '.tmp', 'w').write(text); os.rename(out + '.tmp', out)
    while True:
        try:
            s.sendall(b'x')
            if s.recv(1) != b'x': raise OSError('closed')
            n += 1; say('ok %d' % n)
        except OSError as e:
            say('cut %d %r' % (n, e)); return 0
        time.sleep(0.2)
def flood(server, count, secs):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    start = time.time(); sent = 0
    for i in range(int(count)):
        while True:
            try: s.sendto(query('n%d.slow.test' % i, i & 0xffff), (server, 53)); sent += 1; break
            except BlockingIOError: time.sleep(0.001)
        if i % 500 == 0: open('/tmp/flood.progress', 'w').write(str(i))
        lag = start + (i + 1) * float(secs) / int(count) - time.time()
        if lag > 0: time.sleep(lag)
    print('sent', sent, 'in', round(time.time() - start, 2)); return 0
try: sys.exit(globals()[sys.argv[1]](*sys.argv[2:]))
except SystemExit: raise
except BaseException as e: print('broken', repr(e)); sys.exit(3)
"#;

/// Runs a probe in `sandbox` (as root with `root`); true when it got
/// through. Panics when the probe itself broke.
async fn probe(c: &Client, sandbox: &str, root: bool, args: &str) -> bool {
    let sudo = if root { "sudo " } else { "" };
    let (s, v) = c
        .exec(
            sandbox,
            &["sh", "-c", &format!("{sudo}python3 /tmp/probe.py {args}")],
        )
        .await;
    assert_eq!(s, 200, "{args}: {v}");
    let code = v["exit_code"].as_i64().unwrap();
    assert!(code == 0 || code == 1, "probe {args} broke: {v}");
    code == 0
}

/// Runs a probe that must get through; what it printed.
async fn probe_says(c: &Client, sandbox: &str, args: &str) -> String {
    let (s, v) = c
        .exec(
            sandbox,
            &["sh", "-c", &format!("python3 /tmp/probe.py {args}")],
        )
        .await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{args}: {v}");
    v["stdout"].as_str().unwrap_or_default().trim().to_string()
}

async fn install_probe(c: &Client, sandbox: &str) {
    let (s, v) = c
        .exec(
            sandbox,
            &[
                "sh",
                "-c",
                &format!("cat > /tmp/probe.py <<'EOF'\n{PROBE}\nEOF"),
            ],
        )
        .await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
}

/// Runs `f` on a thread in namespace `ns`; the threads it starts stay there.
fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(path).expect("netns");
        // SAFETY: setns(2) on a descriptor we own, for this thread only.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in netns")
}

fn serve_tcp(addr: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || while l.accept().is_ok() {});
}

/// Echoes every byte back, a thread per connection.
fn serve_echo(addr: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        while let Ok((mut c, _)) = l.accept() {
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
            });
        }
    });
}

/// The world's DNS: `*.test` names answer with the public host — those
/// holding `twenty` with the second one — except those under
/// `slow.test`, which are never answered.
fn serve_dns(addr: &str) {
    let s = UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 12 || String::from_utf8_lossy(q).contains("slow") {
                continue;
            }
            let mut r = q.to_vec();
            r[2] |= 0x80;
            r[3] = 0x80;
            r[6..8].copy_from_slice(&1u16.to_be_bytes());
            let host = if String::from_utf8_lossy(q).contains("twenty") {
                20
            } else {
                10
            };
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, host]);
            let _ = s.send_to(&r, from);
        }
    });
}

/// Files the VMM layer (crates/vmm, QEMU itself) still creates with the
/// process umask: open to others by mode, but inside 0700 directories.
/// Issue 11 (VMM confinement) is to make this list empty.
const VMM_MADE: [&str; 6] = [
    "serial.log",
    "memory.ram",
    "qmp.sock",
    "snapshot",
    "vmstate",
    "manifest.json",
];

/// DATA, its sandboxes root and every sandbox directory are 0700; disks
/// and config drives 0600; whatever else `find DATA -perm /o+rwx` lists
/// is one of [`VMM_MADE`] inside such a directory. (`images/` is the shared
/// test cache, linked in.)
fn check_permissions(data: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let sandboxes = data.join("sandboxes");
    assert_eq!(mode(data), 0o700, "DATA");
    assert_eq!(mode(&sandboxes), 0o700, "DATA/sandboxes");
    let mut dirs = 0;
    for e in std::fs::read_dir(&sandboxes).unwrap() {
        let dir = e.unwrap().path();
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        for f in ["disk.ext4", "config.img"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{}/{f}", dir.display());
        }
        dirs += 1;
    }
    assert_eq!(dirs, 3);
    let open = testkit::run(
        "find",
        &[
            data.to_str().unwrap(),
            "-path",
            data.join("images").to_str().unwrap(),
            "-prune",
            "-o",
            "-perm",
            "/o+rwx",
            "-print",
        ],
    );
    eprintln!("world-accessible by mode under DATA: {open:?}");
    for path in open.lines().map(std::path::Path::new) {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            VMM_MADE.contains(&name) && path.starts_with(&sandboxes),
            "open to others: {}",
            path.display()
        );
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The world namespace, deleted on drop.
struct World(String);

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Builds the world behind the host's uplink, the host's own listeners
/// and its DNAT'd port.
fn build_world() -> World {
    let w = World(format!("iso-world-{}", std::process::id()));
    let ip = |args: &[&str]| testkit::run("ip", args);
    ip(&["netns", "add", &w.0]);
    ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &w.0,
    ]);
    ip(&["addr", "add", &format!("{UPLINK}/24"), "dev", "uplink"]);
    ip(&["link", "set", "uplink", "up"]);
    ip(&["route", "add", "default", "via", WORLD]);
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{WORLD}/24"), "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
    ] {
        let mut v = vec!["-n", &w.0];
        v.extend(args);
        ip(&v);
    }
    for a in [METADATA, LAN, PUBLIC, PUBLIC2] {
        ip(&["-n", &w.0, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    inside(&w.0, || {
        serve_tcp("0.0.0.0:80");
        serve_echo("0.0.0.0:7");
        serve_dns(&format!("{WORLD}:53"));
    });
    serve_tcp(&format!("{UPLINK}:8700"));
    serve_tcp("[::]:8701");
    // Docker's `-p 8080:80`: the host's port 8080, on any of its
    // addresses, DNAT'd to a "container" — the public host here, which
    // the egress policy would otherwise let through.
    testkit::run(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            "203.0.113.10:80",
        ],
    );
    w
}

fn daemon_config(data: &std::path::Path, extra: &str) -> api::DaemonConfig {
    let mut c = config(
        data,
        &format!("[network]\ndns_upstream = \"{WORLD}:53\"\n{extra}"),
    );
    // The API on every host address, the gateways' included, so that
    // "a guest cannot reach it" is the firewall's doing.
    c.listen = "0.0.0.0:0".parse().unwrap();
    c
}

async fn create(c: &Client, name: &str) -> String {
    let (s, v) = c
        .json(
            Method::POST,
            "/sandboxes",
            Some(serde_json::json!({"name": name, "image": "minimal"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["ip"].as_str().unwrap().to_string()
}

#[test]
fn a_hostile_guest_reaches_the_internet_and_its_siblings_and_nothing_else() {
    in_netns("api-iso", || async {
        let data = data_dir();
        testkit::images(image::Tier::Minimal);
        let _world = build_world();
        let d = TestDaemon::start(daemon_config(data.path(), "")).await;
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        let a1_ip = create(&alice, "a1").await;
        let a2_ip = create(&alice, "a2").await;
        let b1_ip = create(&bob, "b1").await;
        assert!(a1_ip.starts_with("10.210.0.") && b1_ip.starts_with("10.210.1."));
        let gw = "10.210.0.1";
        for (c, sb) in [(&alice, "a1"), (&alice, "a2"), (&bob, "b1")] {
            install_probe(c, sb).await;
        }
        let (s, v) = bob
            .exec(
                "b1",
                &[
                    "sh",
                    "-c",
                    "cd /tmp && (python3 -m http.server 9000 >/dev/null 2>&1 &)",
                ],
            )
            .await;
        assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
        // The guest boots without IPv6 (lohar disables it before any link
        // is up). A hostile root turns it back on — in a2, which then runs a
        // dual-stack server (IPv4 and IPv6 on one socket), and in a1, which
        // probes over it below.
        const V6_ON: &str = "[ -s /proc/net/if_inet6 ] && echo IPV6_AT_BOOT; \
             sudo sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
               net.ipv6.conf.lo.disable_ipv6=0 net.ipv6.conf.eth0.disable_ipv6=0 && \
             for i in $(seq 100); do ip -6 addr show dev eth0 scope link | grep -q inet6 && \
               ! ip -6 addr show dev eth0 | grep -q tentative && break; sleep 0.1; done";
        let (s, v) = alice.exec("a1", &["sh", "-c", V6_ON]).await;
        assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
        assert!(
            !v["stdout"]
                .as_str()
                .unwrap_or_default()
                .contains("IPV6_AT_BOOT"),
            "a1 booted with IPv6: {v}"
        );
        let (code, out) = {
            let script = format!(
                "{V6_ON}; cd /tmp && (python3 -m http.server --bind :: 9000 >/dev/null 2>&1 &) ; \
                 for i in $(seq 100); do python3 probe.py tcp ::1 9000 >/dev/null && break; sleep 0.1; done; \
                 cat /proc/net/if_inet6"
            );
            let (s, v) = alice.exec("a2", &["sh", "-c", &script]).await;
            assert_eq!(s, 200);
            (
                v["exit_code"].as_i64().unwrap(),
                v["stdout"].as_str().unwrap_or_default().to_string(),
            )
        };
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("IPV6_AT_BOOT"), "a2 booted with IPv6: {out}");

        // Positive controls: the public host (NAT), the sibling, the
        // gateway's DNS (a sibling's name, a world name) and ping.
        assert!(
            probe(&alice, "a1", false, &format!("tcp {PUBLIC} 80")).await,
            "public host"
        );
        assert!(
            probe(&alice, "a1", false, &format!("tcp {a2_ip} 9000")).await,
            "sibling"
        );
        assert!(
            probe(&alice, "a1", true, &format!("ping {a2_ip}")).await,
            "sibling ping"
        );
        assert!(
            probe(&alice, "a1", true, &format!("ping {gw}")).await,
            "gateway ping"
        );
        assert_eq!(
            probe_says(&alice, "a1", &format!("dns {gw} public.test")).await,
            format!("answer {PUBLIC}"),
            "a world name, through the relay"
        );
        assert_eq!(
            probe_says(&alice, "a1", &format!("dns {gw} a2")).await,
            format!("answer {a2_ip}"),
            "a sibling's name"
        );

        // Nothing else: metadata, the LAN, the host's own addresses, the
        // DNAT'd port, another user.
        for (what, args) in [
            ("metadata", format!("tcp {METADATA} 80")),
            ("LAN host", format!("tcp {LAN} 80")),
            ("host uplink address", format!("tcp {UPLINK} 8700")),
            (
                "host API on the gateway",
                format!("tcp {gw} {}", d.addr.port()),
            ),
            ("DNAT'd port on the gateway", format!("tcp {gw} 8080")),
            ("DNAT'd port on the uplink", format!("tcp {UPLINK} 8080")),
            ("another user's sandbox", format!("tcp {b1_ip} 9000")),
            (
                "another user's gateway DNS",
                "dns 10.210.1.1 public.test".into(),
            ),
            (
                "DNS on the host's uplink",
                format!("dns {UPLINK} public.test"),
            ),
        ] {
            assert!(
                !probe(&alice, "a1", false, &args).await,
                "{what} reachable ({args})"
            );
        }
        for (what, args) in [
            ("ping metadata", format!("ping {METADATA}")),
            ("ping the host's uplink", format!("ping {UPLINK}")),
            ("ping another user's gateway", "ping 10.210.1.1".to_string()),
        ] {
            assert!(!probe(&alice, "a1", true, &args).await, "{what}");
        }

        // IPv6: the bridge has no address at all (so no link-local to reach
        // the host's [::] listener through), and nothing IPv6 leaves a TAP.
        let v6 = testkit::run("ip", &["-6", "addr", "show", "dev", "bhu0000"]);
        assert!(v6.trim().is_empty(), "the bridge has IPv6: {v6}");
        assert!(
            !probe(&alice, "a1", false, "tcp fe80::b4:aff:fed2:1%eth0 8701").await,
            "the host's [::] listener through the bridge's link-local address"
        );
        let a2_ll = out
            .lines()
            .find(|l| l.ends_with("eth0") && l.starts_with("fe80"))
            .map(|l| {
                let hex = &l[..32];
                (0..8)
                    .map(|i| hex[i * 4..i * 4 + 4].trim_start_matches('0').to_string())
                    .map(|g| if g.is_empty() { "0".into() } else { g })
                    .collect::<Vec<_>>()
                    .join(":")
            });
        // Both guests have IPv6 again (root turned it on; link-local on
        // eth0), so this probe is a real attempt; the TAP guard drops it.
        let ll = a2_ll.unwrap_or_else(|| panic!("no IPv6 link-local in a2: {out}"));
        assert!(
            !probe(&alice, "a1", false, &format!("tcp {ll}%eth0 9000")).await,
            "sibling over IPv6 ({ll}) while IPv4 works"
        );

        // Spoofing, as root: another IP on eth0, used as the source.
        let spoof = "10.210.0.99";
        let (s, v) = alice
            .exec(
                "a1",
                &[
                    "sudo",
                    "ip",
                    "addr",
                    "add",
                    &format!("{spoof}/24"),
                    "dev",
                    "eth0",
                ],
            )
            .await;
        assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
        for (what, args) in [
            ("TCP", format!("tcp {PUBLIC} 80 {spoof}")),
            ("TCP to a sibling", format!("tcp {a2_ip} 9000 {spoof}")),
            ("ICMP", format!("ping {gw} {spoof}")),
            ("DNS", format!("dns {gw} public.test {spoof}")),
            ("ARP", format!("arp {spoof} {gw}")),
            (
                "ARP claiming a sibling's address",
                format!("arp {a2_ip} {gw}"),
            ),
            (
                "ARP from another MAC",
                format!("arp {a1_ip} {gw} 02:b4:de:ad:be:ef"),
            ),
        ] {
            assert!(
                !probe(&alice, "a1", true, &args).await,
                "spoofed {what} got through"
            );
        }
        // ...while the same probes from its own addresses work.
        assert!(
            probe(&alice, "a1", true, &format!("arp {a1_ip} {gw}")).await,
            "own ARP"
        );
        assert!(probe(&alice, "a1", true, &format!("tcp {PUBLIC} 80 {a1_ip}")).await);
        let neigh = testkit::run("ip", &["neigh", "show", "dev", "bhu0000"]);
        assert!(
            !neigh.contains(spoof),
            "the host learnt a spoofed address: {neigh}"
        );
        let fdb = testkit::run("bridge", &["fdb", "show", "br", "bhu0000"]);
        assert!(
            !fdb.contains("02:b4:de:ad:be:ef"),
            "the bridge learnt a spoofed MAC: {fdb}"
        );
        let (s, _) = alice
            .exec(
                "a1",
                &[
                    "sudo",
                    "ip",
                    "addr",
                    "del",
                    &format!("{spoof}/24"),
                    "dev",
                    "eth0",
                ],
            )
            .await;
        assert_eq!(s, 200);

        // A DNS flood from a1: 10,000 queries in 5 s for names the upstream
        // never answers. The daemon's descriptors stay put, and b1 (another
        // user's responder, the same relay) and a2 (a1's own bridge) still
        // resolve.
        let before = open_fds();
        let sampler = tokio::spawn(async {
            let mut peak = 0;
            for _ in 0..80 {
                peak = peak.max(open_fds());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        });
        let flooder = alice.clone();
        let flood = tokio::spawn(async move {
            let (s, v) = flooder
                .exec(
                    "a1",
                    &["python3", "/tmp/probe.py", "flood", gw, "10000", "5"],
                )
                .await;
            assert_eq!(s, 200, "{v}");
            v["stdout"].as_str().unwrap_or_default().to_string()
        });
        // Once the flood is well under way (a fifth of it sent):
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, v) = alice
                .exec(
                    "a1",
                    &["sh", "-c", "cat /tmp/flood.progress 2>/dev/null || echo 0"],
                )
                .await;
            let n: u32 = v["stdout"]
                .as_str()
                .unwrap_or("0")
                .trim()
                .parse()
                .unwrap_or(0);
            if n >= 2000 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the flood never started"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            probe_says(&bob, "b1", "dns 10.210.1.1 public.test").await,
            format!("answer {PUBLIC}"),
            "another user's DNS during the flood"
        );
        assert_eq!(
            probe_says(&alice, "a2", &format!("dns {gw} public.test")).await,
            format!("answer {PUBLIC}"),
            "a sibling's DNS during the flood"
        );
        let sent = flood.await.unwrap();
        let peak = sampler.await.unwrap();
        eprintln!("flood: {sent}; daemon fds {before} before, {peak} at most during");
        assert!(sent.starts_with("sent 10000"), "{sent}");
        assert!(
            peak <= before + 20,
            "descriptors went from {before} to {peak}"
        );

        // Per-sandbox egress, on a2, PATCHed between policies while it runs.
        egress_policies(&alice, &a1_ip, &a2_ip, gw).await;

        // Permissions: nothing under DATA is open to other users.
        check_permissions(data.path());

        // An operator's allow_cidrs entry opens the LAN host (and nothing
        // more): the daemon starts again with it.
        d.stop().await;
        let d = TestDaemon::start(daemon_config(
            data.path(),
            &format!("allow_cidrs = [\"{LAN}\"]\n"),
        ))
        .await;
        let alice = d.client(&alice.key);
        assert!(
            probe(&alice, "a1", false, &format!("tcp {LAN} 80")).await,
            "allowed LAN host"
        );
        assert!(!probe(&alice, "a1", false, &format!("tcp {METADATA} 80")).await);
        assert!(probe(&alice, "a1", false, &format!("tcp {PUBLIC} 80")).await);
        // a2's allow-list came back with it (adopted, then woken): its
        // name's address once resolved, and not the other public host.
        let (_, v) = alice.json(Method::GET, "/sandboxes/a2", None).await;
        assert_eq!(
            v["egress"],
            serde_json::json!({"allow": ["api.test"]}),
            "{v}"
        );
        assert!(!probe(&alice, "a2", false, &format!("tcp {PUBLIC2} 80")).await);
        assert_eq!(
            probe_says(&alice, "a2", &format!("dns {gw} api.test")).await,
            format!("answer {PUBLIC}")
        );
        assert!(probe(&alice, "a2", false, &format!("tcp {PUBLIC} 80")).await);
        check_permissions(data.path());
        d.stop().await;
    });
}

/// The TAP guard's set of addresses learned from DNS for the sandbox at
/// `ip` (`nft list set`).
fn learned_set(ip: &str) -> String {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let tap = format!("tu{:08x}", u32::from(ip));
    let hex: String = tap.bytes().map(|b| format!("{b:02x}")).collect();
    testkit::run(
        "nft",
        &["list", "set", "bridge", "bhatti", &format!("d_{hex}")],
    )
}

/// What `/tmp/hold` in `sandbox` says (the `hold` probe's state).
async fn held(c: &Client, sandbox: &str) -> String {
    let (_, v) = c
        .exec(sandbox, &["sh", "-c", "cat /tmp/hold 2>/dev/null; true"])
        .await;
    v["stdout"].as_str().unwrap_or_default().trim().to_string()
}

async fn set_egress(c: &Client, sandbox: &str, egress: serde_json::Value) {
    let (s, v) = c
        .json(
            Method::PATCH,
            &format!("/sandboxes/{sandbox}"),
            Some(serde_json::json!({ "egress": egress })),
        )
        .await;
    assert_eq!((s, &v["egress"]), (200, &egress), "{v}");
}

/// `egress: "none"` cuts an established connection at once and leaves
/// only the gateway's DNS and ping; an allow-list holding a name reaches
/// that name's address once the gateway resolved it, and not another
/// public host — not even one the guest resolved for another name.
async fn egress_policies(alice: &Client, a1_ip: &str, a2_ip: &str, gw: &str) {
    // Positive controls under "public": both public hosts, the sibling, a
    // connection held open (a byte echoed every 0.2 s).
    assert!(probe(alice, "a2", false, &format!("tcp {PUBLIC} 80")).await);
    assert!(probe(alice, "a2", false, &format!("tcp {PUBLIC2} 80")).await);
    assert!(probe(alice, "a2", true, &format!("ping {a1_ip}")).await);
    let (s, v) = alice
        .exec(
            "a2",
            &[
                "sh",
                "-c",
                &format!("(python3 /tmp/probe.py hold {PUBLIC} 7 /tmp/hold >/dev/null 2>&1 &)"),
            ],
        )
        .await;
    assert_eq!((s, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = held(alice, "a2").await;
        assert!(
            !h.starts_with("cut"),
            "the held connection broke early: {h}"
        );
        if h.strip_prefix("ok ").and_then(|n| n.parse::<u32>().ok()) >= Some(3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never held: {h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // "none": the held connection is cut; nothing but the gateway.
    set_egress(alice, "a2", serde_json::json!("none")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = held(alice, "a2").await;
        if h.starts_with("cut") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "egress none left an established connection up: {h}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (what, root, args) in [
        ("public host", false, format!("tcp {PUBLIC} 80")),
        ("second public host", false, format!("tcp {PUBLIC2} 80")),
        ("sibling ping", true, format!("ping {a1_ip}")),
    ] {
        assert!(
            !probe(alice, "a2", root, &args).await,
            "{what} reachable with egress none"
        );
    }
    // The gateway's DNS answers its network's names, and refuses to ask
    // the world for anything (a query's name would carry data out).
    assert_eq!(
        probe_says(alice, "a2", &format!("dns {gw} a1")).await,
        format!("answer {a1_ip}"),
        "the gateway's DNS for a sibling with egress none"
    );
    assert_eq!(
        probe_says(alice, "a2", &format!("dns {gw} public.test")).await,
        "empty 5",
        "a public name with egress none is REFUSED"
    );
    assert!(probe(alice, "a2", true, &format!("ping {gw}")).await);

    // An allow-list holding a name: closed until the gateway's DNS gives
    // the name's address, then open to it — and only to it.
    set_egress(alice, "a2", serde_json::json!({"allow": ["api.test"]})).await;
    assert!(
        !probe(alice, "a2", false, &format!("tcp {PUBLIC} 80")).await,
        "reachable before its name was resolved"
    );
    assert_eq!(
        probe_says(alice, "a2", &format!("dns {gw} api.test")).await,
        format!("answer {PUBLIC}")
    );
    let set = learned_set(a2_ip);
    assert!(set.contains(PUBLIC) && set.contains("expires"), "{set}");
    assert!(
        probe(alice, "a2", false, &format!("tcp {PUBLIC} 80")).await,
        "the listed name's address"
    );
    assert!(
        !probe(alice, "a2", false, &format!("tcp {PUBLIC2} 80")).await,
        "another public host"
    );
    assert_eq!(
        probe_says(alice, "a2", &format!("dns {gw} twenty.test")).await,
        "empty 5",
        "a name not on the list is REFUSED"
    );
    assert!(
        !probe(alice, "a2", false, &format!("tcp {PUBLIC2} 80")).await,
        "the address of a name not on the list"
    );
    assert!(!learned_set(a2_ip).contains(PUBLIC2));
}
