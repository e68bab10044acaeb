//! Authentication, limits and malformed input at the protocol level.

mod common;

use std::time::Duration;

use common::*;
use proto::{
    frame_type, Auth, ErrorCode, Message, MAX_CONNECTIONS, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION,
};

fn expect_error(m: Option<Message>, code: ErrorCode) -> String {
    match m {
        Some(Message::Error(e)) if e.code == code => e.message,
        other => panic!("expected {code:?} error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_the_connection_closed() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    raw.send(Message::Auth(Auth {
        token: "wrong-token-wrong-token".into(),
        version: PROTOCOL_VERSION,
    }))
    .await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("invalid token"));
    assert_eq!(raw.recv().await, None, "connection must close");
    // Same length, one byte off.
    let mut raw = a.raw().await;
    let mut near = TOKEN.to_string();
    near.replace_range(0..1, "X");
    raw.send(Message::Auth(Auth {
        token: near,
        version: PROTOCOL_VERSION,
    }))
    .await;
    expect_error(raw.recv().await, ErrorCode::AuthFailed);
    // Through the client, the error is typed.
    let bad = agent_client::AgentClient::new(a.endpoint.clone(), "nope-nope-nope-nope");
    let err = bad.activity().await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::AuthFailed));
}

#[tokio::test]
async fn a_version_mismatch_is_refused() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    raw.send(Message::Auth(Auth {
        token: TOKEN.into(),
        version: PROTOCOL_VERSION + 1,
    }))
    .await;
    let msg = expect_error(raw.recv().await, ErrorCode::VersionMismatch);
    assert!(msg.contains(&PROTOCOL_VERSION.to_string()));
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn the_first_frame_must_be_auth() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    raw.send(Message::ActivityQuery).await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("first frame must be auth"), "{msg}");
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_auth_deadline() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthTimeout);
    assert!(msg.contains("5s"));
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn an_oversize_frame_is_refused_and_closes_the_connection() {
    let a = TestAgent::start();
    let mut raw = a.raw_authed().await;
    let len = (MAX_FRAME_PAYLOAD as u32 + 1).to_be_bytes();
    raw.send_bytes(&[len[0], len[1], len[2], len[3], frame_type::STDIN])
        .await;
    let msg = expect_error(raw.recv().await, ErrorCode::FrameTooLarge);
    assert!(msg.contains("limit"), "{msg}");
    assert_eq!(raw.recv().await, None);
    // Even before auth.
    let mut raw = a.raw().await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, frame_type::AUTH])
        .await;
    expect_error(raw.recv().await, ErrorCode::AuthFailed);
    // A frame of exactly the limit is fine (an unknown type, skipped).
    let mut raw = a.raw_authed().await;
    let mut frame = (MAX_FRAME_PAYLOAD as u32).to_be_bytes().to_vec();
    frame.push(0xee);
    frame.extend(vec![0u8; MAX_FRAME_PAYLOAD]);
    raw.send_bytes(&frame).await;
    raw.send(Message::ActivityQuery).await;
    assert!(matches!(raw.recv().await, Some(Message::Activity(_))));
}

#[tokio::test]
async fn malformed_and_unexpected_frames_get_errors_and_the_connection_lives() {
    let a = TestAgent::start();
    let mut raw = a.raw_authed().await;
    // Bad JSON in a known frame type.
    raw.send_bytes(&[0, 0, 0, 3, frame_type::EXEC, b'{', b'x', b'}'])
        .await;
    expect_error(raw.recv().await, ErrorCode::BadRequest);
    // Wrong JSON shape.
    let body = br#"{"argv": "not-a-list"}"#;
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.push(frame_type::EXEC);
    f.extend_from_slice(body);
    raw.send_bytes(&f).await;
    expect_error(raw.recv().await, ErrorCode::BadRequest);
    // A payload on an empty message.
    raw.send_bytes(&[0, 0, 0, 1, frame_type::ACTIVITY_QUERY, 7])
        .await;
    expect_error(raw.recv().await, ErrorCode::BadRequest);
    // Frames that make no sense between requests.
    raw.send(Message::Stdin(b"stray".to_vec())).await;
    expect_error(raw.recv().await, ErrorCode::UnexpectedFrame);
    raw.send(Message::Auth(Auth {
        token: TOKEN.into(),
        version: PROTOCOL_VERSION,
    }))
    .await;
    expect_error(raw.recv().await, ErrorCode::UnexpectedFrame);
    // Unknown frame types are skipped silently.
    raw.send_bytes(&[0, 0, 0, 2, 0xfe, 1, 2]).await;
    raw.send(Message::ActivityQuery).await;
    assert!(matches!(raw.recv().await, Some(Message::Activity(_))));
    // A frame cut off by a disconnect does not disturb the agent.
    raw.send_bytes(&[0, 0, 0, 50, frame_type::EXEC, b'{']).await;
    drop(raw);
    assert!(a.client.activity().await.is_ok());
}

#[tokio::test]
async fn caps_concurrent_connections() {
    let a = TestAgent::start();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(a.raw_authed().await);
    }
    let mut extra = a.raw().await;
    let msg = expect_error(extra.recv().await, ErrorCode::TooManyConnections);
    assert!(msg.contains("50"), "{msg}");
    assert_eq!(extra.recv().await, None);
    // Room again once connections close.
    held.truncate(MAX_CONNECTIONS - 1);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut raw = a.raw().await;
        raw.send(Message::Auth(Auth {
            token: TOKEN.into(),
            version: PROTOCOL_VERSION,
        }))
        .await;
        match raw.recv().await {
            Some(Message::AuthOk(_)) => break,
            Some(Message::Error(e)) if e.code == ErrorCode::TooManyConnections => {
                assert!(std::time::Instant::now() < end, "a slot never freed up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}
