//! A small async client for QEMU's QMP protocol over a Unix socket.
//!
//! QMP is newline-delimited JSON: the server greets with `{"QMP": …}`, the
//! client enters command mode with `qmp_capabilities`, then each
//! `{"execute": …, "id": n}` gets exactly one `{"return": …}` or
//! `{"error": {"class", "desc"}}` carrying the same id. Asynchronous events
//! (`{"event": …}`) may arrive at any time and are kept aside. One command is
//! in flight at a time (the caller holds `&mut self`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Default time a command may take to answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line we accept from QEMU.
const MAX_LINE: usize = 1 << 20;
/// How many async events we keep.
const MAX_EVENTS: usize = 64;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("connecting to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
    /// QEMU closed the connection (usually: it exited).
    #[error("connection closed by QEMU")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected message: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("{class}: {desc}")]
    Command {
        /// QMP error class (`GenericError`, `CommandNotFound`, …).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl QmpError {
    /// True when the connection itself is gone (as opposed to a command
    /// QEMU refused).
    pub fn is_disconnect(&self) -> bool {
        match self {
            QmpError::Closed => true,
            QmpError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
            QmpError::Connect { .. }
            | QmpError::Protocol(_)
            | QmpError::Command { .. }
            | QmpError::Timeout(_) => false,
        }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// Event name (`STOP`, `RESUME`, `SHUTDOWN`, …).
    pub event: String,
    /// Event data.
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Serialize)]
struct Request<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a A>,
    id: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// Any message from the server. Untagged: the keys tell them apart.
#[derive(Deserialize)]
#[serde(untagged)]
enum Message {
    Return {
        #[serde(rename = "return")]
        ret: serde_json::Value,
        id: Option<serde_json::Value>,
    },
    Error {
        error: ErrorBody,
        id: Option<serde_json::Value>,
    },
    Event(QmpEvent),
    Greeting {
        #[serde(rename = "QMP")]
        _qmp: serde_json::Value,
    },
}

/// The result of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// True while vCPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `postmigrate`, `inmigrate`, …).
    pub status: String,
}

/// The result of `query-migrate` (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, …;
    /// absent before any migration.
    pub status: Option<String>,
    /// Why it failed.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// One QMP capability switch for `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationCapability {
    /// Capability name (`x-ignore-shared`, …).
    pub capability: &'static str,
    /// On or off.
    pub state: bool,
}

/// Arguments of `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct SetCapabilities {
    /// The switches.
    pub capabilities: Vec<MigrationCapability>,
}

/// Arguments of `migrate-set-parameters` (the ones we set).
#[derive(Debug, Clone, Serialize)]
pub struct SetParameters {
    /// Bytes per second.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

/// Arguments of `migrate` and `migrate-incoming`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateUri {
    /// `fd:<name>`, `exec:…`, `tcp:…`.
    pub uri: String,
}

/// Arguments of `getfd` / `closefd`.
#[derive(Debug, Clone, Serialize)]
pub struct FdName {
    /// The name the fd is registered under.
    pub fdname: String,
}

/// A connected QMP session in command mode.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Runs the handshake on an already connected stream.
    pub async fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let mut c = QmpClient {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
            events: VecDeque::new(),
            timeout: DEFAULT_TIMEOUT,
        };
        let deadline = Instant::now() + c.timeout;
        match c.read_message(deadline).await? {
            Message::Greeting { .. } => {}
            _ => return Err(QmpError::Protocol("expected the QMP greeting".into())),
        }
        c.execute::<(), IgnoredAny>("qmp_capabilities", None)
            .await?;
        Ok(c)
    }

    /// Sets how long a command may take to answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` and decodes its `return` value.
    pub async fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<&A>,
    ) -> Result<R, QmpError> {
        let (id, line) = self.encode(command, arguments)?;
        self.stream.write_all(&line).await.map_err(QmpError::Io)?;
        self.await_reply(id).await
    }

    /// Runs a command whose return value is not needed.
    pub async fn run<A: Serialize>(
        &mut self,
        command: &str,
        arguments: Option<&A>,
    ) -> Result<(), QmpError> {
        self.execute::<A, IgnoredAny>(command, arguments)
            .await
            .map(drop)
    }

    /// Passes `fd` to QEMU (SCM_RIGHTS) under `fdname` with `getfd`, for
    /// `fd:` migration URIs. QEMU keeps its own duplicate.
    pub async fn send_fd(&mut self, fdname: &str, fd: &impl AsRawFd) -> Result<(), QmpError> {
        let args = FdName {
            fdname: fdname.into(),
        };
        let (id, line) = self.encode("getfd", Some(&args))?;
        let sock = self.stream.as_raw_fd();
        let raw = fd.as_raw_fd();
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || send_with_fd(sock, &line, raw))
            .await
            .map_err(QmpError::Io)?;
        // The fd rides with the first byte; the rest of a (rare) short write
        // goes out plainly.
        self.stream
            .write_all(&line[sent..])
            .await
            .map_err(QmpError::Io)?;
        self.await_reply::<IgnoredAny>(id).await.map(drop)
    }

    /// `query-status`.
    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute::<(), _>("query-status", None).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        self.execute::<(), _>("query-migrate", None).await
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    fn encode<A: Serialize>(
        &mut self,
        command: &str,
        arguments: Option<&A>,
    ) -> Result<(u64, Vec<u8>), QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request {
            execute: command,
            arguments,
            id,
        })
        .map_err(|e| QmpError::Protocol(format!("encoding {command}: {e}")))?;
        line.push(b'\n');
        Ok((id, line))
    }

    async fn await_reply<R: DeserializeOwned>(&mut self, id: u64) -> Result<R, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline).await? {
                Message::Return { ret, id: rid } if rid == Some(id.into()) => {
                    return serde_json::from_value(ret)
                        .map_err(|e| QmpError::Protocol(format!("decoding reply: {e}")));
                }
                Message::Error { error, id: rid } if rid == Some(id.into()) || rid.is_none() => {
                    // QEMU answers a request it could not parse with an
                    // error without id; that is this request's answer too.
                    return Err(QmpError::Command {
                        class: error.class,
                        desc: error.desc,
                    });
                }
                Message::Event(ev) => {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    tracing::trace!(event = %ev.event, "QMP event");
                    self.events.push_back(ev);
                }
                Message::Return { id: rid, .. } | Message::Error { id: rid, .. } => {
                    // A reply to an earlier command that timed out: skip it.
                    tracing::debug!(?rid, expected = id, "stale QMP reply");
                }
                Message::Greeting { .. } => {
                    return Err(QmpError::Protocol("second greeting".into()))
                }
            }
        }
    }

    async fn read_message(&mut self, deadline: Instant) -> Result<Message, QmpError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text)
                    .map_err(|e| QmpError::Protocol(format!("{e}: {text}")));
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "line longer than {MAX_LINE} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| QmpError::Timeout(self.timeout))?
                .map_err(QmpError::Io)?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `sendmsg` of `data` with one fd attached as SCM_RIGHTS.
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one
    // cmsghdr carrying one fd, so CMSG_FIRSTHDR is non-null and its data
    // area holds a RawFd; `iov` and `control` outlive the sendmsg call, and
    // the kernel only reads `data` through the iovec.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, then answers each request line with
    /// `respond(request)`; lines returned are written in order.
    async fn fake_server(
        listener: UnixListener,
        respond: impl Fn(serde_json::Value) -> Vec<String> + Send + 'static,
    ) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            for out in respond(req) {
                w.write_all(out.as_bytes()).await.unwrap();
                w.write_all(b"\r\n").await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn executes_commands_skipping_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_server(listener, |req| {
            let id = req["id"].clone();
            match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => {
                    assert!(req.get("arguments").is_none());
                    vec![format!("{{\"return\": {{}}, \"id\": {id}}}")]
                }
                "query-status" => vec![
                    // An event and a stale reply before the answer.
                    r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
                    r#"{"return": {}, "id": 999}"#.into(),
                    format!("{{\"return\": {{\"running\": false, \"singlestep\": false, \"status\": \"paused\"}}, \"id\": {id}}}"),
                ],
                "migrate" => {
                    assert_eq!(req["arguments"]["uri"], "fd:x");
                    vec![format!(
                        "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no fd named x\"}}, \"id\": {id}}}"
                    )]
                }
                other => panic!("unexpected {other}"),
            }
        }));
        let mut c = QmpClient::connect(&path).await.unwrap();
        let st = c.query_status().await.unwrap();
        assert_eq!(
            st,
            StatusInfo {
                running: false,
                status: "paused".into()
            }
        );
        assert_eq!(
            c.take_events()
                .iter()
                .map(|e| e.event.as_str())
                .collect::<Vec<_>>(),
            ["STOP"]
        );
        let e = c
            .run("migrate", Some(&MigrateUri { uri: "fd:x".into() }))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "GenericError: no fd named x");
        assert!(!e.is_disconnect());
    }

    #[tokio::test]
    async fn a_closed_connection_is_a_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            // Answer qmp_capabilities, then hang up on the next command.
            let mut buf = [0u8; 256];
            let _n = s.read(&mut buf).await.unwrap();
            s.write_all(b"{\"return\": {}, \"id\": 1}\n").await.unwrap();
            let _n = s.read(&mut buf).await.unwrap();
        });
        let mut c = QmpClient::connect(&path).await.unwrap();
        let e = c.run::<()>("stop", None).await.unwrap_err();
        assert!(e.is_disconnect(), "{e:?}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_greet_is_rejected() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"return\": {}}\n").await.unwrap();
        let e = QmpClient::handshake(a).await.unwrap_err();
        assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
    }

    #[tokio::test]
    async fn passes_a_file_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let line = b"{\"execute\":\"getfd\"}\n";
        let raw = a.as_raw_fd();
        let n = a
            .async_io(Interest::WRITABLE, || {
                send_with_fd(raw, line, file.as_raw_fd())
            })
            .await
            .unwrap();
        assert_eq!(n, line.len());
        // Receive it with recvmsg and check an fd arrived.
        b.readable().await.unwrap();
        let mut data = [0u8; 64];
        let mut control = vec![0u64; 8];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: zeroed msghdr is valid; buffers outlive the call.
        let got_fd = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut _;
            msg.msg_controllen = 64;
            let n = libc::recvmsg(b.as_raw_fd(), &mut msg, 0);
            assert_eq!(n as usize, line.len());
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd)
        };
        assert!(got_fd >= 0);
        // SAFETY: the fd was just received and is owned by nobody else.
        unsafe { libc::close(got_fd) };
    }
}
