//! Piped and detached commands.
//!
//! A piped command runs in its own process group. Its stdout and stderr are
//! streamed as produced, stdin is fed as it arrives, and a kill, a timeout
//! or the client going away kills the whole group. The exit is reported
//! after the output has drained and (by default) after a `sync`, so that the
//! host can snapshot the guest right after.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use proto::{
    frame_type, write_header, ErrorCode, ExecRequest, FrameReader, FrameWriter, Message, Started,
    DATA_CHUNK, HEADER_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::agent::{Agent, CountGuard};
use crate::failure::{ConnError, Failure};
use crate::spawn::{self, exit_of, kill_group, Grouping};

/// How long output may keep arriving after the command exits (from
/// background children still holding its pipes) before the exit is reported.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Stdin bytes buffered for a command that is not reading them; past this
/// the agent stops reading the connection until the command catches up.
const MAX_PENDING_STDIN: usize = 1024 * 1024;

/// Kills the process group when dropped, unless disarmed.
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            kill_group(self.pgid, Signal::SIGKILL);
        }
    }
}

fn signal_from(n: Option<i32>, default: Signal) -> Result<Signal, Failure> {
    match n {
        None => Ok(default),
        Some(n) => Signal::try_from(n)
            .map_err(|_| Failure::bad_request(format!("unknown signal number {n}"))),
    }
}

pub async fn piped<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    req: ExecRequest,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut prepared = spawn::command(agent, &req, Grouping::ProcessGroup)?;
    prepared.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    prepared.cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = prepared
        .spawn(agent)
        .await
        .map_err(|e| spawn::spawn_failed(&req.argv[0], &e))?;
    let pid = child.id().unwrap_or(0);
    let mut group = GroupGuard {
        pgid: pid,
        armed: true,
    };
    let _running = CountGuard::new(&agent.running_execs);
    writer
        .send(&Message::Started(Started {
            pid,
            session: None,
            log_path: None,
        }))
        .await?;

    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let mut stdin = child.stdin.take();
    // Output is read in place behind a reserved frame header and sent
    // without copying.
    let mut out_buf = vec![0u8; HEADER_LEN + OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; HEADER_LEN + DATA_CHUNK];
    grow_pipe(&stdout);
    let (mut out_open, mut err_open, mut client_open) = (true, true, true);
    let mut pending_in: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut status = None;
    let mut timed_out = false;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let timeout_at = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut drain_until: Option<Instant> = None;

    loop {
        if status.is_some() && !out_open && !err_open {
            break;
        }
        if stdin_eof && pending_in.is_empty() {
            stdin = None;
        }
        tokio::select! {
            r = stdout.read(&mut out_buf[HEADER_LEN..]), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    agent.touch();
                    send_in_place(writer, &mut out_buf, frame_type::STDOUT, n).await?;
                }
            },
            r = stderr.read(&mut err_buf[HEADER_LEN..]), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    agent.touch();
                    send_in_place(writer, &mut err_buf, frame_type::STDERR, n).await?;
                }
            },
            r = child.wait(), if status.is_none() => {
                let st = r.map_err(|e| Failure::new(ErrorCode::Io, format!("waiting for the command failed: {e}")))?;
                status = Some(st);
                drain_until = Some(Instant::now() + DRAIN_GRACE);
            },
            msg = reader.read_message(), if client_open && pending_in.len() < MAX_PENDING_STDIN => match msg {
                Ok(Some(Message::Stdin(data))) => {
                    agent.touch();
                    if stdin.is_some() && !stdin_eof {
                        pending_in.extend_from_slice(&data);
                    }
                }
                Ok(Some(Message::StdinEof)) => stdin_eof = true,
                Ok(Some(Message::Kill(k))) => match signal_from(k.signal, Signal::SIGKILL) {
                    Ok(sig) => kill_group(pid, sig),
                    Err(Failure::Request(e)) => writer.send(&Message::Error(e)).await?,
                    Err(f) => return Err(f),
                },
                Ok(Some(other)) => {
                    let msg = format!("unexpected {} frame during a piped exec", other.name());
                    writer.send(&Message::error(ErrorCode::UnexpectedFrame, msg)).await?;
                }
                Ok(None) | Err(_) => {
                    // The client is gone: nobody will read the output.
                    client_open = false;
                    kill_group(pid, Signal::SIGKILL);
                }
            },
            r = async { stdin.as_mut().expect("guarded").write(&pending_in).await },
                if stdin.is_some() && !pending_in.is_empty() => match r {
                Ok(n) => { pending_in.drain(..n); }
                Err(_) => { pending_in.clear(); stdin = None; }
            },
            _ = tokio::time::sleep_until(timeout_at.unwrap_or(far)),
                if timeout_at.is_some() && status.is_none() && !timed_out => {
                timed_out = true;
                kill_group(pid, Signal::SIGKILL);
            },
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break,
        }
    }
    // The leader exited: background children may stay (they keep running,
    // as after an ssh command); only an abnormal end kills the group.
    group.armed = !client_open;
    drop(group);
    if !client_open {
        return Err(Failure::Conn(ConnError::ClientGone));
    }
    let mut exit = exit_of(status.expect("loop ends after the exit"));
    exit.timed_out = timed_out;
    if agent.config.sync_before_exit {
        sync_filesystems().await;
    }
    writer.send(&Message::Exit(exit)).await?;
    Ok(())
}

/// Largest stdout read; the pipe is grown to match so a busy command needs
/// fewer wakeups.
const OUTPUT_CHUNK: usize = 256 * 1024;

/// Sends `buf[HEADER_LEN..HEADER_LEN + n]` as one frame, header filled in place.
async fn send_in_place<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    buf: &mut [u8],
    ty: u8,
    n: usize,
) -> Result<(), Failure> {
    write_header(buf, ty, n).map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?;
    writer.send_encoded(&buf[..HEADER_LEN + n]).await?;
    Ok(())
}

/// Grows a pipe's buffer; a smaller pipe only costs throughput.
fn grow_pipe(pipe: &tokio::process::ChildStdout) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fcntl(
            pipe.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            OUTPUT_CHUNK as libc::c_int,
        )
    };
    if r < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot grow the stdout pipe");
    }
}

/// Flushes dirty data of every filesystem to its device.
///
/// Runs in place on the current worker (other tasks move to the other
/// worker meanwhile): a hand-off to the blocking pool and back would cost
/// two thread wakeups on every exec.
pub async fn sync_filesystems() {
    tokio::task::block_in_place(nix::unistd::sync);
}

/// Starts a command that outlives the request, its output in a file.
pub async fn detached<W: AsyncWrite + Unpin>(
    agent: &Agent,
    writer: &mut FrameWriter<W>,
    req: ExecRequest,
) -> Result<(), Failure> {
    if req.stdin {
        return Err(Failure::bad_request("a detached command cannot take stdin"));
    }
    let mut prepared = spawn::command(agent, &req, Grouping::ProcessGroup)?;
    let log_path = match &req.log_path {
        Some(p) if p.starts_with('/') => std::path::PathBuf::from(p),
        Some(p) => {
            return Err(Failure::bad_request(format!(
                "log_path must be absolute: {p}"
            )))
        }
        None => agent.config.detach_log_dir.join(format!(
            "lohar-detached-{}-{}.log",
            crate::agent::now_unix_ms(),
            std::process::id()
        )),
    };
    let display = log_path.display().to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Failure::io("cannot open log file", &display, &e))?;
    if agent.identity.switch {
        // The command's own user must be able to keep writing its log.
        std::os::unix::fs::fchown(&log, Some(agent.identity.uid), Some(agent.identity.gid))
            .map_err(|e| Failure::io("cannot chown log file", &display, &e))?;
    }
    let log2 = log
        .try_clone()
        .map_err(|e| Failure::io("cannot open log file", &display, &e))?;
    prepared
        .cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let mut child = prepared
        .spawn(agent)
        .await
        .map_err(|e| spawn::spawn_failed(&req.argv[0], &e))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        // Reap it when it ends so it never lingers as a zombie.
        match child.wait().await {
            Ok(st) => tracing::debug!(pid, status = %st, "detached command ended"),
            Err(e) => tracing::warn!(pid, error = %e, "waiting for a detached command failed"),
        }
    });
    writer
        .send(&Message::Started(Started {
            pid,
            session: None,
            log_path: Some(display),
        }))
        .await?;
    Ok(())
}
