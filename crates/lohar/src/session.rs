//! PTY sessions: commands in a pseudo-terminal that outlive the connection
//! that started them.
//!
//! A session keeps the last [`SCROLLBACK_BYTES`] of output. At most one
//! client is attached; a disconnect detaches without killing, and a later
//! attach replays the scrollback and then the live output. A session with
//! no client and no I/O for the idle timeout is killed.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use proto::{
    ErrorCode, ExecRequest, Exit, FrameReader, FrameWriter, Message, SessionInfo, Started,
    WindowSize, DATA_CHUNK, MAX_SESSIONS, MAX_SESSION_NAME, SCROLLBACK_BYTES,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use crate::agent::{now_unix_ms, Agent};
use crate::failure::{ConnError, Failure};
use crate::spawn::{self, exit_of, kill_group, Grouping};

/// How long a killed session gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// Output a session may produce after its leader exits before it is reported ended.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Stdin bytes buffered for a session that is not reading them.
const MAX_PENDING_INPUT: usize = 1024 * 1024;

/// What an attached client receives from its session.
#[derive(Debug)]
enum Event {
    Output(Vec<u8>),
    Exited(Exit),
}

#[derive(Debug)]
struct Attachment {
    id: u64,
    events: mpsc::Sender<Event>,
    /// Fired when another client takes the session over.
    kicked: Option<oneshot::Sender<()>>,
}

/// The last bytes of output, capped at a fixed size.
#[derive(Debug, Default)]
struct Scrollback(VecDeque<u8>);

impl Scrollback {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(SCROLLBACK_BYTES)..];
        let excess = (self.0.len() + data.len()).saturating_sub(SCROLLBACK_BYTES);
        self.0.drain(..excess);
        self.0.extend(data);
    }

    fn to_vec(&self) -> Vec<u8> {
        let (a, b) = self.0.as_slices();
        [a, b].concat()
    }
}

#[derive(Debug)]
struct State {
    scrollback: Scrollback,
    attached: Option<Attachment>,
    size: WindowSize,
    last_activity_ms: u64,
}

#[derive(Debug)]
pub struct Session {
    name: String,
    pid: u32,
    argv: Vec<String>,
    created_ms: u64,
    master: AsyncFd<OwnedFd>,
    state: Mutex<State>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Session {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug; the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> SessionInfo {
        let st = self.state();
        SessionInfo {
            session: self.name.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            attached: st.attached.is_some(),
            size: st.size,
            created_unix_ms: self.created_ms,
            last_activity_unix_ms: st.last_activity_ms,
            scrollback_bytes: st.scrollback.0.len() as u64,
        }
    }

    /// Records output and hands it to the attached client, if any.
    async fn output(&self, data: &[u8]) {
        let events = {
            let mut st = self.state();
            st.scrollback.push(data);
            st.last_activity_ms = now_unix_ms();
            st.attached.as_ref().map(|a| a.events.clone())
        };
        if let Some(events) = events {
            // A detached client dropped its receiver; that is not an error.
            let _ = events.send(Event::Output(data.to_vec())).await;
        }
    }

    fn resize(&self, size: WindowSize) -> Result<(), Failure> {
        if size.rows == 0 || size.cols == 0 {
            return Err(Failure::bad_request("terminal size must be at least 1x1"));
        }
        crate::pty::resize(self.master.get_ref().as_fd(), size).map_err(|e| {
            Failure::new(ErrorCode::Io, format!("resizing the terminal failed: {e}"))
        })?;
        self.state().size = size;
        Ok(())
    }

    /// Writes as much of `data` to the terminal as it takes without blocking.
    fn try_write(&self, data: &[u8]) -> std::io::Result<usize> {
        nix::unistd::write(self.master.get_ref(), data).map_err(std::io::Error::from)
    }
}

/// All sessions of the agent.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    next_id: std::sync::atomic::AtomicU64,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SESSION_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Sessions {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// (sessions, attached sessions).
    pub fn counts(&self) -> (u32, u32) {
        let map = self.map();
        let attached = map
            .values()
            .filter(|s| s.state().attached.is_some())
            .count();
        (map.len() as u32, attached as u32)
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.map().values().map(|s| s.info()).collect();
        v.sort_by_key(|s| s.created_unix_ms);
        v
    }

    pub fn get(&self, name: &str) -> Result<Arc<Session>, Failure> {
        self.map()
            .get(name)
            .cloned()
            .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no session named '{name}'")))
    }

    /// Starts a command in a new pty session.
    pub fn create(agent: &Arc<Agent>, req: &ExecRequest) -> Result<Arc<Session>, Failure> {
        let this = &agent.sessions;
        let name = match &req.session {
            Some(n) if valid_name(n) => n.clone(),
            Some(n) => {
                return Err(Failure::bad_request(format!(
                    "invalid session name '{n}': use 1-{MAX_SESSION_NAME} of A-Z a-z 0-9 . _ -"
                )))
            }
            None => format!("s{}", this.next_id()),
        };
        let size = req.size.unwrap_or_default();
        if size.rows == 0 || size.cols == 0 {
            return Err(Failure::bad_request("terminal size must be at least 1x1"));
        }
        let mut cmd = spawn::command(agent, req, Grouping::TtySession)?.cmd;
        // Hold the registry lock from the checks to the insert so that two
        // creates cannot both pass them.
        let mut map = this.map();
        if map.contains_key(&name) {
            return Err(Failure::new(
                ErrorCode::SessionExists,
                format!("a session named '{name}' already exists"),
            ));
        }
        if map.len() >= MAX_SESSIONS {
            return Err(Failure::new(
                ErrorCode::TooManySessions,
                format!("the agent already keeps {MAX_SESSIONS} sessions; kill one first"),
            ));
        }
        let pty = crate::pty::open(size)
            .map_err(|e| Failure::new(ErrorCode::Io, format!("cannot allocate a pty: {e}")))?;
        let stdio = |fd: &OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| Failure::new(ErrorCode::Io, format!("cannot duplicate the pty: {e}")))
        };
        cmd.stdin(stdio(&pty.slave)?)
            .stdout(stdio(&pty.slave)?)
            .stderr(stdio(&pty.slave)?);
        let child = cmd
            .spawn()
            .map_err(|e| spawn::spawn_failed(&req.argv[0], &e))?;
        // The agent must not keep the slave open, or the master never sees EOF.
        drop(cmd);
        drop(pty.slave);
        let pid = child.id().unwrap_or(0);
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor
        // stays open and the same for the AsyncFd's whole lifetime.
        let master = unsafe { AsyncFd::register(pty.master) }
            .map_err(|e| e.into_parts().1)
            .map_err(|e| Failure::new(ErrorCode::Io, format!("cannot watch the pty: {e}")))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let now = now_unix_ms();
        let session = Arc::new(Session {
            name: name.clone(),
            pid,
            argv: req.argv.clone(),
            created_ms: now,
            master,
            state: Mutex::new(State {
                scrollback: Scrollback::default(),
                attached: None,
                size,
                last_activity_ms: now,
            }),
            exit: exit_rx,
        });
        map.insert(name, session.clone());
        drop(map);
        tokio::spawn(run_session(agent.clone(), session.clone(), child, exit_tx));
        Ok(session)
    }

    /// Signals a session's process group and waits until it has ended,
    /// escalating to SIGKILL after a grace period.
    pub async fn kill(&self, name: &str, signal: Signal) -> Result<(), Failure> {
        let session = self.get(name)?;
        let mut exit = session.exit.clone();
        kill_group(session.pid, signal);
        if signal == Signal::SIGTERM {
            kill_group(session.pid, Signal::SIGHUP);
        }
        let ended = async {
            // The sender lives until the session task ends, so this only
            // fails once the session is gone, which also means it ended.
            let _ = exit.wait_for(|e| e.is_some()).await;
        };
        if tokio::time::timeout(KILL_GRACE, ended).await.is_err() {
            kill_group(session.pid, Signal::SIGKILL);
            let _ = session.exit.clone().wait_for(|e| e.is_some()).await;
        }
        Ok(())
    }

    /// Kills detached sessions that have been idle for `idle`. Runs forever.
    pub async fn reap_idle(agent: Arc<Agent>) {
        let idle = agent.config.session_idle_timeout();
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            let cutoff = now_unix_ms().saturating_sub(idle.as_millis() as u64);
            let stale: Vec<String> = agent
                .sessions
                .map()
                .values()
                .filter(|s| {
                    let st = s.state();
                    st.attached.is_none() && st.last_activity_ms <= cutoff
                })
                .map(|s| s.name.clone())
                .collect();
            for name in stale {
                tracing::info!(session = %name, "killing idle session");
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(Failure::Request(e)) =
                        agent.sessions.kill(&name, Signal::SIGTERM).await
                    {
                        tracing::debug!(session = %name, error = %e.message, "idle session already gone");
                    }
                });
            }
        }
    }
}

/// Pumps a session's output until its leader has exited and the output
/// drained, then reports the exit and forgets the session.
async fn run_session(
    agent: Arc<Agent>,
    session: Arc<Session>,
    mut child: tokio::process::Child,
    exit_tx: watch::Sender<Option<Exit>>,
) {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut open = true;
    let mut status = None;
    let mut drain_until = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400);
    while open || status.is_none() {
        tokio::select! {
            r = read_master(&session.master, &mut buf), if open => match r {
                Ok(0) | Err(_) => open = false,
                Ok(n) => {
                    agent.touch();
                    session.output(&buf[..n]).await;
                }
            },
            r = child.wait(), if status.is_none() => {
                status = Some(r);
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            },
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break,
        }
    }
    let exit = match status {
        Some(Ok(st)) => exit_of(st),
        _ => Exit {
            code: 255,
            signal: None,
            timed_out: false,
        },
    };
    agent.sessions.map().remove(&session.name);
    let events = session.state().attached.take().map(|a| a.events);
    if let Some(events) = events {
        let _ = events.send(Event::Exited(exit)).await;
    }
    exit_tx.send_replace(Some(exit));
}

/// Reads from the pty master; `Ok(0)` once every slave is closed (EIO).
async fn read_master(master: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = master.readable().await?;
        match guard.try_io(|fd| {
            nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Serves an attached client: replays the scrollback, then relays live
/// output, input and resizes until the client detaches, disconnects, is
/// taken over, or the session ends.
pub async fn attach<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    session: Arc<Session>,
    steal: bool,
    size: Option<WindowSize>,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (events_tx, mut events) = mpsc::channel(64);
    let (kick_tx, mut kicked) = oneshot::channel();
    let id = agent.sessions.next_id();
    let replay = {
        let mut st = session.state();
        if let Some(current) = st.attached.as_mut() {
            if !steal {
                return Err(Failure::new(
                    ErrorCode::SessionAttached,
                    format!(
                        "session '{}' has a client attached; attach with steal to take it over",
                        session.name
                    ),
                ));
            }
            if let Some(kick) = current.kicked.take() {
                let _ = kick.send(());
            }
        }
        st.attached = Some(Attachment {
            id,
            events: events_tx,
            kicked: Some(kick_tx),
        });
        st.last_activity_ms = now_unix_ms();
        st.scrollback.to_vec()
    };
    let detach = |session: &Session| {
        let mut st = session.state();
        if st.attached.as_ref().is_some_and(|a| a.id == id) {
            st.attached = None;
            st.last_activity_ms = now_unix_ms();
        }
    };
    let result = relay(
        agent,
        reader,
        writer,
        &session,
        replay,
        size,
        &mut events,
        &mut kicked,
    )
    .await;
    detach(&session);
    result
}

fn taken_over(session: &Session) -> Message {
    Message::error(
        ErrorCode::SessionTakenOver,
        format!("another client took session '{}' over", session.name),
    )
}

#[allow(clippy::too_many_arguments)]
async fn relay<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    session: &Session,
    replay: Vec<u8>,
    size: Option<WindowSize>,
    events: &mut mpsc::Receiver<Event>,
    kicked: &mut oneshot::Receiver<()>,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Some(size) = size {
        session.resize(size)?;
    }
    writer
        .send(&Message::Started(Started {
            pid: session.pid,
            session: Some(session.name.clone()),
            log_path: None,
        }))
        .await?;
    for chunk in replay.chunks(DATA_CHUNK) {
        writer.send(&Message::Stdout(chunk.to_vec())).await?;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut kick_open = true;
    loop {
        tokio::select! {
            ev = events.recv() => {
                let exit = match ev {
                    Some(Event::Output(data)) => {
                        writer.send(&Message::Stdout(data)).await?;
                        continue;
                    }
                    Some(Event::Exited(exit)) => exit,
                    // Replaced by a client that stole the session: the
                    // kick was sent before this attachment was dropped.
                    None if kicked.try_recv().is_ok() => {
                        writer.send(&taken_over(session)).await?;
                        return Ok(());
                    }
                    // The session ended and dropped this attachment.
                    None => session.exit.borrow().unwrap_or(Exit { code: 255, signal: None, timed_out: false }),
                };
                writer.send(&Message::Exit(exit)).await?;
                return Ok(());
            },
            // A dropped sender (the session ended) is not a kick: stop
            // watching (a finished receiver must not be polled again) and
            // let the events above deliver the remaining output and exit.
            kick = &mut *kicked, if kick_open => match kick {
                Ok(()) => {
                    writer.send(&taken_over(session)).await?;
                    return Ok(());
                }
                Err(_) => kick_open = false,
            },
            msg = reader.read_message(), if pending.len() < MAX_PENDING_INPUT => match msg {
                Ok(Some(Message::Stdin(data))) => {
                    agent.touch();
                    session.state().last_activity_ms = now_unix_ms();
                    pending.extend_from_slice(&data);
                }
                Ok(Some(Message::Resize(size))) => {
                    if let Err(Failure::Request(e)) = session.resize(size) {
                        writer.send(&Message::Error(e)).await?;
                    }
                }
                Ok(Some(Message::Detach)) => {
                    writer.send(&Message::Ok).await?;
                    return Ok(());
                }
                Ok(Some(Message::Kill(k))) => {
                    let sig = k.signal.map(Signal::try_from).transpose();
                    match sig {
                        Ok(sig) => kill_group(session.pid, sig.unwrap_or(Signal::SIGTERM)),
                        Err(_) => writer.send(&Message::error(ErrorCode::BadRequest, "unknown signal number")).await?,
                    }
                }
                Ok(Some(Message::StdinEof)) => {}
                Ok(Some(other)) => {
                    let msg = format!("unexpected {} frame while attached", other.name());
                    writer.send(&Message::error(ErrorCode::UnexpectedFrame, msg)).await?;
                }
                Ok(None) | Err(_) => return Err(Failure::Conn(ConnError::ClientGone)),
            },
            guard = session.master.writable(), if !pending.is_empty() => {
                let mut guard = guard.map_err(|e| Failure::new(ErrorCode::Io, format!("pty failed: {e}")))?;
                match guard.try_io(|_| session.try_write(&pending)) {
                    Ok(Ok(n)) => { pending.drain(..n); }
                    Ok(Err(e)) => return Err(Failure::new(ErrorCode::Io, format!("writing to the terminal failed: {e}"))),
                    Err(_would_block) => {}
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_keeps_the_last_bytes() {
        let mut s = Scrollback::default();
        s.push(b"hello ");
        s.push(b"world");
        assert_eq!(s.to_vec(), b"hello world");
        let big: Vec<u8> = (0..SCROLLBACK_BYTES + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        s.push(&big);
        assert_eq!(s.to_vec(), &big[10..]);
        s.push(b"!");
        assert_eq!(s.to_vec().len(), SCROLLBACK_BYTES);
        assert_eq!(*s.to_vec().last().unwrap(), b'!');
        assert_eq!(s.to_vec()[0], big[11]);
    }

    #[test]
    fn session_names_are_validated() {
        assert!(valid_name("init"));
        assert!(valid_name("build-1.log_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("../x"));
        assert!(!valid_name(&"x".repeat(MAX_SESSION_NAME + 1)));
    }
}
