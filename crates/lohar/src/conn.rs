//! One client connection: the handshake ([`crate::auth`]), then one
//! request at a time.

use std::sync::Arc;

use nix::sys::signal::Signal;
use proto::{
    CodecError, ErrorCode, FrameReader, FrameWriter, Message, ReadError, Sessions, MAX_CONNECTIONS,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::agent::{Agent, CountGuard};
use crate::failure::Failure;
use crate::session;

/// Serves one connection until the client leaves or a fatal error.
pub async fn serve<S>(agent: Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    if !crate::auth::handshake(&agent, &mut reader, &mut writer).await {
        return;
    }
    // Only authenticated connections count (and can fill the slots).
    let Some(_counted) = CountGuard::try_new(&agent.connections, MAX_CONNECTIONS) else {
        let msg = format!("the agent already serves {MAX_CONNECTIONS} connections");
        let _ = writer
            .send(&Message::error(ErrorCode::TooManyConnections, msg))
            .await;
        return;
    };
    loop {
        let msg = match reader.read_message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(ReadError::Codec(e @ CodecError::FrameTooLarge { .. })) => {
                // The stream cannot be resynchronised after an oversize header.
                let _ = writer
                    .send(&Message::error(ErrorCode::FrameTooLarge, e.to_string()))
                    .await;
                return;
            }
            Err(e) => match Failure::from(e) {
                Failure::Request(err) => {
                    if writer.send(&Message::Error(err)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Failure::Conn(_) => return,
            },
        };
        agent.touch();
        let result = match msg {
            Message::Tunnel(t) => match crate::tunnel::connect(t).await {
                Ok(target) => {
                    if writer.send(&Message::TunnelOk).await.is_err() {
                        return;
                    }
                    let (r, early) = reader.into_parts();
                    let client = r.unsplit(writer.into_inner());
                    crate::tunnel::relay(client, early, target).await;
                    return;
                }
                Err(f) => Err(f),
            },
            other => handle(&agent, &mut reader, &mut writer, other).await,
        };
        match result {
            Ok(()) => {}
            Err(Failure::Request(e)) => {
                if writer.send(&Message::Error(e)).await.is_err() {
                    return;
                }
            }
            Err(Failure::Conn(e)) => {
                tracing::debug!(error = %e, "connection ended");
                return;
            }
        }
    }
}

async fn handle<R, W>(
    agent: &Arc<Agent>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    msg: Message,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match msg {
        Message::Exec(req) if req.tty => {
            let s = session::Sessions::create(agent, &req)?;
            session::attach(agent, reader, writer, s, false, None).await
        }
        Message::Exec(req) if req.detach => crate::exec::detached(agent, writer, req).await,
        Message::Exec(req) => crate::exec::piped(agent, reader, writer, req).await,
        Message::SessionAttach(a) => {
            let s = agent.sessions.get(&a.session)?;
            session::attach(agent, reader, writer, s, a.steal, a.size).await
        }
        Message::SessionList => {
            let sessions = agent.sessions.list();
            writer
                .send(&Message::Sessions(Sessions { sessions }))
                .await
                .map_err(Failure::from)
        }
        Message::SessionQuery(r) => {
            let info = agent
                .sessions
                .list()
                .into_iter()
                .find(|s| s.session == r.session)
                .ok_or_else(|| {
                    Failure::new(
                        ErrorCode::NotFound,
                        format!("no session named '{}'", r.session),
                    )
                })?;
            Ok(writer.send(&Message::Session(info)).await?)
        }
        Message::SessionKill(r) => {
            agent.sessions.kill(&r.session, Signal::SIGTERM).await?;
            Ok(writer.send(&Message::Ok).await?)
        }
        Message::ActivityQuery => Ok(writer.send(&Message::Activity(agent.activity())).await?),
        Message::SetTime(t) => {
            crate::clock::set_realtime(t.unix_ms)?;
            Ok(writer.send(&Message::Ok).await?)
        }
        Message::ListPorts => {
            // Two small procfs reads: quick enough to do in place.
            let ports = crate::ports::listening(crate::init::AGENT_PORT);
            Ok(writer.send(&Message::PortList(ports)).await?)
        }
        Message::FileRead(req) => crate::files::read(agent, writer, req).await,
        Message::FileWrite(req) => crate::files::write(agent, reader, writer, req).await,
        Message::Stat(s) => {
            let reply = crate::files::stat(agent, &s.path).await?;
            Ok(writer.send(&reply).await?)
        }
        Message::Ls(l) => crate::files::ls(agent, writer, &l.path).await,
        Message::Auth(_) | Message::LegacyAuth(_) => Err(Failure::new(
            ErrorCode::UnexpectedFrame,
            "already authenticated",
        )),
        other => Err(Failure::new(
            ErrorCode::UnexpectedFrame,
            format!("unexpected {} frame between requests", other.name()),
        )),
    }
}
