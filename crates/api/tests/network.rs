//! The daemon's networks on real VMs: each user's sandboxes share a bridge
//! and subnet of their own and reach each other (by name, through the
//! gateway's DNS); another user's sandboxes reach none of them, nor the
//! daemon's API port on the host; a sandbox keeps its address and its
//! running server across a cold cycle and a daemon restart; the firewall
//! holds one copy of each rule however often the daemon starts.

mod common;

use common::*;
use reqwest::Method;

/// Runs `script` in `sandbox`; returns (exit code, stdout + stderr).
async fn sh(c: &Client, sandbox: &str, script: &str) -> (i64, String) {
    let (s, v) = c.exec(sandbox, &["sh", "-c", script]).await;
    assert_eq!(s, 200, "{script}: {v}");
    let text = format!(
        "{}{}",
        v["stdout"].as_str().unwrap_or_default(),
        v["stderr"].as_str().unwrap_or_default()
    );
    (v["exit_code"].as_i64().unwrap(), text)
}

/// busybox wget's own `-T` crashes (SIGSEGV) in Debian's static busybox,
/// which would make every "cannot connect" pass for the wrong reason: the
/// timeout applet bounds it instead, and refusals are checked to be
/// neither a success nor a crash.
fn get(url: &str) -> String {
    format!(
        "if command -v wget >/dev/null; then timeout 5 wget -q -O - {url}; else curl -sS -m 4 {url}; fi"
    )
}

fn refused((code, out): (i64, String)) {
    assert!(code != 0 && code != 139, "exit {code}: {out}");
}

/// One ICMP echo from an unprivileged ICMP datagram socket (lohar opens
/// `ping_group_range` to every user; busybox's ping wants a raw socket,
/// which the sandbox user does not get): python3, so on `minimal`.
fn ping(ip: &str) -> String {
    format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); \
         s.settimeout(2); s.sendto(bytes([8, 0, 0, 0, 0, 0, 0, 1]) + b'bhatti', ('{ip}', 0)); \
         print('reply from', s.recvfrom(64)[1][0])\""
    )
}

async fn ip_of(c: &Client, sandbox: &str) -> String {
    let (s, v) = c
        .json(Method::GET, &format!("/sandboxes/{sandbox}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    v["ip"].as_str().unwrap().to_string()
}

fn daemon_config(data: &std::path::Path) -> api::DaemonConfig {
    // Unknown names go to a loopback port where nothing listens: no query
    // ever leaves the test's namespace.
    let mut c = config(data, "[network]\ndns_upstream = \"127.0.0.1:9\"\n");
    // The API on every host address, the bridges' gateways included, so
    // that "sandboxes cannot reach it" is the firewall's doing.
    c.listen = "0.0.0.0:0".parse().unwrap();
    c
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn users_get_isolated_networks_with_names_stable_addresses_and_no_way_to_the_host() {
    in_netns("api-net", || async {
        let data = data_dir();
        testkit::images(image::Tier::Minimal);
        let d = TestDaemon::start(daemon_config(data.path())).await;
        let api_port = d.addr.port();
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        let web_ip = alice.create("web").await["ip"]
            .as_str()
            .unwrap()
            .to_string();
        let db_ip = alice.create("db").await["ip"].as_str().unwrap().to_string();
        let (s, v) = bob
            .json(
                Method::POST,
                "/sandboxes",
                Some(serde_json::json!({"name": "other", "image": "minimal"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let other_ip = v["ip"].as_str().unwrap().to_string();

        // A subnet and a bridge per user.
        assert!(web_ip.starts_with("10.210.0.") && db_ip.starts_with("10.210.0."));
        assert!(other_ip.starts_with("10.210.1."), "{other_ip}");
        assert!(link_exists("bhu0000") && link_exists("bhu0001"));

        // A server in alice's "web".
        let (code, out) = sh(
            &alice,
            "web",
            "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
        )
        .await;
        assert_eq!(code, 0, "{out}");

        // Alice's sandboxes reach each other: TCP, ICMP, and by name.
        let (code, out) = sh(&alice, "db", &get(&format!("http://{web_ip}:8080/"))).await;
        assert_eq!((code, out.trim()), (0, "hello-from-web"));
        let (code, out) = sh(&alice, "db", &get("http://web:8080/")).await;
        assert_eq!((code, out.trim()), (0, "hello-from-web"), "by name");

        // Bob's sandbox reaches none of that: not by TCP, not by ICMP, and
        // alice's names mean nothing to him.
        refused(sh(&bob, "other", &get(&format!("http://{web_ip}:8080/"))).await);
        refused(sh(&bob, "other", &ping(&web_ip)).await);
        let (code, out) = sh(
            &bob,
            "other",
            "python3 -c \"import socket; print(socket.gethostbyname('web'))\"",
        )
        .await;
        assert!(code != 0 && !out.contains(&web_ip), "{out}");
        // ...while the same probe to his own gateway shows ICMP works.
        let (code, out) = sh(&bob, "other", &ping("10.210.1.1")).await;
        assert_eq!((code, out.trim()), (0, "reply from 10.210.1.1"));

        // Nobody reaches the daemon's API port on the host: not through
        // their own gateway, not through another user's.
        for (c, sb, gw) in [
            (&alice, "db", "10.210.0.1"),
            (&alice, "db", "10.210.1.1"),
            (&bob, "other", "10.210.1.1"),
        ] {
            refused(sh(c, sb, &get(&format!("http://{gw}:{api_port}/health"))).await);
        }
        // The API does answer on that address from the host, so the
        // refusals above are the firewall's.
        let health = reqwest::get(format!("http://10.210.0.1:{api_port}/health"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);

        // A cold cycle: the same address, and the server (a process that
        // lived through the snapshot) still answers its sibling.
        let (s, v) = alice.json(Method::POST, "/sandboxes/web/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        let (s, v) = alice.json(Method::POST, "/sandboxes/web/start", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("hot")), "{v}");
        assert_eq!(ip_of(&alice, "web").await, web_ip);
        let (code, out) = sh(&alice, "db", &get(&format!("http://{web_ip}:8080/"))).await;
        assert_eq!((code, out.trim()), (0, "hello-from-web"), "after cold");

        // Bob's last sandbox takes his bridge (and its DNS responder) along.
        let (s, _) = bob.json(Method::DELETE, "/sandboxes/other", None).await;
        assert_eq!(s, 204);
        assert!(
            !link_exists("bhu0001"),
            "bob's bridge outlived his sandboxes"
        );

        // Restarts: one copy of each rule; alice's sandboxes come back on
        // their addresses, and still talk.
        d.stop().await;
        let d = TestDaemon::start(daemon_config(data.path())).await;
        d.stop().await;
        let d = TestDaemon::start(daemon_config(data.path())).await;
        let rules = testkit::run("iptables-save", &[]);
        for rule in [
            "-j BHATTI-FWD",
            "-j BHATTI-IN",
            "-j BHATTI-NAT",
            "--physdev-is-bridged",
            "MASQUERADE",
        ] {
            assert_eq!(rules.matches(rule).count(), 1, "{rule}: {rules}");
        }
        let alice = d.client(&alice.key);
        assert_eq!(ip_of(&alice, "web").await, web_ip);
        assert_eq!(ip_of(&alice, "db").await, db_ip);
        // They came back cold; traffic between sandboxes does not wake
        // them, a request through the API does.
        assert_eq!(sh(&alice, "web", "true").await.0, 0);
        let (code, out) = sh(&alice, "db", &get("http://web:8080/")).await;
        assert_eq!((code, out.trim()), (0, "hello-from-web"), "after restarts");
        d.stop().await;
    });
}
