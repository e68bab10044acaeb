//! E2B compatibility: the stock `e2b` SDKs work against the daemon with
//! configuration only (docs/clients.md, "E2B compatibility").
//!
//! * [`rest`] — the E2B sandbox API under `/e2b` (`E2B_API_URL=…/e2b`):
//!   create (template = image, metadata = labels), list, get, kill, set
//!   timeout, pause (hot → warm) and connect (wake), authenticated by
//!   `X-API-Key` = a bhatti API key; errors as E2B's `{code, message}`.
//! * [`connect`], [`process`], [`filesystem`] — the in-sandbox API envd
//!   serves, under `/e2b/envd` (`E2B_SANDBOX_URL=…/e2b/envd`): the
//!   Connect-RPC `process.Process` and `filesystem.Filesystem` services and
//!   the `/files` endpoint. The SDK names the sandbox in `E2b-Sandbox-Id`
//!   and authenticates with `X-Access-Token` (the `envdAccessToken` the
//!   create answered: the caller's own key). Each call maps onto the
//!   sandbox service (`crate::service`) and so onto the guest agent: the
//!   guest runs no second agent.
//!
//! Every call goes through the same per-user rate limits and tenancy as
//! the native API: another user's sandbox is a 404 / `not_found`.

pub mod connect;
pub mod filesystem;
pub mod process;
pub mod rest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::request::Parts;
use axum::http::HeaderMap;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// The envd version the sandboxes report: the SDK turns features on by it.
/// 0.5.7: default user, commands without stdin, octet-stream uploads; not
/// yet file metadata (0.6.2), which bhatti does not keep.
pub const ENVD_VERSION: &str = "0.5.7";

/// What the E2B layer keeps besides the service: sandboxes' timeouts and
/// the processes started through `process.Process/Start`.
#[derive(Debug, Default)]
pub struct E2bState {
    pub(crate) timeouts: rest::Timeouts,
    pub(crate) processes: process::Registry,
    /// Sandboxes (`user/sandbox`) found to have no `/bin/bash` (bounded).
    pub(crate) bashless: Mutex<std::collections::HashSet<String>>,
}

/// The E2B routes, merged into the daemon's router (and so its OpenAPI
/// document) by `crate::routes::api`.
pub fn api() -> OpenApiRouter<AppState> {
    let file_limit = api_types::limits::MAX_FILE_BODY as usize;
    OpenApiRouter::new()
        .routes(routes!(rest::list_v1))
        .routes(routes!(rest::list_v2, rest::create))
        .routes(routes!(rest::create_v1))
        .routes(routes!(rest::get, rest::kill))
        .routes(routes!(rest::set_timeout))
        .routes(routes!(rest::refresh))
        .routes(routes!(rest::pause))
        .routes(routes!(rest::connect_v2))
        .routes(routes!(rest::connect_v1))
        .routes(routes!(rest::resume))
        .routes(routes!(connect::process_rpc))
        .routes(routes!(connect::filesystem_rpc))
        .routes(
            routes!(filesystem::download, filesystem::upload)
                .layer(axum::extract::DefaultBodyLimit::max(file_limit)),
        )
        .routes(routes!(filesystem::health))
        .routes(routes!(rest::unsupported).map(|_| axum::routing::any(rest::unsupported)))
}

/// The caller of an E2B API: the user its key names.
pub(crate) async fn caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Arc<store::UserRecord>, ApiError> {
    let key = ["x-api-key", "x-access-token"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    crate::auth::user_of_key(state, key).await
}

/// The caller of an envd call and the sandbox it names (`E2b-Sandbox-Id`).
#[derive(Debug, Clone)]
pub struct EnvdCaller {
    pub user: Arc<store::UserRecord>,
    pub sandbox: String,
}

impl axum::extract::FromRequestParts<AppState> for EnvdCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = caller(state, &parts.headers).await?;
        let sandbox = parts
            .headers
            .get("e2b-sandbox-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "the E2b-Sandbox-Id header is required (set E2B_SANDBOX_URL to the daemon's /e2b/envd)"
                        .into(),
                )
            })?
            .to_string();
        if let Some(port) = parts.headers.get("e2b-sandbox-port") {
            if port.as_bytes() != b"49983" {
                return Err(ApiError::BadRequest(format!(
                    "E2b-Sandbox-Port {}: only envd's port 49983 is served here; reach other ports through /sandboxes/{{id}}/proxy/{{port}}",
                    String::from_utf8_lossy(port.as_bytes())
                )));
            }
        }
        Ok(EnvdCaller { user, sandbox })
    }
}

/// Per-sandbox maps of the E2B layer, bounded by the sandboxes a user may
/// have (each is dropped with its sandbox).
pub(crate) type BySandbox<T> = Mutex<HashMap<String, T>>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
