//! The DNS responder on loopback: sandbox names answered, the rest relayed
//! from an upstream that is itself a test server on loopback; strangers
//! ignored; a flood from one client bounded (in flight, rate, descriptors)
//! while another client is still answered.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, qtype as u8, 0, 1]);
    m
}

async fn ask(server: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(msg, server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(1500), s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn answers_sandbox_names_and_relays_the_rest() {
    // The fake upstream answers every query with a recognisable reply.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80;
            reply.extend_from_slice(b"UPSTREAM");
            let _ = upstream.send_to(&reply, from).await;
        }
    });
    let names: HashMap<String, Ipv4Addr> =
        HashMap::from([("dev".to_string(), Ipv4Addr::new(10, 210, 0, 7))]);
    let lookup: net::dns::NameLookup = Arc::new(move |n: &str, from: std::net::IpAddr| {
        assert!(from.is_loopback(), "the asker's address reaches the lookup");
        names.get(n).copied()
    });
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let server = socket.local_addr().unwrap();
    let relay = net::dns::Relay::bind(upstream_addr, Default::default())
        .await
        .unwrap();
    tokio::spawn(relay.clone().run());
    tokio::spawn(net::dns::serve(
        socket,
        lookup,
        "bhatti".into(),
        relay,
        "127.0.0.0/8".parse().unwrap(),
    ));

    for name in ["dev", "DEV", "dev.bhatti"] {
        let a = ask(server, &query(7, name, 1)).await.expect("an answer");
        assert_eq!(&a[..2], &[0, 7]);
        assert_eq!(&a[a.len() - 4..], &[10, 210, 0, 7], "{name}");
    }
    let relayed = ask(server, &query(9, "example.org", 1))
        .await
        .expect("relayed");
    assert!(relayed.ends_with(b"UPSTREAM"));
    assert_eq!(&relayed[..2], &[0, 9]);
    // A malformed query gets nothing, and the server goes on.
    assert_eq!(ask(server, b"\x00\x01garbage").await, None);
    assert!(ask(server, &query(11, "dev", 1)).await.is_some());
}

/// An upstream that answers every name but those under `slow.` (which it
/// never answers, so they stay in flight until the relay gives up).
async fn upstream() -> SocketAddr {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            if String::from_utf8_lossy(&buf[..n]).contains("slow") {
                continue;
            }
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80;
            let _ = upstream.send_to(&reply, from).await;
        }
    });
    addr
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn ask_from(from: &str, server: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind(format!("{from}:0")).await.unwrap();
    s.send_to(msg, server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(1500), s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Asks like a stub resolver does: up to 5 tries of [`ask_from`] (glibc
/// retries after its timeout too). A flood's backlog in the server's socket
/// may drop or delay one try on a loaded machine; "answered" means a
/// resolver in the other sandbox gets its answer.
async fn resolve_from(from: &str, server: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    for _ in 0..5 {
        if let Some(answer) = ask_from(from, server, msg).await {
            return Some(answer);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_nothing_and_a_flood_stays_bounded() {
    let limits = net::dns::RelayLimits {
        max_in_flight: 100,
        max_in_flight_per_client: 20,
        per_client_rate: 200,
        per_client_burst: 50,
        timeout: Duration::from_secs(2),
    };
    let relay = net::dns::Relay::bind(upstream().await, limits)
        .await
        .unwrap();
    tokio::spawn(relay.clone().run());
    let lookup: net::dns::NameLookup =
        Arc::new(|n: &str, _| (n == "dev").then_some(Ipv4Addr::new(10, 210, 0, 7)));
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let server = socket.local_addr().unwrap();
    tokio::spawn(net::dns::serve(
        socket,
        lookup,
        "bhatti".into(),
        relay.clone(),
        // The network: 127.0.0.0/30 — 127.0.0.2 and .3 are "sandboxes".
        "127.0.0.0/30".parse().unwrap(),
    ));

    // A stranger (outside the network) is not answered, a sandbox is.
    assert_eq!(
        ask_from("127.0.0.9", server, &query(1, "dev", 1)).await,
        None
    );
    assert!(ask_from("127.0.0.2", server, &query(1, "dev", 1))
        .await
        .is_some());
    assert!(ask_from("127.0.0.3", server, &query(2, "example.org", 1))
        .await
        .is_some());

    // 127.0.0.2 floods: 10,000 queries for names the upstream never answers.
    let before = open_fds();
    let flooder = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let mut peak_fds = 0;
    let mut peak_in_flight = 0;
    for i in 0..10_000u32 {
        let q = query(i as u16, &format!("n{i}.slow.test"), 1);
        flooder.send_to(&q, server).await.unwrap();
        if i % 500 == 0 {
            peak_fds = peak_fds.max(open_fds());
            peak_in_flight = peak_in_flight.max(relay.in_flight());
            tokio::task::yield_now().await;
        }
    }
    // Meanwhile the other sandbox is answered, by name and through the relay.
    let a = resolve_from("127.0.0.3", server, &query(3, "dev", 1))
        .await
        .expect("a name");
    assert_eq!(&a[a.len() - 4..], &[10, 210, 0, 7]);
    let r = resolve_from("127.0.0.3", server, &query(4, "example.org", 1))
        .await
        .expect("relayed during the flood");
    assert_eq!(&r[..2], &[0, 4], "the client's id is restored");
    peak_in_flight = peak_in_flight.max(relay.in_flight());
    assert!(
        peak_in_flight <= 20,
        "one client held {peak_in_flight} queries"
    );
    assert!(
        peak_fds <= before + 2,
        "descriptors grew from {before} to {peak_fds} under a flood"
    );
    // What the flooder got back: SERVFAILs for its in-flight overflow,
    // nothing for queries over its rate, far fewer than it sent.
    let mut answered = 0;
    let mut buf = vec![0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), flooder.recv_from(&mut buf)).await
    {
        answered += 1;
    }
    assert!(answered < 2_000, "{answered} answers to a flood of 10,000");
    // The slow queries expire; the relay is empty again.
    testkit_wait(|| relay.in_flight() == 0).await;
}

async fn testkit_wait(mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < end, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that answers every A query with one record: `ip` (TTL 60).
async fn answering_upstream(ip: [u8; 4]) -> SocketAddr {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80;
            r[3] = 0x80;
            r[6..8].copy_from_slice(&1u16.to_be_bytes());
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&ip);
            let _ = upstream.send_to(&r, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn answers_for_allow_listed_names_are_allowed_before_the_guest_gets_them() {
    use net::fake::FakeNetOps;
    use net::{Egress, NameSets, Network, NetworkConfig};

    let upstream = answering_upstream([203, 0, 113, 10]).await;
    let ops = Arc::new(FakeNetOps::default());
    let names = Arc::new(NameSets::new(ops.clone()));
    // A network on loopback, so a test socket can be its sandbox.
    let config = NetworkConfig {
        bridge: "br-dns".into(),
        subnet: "127.77.0.0/24".parse().unwrap(),
        tap_prefix: "td".into(),
        dns: None,
    };
    let network = Network::setup(config, ops.clone(), [])
        .unwrap()
        .with_name_sets(names.clone());
    let guest: Ipv4Addr = "127.77.0.2".parse().unwrap();
    let list = Egress::allow(&["api.test", "*.cdn.test"]).unwrap();
    let att = network.attach_at(0, guest, &list).unwrap();

    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let server = socket.local_addr().unwrap();
    let relay = net::dns::Relay::bind(upstream, Default::default())
        .await
        .unwrap();
    relay.learn_into(names.clone());
    tokio::spawn(relay.clone().run());
    let lookup: net::dns::NameLookup = Arc::new(|_: &str, _: std::net::IpAddr| None);
    tokio::spawn(net::dns::serve(
        socket,
        lookup,
        "bhatti".into(),
        relay,
        "127.0.0.0/8".parse().unwrap(),
    ));
    let ask_from = |name: &'static str| async move {
        let s = UdpSocket::bind((guest, 0)).await.unwrap();
        s.send_to(&query(3, name, 1), server).await.unwrap();
        let mut buf = vec![0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        buf[..n].to_vec()
    };
    let pub1: Ipv4Addr = "203.0.113.10".parse().unwrap();

    // A name not on the list: REFUSED (not asked upstream), nothing learned.
    let a = ask_from("other.test").await;
    assert_eq!(a[3] & 0x0f, 5, "{a:?}");
    assert_eq!(u16::from_be_bytes([a[6], a[7]]), 0);
    assert!(ops.learned(&att.tap).is_empty());
    // The un-listed neighbour (public): the same name resolves.
    let s = UdpSocket::bind(("127.77.0.3", 0)).await.unwrap();
    s.send_to(&query(5, "other.test", 1), server).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(&buf[n - 4..n], &[203, 0, 113, 10]);
    // A listed name: learned by the time the answer arrives, for its TTL.
    ask_from("api.test").await;
    assert_eq!(ops.learned(&att.tap), vec![(pub1, Duration::from_secs(60))]);
    assert_eq!(names.learned(guest), vec![pub1]);
    // A name under a listed wildcard; known already, so not written again.
    ask_from("x.cdn.test").await;
    assert_eq!(ops.learned(&att.tap).len(), 1);
    // Another address from the same sandbox's un-listed neighbour: nothing.
    let s = UdpSocket::bind(("127.77.0.3", 0)).await.unwrap();
    s.send_to(&query(4, "api.test", 1), server).await.unwrap();
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(ops.learned(&att.tap).len(), 1);

    // Re-guarded with the names kept: the learned address goes along.
    network.set_egress(&att, &list).unwrap();
    let g = ops.guard(&att.tap).unwrap();
    assert_eq!(
        g.learned.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        vec![pub1]
    );
    // Narrowed to none: nothing learned is kept, nothing more learned,
    // nothing resolved.
    network.set_egress(&att, &Egress::None).unwrap();
    assert!(ops.guard(&att.tap).unwrap().learned.is_empty());
    let a = ask_from("api.test").await;
    assert_eq!(a[3] & 0x0f, 5, "{a:?}");
    assert!(ops.learned(&att.tap).is_empty());
    network.detach(&att).unwrap();
    assert!(names.learned(guest).is_empty());
}
