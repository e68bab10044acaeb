//! envd's `process.Process` over the guest agent.
//!
//! `Start` runs the command as a streamed exec (`Service::exec_stream`)
//! whose output a task of its own pumps: to the `Start` response while its
//! client reads (a slow reader slows the command, as on the native API),
//! and to any `Connect` streams (bounded; a lagging one loses chunks). The
//! process lives until it exits, is signalled or times out, like envd's —
//! not until its `Start` stream is dropped (a background command). The
//! registry here (per user and sandbox) is what `List`, `Connect` and
//! `SendSignal` see: the processes started through this API by this
//! daemon process. A `Start` client that stops reading holds the command
//! back for [`PRIMARY_PATIENCE`] at most; then its output is dropped while
//! its queue is full (memory stays bounded, the command never stalls on
//! a handle nobody iterates).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use agent_client::ExecEvent;
use api_types::limits::MAX_EXEC_TIMEOUT_SEC;
use axum::body::Bytes;
use axum::response::Response;
use envd_proto::process::{
    process_event, process_selector, ConnectRequest, ConnectResponse, ListRequest, ListResponse,
    ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, SendSignalRequest,
    SendSignalResponse, Signal, StartRequest, StartResponse,
};
use tokio::sync::{broadcast, mpsc};

use super::connect::{self, Call, Code, Codec, RpcError};
use super::{lock, BySandbox, E2bState};
use crate::error::ApiError;
use crate::ratelimit::Class;
use crate::state::AppState;

/// Processes one sandbox may have running through this API at once.
pub const MAX_PROCESSES: usize = 256;
/// Chunks queued towards a `Start` stream before the command waits.
const PRIMARY_QUEUE: usize = 16;
/// How long output waits for a `Start` client that does not read before
/// it is dropped instead (until the client reads again).
const PRIMARY_PATIENCE: Duration = Duration::from_secs(2);
/// Chunks queued towards each `Connect` stream; past it, it lags.
const SECONDARY_QUEUE: usize = 64;
/// Keepalive interval bounds (the SDK asks with `Keepalive-Ping-Interval`).
const KEEPALIVE_DEFAULT: u64 = 50;

/// What a process produced.
#[derive(Debug, Clone)]
enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    End {
        code: i32,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The exec broke (the VM died, the agent failed).
    Failed(String),
}

#[derive(Debug)]
struct Proc {
    config: ProcessConfig,
    tag: Option<String>,
    events: broadcast::Sender<Event>,
}

/// The processes started through `Start`, by `user/sandbox` and pid.
#[derive(Debug, Default)]
pub struct Registry {
    procs: BySandbox<HashMap<u32, Arc<Proc>>>,
}

impl Registry {
    fn of(&self, key: &str) -> Vec<(u32, Arc<Proc>)> {
        lock(&self.procs)
            .get(key)
            .map(|m| m.iter().map(|(p, x)| (*p, x.clone())).collect())
            .unwrap_or_default()
    }

    fn count(&self, key: &str) -> usize {
        lock(&self.procs).get(key).map_or(0, HashMap::len)
    }

    fn insert(&self, key: &str, pid: u32, p: Arc<Proc>) {
        lock(&self.procs)
            .entry(key.to_string())
            .or_default()
            .insert(pid, p);
    }

    fn remove(&self, key: &str, pid: u32) {
        let mut procs = lock(&self.procs);
        if let Some(m) = procs.get_mut(key) {
            m.remove(&pid);
            if m.is_empty() {
                procs.remove(key);
            }
        }
    }

    /// The pid a selector names, if it is a process of this registry.
    fn select(
        &self,
        key: &str,
        sel: Option<&ProcessSelector>,
    ) -> Result<(u32, Arc<Proc>), RpcError> {
        let sel = sel.and_then(|s| s.selector.as_ref()).ok_or_else(|| {
            RpcError::new(
                Code::InvalidArgument,
                "a process selector (pid or tag) is required",
            )
        })?;
        let found = self.of(key).into_iter().find(|(pid, p)| match sel {
            process_selector::Selector::Pid(want) => pid == want,
            process_selector::Selector::Tag(t) => p.tag.as_deref() == Some(t.as_str()),
        });
        found.ok_or_else(|| {
            let what = match sel {
                process_selector::Selector::Pid(p) => format!("pid {p}"),
                process_selector::Selector::Tag(t) => format!("tag '{t}'"),
            };
            RpcError::new(Code::NotFound, format!("process with {what} not found"))
        })
    }
}

fn key(call: &Call) -> String {
    format!("{}/{}", call.caller.user.id, call.caller.sandbox)
}

pub async fn dispatch(state: &AppState, method: &str, call: Call) -> Response {
    match method {
        "Start" => start(state, call).await,
        "Connect" => reconnect(state, call),
        "List" => list(state, call),
        "SendSignal" => signal(state, call).await,
        "SendInput" | "StreamInput" | "CloseStdin" => answer_error(
            &call,
            RpcError::unsupported("stdin to commands (send_stdin, close_stdin, stdin=True)"),
        ),
        "Update" => answer_error(&call, RpcError::unsupported("PTY resizing (sandbox.pty)")),
        other => answer_error(
            &call,
            RpcError::new(
                Code::Unimplemented,
                format!("process.Process/{other} does not exist"),
            ),
        ),
    }
}

fn answer_error(call: &Call, e: RpcError) -> Response {
    if call.stream {
        connect::stream_error(call.codec, e)
    } else {
        e.response()
    }
}

async fn start(state: &AppState, call: Call) -> Response {
    let req: StartRequest = match connect::message(&call) {
        Ok(r) => r,
        Err(e) => return answer_error(&call, e),
    };
    match begin(state, &call, req).await {
        Ok((pid, rx)) => {
            let keepalive = keepalive_of(&call);
            let codec = call.codec;
            let start = event_frame_of(codec, started(pid), true);
            let rest = futures_util::stream::unfold(Some(Feed::Primary(rx)), move |feed| {
                relay(feed, codec, keepalive, true)
            });
            connect::stream_response(
                codec,
                futures_util::StreamExt::chain(futures_util::stream::iter([start]), rest),
            )
        }
        Err(e) => answer_error(&call, e),
    }
}

/// Starts the command and its pump; the pid and the primary feed.
async fn begin(
    state: &AppState,
    call: &Call,
    req: StartRequest,
) -> Result<(u32, mpsc::Receiver<Event>), RpcError> {
    let user = &call.caller.user;
    state.limit(user, Class::Exec)?;
    if req.pty.is_some() {
        return Err(RpcError::unsupported("PTY commands (sandbox.pty)"));
    }
    let config = req.process.unwrap_or_default();
    if config.cmd.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "process.cmd is required",
        ));
    }
    if let Some(cwd) = &config.cwd {
        crate::validate::guest_path(cwd)?;
    }
    let k = key(call);
    if state.e2b.processes.count(&k) >= MAX_PROCESSES {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("at most {MAX_PROCESSES} processes per sandbox through the E2B API"),
        ));
    }
    let max_ms = MAX_EXEC_TIMEOUT_SEC * 1000;
    let timeout_ms = connect::timeout_ms(&call.headers)
        .unwrap_or(max_ms)
        .min(max_ms);
    let mut argv = vec![config.cmd.clone()];
    argv.extend(config.args.iter().cloned());
    let exec_req = proto::ExecRequest {
        argv,
        env: config
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        cwd: config.cwd.clone(),
        timeout_ms: Some(timeout_ms),
        ..Default::default()
    };
    // The SDKs run every command as `/bin/bash -l -c …`; an image without
    // bash (bhatti's `tiny`, busybox) runs it under `/bin/sh`, known after
    // the first try.
    let bashless = config.cmd == "/bin/bash" && lock(&state.e2b.bashless).contains(&k);
    let mut exec_req = exec_req;
    if bashless {
        exec_req.argv[0] = "/bin/sh".into();
    }
    let exec = match state
        .service
        .exec_stream(user, &call.caller.sandbox, exec_req.clone())
        .await
    {
        Err(ApiError::BadRequest(_)) if config.cmd == "/bin/bash" && !bashless => {
            exec_req.argv[0] = "/bin/sh".into();
            let exec = state
                .service
                .exec_stream(user, &call.caller.sandbox, exec_req)
                .await?;
            let mut known = lock(&state.e2b.bashless);
            if known.len() < 4096 {
                known.insert(k.clone());
            }
            exec
        }
        other => other?,
    };
    let pid = exec.pid();
    let (tx, rx) = mpsc::channel(PRIMARY_QUEUE);
    let (events, _) = broadcast::channel(SECONDARY_QUEUE);
    let proc = Arc::new(Proc {
        config,
        tag: req.tag,
        events: events.clone(),
    });
    state.e2b.processes.insert(&k, pid, proc);
    tokio::spawn(pump(exec, tx, events, state.e2b.clone(), k, pid));
    Ok((pid, rx))
}

/// Reads the command's output to its end, whoever listens.
async fn pump(
    mut exec: bhatti_core::GuestExec,
    primary: mpsc::Sender<Event>,
    others: broadcast::Sender<Event>,
    e2b: Arc<E2bState>,
    key: String,
    pid: u32,
) {
    // Set when the Start client stopped reading for PRIMARY_PATIENCE (a
    // background command's handle nobody iterates): its output is then
    // dropped while its queue is full, so the command never stalls on it.
    let mut lagging = false;
    loop {
        let ev = match exec.next().await {
            Ok(ExecEvent::Stdout(d)) => Event::Stdout(Bytes::from(d)),
            Ok(ExecEvent::Stderr(d)) => Event::Stderr(Bytes::from(d)),
            Ok(ExecEvent::Exit(x)) => Event::End {
                code: x.code,
                signal: x.signal,
                timed_out: x.timed_out,
            },
            Err(e) => Event::Failed(crate::error::error_chain(&e)),
        };
        let last = matches!(ev, Event::End { .. } | Event::Failed(_));
        // No receivers is fine: nobody connected.
        let _ = others.send(ev.clone());
        if last {
            // Gone from List before the Start client hears of the end.
            e2b.processes.remove(&key, pid);
            // Waits while the Start client lives (its stream ends with this).
            let _ = primary.send(ev).await;
            return;
        }
        // A closed queue: the Start client went away; the command runs on.
        if lagging {
            match primary.try_send(ev) {
                Ok(()) => lagging = false,
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        } else if let Err(mpsc::error::SendTimeoutError::Timeout(_)) =
            primary.send_timeout(ev, PRIMARY_PATIENCE).await
        {
            tracing::debug!(pid, "an E2B Start stream is not read; dropping its output");
            lagging = true;
        }
    }
}

/// Where a stream's events come from.
enum Feed {
    Primary(mpsc::Receiver<Event>),
    Secondary(broadcast::Receiver<Event>),
    /// The process ended; its end-of-stream goes out next.
    Ending(Option<RpcError>),
}

fn keepalive_of(call: &Call) -> Duration {
    let secs = call
        .headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(KEEPALIVE_DEFAULT)
        .clamp(1, 3600);
    Duration::from_secs(secs)
}

/// The next frame of a process stream.
async fn relay(
    feed: Option<Feed>,
    codec: Codec,
    keepalive: Duration,
    is_start: bool,
) -> Option<(Bytes, Option<Feed>)> {
    let mut feed = feed?;
    let ev = loop {
        let next = match &mut feed {
            Feed::Ending(err) => return Some((connect::end_frame(err.as_ref()), None)),
            Feed::Primary(rx) => tokio::time::timeout(keepalive, rx.recv())
                .await
                .map(|e| e.ok_or(())),
            Feed::Secondary(rx) => match tokio::time::timeout(keepalive, rx.recv()).await {
                Ok(Ok(e)) => Ok(Ok(e)),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    tracing::debug!(skipped = n, "an E2B process stream lagged");
                    continue;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => Ok(Err(())),
                Err(t) => Err(t),
            },
        };
        match next {
            Err(_) => {
                let ka = ProcessEvent {
                    event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
                };
                return Some((event_frame_of(codec, ka, is_start), Some(feed)));
            }
            Ok(Err(())) => {
                let err = RpcError::new(
                    Code::Unavailable,
                    "the process's output ended without its exit",
                );
                return Some((connect::end_frame(Some(&err)), None));
            }
            Ok(Ok(ev)) => break ev,
        }
    };
    let data = |o| ProcessEvent {
        event: Some(process_event::Event::Data(process_event::DataEvent {
            output: Some(o),
        })),
    };
    use process_event::data_event::Output;
    let (msg, next) = match ev {
        Event::Stdout(d) => (data(Output::Stdout(d.to_vec())), feed),
        Event::Stderr(d) => (data(Output::Stderr(d.to_vec())), feed),
        Event::End {
            code,
            signal,
            timed_out,
        } => {
            let status = match signal {
                Some(s) => format!("signal: {}", signal_name(s)),
                None => format!("exit status {code}"),
            };
            let end = ProcessEvent {
                event: Some(process_event::Event::End(process_event::EndEvent {
                    exit_code: code,
                    exited: signal.is_none(),
                    status: status.clone(),
                    error: signal.map(|_| status),
                })),
            };
            let err = timed_out.then(|| {
                RpcError::new(
                    Code::DeadlineExceeded,
                    "the command's timeout passed; it was killed",
                )
            });
            (end, Feed::Ending(err))
        }
        Event::Failed(m) => {
            let err = RpcError::new(Code::Unavailable, m);
            return Some((connect::end_frame(Some(&err)), None));
        }
    };
    Some((event_frame_of(codec, msg, is_start), Some(next)))
}

fn signal_name(s: i32) -> String {
    match s {
        9 => "killed".into(),
        15 => "terminated".into(),
        2 => "interrupt".into(),
        n => format!("signal {n}"),
    }
}

fn started(pid: u32) -> ProcessEvent {
    ProcessEvent {
        event: Some(process_event::Event::Start(process_event::StartEvent {
            pid,
        })),
    }
}

fn event_frame_of(codec: Codec, ev: ProcessEvent, is_start: bool) -> Bytes {
    if is_start {
        connect::frame(codec, &StartResponse { event: Some(ev) })
    } else {
        connect::frame(codec, &ConnectResponse { event: Some(ev) })
    }
}

/// `Connect`: attach to a running process's output from now on.
fn reconnect(state: &AppState, call: Call) -> Response {
    let req: ConnectRequest = match connect::message(&call) {
        Ok(r) => r,
        Err(e) => return answer_error(&call, e),
    };
    if let Err(e) = state.limit(&call.caller.user, Class::Exec) {
        return answer_error(&call, e.into());
    }
    let (pid, proc) = match state
        .e2b
        .processes
        .select(&key(&call), req.process.as_ref())
    {
        Ok(p) => p,
        Err(e) => return answer_error(&call, e),
    };
    let rx = proc.events.subscribe();
    let codec = call.codec;
    let keepalive = keepalive_of(&call);
    let start = event_frame_of(codec, started(pid), false);
    let rest = futures_util::stream::unfold(Some(Feed::Secondary(rx)), move |feed| {
        relay(feed, codec, keepalive, false)
    });
    connect::stream_response(
        codec,
        futures_util::StreamExt::chain(futures_util::stream::iter([start]), rest),
    )
}

fn list(state: &AppState, call: Call) -> Response {
    if let Err(e) = connect::message::<ListRequest>(&call) {
        return answer_error(&call, e);
    }
    if let Err(e) = state.limit(&call.caller.user, Class::Read) {
        return answer_error(&call, e.into());
    }
    let mut processes: Vec<ProcessInfo> = state
        .e2b
        .processes
        .of(&key(&call))
        .into_iter()
        .map(|(pid, p)| ProcessInfo {
            config: Some(p.config.clone()),
            pid,
            tag: p.tag.clone(),
        })
        .collect();
    processes.sort_by_key(|p| p.pid);
    connect::unary(call.codec, &ListResponse { processes })
}

/// `SendSignal`: SIGTERM or SIGKILL to the process's group, by a `kill`
/// run in the guest (the agent's own exec, so through the same service
/// call as any command).
async fn signal(state: &AppState, call: Call) -> Response {
    let req: SendSignalRequest = match connect::message(&call) {
        Ok(r) => r,
        Err(e) => return answer_error(&call, e),
    };
    let user = call.caller.user.clone();
    if let Err(e) = state.limit(&user, Class::Exec) {
        return answer_error(&call, e.into());
    }
    let (pid, _) = match state
        .e2b
        .processes
        .select(&key(&call), req.process.as_ref())
    {
        Ok(p) => p,
        Err(e) => return answer_error(&call, e),
    };
    let sig = match Signal::try_from(req.signal) {
        Ok(Signal::Sigterm) => "TERM",
        Ok(Signal::Sigkill | Signal::Unspecified) => "KILL",
        Err(_) => {
            return answer_error(
                &call,
                RpcError::new(
                    Code::InvalidArgument,
                    format!("unknown signal {}", req.signal),
                ),
            )
        }
    };
    // Each command is its own process group (the agent's piped exec).
    // Shells' `kill` differ on `--` and negative pids (busybox's kills the
    // group, then fails on `--`): existence decides the answer, then each
    // spelling is tried.
    let script = "kill -0 \"$2\" 2>/dev/null || exit 1; \
        kill -s \"$1\" -- \"-$2\" 2>/dev/null || kill -s \"$1\" \"-$2\" 2>/dev/null \
        || kill -s \"$1\" \"$2\" 2>/dev/null; exit 0";
    let exec_req = proto::ExecRequest {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            sig.into(),
            pid.to_string(),
        ],
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    match state
        .service
        .exec(&user, &call.caller.sandbox, exec_req)
        .await
    {
        Ok(out) if out.exit.code == 0 => connect::unary(call.codec, &SendSignalResponse {}),
        Ok(_) => RpcError::new(Code::NotFound, format!("process {pid} is gone")).response(),
        Err(e) => RpcError::from(e).response(),
    }
}
