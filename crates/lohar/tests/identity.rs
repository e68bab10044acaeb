//! `lohar serve --identity-stdin`: an identity line on stdin replaces the
//! agent's token (the fake engine's stand-in for the guest's console).

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use agent_client::AgentClient;
use common::{TestAgent, TOKEN};
use proto::identity::{GuestIdentity, IDENTITY_ENTROPY_BYTES};
use proto::ErrorCode;

const NEW_TOKEN: &str = "the-new-token-after-a-restore";

fn identity(token: &str) -> GuestIdentity {
    GuestIdentity {
        token: token.into(),
        hostname: "child-1".into(),
        ip: "10.200.0.7".parse().unwrap(),
        prefix: 24,
        gateway: "10.200.0.1".parse().unwrap(),
        mac: "02:b4:0a:c8:00:07".into(),
        unix_ms: 1_800_000_000_000,
        entropy: "ab".repeat(IDENTITY_ENTROPY_BYTES),
    }
}

/// Whether a fresh connection authenticates with `token` (`Err` for any
/// failure other than a refused token).
async fn accepts(a: &TestAgent, token: &str) -> Result<bool, String> {
    match AgentClient::new(a.endpoint.clone(), token).activity().await {
        Ok(_) => Ok(true),
        Err(e) if e.agent_code() == Some(ErrorCode::AuthFailed) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn an_identity_line_on_stdin_replaces_the_token() {
    let mut a = TestAgent::start_identity_stdin();
    assert_eq!(accepts(&a, TOKEN).await, Ok(true));
    assert_eq!(accepts(&a, NEW_TOKEN).await, Ok(false), "positive control");

    let mut stdin = a.child.stdin.take().expect("piped stdin");
    // Noise, a refused identity (token too short) and an over-long line
    // first: the reader skips them…
    let bad = identity("short");
    let long = format!(
        "{}{}\n",
        proto::identity::IDENTITY_PREFIX,
        "0".repeat(20_000)
    );
    stdin
        .write_all(format!("hello\n{}{long}", bad.to_line()).as_bytes())
        .unwrap();
    // …then the real line, with a carriage return as a terminal may add.
    let line = identity(NEW_TOKEN).to_line();
    stdin
        .write_all((line.trim_end().to_string() + "\r\n").as_bytes())
        .unwrap();
    stdin.flush().unwrap();

    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if accepts(&a, NEW_TOKEN).await == Ok(true) {
            break;
        }
        assert!(Instant::now() < end, "the new token never worked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        accepts(&a, TOKEN).await,
        Ok(false),
        "the old token stops at once"
    );
    // The agent kept its own (host) identity: it is still serving, and
    // stdin closing ends nothing.
    drop(stdin);
    assert_eq!(accepts(&a, NEW_TOKEN).await, Ok(true));
    assert!(common::alive(a.pid()));
}
