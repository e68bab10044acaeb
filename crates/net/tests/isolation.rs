//! The egress policy and the TAP guard for real, without VMs: a test-made
//! "host" namespace with two users' bridges (made by [`IpRoute`]), guests
//! as namespaces on veth pairs (the host ends guarded like TAPs), and a
//! "world" namespace behind a veth holding a metadata address, a LAN host
//! and a public host on its loopback, each with a listener. Every probe is
//! first shown to succeed before the rules go in, so each refusal after is
//! the rules' doing. Nothing leaves these namespaces.
//!
//! (The same world with real VMs and the daemon: crates/api/tests/isolation.rs.)

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use net::{
    Cidr, Egress, Firewall, FirewallConfig, IpRoute, IptablesCommand, Mac, NetOps, TapGuard,
};
use testkit::{run, Netns};

const METADATA: &str = "169.254.169.254";
const LAN: &str = "192.168.77.1";
const PUBLIC: &str = "203.0.113.10";
/// The host's own address on its uplink (not a bridge).
const UPLINK: &str = "198.51.100.1";

fn ns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

/// Runs `f` on a thread inside namespace `ns`.
fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns_path(ns);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(path).expect("netns");
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns")
}

fn in_ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec")
}

/// A namespace of the test's own, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }
    fn ip(&self, args: &[&str]) {
        let mut v = vec!["-n", &self.0];
        v.extend_from_slice(args);
        run("ip", &v);
    }
    fn ok(&self, cmd: &[&str]) -> bool {
        in_ns(&self.0, cmd).status.success()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A guest: a namespace whose `eth0` is the peer of a host-side port on a
/// bridge, with the MAC bhatti derives from its address.
struct Guest {
    ns: Ns,
    port: String,
    ip: String,
    gw: String,
}

impl Guest {
    fn new(tag: &str, bridge: &str, ip: &str, gw: &str) -> Guest {
        let ns = Ns::new(tag);
        let port = format!("v{tag}");
        run(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
            ],
        );
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6"), "1").unwrap();
        run("ip", &["link", "set", &port, "master", bridge, "up"]);
        let mac = Mac::for_ip(ip.parse().unwrap()).to_string();
        ns.ip(&["link", "set", "eth0", "address", &mac]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", gw]);
        Guest {
            ns,
            port,
            ip: ip.into(),
            gw: gw.into(),
        }
    }

    fn guard(&self, egress: Egress) -> TapGuard {
        TapGuard {
            tap: self.port.clone(),
            mac: Mac::for_ip(self.ip.parse().unwrap()),
            ip: self.ip.parse().unwrap(),
            gateway: self.gw.parse().unwrap(),
            egress,
            learned: Vec::new(),
        }
    }

    /// A TCP connection to `to`, from `from` when given.
    fn connects(&self, to: &str, from: Option<&str>) -> bool {
        let to: SocketAddr = self.scoped(to).parse().unwrap();
        let from: Option<SocketAddr> = from.map(|f| format!("{f}:0").parse().unwrap());
        inside(&self.ns.0, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sock = if to.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .unwrap();
                if let Some(f) = from {
                    sock.bind(f).unwrap();
                }
                matches!(
                    tokio::time::timeout(Duration::from_millis(800), sock.connect(to)).await,
                    Ok(Ok(_))
                )
            })
        })
    }

    /// `[fe80::…%eth0]:port` with the interface as its index (what std
    /// parses); anything else unchanged.
    fn scoped(&self, to: &str) -> String {
        match to.split_once("%eth0") {
            Some((head, tail)) => {
                let out = in_ns(&self.ns.0, &["cat", "/sys/class/net/eth0/ifindex"]);
                let index = String::from_utf8_lossy(&out.stdout).trim().to_string();
                format!("{head}%{index}{tail}")
            }
            None => to.to_string(),
        }
    }

    fn pings(&self, ip: &str, from: Option<&str>) -> bool {
        let mut cmd = vec!["ping", "-c", "1", "-W", "1"];
        if let Some(f) = from {
            cmd.extend(["-I", f]);
        }
        cmd.push(ip);
        self.ns.ok(&cmd)
    }

    /// A UDP "DNS" query to `to`; whether an answer came back.
    fn asks(&self, to: &str) -> bool {
        let to: SocketAddr = to.parse().unwrap();
        inside(&self.ns.0, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(800)))
                .unwrap();
            s.send_to(b"query", to).unwrap();
            let mut buf = [0u8; 16];
            s.recv_from(&mut buf).is_ok()
        })
    }

    /// The IPv6 link-local address of this guest's eth0.
    fn link_local(&self) -> String {
        let out = in_ns(
            &self.ns.0,
            &["ip", "-6", "-o", "addr", "show", "dev", "eth0"],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .find(|w| w.starts_with("fe80::"))
            .and_then(|w| w.split('/').next())
            .unwrap_or_else(|| panic!("no link-local on eth0: {text}"))
            .to_string()
    }
}

fn serve_tcp(addr: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || while l.accept().is_ok() {});
}

fn serve_udp_echo(addr: &str) {
    let s = UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
}

fn neighbour_exists(dev: &str, ip: &str) -> bool {
    let out = run("ip", &["neigh", "show", "dev", dev]);
    out.lines().any(|l| l.split_whitespace().next() == Some(ip))
}

fn fdb_has(bridge: &str, mac: &str) -> bool {
    run("bridge", &["fdb", "show", "br", bridge]).contains(mac)
}

#[test]
fn guests_reach_the_internet_and_siblings_and_nothing_else_and_cannot_spoof() {
    assert!(
        testkit::is_root(),
        "needs root for namespaces, iptables and nft"
    );
    let _host = Netns::enter("iso");
    let host_ns = _host.name.clone();
    run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let ops = IpRoute::default();
    for (br, gw) in [("bhia", "10.92.1.1"), ("bhib", "10.92.2.1")] {
        ops.create_bridge(
            br,
            Mac::for_ip(gw.parse().unwrap()),
            gw.parse().unwrap(),
            24,
        )
        .unwrap();
    }

    // The world, behind the host's uplink: metadata, LAN and public hosts
    // on its loopback (no dummy driver needed), a listener on :80.
    let world = Ns::new("isow");
    run(
        "ip",
        &[
            "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", &world.0,
        ],
    );
    run(
        "ip",
        &["addr", "add", &format!("{UPLINK}/24"), "dev", "uplink"],
    );
    run("ip", &["link", "set", "uplink", "up"]);
    world.ip(&["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
    world.ip(&["link", "set", "eth0", "up"]);
    for a in [METADATA, LAN, PUBLIC] {
        world.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    // So that, before NAT is set up, the probes below can succeed.
    world.ip(&["route", "add", "10.92.0.0/16", "via", UPLINK]);
    run("ip", &["route", "add", "default", "via", "198.51.100.2"]);
    inside(&world.0, || serve_tcp("0.0.0.0:80"));

    // The host: a service on its uplink address, one on [::], a DNS-ish
    // echo on every address, and a Docker-style published port: DNAT of
    // the host's port 8080 to a "container" — here the public host, which
    // the egress policy would otherwise allow.
    serve_tcp(&format!("{UPLINK}:8700"));
    serve_tcp("[::]:8701");
    serve_udp_echo("0.0.0.0:53");
    run(
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

    let a1 = Guest::new("isa1", "bhia", "10.92.1.2", "10.92.1.1");
    let a2 = Guest::new("isa2", "bhia", "10.92.1.3", "10.92.1.1");
    let b1 = Guest::new("isb1", "bhib", "10.92.2.2", "10.92.2.1");
    for g in [&a2, &b1] {
        inside(&g.ns.0, || serve_tcp("0.0.0.0:9000"));
    }
    inside(&a2.ns.0, || serve_tcp("[::]:9001"));

    // The bridges have no IPv6 (and so no link-local address for a guest
    // to reach [::] listeners through), filter reverse paths strictly and
    // answer ARP only for their own address.
    for br in ["bhia", "bhib"] {
        let v6 = run("ip", &["-6", "addr", "show", "dev", br]);
        assert!(v6.trim().is_empty(), "{br} has IPv6: {v6}");
        for (key, want) in [
            (format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6"), "1"),
            (format!("/proc/sys/net/ipv4/conf/{br}/rp_filter"), "1"),
            (format!("/proc/sys/net/ipv4/conf/{br}/arp_ignore"), "1"),
        ] {
            assert_eq!(std::fs::read_to_string(&key).unwrap().trim(), want, "{key}");
        }
    }

    // Before any rule: every probe below gets through, so each refusal
    // after is the rules' doing.
    let public = format!("{PUBLIC}:80");
    for g in [&a1, &a2] {
        testkit::wait_until(
            "IPv6 duplicate address detection",
            Duration::from_secs(10),
            || {
                let out = in_ns(
                    &g.ns.0,
                    &["ip", "-6", "addr", "show", "dev", "eth0", "tentative"],
                );
                out.status.success() && out.stdout.is_empty()
            },
        );
    }
    let a2_ll = a2.link_local();
    let a2_v6 = format!("[{a2_ll}%eth0]:9001");
    for (what, ok) in [
        ("public", a1.connects(&public, None)),
        ("metadata", a1.connects(&format!("{METADATA}:80"), None)),
        ("LAN", a1.connects(&format!("{LAN}:80"), None)),
        ("host uplink", a1.connects(&format!("{UPLINK}:8700"), None)),
        ("DNAT'd port", a1.connects("10.92.1.1:8080", None)),
        ("other user", a1.connects("10.92.2.2:9000", None)),
        ("other gateway DNS", a1.asks("10.92.2.1:53")),
        ("sibling over IPv6", a1.connects(&a2_v6, None)),
    ] {
        assert!(ok, "before the rules, {what} must be reachable");
    }

    let fw = Firewall::new(Arc::new(IptablesCommand::default()));
    let mut cfg = FirewallConfig {
        bridge_prefix: "bhi".into(),
        subnets: vec!["10.92.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    fw.apply(&cfg).unwrap();
    for g in [&a1, &a2, &b1] {
        ops.guard_tap(&g.guard(Egress::Public)).unwrap();
    }

    // Positive controls: the public host through NAT, the sibling (TCP and
    // ICMP), DNS and ping to the own gateway.
    assert!(a1.connects(&public, None), "public host");
    assert!(a1.connects("10.92.1.3:9000", None), "sibling");
    assert!(a1.pings("10.92.1.3", None), "sibling ping");
    assert!(a1.pings("10.92.1.1", None), "gateway ping");
    assert!(a1.asks("10.92.1.1:53"), "gateway DNS");
    // Nothing else.
    for (what, to) in [
        ("metadata", format!("{METADATA}:80")),
        ("LAN host", format!("{LAN}:80")),
        ("host's uplink address", format!("{UPLINK}:8700")),
        ("DNAT'd port on the gateway", "10.92.1.1:8080".into()),
        ("DNAT'd port on the uplink", format!("{UPLINK}:8080")),
        ("other user's sandbox", "10.92.2.2:9000".into()),
    ] {
        assert!(!a1.connects(&to, None), "{what} ({to}) reachable");
    }
    assert!(!a1.asks("10.92.2.1:53"), "another user's gateway DNS");
    assert!(
        !a1.asks(&format!("{UPLINK}:53")),
        "DNS on the host's uplink"
    );
    assert!(!a1.pings(UPLINK, None), "ping to the host's uplink");
    assert!(
        !a1.pings("10.92.2.1", None),
        "ping to another user's gateway"
    );
    assert!(!a1.pings(METADATA, None), "ping to metadata");
    // IPv6: nothing gets onto the bridge (sibling, host [::] listener via
    // the bridge's would-be link-local address).
    assert!(!a1.connects(&a2_v6, None), "sibling over IPv6");
    let bridge_ll = "fe80::b4:aff:fe5c:101"; // EUI-64 of 02:b4:0a:5c:01:01
    assert!(!a1.connects(&format!("[{bridge_ll}%eth0]:8701"), None));

    // Spoofing: another address on a1, used as the source, gets nothing
    // through (TCP, ICMP, DNS — and its ARP never teaches the host).
    a1.ns.ip(&["addr", "add", "10.92.1.99/24", "dev", "eth0"]);
    assert!(
        !a1.connects(&public, Some("10.92.1.99")),
        "TCP from a spoofed IP"
    );
    assert!(
        !a1.pings("10.92.1.1", Some("10.92.1.99")),
        "ICMP from a spoofed IP"
    );
    assert!(
        !a1.connects("10.92.1.3:9000", Some("10.92.1.99")),
        "to a sibling"
    );
    let spoofed_dns = inside(&a1.ns.0, || {
        let s = UdpSocket::bind("10.92.1.99:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s.send_to(b"q", "10.92.1.1:53").unwrap();
        s.recv_from(&mut [0u8; 8]).is_ok()
    });
    assert!(!spoofed_dns, "DNS from a spoofed IP");
    assert!(
        !neighbour_exists("bhia", "10.92.1.99"),
        "ARP from a spoofed IP"
    );
    // ...and the real address still works (the guard is not just closed).
    assert!(a1.connects(&public, Some("10.92.1.2")));
    a1.ns.ip(&["addr", "del", "10.92.1.99/24", "dev", "eth0"]);
    // Another MAC: nothing, and the bridge never learns it.
    a1.ns
        .ip(&["link", "set", "eth0", "address", "02:b4:de:ad:be:ef"]);
    assert!(!a1.pings("10.92.1.1", None), "from a spoofed MAC");
    assert!(
        !a1.connects("10.92.1.3:9000", None),
        "to a sibling from a spoofed MAC"
    );
    assert!(!fdb_has("bhia", "02:b4:de:ad:be:ef"));
    a1.ns.ip(&[
        "link",
        "set",
        "eth0",
        "address",
        &Mac::for_ip("10.92.1.2".parse().unwrap()).to_string(),
    ]);
    assert!(a1.pings("10.92.1.1", None));

    // The operator's allow opens the LAN host; a deny closes the public one.
    cfg.allow = vec![Cidr::host(LAN.parse().unwrap())];
    cfg.deny = vec![Cidr::host(PUBLIC.parse().unwrap())];
    fw.apply(&cfg).unwrap();
    assert!(a1.connects(&format!("{LAN}:80"), None), "allowed LAN host");
    assert!(
        !a1.connects(&format!("{METADATA}:80"), None),
        "metadata still denied"
    );
    assert!(!a1.connects(&public, None), "denied public host");
    cfg.allow.clear();
    cfg.deny.clear();
    fw.apply(&cfg).unwrap();

    // Per sandbox: `None` reaches its gateway's DNS and ping only.
    ops.guard_tap(&a1.guard(Egress::None)).unwrap();
    assert!(a1.asks("10.92.1.1:53") && a1.pings("10.92.1.1", None));
    assert!(!a1.connects(&public, None), "public with egress none");
    assert!(
        !a1.connects("10.92.1.3:9000", None),
        "sibling with egress none"
    );
    // An allow-list reaches what it lists — and the firewall still decides:
    // a listed LAN host stays denied unless the operator allows it.
    let list = Egress::allow(&[PUBLIC, LAN]).unwrap();
    ops.guard_tap(&a1.guard(list)).unwrap();
    assert!(a1.connects(&public, None), "listed public host");
    assert!(!a1.connects("10.92.1.3:9000", None), "unlisted sibling");
    assert!(
        !a1.connects(&format!("{LAN}:80"), None),
        "listed but denied by the host"
    );
    // A list holding a name: nothing but the gateway until an address is
    // learned for it (what the DNS relay does with its answers), then that
    // address until its timeout runs out; a guard replaced with what was
    // learned keeps it, one replaced without does not.
    let named = Egress::allow(&["api.test"]).unwrap();
    ops.guard_tap(&a1.guard(named.clone())).unwrap();
    assert!(a1.asks("10.92.1.1:53"), "gateway DNS with a name list");
    assert!(
        !a1.connects(&public, None),
        "public before its name is learned"
    );
    let pub_ip: std::net::Ipv4Addr = PUBLIC.parse().unwrap();
    ops.allow_learned(&a1.port, &[(pub_ip, Duration::from_secs(600))])
        .unwrap();
    assert!(a1.connects(&public, None), "learned address");
    assert!(!a1.connects("10.92.1.3:9000", None), "unlisted sibling");
    let mut kept = a1.guard(named.clone());
    kept.learned = vec![(pub_ip, Duration::from_secs(600))];
    ops.guard_tap(&kept).unwrap();
    assert!(a1.connects(&public, None), "kept across a new guard");
    ops.guard_tap(&a1.guard(named)).unwrap();
    assert!(!a1.connects(&public, None), "dropped with a new guard");
    // Learned again for 2 s (re-adding restarts the timeout): open, then closed.
    ops.allow_learned(&a1.port, &[(pub_ip, Duration::from_secs(600))])
        .unwrap();
    ops.allow_learned(&a1.port, &[(pub_ip, Duration::from_secs(2))])
        .unwrap();
    assert!(a1.connects(&public, None), "learned for 2 s");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while a1.connects(&public, None) {
        assert!(
            std::time::Instant::now() < deadline,
            "a learned address never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ops.guard_tap(&a1.guard(Egress::Public)).unwrap();
    assert!(a1.connects("10.92.1.3:9000", None));

    // An unguarded TAP is back to anything; the table goes with remove_guards.
    ops.unguard_tap(&a1.port).unwrap();
    ops.unguard_tap(&a1.port).unwrap(); // twice is harmless
    a1.ns.ip(&["addr", "add", "10.92.1.99/24", "dev", "eth0"]);
    assert!(
        a1.pings("10.92.1.1", Some("10.92.1.99")),
        "unguarded: spoofing works"
    );
    assert!(net::remove_guards().unwrap());
    assert!(!net::remove_guards().unwrap());
    fw.remove().unwrap();
    drop((a1, a2, b1, world));
    let _ = host_ns;
}
