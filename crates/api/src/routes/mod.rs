//! Handlers: each turns HTTP into a typed call on the service and back.

pub mod checkpoints;
pub mod events;
pub mod exec;
pub mod files;
pub mod health;
pub mod images;
pub mod mcp;
pub mod metrics;
pub mod proxy;
pub mod publish;
pub mod sandboxes;
pub mod secrets;
pub mod share;
pub mod shell;
pub mod templates;
pub mod volumes;

use axum::extract::ws::WebSocketUpgrade;
use axum::routing::any;
use axum::Router;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

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

/// Every route of the API, registered from its handler's
/// `#[utoipa::path]`: the path and methods the router serves are the ones
/// the OpenAPI document shows (`crate::openapi`), from the same
/// attribute. Add a route here and only here, with `routes!`; the test
/// `tests/openapi.rs` walks the built router and fails on any route the
/// document lacks.
pub fn api() -> OpenApiRouter<AppState> {
    let file_limit = api_types::limits::MAX_FILE_BODY as usize;
    OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(health::health))
        .routes(routes!(crate::openapi::serve))
        .routes(routes!(sandboxes::list, sandboxes::create))
        .routes(routes!(
            sandboxes::inspect,
            sandboxes::patch,
            sandboxes::destroy
        ))
        .routes(routes!(sandboxes::stop))
        .routes(routes!(sandboxes::start))
        .routes(routes!(exec::exec))
        .routes(routes!(sandboxes::sessions))
        .routes(routes!(shell::shell))
        .routes(routes!(share::create))
        .routes(routes!(share::list))
        .routes(routes!(share::revoke))
        .routes(routes!(share::page))
        .routes(routes!(share::info))
        .routes(routes!(share::ws))
        .routes(routes!(share::file))
        .routes(
            routes!(files::read, files::head, files::write)
                .layer(axum::extract::DefaultBodyLimit::max(file_limit)),
        )
        // Any method (the document lists the eight OpenAPI knows); bodies
        // stream through unbuffered: no JSON limit.
        .routes(routes!(proxy::proxy_port).map(|_| proxied(proxy::proxy_port)))
        .routes(routes!(proxy::proxy_port_slash).map(|_| proxied(proxy::proxy_port_slash)))
        .routes(routes!(proxy::proxy_rest).map(|_| proxied(proxy::proxy_rest)))
        .routes(routes!(proxy::ports))
        .routes(routes!(proxy::tunnel))
        .routes(routes!(publish::publish))
        .routes(routes!(publish::unpublish))
        .routes(routes!(secrets::list, secrets::create))
        .routes(routes!(secrets::delete))
        .routes(routes!(checkpoints::create))
        .routes(routes!(checkpoints::list))
        .routes(routes!(checkpoints::inspect, checkpoints::delete))
        .routes(routes!(checkpoints::restore))
        .routes(routes!(checkpoints::fork))
        .routes(routes!(images::list))
        .routes(routes!(images::inspect, images::delete))
        .routes(routes!(images::pull))
        // An import's size is bounded by the caller's disk quota (the
        // handler checks Content-Length against it before reading a byte).
        .routes(routes!(images::import).layer(axum::extract::DefaultBodyLimit::disable()))
        .routes(routes!(images::share, images::unshare))
        .routes(routes!(images::task))
        .routes(routes!(images::save))
        .routes(routes!(templates::warm, templates::list))
        .routes(routes!(templates::delete))
        .routes(routes!(volumes::list, volumes::create))
        .routes(routes!(volumes::inspect, volumes::patch, volumes::delete))
        .routes(routes!(volumes::clone))
        // An import's size is bounded by the volume's (the handler checks
        // Content-Length against it before reading a byte).
        .routes(
            routes!(volumes::export, volumes::import)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .routes(routes!(events::list))
        .routes(routes!(metrics::metrics))
        .routes(routes!(metrics::status))
        .routes(
            routes!(mcp::post, mcp::get, mcp::delete)
                .layer(axum::extract::DefaultBodyLimit::max(mcp::MAX_BODY)),
        )
        // E2B compatibility (`crate::e2b`): its sandbox API and envd.
        .merge(crate::e2b::api())
}

/// The router of [`api`] and its OpenAPI document (paths as OpenAPI
/// writes them: a catch-all `{*rest}` is `{rest}`).
pub fn parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = api().split_for_parts();
    doc.paths.paths = std::mem::take(&mut doc.paths.paths)
        .into_iter()
        .map(|(path, item)| (crate::openapi::document_path(&path), item))
        .collect();
    crate::openapi::unique_operation_ids(&mut doc);
    (router, doc)
}

pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_json_body;
    let metrics = state.service.metrics().clone();
    parts()
        .0
        .fallback(|| async { crate::error::ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(json_limit))
        // Outermost: every answer (a 404, a 413 too) gets its request id.
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::observe::track,
        ))
        .with_state(state)
}

/// A proxy route: any method, no body limit.
fn proxied<H, T>(handler: H) -> axum::routing::MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    any(handler).layer(axum::extract::DefaultBodyLimit::disable())
}
