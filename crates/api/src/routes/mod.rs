//! Handlers: each turns HTTP into a typed call on the service and back.

pub mod exec;
pub mod files;
pub mod health;
pub mod proxy;
pub mod publish;
pub mod sandboxes;
pub mod secrets;
pub mod shell;

use axum::routing::{any, get, post};
use axum::Router;

use crate::state::AppState;

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
