//! `GET /sandboxes/:id/ws`: an interactive PTY session over a WebSocket.
//! Protocol in `docs/api.md`: a `ShellOpen` text frame first, binary frames
//! for terminal bytes, JSON text frames for control.

use std::time::Duration;

use agent_client::SessionEvent;
use api_types::{ShellControl, ShellOpen};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};

use crate::auth::User;
use crate::error::ApiError;
use crate::openapi::{Authed, Guest, Invalid, Missing};
use crate::ratelimit::Class;
use crate::service::ShellRequest;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/sandboxes/{id}/ws",
    operation_id = "shell",
    tag = "guest",
    description = "WebSocket (a GET with `Upgrade: websocket`): an interactive PTY session. \
        The client's first text frame is a `ShellOpen`; the server answers \
        `{\"type\":\"attached\",…}` (a `ShellControl`), replaying the session's scrollback \
        when it attached to an existing one. Terminal bytes travel as **binary** frames both \
        ways; control messages (`ShellControl`: `resize` and `detach` from the client; \
        `exit`, `detached` and `error` from the server) as JSON text frames. Closing the \
        socket detaches; the session lives on. Messages and frames of at most 1 MiB. \
        Wakes the sandbox.",
    params(
        ("id" = String, Path, description = "The sandbox's id or name."),
        ("Upgrade" = String, Header, description = "`websocket`."),
        ("Connection" = String, Header, description = "`Upgrade`."),
        ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake key."),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`."),
    ),
    responses(
        (status = 101, description = "Switching Protocols: the shell protocol begins."),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn shell(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Not an upgrade: a JSON 400 like every other bad request.
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    state.limit(&user, Class::Exec)?;
    // A missing or failed sandbox is an HTTP answer, before the upgrade.
    state.service.wake(&user, &id).await?;
    Ok(super::ws_limits(ws).on_upgrade(move |socket| async move {
        if let Err(e) = serve(socket, &state, &user, &id).await {
            tracing::debug!(error = %e, "shell websocket ended");
        }
    }))
}

pub(crate) fn control(c: &ShellControl) -> WsMessage {
    WsMessage::Text(serde_json::to_string(c).unwrap_or_default().into())
}

/// The service's request for an open message.
pub(crate) fn shell_request(o: &ShellOpen) -> Result<ShellRequest, String> {
    let size = match (o.rows, o.cols) {
        (Some(rows), Some(cols)) if rows > 0 && cols > 0 => Some(proto::WindowSize { rows, cols }),
        (None, None) => None,
        _ => return Err("rows and cols must both be given and positive".into()),
    };
    Ok(ShellRequest {
        session: o.session.clone(),
        new: o.new,
        steal: o.steal,
        size,
        cmd: o.cmd.clone(),
    })
}

async fn serve(
    socket: WebSocket,
    state: &AppState,
    user: &store::UserRecord,
    id: &str,
) -> Result<(), String> {
    let (mut tx, mut rx) = socket.split();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .map_err(|_| "no open message within 10s".to_string())?;
    let opened: ShellOpen = match first {
        Some(Ok(WsMessage::Text(t))) => match serde_json::from_str(&t) {
            Ok(o) => o,
            Err(e) => {
                let _ = tx
                    .send(control(&ShellControl::Error {
                        error: format!("bad open message: {e}"),
                    }))
                    .await;
                return Err("bad open message".into());
            }
        },
        _ => return Err("expected a JSON open message".into()),
    };
    pump(
        tx,
        rx,
        state,
        user,
        id,
        shell_request(&opened),
        Access::ReadWrite,
        std::future::pending(),
    )
    .await
}

/// What a client may do in the session it attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    /// Output only: the client's terminal bytes and resizes are dropped
    /// here, before anything reaches the guest.
    ReadOnly,
}

/// A share link's WebSocket is closed with this code when its token is
/// refused, revoked or expires (the page then stops reconnecting).
pub(crate) const CLOSE_UNAUTHORIZED: u16 = 4401;

pub(crate) type WsTx = futures_util::stream::SplitSink<WebSocket, WsMessage>;
pub(crate) type WsRx = futures_util::stream::SplitStream<WebSocket>;

/// Sends an error and closes with `code`.
pub(crate) async fn refuse(tx: &mut WsTx, error: String, code: u16) {
    let _ = tx.send(control(&ShellControl::Error { error })).await;
    let _ = tx
        .send(WsMessage::Close(Some(axum::extract::ws::CloseFrame {
            code,
            reason: "refused".into(),
        })))
        .await;
}

/// Opens or attaches the session `request` asks for, then moves bytes both
/// ways until either side ends or `revoked` resolves (with the reason the
/// client is told, and the socket closed with [`CLOSE_UNAUTHORIZED`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pump(
    mut tx: WsTx,
    mut rx: WsRx,
    state: &AppState,
    user: &store::UserRecord,
    id: &str,
    request: Result<ShellRequest, String>,
    access: Access,
    revoked: impl std::future::Future<Output = String>,
) -> Result<(), String> {
    let opened = match request {
        Ok(r) => state
            .service
            .shell(user, id, r)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let session = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = tx
                .send(control(&ShellControl::Error { error: e.clone() }))
                .await;
            let _ = tx.send(WsMessage::Close(None)).await;
            return Err(e);
        }
    };
    tx.send(control(&ShellControl::Attached {
        session: session.name().to_string(),
        pid: session.pid(),
    }))
    .await
    .map_err(|e| e.to_string())?;
    let (mut output, mut input) = session.into_split().map_err(|e| e.to_string())?;

    // Guest → browser/CLI.
    let down = async move {
        tokio::pin!(revoked);
        loop {
            let event = tokio::select! {
                reason = &mut revoked => {
                    refuse(&mut tx, reason, CLOSE_UNAUTHORIZED).await;
                    return;
                }
                event = output.next() => event,
            };
            match event {
                Ok(Some(SessionEvent::Output(d))) => {
                    if tx.send(WsMessage::Binary(d.into())).await.is_err() {
                        return;
                    }
                }
                Ok(Some(SessionEvent::Exit(e))) => {
                    let _ = tx
                        .send(control(&ShellControl::Exit { exit_code: e.code }))
                        .await;
                    let _ = tx.send(WsMessage::Close(None)).await;
                    return;
                }
                Ok(Some(SessionEvent::TakenOver(reason))) => {
                    let _ = tx.send(control(&ShellControl::Detached { reason })).await;
                    let _ = tx.send(WsMessage::Close(None)).await;
                    return;
                }
                Ok(None) => {
                    let _ = tx
                        .send(control(&ShellControl::Detached {
                            reason: "detached".into(),
                        }))
                        .await;
                    let _ = tx.send(WsMessage::Close(None)).await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(control(&ShellControl::Error {
                            error: crate::error::error_chain(&e),
                        }))
                        .await;
                    return;
                }
            }
        }
    };
    let read_only = access == Access::ReadOnly;
    // Browser/CLI → guest.
    let up = async move {
        while let Some(Ok(msg)) = rx.next().await {
            let r = match msg {
                // A read-only client's keystrokes never reach the guest.
                WsMessage::Binary(_) if read_only => Ok(()),
                WsMessage::Binary(b) => input.write(&b).await,
                WsMessage::Text(t) => match serde_json::from_str::<ShellControl>(&t) {
                    // Nor do its resizes (the terminal is someone else's).
                    Ok(ShellControl::Resize { .. }) if read_only => Ok(()),
                    Ok(ShellControl::Resize { rows, cols }) if rows > 0 && cols > 0 => {
                        input.resize(proto::WindowSize { rows, cols }).await
                    }
                    Ok(ShellControl::Detach) => input.detach().await,
                    // Anything else from a client is ignored rather than fatal.
                    _ => Ok(()),
                },
                WsMessage::Close(_) => break,
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
        // Dropping the input half with the output half detaches: the
        // agent keeps the session.
    };
    tokio::select! {
        () = down => {},
        () = up => {},
    }
    Ok(())
}
