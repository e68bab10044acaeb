//! The guest surface of core: every call into a running sandbox's agent
//! (exec, files, sessions, ports, tunnels). Each wakes the sandbox first,
//! runs under a deadline and is raced against the VMM's exit, so a dead VM
//! is reported as soon as it dies and a hung agent as soon as its deadline
//! passes. Streams (exec output, file reads, sessions, tunnels) keep
//! watching the VMM for as long as they live, and bound every wait on the
//! agent that is not a wait for a person (a terminal's output, a tunnel's
//! traffic).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agent_client::{
    AgentClient, ClientError, ExecEvent, ExecOutput, ExecStream, FileContent, FileReader, Listing,
    SessionEvent, SessionInput, SessionOutput, SessionStream, Tunnel, WriteOptions,
};
use proto::{ExecRequest, FileRead, FileStat, ListeningPort, SessionInfo, Started, WindowSize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::Instrument;

use crate::boot::exited;
use crate::error::{CoreError, Result};
use crate::id::SandboxId;
use crate::manager::{Entry, SandboxManager, Vm};
use crate::registry::CallInFlight;

/// Deadline of one request to the agent (a stat, a listing, one chunk of a
/// file, opening a session or tunnel).
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// How long past a command's own timeout the host waits for its exit: the
/// agent kills the command at its timeout, so this only catches an agent
/// that stopped answering.
pub const EXEC_GRACE: Duration = Duration::from_secs(30);

/// The run-time bound of a command run without a timeout of its own.
pub const UNTIMED_EXEC: Duration = Duration::from_secs(24 * 3600);

/// The whole-run deadline of a command.
fn exec_deadline(req: &ExecRequest) -> Duration {
    req.timeout_ms
        .map_or(UNTIMED_EXEC, Duration::from_millis)
        .saturating_add(EXEC_GRACE)
}

/// A running sandbox's VM, watched: calls through it are raced against the
/// VMM's exit, and an exit marks the sandbox failed.
#[derive(Debug, Clone)]
struct Watch {
    manager: SandboxManager,
    entry: Arc<Entry>,
    vm: Vm,
    /// Keeps the thermal manager from pausing the VM under this call.
    _busy: CallInFlight,
}

impl Watch {
    fn client(&self, deadline: Duration) -> AgentClient {
        self.vm.client.deadline(deadline)
    }

    fn dead(&self, exit: &vmm::VmmExit) -> CoreError {
        self.manager.mark_dead(&self.entry, exit)
    }

    /// Runs `call` within `deadline` (when given), racing it against the
    /// VMM's exit.
    async fn race<T>(
        &self,
        operation: &'static str,
        deadline: Option<Duration>,
        call: impl Future<Output = std::result::Result<T, ClientError>>,
    ) -> Result<T> {
        let span = tracing::debug_span!("agent", sandbox = %self.entry.id, operation);
        let bounded = async {
            match deadline {
                Some(after) => tokio::time::timeout(after, call)
                    .await
                    .unwrap_or(Err(ClientError::Timeout { operation, after })),
                None => call.await,
            }
        };
        let result = tokio::select! {
            r = bounded.instrument(span) => r,
            exit = exited(&*self.vm.vmm) => return Err(self.dead(&exit)),
        };
        result.map_err(|source| self.agent_error(source))
    }

    fn agent_error(&self, source: ClientError) -> CoreError {
        match self.vm.vmm.exit() {
            // The call failed because the VM died under it.
            Some(exit) if source.agent_code().is_none() => self.dead(&exit),
            _ => CoreError::Agent {
                id: self.entry.id.clone(),
                source,
            },
        }
    }
}

impl SandboxManager {
    /// Wakes a sandbox and watches its VM for a call into the guest.
    async fn watch(&self, id: &SandboxId, operation: &'static str) -> Result<Watch> {
        // In flight before the wake check: a tick that pauses after it sees
        // this call (and a tick that paused just before it is undone at the
        // next tick, which wakes a warm sandbox with calls in flight).
        let busy = self.entry(id)?.begin_call();
        self.ensure_hot(id).await?;
        let entry = self.entry(id)?;
        let vm = self.running(&entry, operation)?;
        Ok(Watch {
            manager: self.clone(),
            entry,
            vm,
            _busy: busy,
        })
    }

    /// One request/answer call with [`CALL_DEADLINE`].
    async fn call<T, F, Fut>(&self, id: &SandboxId, operation: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(AgentClient) -> Fut,
        Fut: Future<Output = std::result::Result<T, ClientError>>,
    {
        let w = self.watch(id, operation).await?;
        let client = w.client(CALL_DEADLINE);
        w.race(operation, Some(CALL_DEADLINE), call(client)).await
    }

    /// Runs a command to completion, collecting all its output.
    pub async fn exec(&self, id: &SandboxId, req: ExecRequest) -> Result<ExecOutput> {
        self.exec_capped(id, req, usize::MAX).await
    }

    /// Runs a command to completion, keeping at most `max_per_stream` bytes
    /// of each output stream (the rest is dropped and the output says so).
    /// Bounded by the command's timeout plus [`EXEC_GRACE`].
    pub async fn exec_capped(
        &self,
        id: &SandboxId,
        req: ExecRequest,
        max_per_stream: usize,
    ) -> Result<ExecOutput> {
        let w = self.watch(id, "exec").await?;
        let deadline = exec_deadline(&req);
        // The client's deadline bounds the whole run (start included).
        let client = w.client(deadline);
        w.race("exec", None, client.exec_capped(req, max_per_stream))
            .await
    }

    /// Starts a piped command and streams its output; the stream ends with
    /// an error if the VM dies or the command outlives its timeout plus
    /// [`EXEC_GRACE`].
    pub async fn exec_stream(&self, id: &SandboxId, req: ExecRequest) -> Result<GuestExec> {
        let w = self.watch(id, "exec").await?;
        let deadline = Instant::now() + exec_deadline(&req);
        let client = w.client(CALL_DEADLINE);
        let stream = w
            .race("exec", Some(CALL_DEADLINE), client.exec_stream(req))
            .await?;
        Ok(GuestExec {
            watch: w,
            stream,
            deadline,
        })
    }

    /// Starts a detached command; returns its pid and log file.
    pub async fn spawn(&self, id: &SandboxId, req: ExecRequest) -> Result<Started> {
        self.call(id, "exec (detached)", |c| async move { c.spawn(req).await })
            .await
    }

    /// Reads a file whole (within the request's limits).
    pub async fn read_file(&self, id: &SandboxId, req: FileRead) -> Result<FileContent> {
        self.call(id, "read a file", |c| async move { c.read_file(req).await })
            .await
    }

    /// Starts a streamed file read; each chunk has [`CALL_DEADLINE`].
    pub async fn read_file_stream(&self, id: &SandboxId, req: FileRead) -> Result<GuestFile> {
        let w = self.watch(id, "read a file").await?;
        let client = w.client(CALL_DEADLINE);
        let reader = w
            .race(
                "read a file",
                Some(CALL_DEADLINE),
                client.read_file_stream(req),
            )
            .await?;
        Ok(GuestFile { watch: w, reader })
    }

    /// Writes a file atomically.
    pub async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: &[u8],
        opts: WriteOptions,
    ) -> Result<u64> {
        self.call(id, "write a file", |c| async move {
            c.write_file(path, data, opts).await
        })
        .await
    }

    /// Writes `size` bytes from `source` to a file atomically, streaming;
    /// each step (a read of the source, a send, the commit) has
    /// [`CALL_DEADLINE`].
    pub async fn write_file_stream<R: AsyncRead + Unpin>(
        &self,
        id: &SandboxId,
        path: &str,
        size: u64,
        source: R,
        opts: WriteOptions,
    ) -> Result<u64> {
        let w = self.watch(id, "write a file").await?;
        let client = w.client(CALL_DEADLINE);
        w.race(
            "write a file",
            None,
            client.write_file_stream(path, size, source, opts),
        )
        .await
    }

    /// Metadata of a guest path.
    pub async fn stat(&self, id: &SandboxId, path: &str) -> Result<FileStat> {
        self.call(id, "stat", |c| async move { c.stat(path).await })
            .await
    }

    /// Lists a guest directory.
    pub async fn ls(&self, id: &SandboxId, path: &str) -> Result<Listing> {
        self.call(id, "list a directory", |c| async move { c.ls(path).await })
            .await
    }

    /// Starts a command in a new PTY session and attaches to it.
    pub async fn open_session(&self, id: &SandboxId, req: ExecRequest) -> Result<GuestSession> {
        let w = self.watch(id, "open a session").await?;
        let client = w.client(CALL_DEADLINE);
        let s = w
            .race(
                "open a session",
                Some(CALL_DEADLINE),
                client.open_session(req),
            )
            .await?;
        Ok(GuestSession {
            watch: w,
            stream: s,
        })
    }

    /// Attaches to an existing session (scrollback replayed first).
    pub async fn attach_session(
        &self,
        id: &SandboxId,
        name: &str,
        steal: bool,
        size: Option<WindowSize>,
    ) -> Result<GuestSession> {
        let w = self.watch(id, "attach a session").await?;
        let client = w.client(CALL_DEADLINE);
        let s = w
            .race(
                "attach a session",
                Some(CALL_DEADLINE),
                client.attach(name, steal, size),
            )
            .await?;
        Ok(GuestSession {
            watch: w,
            stream: s,
        })
    }

    /// The sandbox's PTY sessions.
    pub async fn sessions(&self, id: &SandboxId) -> Result<Vec<SessionInfo>> {
        self.call(id, "list sessions", |c| async move { c.sessions().await })
            .await
    }

    /// The TCP ports listening in the guest.
    pub async fn ports(&self, id: &SandboxId) -> Result<Vec<ListeningPort>> {
        self.call(id, "list ports", |c| async move { c.ports().await })
            .await
    }

    /// Opens a raw byte tunnel to `127.0.0.1:port` in the guest. Reads and
    /// writes on it fail (`ConnectionAborted`) once the VM dies.
    pub async fn tunnel(&self, id: &SandboxId, port: u16) -> Result<GuestTunnel> {
        let w = self.watch(id, "open a tunnel").await?;
        let client = w.client(CALL_DEADLINE);
        let tunnel = w
            .race("open a tunnel", Some(CALL_DEADLINE), client.tunnel(port))
            .await?;
        let vmm = w.vm.vmm.clone();
        Ok(GuestTunnel {
            tunnel,
            exit: Box::pin(async move { exited(&*vmm).await }),
            watch: w,
            dead: false,
        })
    }
}

/// A running piped command's output, watched.
#[derive(Debug)]
pub struct GuestExec {
    watch: Watch,
    stream: ExecStream,
    deadline: Instant,
}

impl GuestExec {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.stream.pid
    }

    /// The next output chunk, or the exit (after which the stream is done).
    pub async fn next(&mut self) -> Result<ExecEvent> {
        let after = self.deadline.saturating_duration_since(Instant::now());
        let next = async {
            tokio::time::timeout_at(self.deadline, self.stream.next())
                .await
                .unwrap_or(Err(ClientError::Timeout {
                    operation: "exec",
                    after,
                }))
        };
        let w = &self.watch;
        let result = tokio::select! {
            r = next => r,
            exit = exited(&*w.vm.vmm) => return Err(w.dead(&exit)),
        };
        result.map_err(|e| w.agent_error(e))
    }
}

/// A file being read from the guest, chunk by chunk.
#[derive(Debug)]
pub struct GuestFile {
    watch: Watch,
    reader: FileReader,
}

impl GuestFile {
    /// Size of the whole file.
    pub fn total_size(&self) -> u64 {
        self.reader.total_size
    }

    /// Its mode bits.
    pub fn mode(&self) -> u32 {
        self.reader.mode
    }

    /// The next chunk; `None` once the read is complete.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let w = &self.watch;
        w.race("read a file", None, self.reader.next_chunk()).await
    }

    /// Whether the limits left part of the file out; known at the end.
    pub fn truncated(&self) -> Option<bool> {
        self.reader.truncated()
    }
}

/// An attachment to a PTY session, watched.
#[derive(Debug)]
pub struct GuestSession {
    watch: Watch,
    stream: SessionStream,
}

impl GuestSession {
    /// The session's name.
    pub fn name(&self) -> &str {
        &self.stream.name
    }

    /// The pid of its command.
    pub fn pid(&self) -> u32 {
        self.stream.pid
    }

    /// The next output, or the end of the attachment. Output may be long in
    /// coming (a terminal waits for its user): no deadline, but the VM's
    /// death ends the wait.
    pub async fn next(&mut self) -> Result<SessionEvent> {
        let w = &self.watch;
        w.race("session", None, self.stream.next()).await
    }

    /// Splits into an output half and an input half for concurrent use.
    /// Dropping both halves detaches.
    pub fn into_split(self) -> Result<(GuestSessionOutput, GuestSessionInput)> {
        let w = self.watch;
        let (output, input) = self.stream.into_split().map_err(|e| w.agent_error(e))?;
        Ok((
            GuestSessionOutput {
                watch: w.clone(),
                output,
            },
            GuestSessionInput { watch: w, input },
        ))
    }
}

/// Output half of a [`GuestSession`].
#[derive(Debug)]
pub struct GuestSessionOutput {
    watch: Watch,
    output: SessionOutput,
}

impl GuestSessionOutput {
    /// The next event; `Ok(None)` once the agent confirmed a detach. No
    /// deadline (a terminal may be quiet for hours); the VM's death ends it.
    pub async fn next(&mut self) -> Result<Option<SessionEvent>> {
        let w = &self.watch;
        w.race("session", None, self.output.next()).await
    }
}

/// Input half of a [`GuestSession`]; each write has [`CALL_DEADLINE`].
#[derive(Debug)]
pub struct GuestSessionInput {
    watch: Watch,
    input: SessionInput,
}

impl GuestSessionInput {
    /// Sends terminal input.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let w = &self.watch;
        w.race("session input", Some(CALL_DEADLINE), self.input.write(data))
            .await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, size: WindowSize) -> Result<()> {
        let w = &self.watch;
        w.race(
            "session resize",
            Some(CALL_DEADLINE),
            self.input.resize(size),
        )
        .await
    }

    /// Asks the agent to end the attachment (the output half then ends).
    pub async fn detach(&mut self) -> Result<()> {
        let w = &self.watch;
        w.race("session detach", Some(CALL_DEADLINE), self.input.detach())
            .await
    }
}

/// A tunnel to a guest port: raw bytes both ways, for as long as both ends
/// want (no deadline), failing with `ConnectionAborted` once the VM dies
/// (and marking the sandbox failed).
pub struct GuestTunnel {
    tunnel: Tunnel,
    exit: Pin<Box<dyn Future<Output = vmm::VmmExit> + Send>>,
    watch: Watch,
    dead: bool,
}

impl std::fmt::Debug for GuestTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestTunnel")
            .field("sandbox", &self.watch.entry.id)
            .field("dead", &self.dead)
            .finish()
    }
}

impl GuestTunnel {
    /// `Err` once the VMM has exited.
    fn check_alive(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.dead {
            if let Poll::Ready(exit) = self.exit.as_mut().poll(cx) {
                self.dead = true;
                let e = self.watch.dead(&exit);
                tracing::debug!(error = %e, "tunnel ended: the VM died");
            }
        }
        if self.dead {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("the VM of sandbox {} died", self.watch.entry.id),
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for GuestTunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check_alive(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tunnel).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuestTunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check_alive(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tunnel).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check_alive(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tunnel).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tunnel).poll_shutdown(cx)
    }
}
