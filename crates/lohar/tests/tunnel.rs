//! Tunnels to ports "in the guest" (here: loopback of the test host).

mod common;

use common::*;
use proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn relays_bytes_both_ways() {
    let a = TestAgent::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        // A greeting first, then an upper-casing echo.
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n;
            let up: Vec<u8> = buf[..n].iter().map(|b| b.to_ascii_uppercase()).collect();
            s.write_all(&up).await.unwrap();
        }
    });
    let mut t = a.client.tunnel(port).await.unwrap();
    let mut greeting = [0u8; 6];
    t.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello\n");
    let payload: Vec<u8> = (0..2_000_000).map(|i| b'a' + (i % 26) as u8).collect();
    let (mut r, mut w) = tokio::io::split(t);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload.to_ascii_uppercase());
    assert_eq!(server.await.unwrap(), payload.len());
}

#[tokio::test]
async fn a_closed_port_is_a_clear_error_and_the_client_goes_on() {
    let a = TestAgent::start();
    // Bind then drop to find a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = a.client.tunnel(port).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::ConnectFailed));
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    let err = a.client.tunnel(0).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    assert_eq!(a.client.exec(argv(&["true"])).await.unwrap().exit.code, 0);
}

#[tokio::test]
async fn listening_ports_are_listed_and_closed_ones_are_not() {
    let a = TestAgent::start();
    let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let v4_port = v4.local_addr().unwrap().port();
    let listed = a.client.ports().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|p| p.port == v4_port && p.address == "127.0.0.1" && p.protocol == "tcp"),
        "{listed:?}"
    );
    // Sorted by port, no duplicates.
    let keys: Vec<_> = listed.iter().map(|p| (p.port, p.address.clone())).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted);
    // IPv6, where the host has it.
    if let Ok(v6) = TcpListener::bind("[::1]:0").await {
        let v6_port = v6.local_addr().unwrap().port();
        let listed = a.client.ports().await.unwrap();
        assert!(
            listed
                .iter()
                .any(|p| p.port == v6_port && p.address == "::1"),
            "{listed:?}"
        );
    }
    drop(v4);
    let listed = a.client.ports().await.unwrap();
    assert!(!listed.iter().any(|p| p.port == v4_port), "{listed:?}");
}
