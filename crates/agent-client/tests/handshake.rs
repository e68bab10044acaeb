//! The client's half of the handshake against scripted agents on a Unix
//! socket: it proves itself without sending the token, and refuses a peer
//! that cannot prove it holds the token (mutual authentication).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use agent_client::{AgentClient, ClientError, Endpoint};
use proto::auth::{agent_proof, verify_host_proof};
use proto::{Activity, AuthOk, Challenge, FrameReader, FrameWriter, Message, Nonce};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

const TOKEN: &str = "handshake-test-token-0123456789";

/// How a scripted agent behaves.
#[derive(Clone, Copy)]
enum Script {
    /// Checks the host's proof and proves itself with `TOKEN`.
    Honest,
    /// Proves itself with another token.
    WrongToken,
    /// Always sends the same challenge, and answers with the `auth_ok` it
    /// recorded from the first (honest) exchange.
    Replay,
    /// Speaks another protocol version in its challenge.
    OldVersion,
    /// Never sends a challenge (a protocol 1 agent waits for a token).
    Silent,
}

struct Fake {
    _dir: tempfile::TempDir,
    endpoint: Endpoint,
    /// Every byte a client sent, over all connections.
    received: Arc<Mutex<Vec<u8>>>,
}

fn start(script: Script) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let sock: PathBuf = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let recorded: Arc<Mutex<Option<AuthOk>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(script, stream, log.clone(), recorded.clone()));
        }
    });
    Fake {
        _dir: dir,
        endpoint: Endpoint::Unix(sock),
        received,
    }
}

/// One connection of a scripted agent.
async fn serve(
    script: Script,
    stream: tokio::net::UnixStream,
    log: Arc<Mutex<Vec<u8>>>,
    recorded: Arc<Mutex<Option<AuthOk>>>,
) {
    let (mut r, w) = stream.into_split();
    let mut writer = FrameWriter::new(w);
    if let Script::Silent = script {
        // Only read (and record) what the client sends.
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            log.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        return;
    }
    let mut reader = FrameReader::new(RecordingReader(r, log));
    let nonce = match script {
        Script::Replay => Nonce([0x42; proto::auth::NONCE_LEN]),
        _ => Nonce::random().unwrap(),
    };
    let version = match script {
        Script::OldVersion => 1,
        _ => proto::PROTOCOL_VERSION,
    };
    writer
        .send(&Message::Challenge(Challenge { version, nonce }))
        .await
        .unwrap();
    let Ok(Some(Message::Auth(auth))) = reader.read_message().await else {
        return;
    };
    // The host's proof is right, so what follows tests only the client's
    // check of the agent.
    assert!(verify_host_proof(
        TOKEN.as_bytes(),
        &nonce,
        &auth.nonce,
        &auth.proof
    ));
    let honest = AuthOk {
        version,
        agent_version: "fake".into(),
        proof: agent_proof(TOKEN.as_bytes(), &nonce, &auth.nonce),
    };
    let ok = match script {
        Script::WrongToken => AuthOk {
            proof: agent_proof(b"not-the-token-0123456", &nonce, &auth.nonce),
            ..honest
        },
        Script::Replay => recorded.lock().unwrap().get_or_insert(honest).clone(),
        _ => honest,
    };
    writer.send(&Message::AuthOk(ok)).await.unwrap();
    // Serve activity queries until the client leaves.
    while let Ok(Some(Message::ActivityQuery)) = reader.read_message().await {
        let a = Activity {
            last_activity_unix_ms: 0,
            sessions: 0,
            attached: 0,
            running_execs: 0,
            connections: 1,
            uptime_ms: 0,
        };
        if writer.send(&Message::Activity(a)).await.is_err() {
            break;
        }
    }
}

/// Records what passes through, to look for the token afterwards.
struct RecordingReader<R>(R, Arc<Mutex<Vec<u8>>>);

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RecordingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.1.lock().unwrap().extend_from_slice(&new);
        r
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn an_honest_agent_is_accepted_and_never_sees_the_token() {
    let fake = start(Script::Honest);
    let client = AgentClient::new(fake.endpoint.clone(), TOKEN);
    assert_eq!(client.activity().await.expect("activity").connections, 1);
    // A second, fresh connection authenticates again.
    let again = AgentClient::new(fake.endpoint.clone(), TOKEN);
    again.activity().await.expect("second handshake");
    let sent = fake.received.lock().unwrap().clone();
    assert!(
        contains(&sent, br#""proof":""#),
        "the recorder saw the client's auth frames"
    );
    assert!(
        !contains(&sent, TOKEN.as_bytes()),
        "the token crossed the wire"
    );
    assert!(!contains(&sent, hex_of(TOKEN).as_bytes()));
}

#[tokio::test]
async fn an_agent_proving_another_token_is_refused() {
    let fake = start(Script::WrongToken);
    let client = AgentClient::new(fake.endpoint.clone(), TOKEN);
    let err = client.activity().await.unwrap_err();
    assert!(matches!(err, ClientError::AgentProof { .. }), "{err}");
    assert!(err.to_string().contains("not its agent"), "{err}");
}

#[tokio::test]
async fn a_replayed_agent_proof_is_refused() {
    // Positive control first: the exchange recorded was good.
    let fake = start(Script::Replay);
    let first = AgentClient::new(fake.endpoint.clone(), TOKEN);
    first.activity().await.expect("the honest first exchange");
    // The same challenge and the recorded answer: the client's fresh nonce
    // makes the old proof worthless.
    let second = AgentClient::new(fake.endpoint.clone(), TOKEN);
    let err = second.activity().await.unwrap_err();
    assert!(matches!(err, ClientError::AgentProof { .. }), "{err}");
}

#[tokio::test]
async fn an_agent_of_another_version_is_refused() {
    let fake = start(Script::OldVersion);
    let client = AgentClient::new(fake.endpoint.clone(), TOKEN);
    let err = client.activity().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::VersionMismatch {
                agent: 1,
                client: proto::PROTOCOL_VERSION
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_agent_that_never_challenges_gets_nothing_and_times_out() {
    let fake = start(Script::Silent);
    let client = AgentClient::new(fake.endpoint.clone(), TOKEN);
    let err = client.activity().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                operation: "authentication",
                ..
            }
        ),
        "{err}"
    );
    // It waited for a challenge and sent nothing at all.
    assert!(fake.received.lock().unwrap().is_empty());
}
