//! The real [`IpRoute`] implementation, exercised inside a network
//! namespace made by the test (never the host's). Needs root, as the whole
//! VM and network suite does (`scripts/test.sh`); without it, prints `SKIP` (and fails under `scripts/test.sh`).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;

use net::{IpRoute, Mac, NetError, NetOps, Network, NetworkConfig};
use serde_json::Value;
use testkit::Netns;

fn ip_json(args: &[&str]) -> Value {
    let out = Command::new("ip").arg("-j").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn link(name: &str) -> Option<Value> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone())
}

fn config() -> NetworkConfig {
    NetworkConfig {
        bridge: "bhtest0".into(),
        subnet: "10.201.0.0/24".parse().unwrap(),
        tap_prefix: "bx".into(),
        dns: Some(Ipv4Addr::new(10, 201, 0, 1)),
    }
}

/// Like the VM suites: without root there is nothing to test here.
fn skip() -> bool {
    if !testkit::is_root() {
        testkit::cannot_run("the network tests need root (scripts/test.sh runs them as root)");
        return true;
    }
    false
}

#[test]
fn bridge_taps_and_neighbours_for_real() {
    if skip() {
        return;
    }
    let _ns = Netns::enter("net");
    let ops = Arc::new(IpRoute::default());
    let net = Network::setup(config(), ops.clone(), []).unwrap();

    let br = link("bhtest0").expect("bridge exists");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert_eq!(
        br["address"], "02:b4:0a:c9:00:01",
        "fixed MAC from the gateway"
    );
    assert!(br["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let addrs = ip_json(&["addr", "show", "dev", "bhtest0"]);
    let inet: Vec<_> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(inet, vec!["10.201.0.1/24"]);

    let a = net.attach(4242, &net::Egress::Public).unwrap();
    let b = net.attach(0, &net::Egress::Public).unwrap();
    assert_eq!(a.ip, Ipv4Addr::new(10, 201, 0, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 201, 0, 3));
    assert_eq!(
        a.kernel_args(),
        "bhatti.ip=10.201.0.2/24 bhatti.gw=10.201.0.1 bhatti.dns=10.201.0.1"
    );
    let tap = link(&a.tap).expect("TAP exists");
    assert_eq!(tap["linkinfo"]["info_kind"], "tun");
    assert_eq!(tap["linkinfo"]["info_data"]["type"], "tap");
    assert_eq!(tap["linkinfo"]["info_data"]["user"], 4242);
    assert_eq!(tap["master"], "bhtest0");
    // No IPv6 on the TAP or the bridge (disabled before they came up, so
    // not even a link-local address), and the TAP is guarded from the start.
    for dev in [a.tap.as_str(), "bhtest0"] {
        let v6 = testkit::run("ip", &["-6", "addr", "show", "dev", dev]);
        assert!(v6.trim().is_empty(), "{dev}: {v6}");
    }
    let map = testkit::run("nft", &["list", "map", "bridge", "bhatti", "taps"]);
    assert!(map.contains(&format!("\"{}\"", a.tap)), "{map}");
    assert_eq!(
        ops.list_links("bx").unwrap(),
        vec![a.tap.clone(), b.tap.clone()]
    );

    let neigh = ip_json(&["neigh", "show", "dev", "bhtest0"]);
    let entry = neigh
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["dst"] == "10.201.0.2")
        .expect("pre-seeded neighbour");
    assert_eq!(entry["lladdr"], Mac::for_ip(a.ip).to_string());
    assert!(entry["state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "PERMANENT"));

    // Absent things are reported as such, not as errors.
    assert!(!ops.delete_link("bxnosuch").unwrap());
    assert!(!ops
        .delete_neighbour("bhtest0", Ipv4Addr::new(10, 201, 0, 99))
        .unwrap());
    // A TAP where a bridge is wanted is refused, not adopted.
    let e = ops
        .create_bridge(&a.tap, Mac::for_ip(a.ip), a.ip, 24)
        .unwrap_err();
    assert!(matches!(e, NetError::WrongKind { .. }), "{e}");
    // A second TAP of the same name fails with the tool's message.
    let e = ops.create_tap(&a.tap, 0, "bhtest0").unwrap_err();
    assert!(matches!(e, NetError::Command { .. }), "{e}");

    net.detach(&a).unwrap();
    assert!(link(&a.tap).is_none());
    let map = testkit::run("nft", &["list", "map", "bridge", "bhatti", "taps"]);
    assert!(
        !map.contains(&format!("\"{}\"", a.tap)),
        "guard outlived its TAP: {map}"
    );
    assert!(map.contains(&format!("\"{}\"", b.tap)), "{map}");
    let neigh = ip_json(&["neigh", "show", "dev", "bhtest0"]);
    assert!(!neigh
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["dst"] == "10.201.0.2"));
    net.detach(&a).unwrap();

    // A restart that kept nothing: the bridge is adopted, `b`'s TAP is an
    // orphan and goes.
    drop(net);
    let net = Network::setup(config(), ops.clone(), []).unwrap();
    assert!(link(&b.tap).is_none());
    assert!(link("bhtest0").is_some());
    net.teardown().unwrap();
    assert!(link("bhtest0").is_none());
    assert!(ops.list_links("bx").unwrap().is_empty());
}
