//! `bhatti shell`: a terminal attached to a sandbox session over the
//! shell WebSocket (docs/api.md). The local terminal is put in raw mode
//! and restored on every way out (return, error, panic unwind); Ctrl+\
//! detaches and leaves the session running.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use api_types::{ShellControl, ShellOpen};
use futures_util::{SinkExt, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::{error_message, Client};
use crate::error::{CliError, Result};
use crate::terminal::{terminal_size, RawMode};

/// The detach key: Ctrl+\ (FS, 0x1c), which raw mode passes through as a byte.
pub const DETACH_BYTE: u8 = 0x1c;

/// Splits typed input at the detach key: the bytes to send, and whether
/// the key was pressed (anything after it is dropped).
pub fn split_detach(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == DETACH_BYTE) {
        Some(i) => (&input[..i], true),
        None => (input, false),
    }
}

/// The line printed after detaching.
pub fn reattach_hint(sandbox: &str, session: &str) -> String {
    format!("[detached from session {session}; reattach with: bhatti shell {sandbox} --session {session}]")
}

/// What `bhatti shell` was asked for.
#[derive(Debug, Clone)]
pub struct ShellRequest {
    pub sandbox: String,
    pub session: Option<String>,
    pub new: bool,
    pub steal: bool,
}

/// How the attachment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The session's command exited.
    Exited(i32),
    /// We detached (Ctrl+\) or the server detached us; the session lives on.
    Detached {
        session: String,
        reason: Option<String>,
    },
    /// A signal (SIGTERM, SIGHUP) ended the client; the session lives on.
    Interrupted { session: String },
}

/// Standard input, read on its own thread: a blocked read of a terminal
/// cannot be cancelled, and the thread dies with the process.
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

pub(crate) fn ws_error(url: &str, e: tungstenite::Error) -> CliError {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().unwrap_or_default();
            CliError::Api {
                status: resp.status().as_u16(),
                message: error_message(resp.status(), resp.headers(), body),
            }
        }
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            CliError::Connect {
                url: url.to_string(),
                reason: io.to_string(),
            }
        }
        e => CliError::WebSocket {
            url: url.to_string(),
            source: Box::new(e),
        },
    }
}

fn control(msg: &ShellControl) -> Message {
    Message::text(serde_json::to_string(msg).expect("control messages serialise"))
}

/// Attaches the terminal to a session until it exits or is detached.
pub async fn run(client: &Client, req: &ShellRequest) -> Result<Outcome> {
    let (mut ws, session) = attach(client, req, terminal_size()).await?;
    let url = client.shell_url(&req.sandbox).to_string();
    let raw = if std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let result = pump(&mut ws, &url, session, stdin_reader(), std::io::stdout()).await;
    // Whatever happened, try to leave cleanly, then give the terminal back.
    if let Ok(Outcome::Detached { .. } | Outcome::Interrupted { .. }) = &result {
        close_within(&mut ws, Duration::from_secs(2)).await;
    }
    drop(raw);
    result
}

/// Connects, sends `ShellOpen`, and waits for `attached`: the session's name.
pub async fn attach(
    client: &Client,
    req: &ShellRequest,
    size: Option<(u16, u16)>,
) -> Result<(Ws, String)> {
    let url = client.shell_url(&req.sandbox).to_string();
    let mut wsreq = url
        .as_str()
        .into_client_request()
        .map_err(|e| ws_error(&url, e))?;
    let auth = HeaderValue::from_str(&format!("Bearer {}", client.token()?))
        .map_err(|_| CliError::NoToken)?;
    wsreq.headers_mut().insert(AUTHORIZATION, auth);
    let mut ws = client.websocket(&url, wsreq).await?;

    let open = ShellOpen {
        session: req.session.clone(),
        new: req.new,
        steal: req.steal,
        cmd: None,
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
    };
    let open = serde_json::to_string(&open).expect("ShellOpen serialises");
    ws.send(Message::text(open))
        .await
        .map_err(|e| ws_error(&url, e))?;

    loop {
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(CliError::ShellClosed),
            Some(Err(e)) => return Err(ws_error(&url, e)),
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ShellControl>(&t) {
                Ok(ShellControl::Attached { session, .. }) => return Ok((ws, session)),
                Ok(ShellControl::Error { error }) => return Err(CliError::Remote(error)),
                Ok(other) => {
                    return Err(CliError::Remote(format!(
                        "unexpected first message from the server: {other:?}"
                    )))
                }
                Err(source) => {
                    return Err(CliError::Decode {
                        what: "the shell socket",
                        source,
                    })
                }
            },
            Some(Ok(_)) => {}
        }
    }
}

/// The shell's WebSocket.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Moves bytes between `input`/`out` and the socket until the session
/// exits or is detached.
pub async fn pump(
    ws: &mut Ws,
    url: &str,
    session: String,
    mut input: mpsc::Receiver<Vec<u8>>,
    mut stdout: impl Write,
) -> Result<Outcome> {
    let mut input_open = true;
    let mut winch = signal(SignalKind::window_change()).map_err(CliError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(CliError::Signals)?;
    loop {
        tokio::select! {
            chunk = input.recv(), if input_open => match chunk {
                Some(bytes) => {
                    let (send, detach) = split_detach(&bytes);
                    if !send.is_empty() {
                        ws.send(Message::binary(send.to_vec())).await.map_err(|e| ws_error(url, e))?;
                    }
                    if detach {
                        ws.send(control(&ShellControl::Detach)).await.map_err(|e| ws_error(url, e))?;
                        return Ok(Outcome::Detached { session, reason: None });
                    }
                }
                // Input ended (a pipe): keep showing output until the session ends.
                None => input_open = false,
            },
            msg = ws.next() => match msg {
                None => return Err(CliError::ShellClosed),
                Some(Err(e)) => return Err(ws_error(url, e)),
                Some(Ok(Message::Binary(b))) => {
                    stdout.write_all(&b).and_then(|()| stdout.flush()).map_err(CliError::Output)?;
                }
                Some(Ok(Message::Text(t))) => {
                    let ctl: ShellControl = serde_json::from_str(&t).map_err(|source| CliError::Decode {
                        what: "the shell socket",
                        source,
                    })?;
                    match ctl {
                        ShellControl::Exit { exit_code } => return Ok(Outcome::Exited(exit_code)),
                        ShellControl::Detached { reason } => {
                            return Ok(Outcome::Detached { session, reason: Some(reason) })
                        }
                        ShellControl::Error { error } => return Err(CliError::Remote(error)),
                        // Client-bound only; ignore anything else.
                        ShellControl::Attached { .. } | ShellControl::Resize { .. } | ShellControl::Detach => {}
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    return Ok(Outcome::Detached { session, reason: Some("the server closed the connection".into()) })
                }
                Some(Ok(_)) => {}
            },
            _ = winch.recv() => {
                if let Some((rows, cols)) = terminal_size() {
                    ws.send(control(&ShellControl::Resize { rows, cols })).await.map_err(|e| ws_error(url, e))?;
                }
            }
            _ = term.recv() => return Ok(Outcome::Interrupted { session }),
            _ = hup.recv() => return Ok(Outcome::Interrupted { session }),
        }
    }
}

/// Sends a close frame and waits (bounded) for the server's, so that a
/// reattach right after finds the session already detached.
async fn close_within(ws: &mut Ws, limit: Duration) {
    let closing = async {
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    };
    if tokio::time::timeout(limit, closing).await.is_err() {
        // The session lives on either way; say why a reattach may need --steal.
        eprintln!("\r\nbhatti: the server did not acknowledge the detach in time\r");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_key_splits_input() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1ccd"), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1c"), (&b""[..], true));
        assert_eq!(split_detach(b""), (&b""[..], false));
    }

    // The signature is tungstenite's handshake callback.
    #[allow(clippy::result_large_err)]
    fn check_auth(
        req: &tungstenite::handshake::server::Request,
        resp: tungstenite::handshake::server::Response,
    ) -> Result<
        tungstenite::handshake::server::Response,
        tungstenite::handshake::server::ErrorResponse,
    > {
        assert_eq!(req.uri().path(), "/sandboxes/demo/ws");
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer bht_t");
        Ok(resp)
    }

    /// A loopback server standing in for the daemon's shell socket: it
    /// checks the open message, answers `attached`, echoes one binary
    /// frame, and reports the control message that ends the attachment.
    #[tokio::test(flavor = "current_thread")]
    async fn attach_echo_and_detach_against_a_fake_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_hdr_async(sock, check_auth)
                .await
                .unwrap();
            let Some(Ok(Message::Text(open))) = ws.next().await else {
                panic!("no open message")
            };
            let open: ShellOpen = serde_json::from_str(&open).unwrap();
            assert_eq!(open.session.as_deref(), Some("s1"));
            assert_eq!((open.rows, open.cols), (Some(24), Some(80)));
            let attached = ShellControl::Attached {
                session: "s1".into(),
                pid: 42,
            };
            ws.send(control(&attached)).await.unwrap();
            let Some(Ok(Message::Binary(typed))) = ws.next().await else {
                panic!("no input frame")
            };
            assert_eq!(&typed[..], b"echo hi\r");
            ws.send(Message::binary(&b"hi\r\n"[..])).await.unwrap();
            // The next frame is the detach control; the byte after Ctrl+\ is dropped.
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                panic!("no detach")
            };
            serde_json::from_str::<ShellControl>(&t).unwrap()
        });
        let client = Client::new(&format!("http://{addr}"), Some("bht_t".into())).unwrap();
        let req = ShellRequest {
            sandbox: "demo".into(),
            session: Some("s1".into()),
            new: false,
            steal: false,
        };
        let (mut ws, session) = attach(&client, &req, Some((24, 80))).await.unwrap();
        assert_eq!(session, "s1");
        let (tx, rx) = mpsc::channel(4);
        tx.send(b"echo hi\r".to_vec()).await.unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct W(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let seen = out.clone();
        let typist = tokio::spawn(async move {
            // Detach only once the echo came back, as a person would.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while seen.lock().unwrap().as_slice() != b"hi\r\n" {
                assert!(tokio::time::Instant::now() < deadline, "echo never arrived");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tx.send(b"\x1cignored".to_vec()).await.unwrap();
        });
        let outcome = pump(&mut ws, "ws://test", session, rx, W(out.clone()))
            .await
            .unwrap();
        typist.await.unwrap();
        assert_eq!(
            outcome,
            Outcome::Detached {
                session: "s1".into(),
                reason: None
            }
        );
        assert_eq!(server.await.unwrap(), ShellControl::Detach);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn handshake_refusal_carries_the_servers_message() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"error":"no sandbox named demo"}"#;
            let resp = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
        });
        let client = Client::new(&format!("http://{addr}"), Some("bht_t".into())).unwrap();
        let req = ShellRequest {
            sandbox: "demo".into(),
            session: None,
            new: true,
            steal: false,
        };
        let e = attach(&client, &req, None).await.expect_err("refused");
        assert!(matches!(e, CliError::Api { status: 404, .. }), "{e:?}");
        assert_eq!(e.to_string(), "no sandbox named demo");
    }

    #[test]
    fn hint_names_the_reattach_command() {
        assert_eq!(
            reattach_hint("demo", "s1"),
            "[detached from session s1; reattach with: bhatti shell demo --session s1]"
        );
    }
}
