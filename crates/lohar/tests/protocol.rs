//! Authentication (challenge-response), limits and malformed input at the
//! protocol level.

mod common;

use std::time::Duration;

use common::*;
use proto::auth::verify_agent_proof;
use proto::{
    frame_type, Auth, ErrorCode, Message, Nonce, Proof, MAX_CONNECTIONS, MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
};

fn expect_error(m: Option<Message>, code: ErrorCode) -> String {
    match m {
        Some(Message::Error(e)) if e.code == code => e.message,
        other => panic!("expected {code:?} error, got {other:?}"),
    }
}

/// Protocol 1's first frame as its clients sent it: the token itself.
fn protocol_1_token_frame(token: &str) -> Vec<u8> {
    let body = format!(r#"{{"token":"{token}","version":1}}"#);
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.push(frame_type::LEGACY_AUTH);
    f.extend_from_slice(body.as_bytes());
    f
}

#[tokio::test]
async fn the_right_token_authenticates_both_ways() {
    // The positive control of the refusals below.
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    let c1 = raw.challenge().await;
    assert_eq!(c1.version, PROTOCOL_VERSION);
    let auth = raw.answer(&c1, TOKEN).await;
    let Some(Message::AuthOk(ok)) = raw.recv().await else {
        panic!("no auth_ok");
    };
    assert!(verify_agent_proof(
        TOKEN.as_bytes(),
        &c1.nonce,
        &auth.nonce,
        &ok.proof
    ));
    // Its proof is bound to the token and to this exchange.
    assert!(!verify_agent_proof(
        b"another-token-0123456",
        &c1.nonce,
        &auth.nonce,
        &ok.proof
    ));
    raw.send(Message::ActivityQuery).await;
    assert!(matches!(raw.recv().await, Some(Message::Activity(_))));
    // Every connection gets a new challenge.
    let c2 = a.raw().await.challenge().await;
    assert_ne!(c1.nonce, c2.nonce);
    // And the real client does it all.
    assert!(a.client.activity().await.is_ok());
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_the_connection_closed() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    let c = raw.challenge().await;
    raw.answer(&c, "wrong-token-wrong-token").await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("invalid proof"), "{msg}");
    assert_eq!(raw.recv().await, None, "connection must close");
    // Same length, one byte off.
    let mut raw = a.raw().await;
    let mut near = TOKEN.to_string();
    near.replace_range(0..1, "X");
    let c = raw.challenge().await;
    raw.answer(&c, &near).await;
    expect_error(raw.recv().await, ErrorCode::AuthFailed);
    // Through the client, the error is typed.
    let bad = agent_client::AgentClient::new(a.endpoint.clone(), "nope-nope-nope-nope");
    let err = bad.activity().await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::AuthFailed));
}

#[tokio::test]
async fn a_recorded_answer_does_not_open_another_connection() {
    let a = TestAgent::start();
    // A neighbour records a whole good exchange…
    let mut first = a.raw().await;
    let c1 = first.challenge().await;
    let recorded = first.answer(&c1, TOKEN).await;
    assert!(matches!(first.recv().await, Some(Message::AuthOk(_))));
    // …and replays the answer on a new connection (held open or not).
    let mut replay = a.raw().await;
    let c2 = replay.challenge().await;
    assert_ne!(c1.nonce, c2.nonce);
    replay.send(Message::Auth(recorded.clone())).await;
    let msg = expect_error(replay.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("invalid proof"), "{msg}");
    assert_eq!(replay.recv().await, None);
    drop(first);
    let mut replay = a.raw().await;
    replay.challenge().await;
    replay.send(Message::Auth(recorded)).await;
    expect_error(replay.recv().await, ErrorCode::AuthFailed);
}

#[tokio::test]
async fn a_protocol_1_token_frame_is_refused() {
    let a = TestAgent::start();
    // As an old client does it: the token first, without waiting.
    let mut raw = a.raw().await;
    raw.send_bytes(&protocol_1_token_frame(TOKEN)).await;
    raw.challenge().await;
    let msg = expect_error(raw.recv().await, ErrorCode::VersionMismatch);
    assert!(msg.contains("protocol 1 token frame"), "{msg}");
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn a_version_mismatch_is_refused() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    let c = raw.challenge().await;
    let mut auth = Auth {
        version: PROTOCOL_VERSION + 1,
        nonce: Nonce::random().unwrap(),
        proof: Proof([0; proto::auth::PROOF_LEN]),
    };
    auth.proof = proto::auth::host_proof(TOKEN.as_bytes(), &c.nonce, &auth.nonce);
    raw.send(Message::Auth(auth)).await;
    let msg = expect_error(raw.recv().await, ErrorCode::VersionMismatch);
    assert!(msg.contains(&PROTOCOL_VERSION.to_string()));
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn the_first_frame_must_be_auth() {
    let a = TestAgent::start();
    let mut raw = a.raw().await;
    raw.challenge().await;
    raw.send(Message::ActivityQuery).await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("first frame must be auth"), "{msg}");
    assert_eq!(raw.recv().await, None);
    // A malformed answer is refused the same way.
    let mut raw = a.raw().await;
    raw.challenge().await;
    let body = br#"{"version":2,"nonce":"00","proof":"00"}"#;
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.push(frame_type::AUTH);
    f.extend_from_slice(body);
    raw.send_bytes(&f).await;
    let msg = expect_error(raw.recv().await, ErrorCode::AuthFailed);
    assert!(msg.contains("bad auth frame"), "{msg}");
}

#[tokio::test]
async fn a_silent_client_is_cut_after_the_deadline_while_another_works() {
    let a = TestAgent::start();
    let mut silent = a.raw().await;
    silent.challenge().await;
    // Meanwhile the host gets through, more than once.
    for _ in 0..3 {
        assert!(a.client.activity().await.is_ok());
    }
    let msg = expect_error(silent.recv().await, ErrorCode::AuthTimeout);
    assert!(msg.contains("5s"), "{msg}");
    assert_eq!(silent.recv().await, None);
}

#[tokio::test]
async fn connections_that_never_answer_cannot_keep_the_host_out() {
    let a = TestAgent::start();
    // More silent connections than the agent serves at all, each shown a challenge.
    let mut silent = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 5 {
        let mut raw = a.raw().await;
        raw.challenge().await;
        silent.push(raw);
    }
    // The host still gets in, over fresh connections.
    let fresh = agent_client::AgentClient::new(a.endpoint.clone(), TOKEN);
    let activity = fresh.activity().await.expect("the host is kept out");
    assert_eq!(
        activity.connections, 1,
        "pending handshakes are not connections"
    );
    // The oldest were pushed out with a clear error at once, not after the deadline.
    let msg = expect_error(silent[0].recv().await, ErrorCode::TooManyConnections);
    assert!(msg.contains("pushed out"), "{msg}");
    assert_eq!(silent[0].recv().await, None);
    // The most recent ones are still waiting in the handshake, bounded.
    let last = silent.last_mut().unwrap();
    expect_error(last.recv().await, ErrorCode::AuthTimeout);
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
    raw.challenge().await;
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
        version: PROTOCOL_VERSION,
        nonce: Nonce::random().unwrap(),
        proof: Proof([0; proto::auth::PROOF_LEN]),
    }))
    .await;
    expect_error(raw.recv().await, ErrorCode::UnexpectedFrame);
    raw.send_bytes(&protocol_1_token_frame(TOKEN)).await;
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
        let reply = match raw.recv().await {
            Some(Message::Challenge(c)) => {
                raw.answer(&c, TOKEN).await;
                raw.recv().await
            }
            other => other,
        };
        match reply {
            Some(Message::AuthOk(_)) => break,
            Some(Message::Error(e)) if e.code == ErrorCode::TooManyConnections => {
                assert!(std::time::Instant::now() < end, "a slot never freed up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}
