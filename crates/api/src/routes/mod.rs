//! Handlers: each turns HTTP into a typed call on the service and back.

pub mod exec;
pub mod files;
pub mod health;
pub mod proxy;
pub mod publish;
pub mod sandboxes;
pub mod secrets;
pub mod shell;

use axum::extract::ws::WebSocketUpgrade;
use axum::routing::{any, get, post};
use axum::Router;

use crate::state::AppState;

/// Largest WebSocket message the shell and tunnel routes accept: 1 MiB —
/// a terminal sends keystrokes and pastes, `bhatti forward` sends 64 KiB
/// chunks, so anything larger is a client misbehaving, and a message is
/// buffered whole before it is handled.
pub const WS_MAX_MESSAGE: usize = 1024 * 1024;
/// Largest WebSocket frame: the same as a message (no fragmentation needed).
pub const WS_MAX_FRAME: usize = WS_MAX_MESSAGE;
/// Bytes queued towards a WebSocket client before a send waits for the
/// socket (guest output is then held back in the guest).
pub const WS_WRITE_BUFFER: usize = 128 * 1024;

/// The daemon's WebSocket limits on an upgrade.
pub fn ws_limits(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_FRAME)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_WRITE_BUFFER + WS_MAX_MESSAGE + 1024)
}

pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_json_body;
    let file_limit = api_types::limits::MAX_FILE_BODY as usize;
    Router::new()
        .route("/health", get(health::health))
        .route("/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::inspect)
                .patch(sandboxes::patch)
                .delete(sandboxes::destroy),
        )
        .route("/sandboxes/{id}/stop", post(sandboxes::stop))
        .route("/sandboxes/{id}/start", post(sandboxes::start))
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route("/sandboxes/{id}/sessions", get(sandboxes::sessions))
        .route("/sandboxes/{id}/ws", get(shell::shell))
        .route(
            "/sandboxes/{id}/files",
            get(files::read)
                .head(files::head)
                .put(files::write)
                .layer(axum::extract::DefaultBodyLimit::max(file_limit)),
        )
        // Proxied bodies stream through unbuffered: no JSON limit.
        .route("/sandboxes/{id}/proxy/{port}", proxied())
        .route("/sandboxes/{id}/proxy/{port}/", proxied())
        .route("/sandboxes/{id}/proxy/{port}/{*rest}", proxied())
        .route("/sandboxes/{id}/ports", get(proxy::ports))
        .route("/sandboxes/{id}/tunnel/{port}", get(proxy::tunnel))
        .route("/sandboxes/{id}/publish", post(publish::publish))
        .route(
            "/sandboxes/{id}/publish/{port}",
            axum::routing::delete(publish::unpublish),
        )
        .route("/secrets", get(secrets::list).post(secrets::create))
        .route("/secrets/{name}", axum::routing::delete(secrets::delete))
        .fallback(|| async { crate::error::ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(json_limit))
        .with_state(state)
}

fn proxied() -> axum::routing::MethodRouter<AppState> {
    any(proxy::proxy).layer(axum::extract::DefaultBodyLimit::disable())
}
