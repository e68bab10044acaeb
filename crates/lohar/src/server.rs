//! Accepting connections, with the connection limit, and starting the agent.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use proto::{ErrorCode, FrameWriter, Message, MAX_CONNECTIONS};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::agent::Agent;
use crate::boot_command::{self, BootCommand};
use crate::cli::{ListenAddr, ServeOptions};
use crate::config::AgentConfig;
use crate::config::RunAs;
use crate::identity::Identity;
use crate::session::Sessions;

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> anyhow::Result<Listener> {
        Ok(match addr {
            ListenAddr::Unix(path) => {
                if path.exists() {
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
                Listener::Unix(
                    UnixListener::bind(path)
                        .with_context(|| format!("binding {}", path.display()))?,
                )
            }
            ListenAddr::Tcp(a) => Listener::Tcp(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding {a}"))?,
            ),
        })
    }

    /// The bound address, as `unix:PATH` or `tcp:IP:PORT`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:?".to_string(),
            },
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".to_string(),
            },
        }
    }
}

/// Accepts connections forever.
pub async fn accept_loop(listener: Listener, agent: Arc<Agent>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| spawn_conn(&agent, s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                s.set_nodelay(true).ok();
                spawn_conn(&agent, s)
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off briefly instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

fn spawn_conn<S>(agent: &Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let agent = agent.clone();
    // Authenticated connections only: ones still in the handshake are
    // bounded apart (`crate::auth`). Checked again after the handshake.
    if agent.connections.load(Ordering::Relaxed) as usize >= MAX_CONNECTIONS {
        tokio::spawn(async move {
            let mut w = FrameWriter::new(stream);
            let msg = format!("the agent already serves {MAX_CONNECTIONS} connections");
            let _ = w
                .send(&Message::error(ErrorCode::TooManyConnections, msg))
                .await;
        });
        return;
    }
    tokio::spawn(crate::conn::serve(agent, stream));
}

/// Starts the background work of an agent: the idle-session reaper and,
/// in test mode, the `init` command (in a VM PID 1 starts it; see
/// [`crate::boot_command`]).
pub fn start_agent(agent: &Arc<Agent>) -> anyhow::Result<()> {
    tokio::spawn(Sessions::reap_idle(agent.clone()));
    let config = &agent.config;
    if let Some(argv) = &config.init_command {
        let cwd = [config.init_cwd.clone(), config.default_cwd.clone()]
            .into_iter()
            .flatten()
            .next()
            .unwrap_or_else(|| agent.identity.home.clone());
        let cmd = BootCommand {
            argv: argv.clone(),
            cwd,
            env: Identity::resolve(RunAs::Agent).environment(
                config,
                &std::collections::BTreeMap::new(),
                false,
            ),
            user: None,
        };
        let log = config.init_log.clone();
        let started = boot_command::start(&cmd)
            .with_context(|| format!("starting the init command {argv:?}"))?;
        let mut child = started.child;
        boot_command::note(&log, &format!("init started: pid {}, {argv:?}", child.id()));
        boot_command::spawn_relay(started.output, log.clone(), boot_command::LOG_LIMIT);
        std::thread::Builder::new()
            .name("boot-wait".into())
            .spawn(move || match child.wait() {
                Ok(status) => boot_command::note(
                    &log,
                    &format!("init {}", boot_command::describe_exit(status)),
                ),
                Err(e) => tracing::warn!(error = %e, "waiting for the init command"),
            })
            .context("starting the init command's waiter")?;
    }
    Ok(())
}

/// `lohar serve`: the agent on this host, without PID-1 duties.
pub fn run_test_mode(opts: ServeOptions) -> anyhow::Result<()> {
    init_logging();
    let token = std::fs::read_to_string(&opts.token_file)
        .with_context(|| format!("reading token file {}", opts.token_file.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        bail!("the token must be at least 16 characters");
    }
    let config: AgentConfig = match &opts.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing config {}", path.display()))?
        }
        None => AgentConfig::default(),
    };
    let identity = Identity::resolve(config.run_as);
    // Two workers: `sync` before an exit report runs in place on one
    // (block_in_place) while the other keeps serving every other connection.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = Listener::bind(&opts.listen).await?;
        let agent = Agent::new(config, identity, token);
        start_agent(&agent)?;
        if opts.identity_stdin {
            crate::reidentify::start_stdin(agent.clone())
                .context("starting the identity reader")?;
        }
        println!("LISTENING {}", listener.describe());
        accept_loop(listener, agent).await;
        Ok(())
    })
}

/// The agent in a sandbox VM (the process PID 1 forks): TCP on `addr`,
/// `on_ready` called once it accepts connections.
pub fn serve_guest(
    config: AgentConfig,
    token: String,
    addr: std::net::SocketAddr,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let identity = Identity::resolve(config.run_as);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        crate::clock::mark_guest();
        let agent = Agent::new(config, identity, token);
        // Before the agent is ready, so before any snapshot can be taken.
        crate::reidentify::start_console(agent.clone());
        start_agent(&agent)?;
        on_ready();
        accept_loop(Listener::Tcp(listener), agent).await;
        Ok(())
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOHAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
