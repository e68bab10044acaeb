//! The client: connection pool, deadlines, exec and small requests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{
    Activity, ExecRequest, Exit, Kill, Message, SessionInfo, SessionRef, Started,
    Tunnel as TunnelReq, DATA_CHUNK,
};
use tokio::io::{ReadHalf, WriteHalf};

use crate::conn::{unexpected, Conn};
use crate::stream::{Endpoint, Stream, Tunnel};
use crate::ClientError;

/// Runs one exchange (`$body`, a future using `$c: &mut Conn`) on a pooled
/// connection, within the client's deadline. A pooled connection that turns
/// out stale (closed before answering anything) is replaced once and the
/// exchange run again. A macro rather than a closure-taking method: futures
/// of async closures over `&mut Conn` cannot be proven `Send`, which the
/// daemon's handlers need.
macro_rules! call {
    ($client:expr, $op:expr, |$c:ident| $body:expr) => {{
        let client: &$crate::AgentClient = $client;
        let fut = async {
            let (mut conn, pooled) = match client.checkout_idle() {
                Some(c) => (c, true),
                None => (client.open_fresh().await?, false),
            };
            let seen = conn.received();
            let result = {
                let $c = &mut conn;
                $body.await
            };
            match result {
                Err(e) if pooled && conn.received() == seen && e.is_stale_connection() => {
                    let mut conn = client.open_fresh().await?;
                    let v = {
                        let $c = &mut conn;
                        $body.await
                    };
                    client.finish(conn, v)
                }
                other => client.finish(conn, other),
            }
        };
        client.within_deadline($op, fut).await
    }};
}
pub(crate) use call;

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// Default deadline for requests that are not commands.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Inner {
    endpoint: Endpoint,
    token: String,
    idle: Mutex<Vec<Conn>>,
}

impl Inner {
    pub(crate) fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    fn checkout_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    async fn open(&self) -> Result<Conn, ClientError> {
        Conn::open(&self.endpoint, &self.token).await
    }
}

/// A client for one agent. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    deadline: Duration,
    exec_deadline: Option<Duration>,
}

/// A finished command's collected output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: u32,
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output past the cap of [`AgentClient::exec_capped`] was left out.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Appends `d` to `buf` up to `cap` bytes in all; says whether anything
/// was left out.
fn keep_capped(buf: &mut Vec<u8>, d: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&d[..d.len().min(room)]);
    d.len() > room
}

/// What a streamed command produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(Exit),
}

impl AgentClient {
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> AgentClient {
        AgentClient {
            inner: Arc::new(Inner {
                endpoint,
                token: token.into(),
                idle: Mutex::new(Vec::new()),
            }),
            deadline: DEFAULT_DEADLINE,
            exec_deadline: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The same client (sharing its pool) with another deadline for each
    /// call: `client.deadline(Duration::from_secs(1)).stat("/")`. For
    /// commands it bounds the whole run; a command past it is killed.
    pub fn deadline(&self, deadline: Duration) -> AgentClient {
        AgentClient {
            inner: self.inner.clone(),
            deadline,
            exec_deadline: Some(deadline),
        }
    }

    /// Opens and authenticates a connection now, to check the agent answers.
    pub async fn ping(&self) -> Result<Activity, ClientError> {
        self.activity().await
    }

    async fn within<T>(
        &self,
        operation: &'static str,
        deadline: Option<Duration>,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match deadline {
            None => fut.await,
            Some(after) => tokio::time::timeout(after, fut)
                .await
                .map_err(|_| ClientError::Timeout { operation, after })?,
        }
    }

    pub(crate) fn checkout_idle(&self) -> Option<Conn> {
        self.inner.checkout_idle()
    }

    pub(crate) async fn open_fresh(&self) -> Result<Conn, ClientError> {
        self.inner.open().await
    }

    pub(crate) async fn within_deadline<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        self.within(operation, Some(self.deadline), fut).await
    }

    pub(crate) fn finish<T>(
        &self,
        conn: Conn,
        result: Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        // After an agent error the exchange is over and the connection in step.
        if matches!(result, Ok(_) | Err(ClientError::Agent { .. })) {
            self.inner.checkin(conn);
        }
        result
    }

    async fn start_exec(&self, req: &ExecRequest) -> Result<(Conn, Started), ClientError> {
        let started = async {
            let mut conn = match self.inner.checkout_idle() {
                Some(c) => c,
                None => self.inner.open().await?,
            };
            conn.send(&Message::Exec(req.clone())).await?;
            match conn.recv("exec").await {
                Ok(Message::Started(s)) => Ok((conn, s)),
                Ok(other) => Err(unexpected("started", &other)),
                Err(e @ ClientError::Agent { .. }) => {
                    self.inner.checkin(conn);
                    Err(e)
                }
                Err(e) if e.is_stale_connection() => {
                    let mut conn = self.inner.open().await?;
                    conn.send(&Message::Exec(req.clone())).await?;
                    match conn.recv("exec").await? {
                        Message::Started(s) => Ok((conn, s)),
                        other => Err(unexpected("started", &other)),
                    }
                }
                Err(e) => Err(e),
            }
        };
        self.within("exec start", Some(self.deadline), started)
            .await
    }

    /// Runs a command to completion and collects its output.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        self.exec_capped(req, usize::MAX).await
    }

    /// Runs a command to completion and keeps at most `max_per_stream`
    /// bytes of each of stdout and stderr; the rest is read and dropped
    /// (the command runs to its end) and the output says it was truncated.
    pub async fn exec_capped(
        &self,
        req: ExecRequest,
        max_per_stream: usize,
    ) -> Result<ExecOutput, ClientError> {
        if req.tty || req.detach {
            return Err(ClientError::InvalidRequest(
                "exec collects piped commands; use open_session or spawn".into(),
            ));
        }
        let run = async {
            let mut stream = self.exec_stream(req).await?;
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let (mut out_cut, mut err_cut) = (false, false);
            loop {
                match stream.next().await? {
                    ExecEvent::Stdout(d) => out_cut |= keep_capped(&mut stdout, &d, max_per_stream),
                    ExecEvent::Stderr(d) => err_cut |= keep_capped(&mut stderr, &d, max_per_stream),
                    ExecEvent::Exit(exit) => {
                        return Ok(ExecOutput {
                            pid: stream.pid,
                            exit,
                            stdout,
                            stderr,
                            stdout_truncated: out_cut,
                            stderr_truncated: err_cut,
                        })
                    }
                }
            }
        };
        self.within("exec", self.exec_deadline, run).await
    }

    /// Starts a piped command and streams its output.
    pub async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        if req.tty || req.detach {
            return Err(ClientError::InvalidRequest(
                "exec_stream runs piped commands; use open_session or spawn".into(),
            ));
        }
        let (conn, started) = self.start_exec(&req).await?;
        Ok(ExecStream {
            conn: Some(conn),
            pool: self.inner.clone(),
            pid: started.pid,
        })
    }

    /// Starts a detached command; returns its pid and log file.
    pub async fn spawn(&self, mut req: ExecRequest) -> Result<Started, ClientError> {
        req.detach = true;
        let (conn, started) = self.start_exec(&req).await?;
        self.inner.checkin(conn);
        Ok(started)
    }

    pub async fn activity(&self) -> Result<Activity, ClientError> {
        call!(self, "activity", |c| async {
            c.send(&Message::ActivityQuery).await?;
            match c.recv("activity").await? {
                Message::Activity(a) => Ok(a),
                other => Err(unexpected("activity", &other)),
            }
        })
    }

    /// Sets the guest's wall clock to `unix_ms` (after a resume or restore).
    pub async fn set_time(&self, unix_ms: u64) -> Result<(), ClientError> {
        call!(self, "set_time", |c| async {
            c.send(&Message::SetTime(proto::SetTime { unix_ms }))
                .await?;
            match c.recv("set_time").await? {
                Message::Ok => Ok(()),
                other => Err(unexpected("set_time", &other)),
            }
        })
    }

    /// The TCP ports listening in the guest (the agent's own left out).
    pub async fn ports(&self) -> Result<Vec<proto::ListeningPort>, ClientError> {
        call!(self, "list ports", |c| async {
            c.send(&Message::ListPorts).await?;
            match c.recv("list ports").await? {
                Message::PortList(l) => Ok(l.ports),
                other => Err(unexpected("port_list", &other)),
            }
        })
    }

    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        call!(self, "session list", |c| async {
            c.send(&Message::SessionList).await?;
            match c.recv("session list").await? {
                Message::Sessions(s) => Ok(s.sessions),
                other => Err(unexpected("sessions", &other)),
            }
        })
    }

    pub async fn session(&self, name: &str) -> Result<SessionInfo, ClientError> {
        call!(self, "session query", |c| async {
            c.send(&Message::SessionQuery(SessionRef {
                session: name.to_string(),
            }))
            .await?;
            match c.recv("session query").await? {
                Message::Session(s) => Ok(s),
                other => Err(unexpected("session", &other)),
            }
        })
    }

    /// Ends a session (SIGTERM, then SIGKILL after a grace period) and
    /// returns once it is gone.
    pub async fn kill_session(&self, name: &str) -> Result<(), ClientError> {
        call!(self, "session kill", |c| async {
            c.send(&Message::SessionKill(SessionRef {
                session: name.to_string(),
            }))
            .await?;
            match c.recv("session kill").await? {
                Message::Ok => Ok(()),
                other => Err(unexpected("ok", &other)),
            }
        })
    }

    /// Opens a raw byte tunnel to `127.0.0.1:port` in the guest.
    pub async fn tunnel(&self, port: u16) -> Result<Tunnel, ClientError> {
        let open = async {
            let mut conn = self.inner.open().await?;
            conn.send(&Message::Tunnel(TunnelReq { port })).await?;
            match conn.recv("tunnel").await {
                Ok(Message::TunnelOk) => {
                    let (stream, early) = conn.into_stream();
                    Ok(Tunnel::new(stream, early))
                }
                Ok(other) => Err(unexpected("tunnel_ok", &other)),
                Err(e) => {
                    if e.agent_code().is_some() {
                        self.inner.checkin(conn);
                    }
                    Err(e)
                }
            }
        };
        self.within("tunnel", Some(self.deadline), open).await
    }

    pub(crate) fn pool(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    pub(crate) async fn open_conn(&self) -> Result<Conn, ClientError> {
        match self.inner.checkout_idle() {
            Some(c) => Ok(c),
            None => self.inner.open().await,
        }
    }

    pub(crate) fn call_deadline(&self) -> Duration {
        self.deadline
    }
}

/// A running piped command.
#[derive(Debug)]
pub struct ExecStream {
    conn: Option<Conn>,
    pool: Arc<Inner>,
    pub pid: u32,
}

impl ExecStream {
    fn conn(&mut self) -> Result<&mut Conn, ClientError> {
        self.conn.as_mut().ok_or(ClientError::Closed {
            operation: "exec (already finished)",
        })
    }

    /// The next output chunk, or the exit (after which the stream is done).
    pub async fn next(&mut self) -> Result<ExecEvent, ClientError> {
        let msg = self.conn()?.recv("exec").await?;
        match msg {
            Message::Stdout(d) => Ok(ExecEvent::Stdout(d)),
            Message::Stderr(d) => Ok(ExecEvent::Stderr(d)),
            Message::Exit(e) => {
                if let Some(conn) = self.conn.take() {
                    self.pool.checkin(conn);
                }
                Ok(ExecEvent::Exit(e))
            }
            other => Err(unexpected("stdout, stderr or exit", &other)),
        }
    }

    /// Sends stdin (the request must have set `stdin: true`).
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let conn = self.conn()?;
        for chunk in data.chunks(DATA_CHUNK) {
            conn.send(&Message::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.conn()?.send(&Message::StdinEof).await
    }

    /// Signals the command's process group (SIGKILL when `None`).
    pub async fn kill(&mut self, signal: Option<i32>) -> Result<(), ClientError> {
        self.conn()?.send(&Message::Kill(Kill { signal })).await
    }

    /// Splits into an output half and an input half, to read and write
    /// concurrently. The connection is not reused afterwards.
    pub fn into_split(mut self) -> Result<(ExecOutputHalf, ExecInputHalf), ClientError> {
        let conn = self.conn.take().ok_or(ClientError::Closed {
            operation: "exec (already finished)",
        })?;
        Ok((
            ExecOutputHalf {
                reader: conn.reader,
                done: false,
            },
            ExecInputHalf {
                writer: conn.writer,
            },
        ))
    }
}

/// Output half of a split [`ExecStream`].
#[derive(Debug)]
pub struct ExecOutputHalf {
    reader: proto::FrameReader<ReadHalf<Stream>>,
    done: bool,
}

impl ExecOutputHalf {
    pub async fn next(&mut self) -> Result<ExecEvent, ClientError> {
        if self.done {
            return Err(ClientError::Closed {
                operation: "exec (already finished)",
            });
        }
        match self.reader.read_message().await? {
            Some(Message::Stdout(d)) => Ok(ExecEvent::Stdout(d)),
            Some(Message::Stderr(d)) => Ok(ExecEvent::Stderr(d)),
            Some(Message::Exit(e)) => {
                self.done = true;
                Ok(ExecEvent::Exit(e))
            }
            Some(Message::Error(e)) => Err(e.into()),
            Some(other) => Err(unexpected("stdout, stderr or exit", &other)),
            None => Err(ClientError::Closed { operation: "exec" }),
        }
    }
}

/// Input half of a split [`ExecStream`].
#[derive(Debug)]
pub struct ExecInputHalf {
    writer: proto::FrameWriter<WriteHalf<Stream>>,
}

impl ExecInputHalf {
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.writer.send(&Message::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        Ok(self.writer.send(&Message::StdinEof).await?)
    }

    pub async fn kill(&mut self, signal: Option<i32>) -> Result<(), ClientError> {
        Ok(self.writer.send(&Message::Kill(Kill { signal })).await?)
    }
}
