//! The firewall for real: two "users'" bridges in a test-made namespace
//! (the host), guests as further test-made namespaces on veth pairs, real
//! iptables rules, real TCP/UDP/ICMP between them. No traffic leaves the
//! namespaces this test creates.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use net::{Firewall, FirewallConfig, IptablesCommand};
use testkit::{run, Netns};

/// A guest: its own namespace, a veth to a host bridge, an address, a route.
struct Guest {
    ns: String,
}

impl Guest {
    fn new(tag: &str, bridge: &str, ip: &str, gw: &str) -> Guest {
        let ns = format!("{tag}-{}", std::process::id());
        let host_end = format!("v{tag}h");
        run("ip", &["netns", "add", &ns]);
        run(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        );
        run("ip", &["link", "set", &host_end, "master", bridge, "up"]);
        let inside = |args: &[&str]| {
            let mut v = vec!["netns", "exec", &ns, "ip"];
            v.extend_from_slice(args);
            run("ip", &v);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", "default", "via", gw]);
        Guest { ns }
    }

    /// Runs `f` on a thread inside this guest's namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(path).expect("guest netns");
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("guest thread")
    }

    fn pings(&self, ip: &str) -> bool {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "ping", "-c", "1", "-W", "1", ip])
            .output()
            .expect("ping")
            .status
            .success()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

fn tcp_connects(to: SocketAddr) -> bool {
    TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()
}

fn save() -> String {
    run("iptables-save", &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            // Counters change between saves; the rules are what matters.
            if l.starts_with(':') {
                l.split(' ').next().unwrap_or(l).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn isolates_users_guards_the_host_and_is_idempotent() {
    if !testkit::is_root() {
        testkit::cannot_run("firewall: needs root for namespaces and iptables");
        return;
    }
    let _host = Netns::enter("fw");
    run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    for (br, gw) in [("bhfa", "10.91.1.1/24"), ("bhfb", "10.91.2.1/24")] {
        run("ip", &["link", "add", br, "type", "bridge"]);
        run("ip", &["addr", "add", gw, "dev", br]);
        run("ip", &["link", "set", br, "up"]);
    }
    let a1 = Guest::new("fwa1", "bhfa", "10.91.1.2", "10.91.1.1");
    let a2 = Guest::new("fwa2", "bhfa", "10.91.1.3", "10.91.1.1");
    let b1 = Guest::new("fwb1", "bhfb", "10.91.2.2", "10.91.2.1");

    // Listeners: a host service on the gateway (think: the API), a DNS-ish
    // UDP responder on the gateway, and servers inside a2 and b1.
    let api = TcpListener::bind("10.91.1.1:8700").unwrap();
    let dns = UdpSocket::bind("10.91.1.1:53").unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = dns.recv_from(&mut buf) {
            let _ = dns.send_to(&buf[..n], from);
        }
    });
    for g in [&a2, &b1] {
        g.run(|| {
            let l = TcpListener::bind("0.0.0.0:9000").unwrap();
            std::thread::spawn(move || while l.accept().is_ok() {});
        });
    }
    // A rule someone else made, which bhatti must never touch.
    run(
        "iptables",
        &["-w", "-A", "INPUT", "-s", "192.0.2.7", "-j", "ACCEPT"],
    );

    // Before the firewall everything is open, so the checks below can fail.
    assert!(a1.run(|| tcp_connects("10.91.2.2:9000".parse().unwrap())));
    assert!(a1.run(|| tcp_connects("10.91.1.1:8700".parse().unwrap())));

    let fw = Firewall::new(Arc::new(IptablesCommand::default()));
    let cfg = FirewallConfig {
        bridge_prefix: "bhf".into(),
        subnets: vec![
            "10.91.1.0/24".parse().unwrap(),
            "10.91.2.0/24".parse().unwrap(),
        ],
        ..Default::default()
    };
    fw.apply(&cfg).unwrap();
    let once = save();
    fw.apply(&cfg).unwrap();
    fw.apply(&cfg).unwrap();
    assert_eq!(save(), once, "applying again must change nothing");
    assert_eq!(once.matches("-j BHATTI-FWD").count(), 1, "{once}");
    assert_eq!(once.matches("-j BHATTI-IN").count(), 1, "{once}");
    assert_eq!(once.matches("-j BHATTI-NAT").count(), 1, "{once}");

    // Same user: a1 and a2 talk (TCP and ICMP).
    assert!(a1.run(|| tcp_connects("10.91.1.3:9000".parse().unwrap())));
    assert!(a1.pings("10.91.1.3"));
    // Other user: nothing gets through, either way.
    assert!(!a1.run(|| tcp_connects("10.91.2.2:9000".parse().unwrap())));
    assert!(!a1.pings("10.91.2.2"));
    assert!(!b1.pings("10.91.1.2"));
    // The host: no new connections from sandboxes...
    assert!(!a1.run(|| tcp_connects("10.91.1.1:8700".parse().unwrap())));
    assert!(!a1.run(|| tcp_connects("10.91.2.1:8700".parse().unwrap())));
    // ...except pings and DNS to the gateway.
    assert!(a1.pings("10.91.1.1"));
    let answered = a1.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"query", (Ipv4Addr::new(10, 91, 1, 1), 53))
            .unwrap();
        let mut buf = [0u8; 16];
        s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).ok()
    });
    assert_eq!(answered.as_deref(), Some(&b"query"[..]));
    // The host may still open connections to its sandboxes (the agent).
    assert!(tcp_connects("10.91.1.3:9000".parse().unwrap()));
    drop(api);

    fw.remove().unwrap();
    let after = save();
    assert!(!after.contains("BHATTI"), "{after}");
    assert!(
        after.contains("-A INPUT -s 192.0.2.7/32 -j ACCEPT"),
        "{after}"
    );
    assert!(a1.run(|| tcp_connects("10.91.2.2:9000".parse().unwrap())));
}
