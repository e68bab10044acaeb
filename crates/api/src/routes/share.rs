//! Share links and the browser terminal (docs/clients.md):
//!
//! * `POST /sandboxes/:id/share`, `GET /sandboxes/:id/shares`,
//!   `DELETE /sandboxes/:id/shares/:share_id` — the owner makes, lists and
//!   revokes links (API key);
//! * `GET /share/` and its files — the terminal page (no key: static, the
//!   same for everyone);
//! * `GET /share/info` and `GET /share/ws` — what the page calls with the
//!   link's token (`Authorization: Bearer bhs_…`, and the WebSocket's first
//!   message), limited per client IP.

use std::net::SocketAddr;
use std::time::Duration;

use api_types::{CreateShare, Share, ShareCreated, ShareOpen, ShareSession};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;

use super::shell::{pump, refuse, Access, CLOSE_UNAUTHORIZED};
use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::service::ShellRequest;
use crate::state::{blocking, AppState};

/// The session a link attaches to when the page names none.
pub const DEFAULT_SESSION: &str = "web";
/// How often an open share WebSocket checks its link is still live.
const RECHECK: Duration = Duration::from_secs(5);

/// The TCP peer's address, when the listener recorded it.
#[derive(Debug)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

#[utoipa::path(
    post,
    path = "/sandboxes/{id}/share",
    operation_id = "create_share",
    tag = "share",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::CreateShare,
    responses(
        (status = 201, description = "The link, with its token (shown only now).", body = api_types::ShareCreated),
        (status = 403, description = "`public` asked for, and publishing is off.", body = api_types::ErrorBody),
        (status = 409, description = "The sandbox has `share.max_per_sandbox` live links.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge, Missing
    )
)]
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateShare>,
) -> Result<(StatusCode, Json<ShareCreated>), ApiError> {
    state.limit(&user, Class::Read)?;
    let base = if body.public {
        if !state.config.publish.enabled() {
            return Err(ApiError::Forbidden(
                "publishing is off on this daemon ([publish] listen is empty)".into(),
            ));
        }
        state.config.publish.base_url()
    } else {
        state.config.share.base(&headers)
    };
    let created = state.service.create_share(&user, &id, body, &base).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(
    get,
    path = "/sandboxes/{id}/shares",
    operation_id = "list_shares",
    tag = "share",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 200, description = "The sandbox's live links, oldest first (no tokens).", body = Vec<api_types::Share>),
        Authed, Missing
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Vec<Share>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.shares(&user, &id).await?))
}

#[utoipa::path(
    delete,
    path = "/sandboxes/{id}/shares/{share_id}",
    operation_id = "revoke_share",
    tag = "share",
    params(
        ("id" = String, Path, description = "The sandbox's id or name."),
        ("share_id" = String, Path, description = "The link's id (`shr-…`)."),
    ),
    responses(
        (status = 204, description = "Revoked: the token is refused from now on, and terminals open with it are closed within seconds."),
        Authed, Missing
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    User(user): User,
    Path((id, share_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Read)?;
    state.service.revoke_share(&user, &id, &share_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/share/",
    operation_id = "share_page",
    tag = "share",
    security(()),
    description = "The browser terminal page (HTML). A share link is this page with \
        `#t=<token>` (and optionally `&session=<name>`) in the fragment. Served with a strict \
        Content-Security-Policy; its scripts and styles are the files under `/share/`.",
    responses((status = 200, description = "The page.", content_type = "text/html"))
)]
pub async fn page() -> Response {
    crate::share::asset("")
}

#[utoipa::path(
    get,
    path = "/share/{file}",
    operation_id = "share_file",
    tag = "share",
    security(()),
    params(("file" = String, Path, description = "`term.js`, `term.css`, `xterm.js`, `xterm.css` or `addon-fit.js`.")),
    responses(
        (status = 200, description = "The file (JavaScript or CSS)."),
        Missing
    )
)]
pub async fn file(Path(file): Path<String>) -> Response {
    crate::share::asset(&file)
}

/// A `/share/…` request on the public proxy (`bhatti publish --shell`):
/// the same handlers, state and limits as on the API listener.
pub async fn public(req: axum::extract::Request, state: AppState) -> Response {
    use axum::handler::Handler;
    use axum::response::IntoResponse;
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            Json(api_types::ErrorBody {
                error: "the terminal page answers GET only".into(),
            }),
        )
            .into_response();
    }
    let path = req.uri().path().to_string();
    match path.strip_prefix(crate::share::PAGE_PATH).unwrap_or("-") {
        "" => page().await,
        "info" => Handler::call(info, req, state).await,
        "ws" => Handler::call(ws, req, state).await,
        name => crate::share::asset(name),
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
}

#[utoipa::path(
    get,
    path = "/share/info",
    operation_id = "share_info",
    tag = "share",
    security(("share_token" = [])),
    description = "What a share token opens. Counts against the client IP's \
        `share.attempts_per_min`.",
    responses(
        (status = 200, description = "The link is live.", body = api_types::ShareSession),
        (status = 401, description = "No token, or one that is malformed, unknown, expired or revoked.", body = api_types::ErrorBody),
        (status = 429, description = "Too many attempts from this address.", body = api_types::ErrorBody),
    )
)]
pub async fn info(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<ShareSession>, ApiError> {
    state.shares.attempt(peer)?;
    let (share, _) = state.service.share_by_token(bearer(&headers)).await?;
    Ok(Json(ShareSession {
        sandbox: share.sandbox_name,
        read_only: share.read_only,
        expires_at: share.expires_at,
    }))
}

#[utoipa::path(
    get,
    path = "/share/ws",
    operation_id = "share_shell",
    tag = "share",
    security(("share_token" = [])),
    description = "WebSocket: the shell protocol of `GET /sandboxes/{id}/ws`, authenticated by \
        a share token. The first text frame is a `ShareOpen` (the token, and the session — \
        `web` when absent — and size); a refused token gets an `error` message and close code \
        4401, as does an open socket whose link is revoked or expires. On a read-only link the \
        client's terminal bytes and resizes are dropped by the daemon. Counts against the \
        client IP's `share.attempts_per_min`.",
    params(
        ("Upgrade" = String, Header, description = "`websocket`."),
        ("Connection" = String, Header, description = "`Upgrade`."),
        ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake key."),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`."),
    ),
    responses(
        (status = 101, description = "Switching Protocols: the share shell protocol begins."),
        (status = 429, description = "Too many attempts from this address.", body = api_types::ErrorBody),
        Invalid
    )
)]
pub async fn ws(
    State(state): State<AppState>,
    Peer(peer): Peer,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    state.shares.attempt(peer)?;
    Ok(super::ws_limits(ws).on_upgrade(move |socket| async move {
        if let Err(e) = serve(socket, state).await {
            tracing::debug!(error = %e, "share websocket ended");
        }
    }))
}

async fn serve(socket: axum::extract::ws::WebSocket, state: AppState) -> Result<(), String> {
    let (mut tx, mut rx) = socket.split();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .map_err(|_| "no open message within 10s".to_string())?;
    let opened: ShareOpen = match first {
        Some(Ok(WsMessage::Text(t))) => match serde_json::from_str(&t) {
            Ok(o) => o,
            // serde's message is not echoed: it may quote the token.
            Err(_) => {
                refuse(
                    &mut tx,
                    "bad open message: expected a ShareOpen".into(),
                    1008,
                )
                .await;
                return Err("bad open message".into());
            }
        },
        _ => return Err("expected a JSON open message".into()),
    };
    let (share, user) = match state.service.share_by_token(&opened.token).await {
        Ok(found) => found,
        Err(e) => {
            refuse(&mut tx, e.to_string(), CLOSE_UNAUTHORIZED).await;
            return Err("share token refused".into());
        }
    };
    if let Err(e) = state.limit(&user, Class::Exec) {
        refuse(&mut tx, e.to_string(), 1013).await;
        return Err("owner's rate limit".into());
    }
    let size = match (opened.rows, opened.cols) {
        (Some(rows), Some(cols)) if rows > 0 && cols > 0 => {
            Ok(Some(proto::WindowSize { rows, cols }))
        }
        (None, None) => Ok(None),
        _ => Err("rows and cols must both be given and positive".to_string()),
    };
    // A read-only client's size is not the session's: it attaches
    // without one.
    let size = size.map(|s| s.filter(|_| !share.read_only));
    let request = size.map(|size| ShellRequest {
        session: Some(
            opened
                .session
                .clone()
                .unwrap_or_else(|| DEFAULT_SESSION.into()),
        ),
        new: false,
        steal: opened.steal,
        size,
        cmd: None,
    });
    let access = if share.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let hash = crate::share::hash_token(&opened.token);
    let store = state.store.clone();
    let (share_id, expires_at) = (share.id.clone(), share.expires_at);
    // Resolves when the link is revoked or expires.
    let revoked = async move {
        loop {
            let left = expires_at.saturating_sub(store::now_ms()).max(0) as u64;
            // Not before expiry (ms may round down), not later than RECHECK.
            tokio::time::sleep(RECHECK.min(Duration::from_millis(left.max(50)))).await;
            let (s, h) = (store.clone(), hash.clone());
            match blocking(move || s.share_by_token_hash(&h)).await {
                Ok(Some(live)) if live.id == share_id => {}
                Ok(_) => return "the share link was revoked or has expired".to_string(),
                // The store failing is no reason to cut a terminal off.
                Err(e) => tracing::warn!(error = %e, "cannot recheck a share link"),
            }
        }
    };
    pump(
        tx,
        rx,
        &state,
        &user,
        &share.sandbox_id,
        request,
        access,
        revoked,
    )
    .await
}
