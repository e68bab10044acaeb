//! The DNS responder on loopback: sandbox names answered, the rest relayed
//! from an upstream that is itself a test server on loopback.

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
    tokio::spawn(net::dns::serve(
        socket,
        lookup,
        "bhatti".into(),
        upstream_addr,
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
