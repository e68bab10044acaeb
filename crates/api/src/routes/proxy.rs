//! `GET /sandboxes/:id/ports`: what listens in a sandbox;
//! `ANY /sandboxes/:id/proxy/:port/*rest`: the authenticated reverse proxy
//! into a sandbox port, and `GET /sandboxes/:id/tunnel/:port`: a raw TCP
//! tunnel carried in WebSocket binary frames (what `bhatti forward` uses).
//! All wake a warm or cold sandbox first.

use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::response::Response;
use bhatti_core::GuestTunnel;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::User;
use crate::error::ApiError;
use crate::openapi::{Authed, Guest, Invalid, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

/// Size of one binary frame the tunnel sends towards the client.
const TUNNEL_CHUNK: usize = 64 * 1024;

/// A guest port from the URL: 1–65535.
pub fn parse_port(s: &str) -> Result<u16, ApiError> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(ApiError::BadRequest(format!(
            "invalid port {s:?}: expected a number from 1 to 65535"
        ))),
        Ok(p) => Ok(p),
    }
}

/// The request target the guest sees: what follows
/// `/sandboxes/<id>/proxy/<port>` in the raw (still percent-encoded) path,
/// "/" when nothing does, plus the query.
pub fn guest_target(path: &str, query: Option<&str>) -> String {
    // "", "sandboxes", id, "proxy", port, rest
    let rest = path.splitn(6, '/').nth(5).unwrap_or("");
    let mut t = format!("/{rest}");
    if let Some(q) = query {
        t.push('?');
        t.push_str(q);
    }
    t
}

/// `GET /sandboxes/:id/ports`: the TCP ports listening in the guest.
#[utoipa::path(
    get,
    path = "/sandboxes/{id}/ports",
    operation_id = "list_ports",
    tag = "ports",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 200, description = "The TCP ports listening in the guest, sorted, the agent's own left out (wakes the sandbox).", body = api_types::PortList),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn ports(
    State(state): State<AppState>,
    User(user): User,
    id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<api_types::PortList>, ApiError> {
    let Path(id) = id.map_err(bad_path)?;
    state.limit(&user, Class::Read)?;
    let ports = state.service.ports(&user, &id).await?;
    Ok(axum::Json(api_types::PortList {
        ports: ports
            .into_iter()
            .map(|p| api_types::Port {
                port: p.port,
                address: p.address,
                protocol: p.protocol,
            })
            .collect(),
    }))
}

/// One route of the authenticated proxy: a handler over [`proxy`] and its
/// operation (any method: the eight OpenAPI knows are listed; the router
/// takes any).
macro_rules! proxy_route {
    ($name:ident, $path:literal, $id:literal, $seen:literal $(, $rest:tt)?) => {
        #[doc = concat!("`ANY ", $path, "`: the authenticated proxy.")]
        #[utoipa::path(
            method(get, put, post, delete, options, head, patch, trace),
            path = $path,
            operation_id = $id,
            tag = "ports",
            params(
                ("id" = String, Path, description = "The sandbox's id or name."),
                ("port" = u16, Path, minimum = 1, maximum = 65535, description = "The guest port, 1-65535."),
                $($rest)?
            ),
            description = concat!(
                "Forwards the request (any method, any body) to `127.0.0.1:port` in \
                 the guest, which sees ",
                $seen,
                " plus the query. Bodies stream both ways unbuffered and without the \
                 JSON limit; a WebSocket (any `Upgrade`) is forwarded and spliced on \
                 a `101`. Hop-by-hop headers are dropped, `X-Forwarded-*` added, and \
                 the `Authorization` header never reaches the guest. Wakes the sandbox."
            ),
            // Sets first: a later answer of the same status overrides.
            responses(
                Authed, Invalid, Missing, Guest,
                (status = "default", description = "The guest server's answer, as it sent it."),
                (status = 502, description = "Nothing listens on the port, the guest server broke the HTTP exchange, or the VM died.", body = api_types::ErrorBody),
                (status = 504, description = "No response head within 60 s.", body = api_types::ErrorBody),
            )
        )]
        pub async fn $name(
            state: State<AppState>,
            user: User,
            params: Result<Path<Vec<(String, String)>>, PathRejection>,
            req: Request,
        ) -> Result<Response, ApiError> {
            proxy(state, user, params, req).await
        }
    };
}

proxy_route!(
    proxy_port,
    "/sandboxes/{id}/proxy/{port}",
    "proxy_port",
    "`/`"
);
proxy_route!(
    proxy_port_slash,
    "/sandboxes/{id}/proxy/{port}/",
    "proxy_port_slash",
    "`/`"
);
proxy_route!(
    proxy_rest,
    "/sandboxes/{id}/proxy/{port}/{*rest}",
    "proxy_rest",
    "`/rest` exactly as sent (still percent-encoded)",
    (
        "rest" = String,
        Path,
        description = "The rest of the path; may hold `/`."
    )
);

/// Proxied requests take a token from the read class: each is one agent
/// connection and no guest process, and a page load makes dozens.
pub async fn proxy(
    State(state): State<AppState>,
    User(user): User,
    params: Result<Path<Vec<(String, String)>>, PathRejection>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let Path(params) = params.map_err(bad_path)?;
    let id = param(&params, "id")?;
    let port = parse_port(param(&params, "port")?)?;
    state.limit(&user, Class::Read)?;
    let target = guest_target(req.uri().path(), req.uri().query());
    // The key authenticated this request; the guest never sees it.
    req.headers_mut().remove(axum::http::header::AUTHORIZATION);
    state
        .service
        .proxy(&user, id, port, req, &target, id, ())
        .await
}

fn bad_path(e: PathRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid path: {}", e.body_text()))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Result<&'a str, ApiError> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| ApiError::Internal(format!("route without a {name} parameter")))
}

/// The tunnel is opened before the upgrade, so a port nobody listens on
/// is a 502 the client sees as an HTTP answer.
#[utoipa::path(
    get,
    path = "/sandboxes/{id}/tunnel/{port}",
    operation_id = "tunnel",
    tag = "ports",
    description = "WebSocket (a GET with `Upgrade: websocket`): raw TCP to `127.0.0.1:port` in \
        the guest. After the upgrade **binary** frames carry the bytes both ways; an \
        **empty** binary frame means its sender has finished writing (a TCP half-close); \
        a close frame ends both directions; text frames from the client are sent as their \
        UTF-8 bytes. Messages and frames of at most 1 MiB. Wakes the sandbox and keeps it \
        hot while open.",
    params(
        ("id" = String, Path, description = "The sandbox's id or name."),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "The guest port, 1-65535."),
        ("Upgrade" = String, Header, description = "`websocket`."),
        ("Connection" = String, Header, description = "`Upgrade`."),
        ("Sec-WebSocket-Key" = String, Header, description = "The WebSocket handshake key."),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`."),
    ),
    // Sets first: a later answer of the same status overrides.
    responses(
        Authed, Invalid, Missing, Guest,
        (status = 101, description = "Switching Protocols: the tunnel is open."),
        (status = 502, description = "Nothing listens on the port in the guest (answered before the upgrade), or the VM died.", body = api_types::ErrorBody),
    )
)]
pub async fn tunnel(
    State(state): State<AppState>,
    User(user): User,
    params: Result<Path<(String, String)>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Path((id, port)) = params.map_err(bad_path)?;
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    let port = parse_port(&port)?;
    state.limit(&user, Class::Read)?;
    let (tunnel, keep_hot) = state.service.tunnel(&user, &id, port).await?;
    Ok(super::ws_limits(ws).on_upgrade(move |socket| async move {
        relay(socket, tunnel).await;
        drop(keep_hot);
    }))
}

/// Binary frames carry the bytes; an empty binary frame says its sender
/// has finished writing (a TCP half-close); a close frame ends both ways.
async fn relay(socket: WebSocket, tunnel: GuestTunnel) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut t_rx, mut t_tx) = tokio::io::split(tunnel);
    let up = async move {
        while let Some(msg) = ws_rx.next().await {
            let data = match msg {
                Ok(WsMessage::Binary(d)) => d,
                Ok(WsMessage::Text(t)) => axum::body::Bytes::from(t.as_str().to_owned()),
                Ok(WsMessage::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let written = if data.is_empty() {
                t_tx.shutdown().await
            } else {
                t_tx.write_all(&data).await
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "tunnel target stopped taking data");
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; TUNNEL_CHUNK];
        loop {
            match t_rx.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = ws_tx.send(WsMessage::Binary(Default::default())).await;
                    break;
                }
                Ok(n) => {
                    let frame = WsMessage::Binary(axum::body::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(frame).await.is_err() {
                        return None;
                    }
                }
            }
        }
        Some(ws_tx)
    };
    tokio::pin!(up, down);
    tokio::select! {
        // The client closed (or went away): nothing more to relay.
        () = &mut up => {}
        // The guest finished: let the client finish its side, then close.
        tx = &mut down => {
            up.await;
            if let Some(mut tx) = tx {
                let _ = tx.send(WsMessage::Close(None)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(parse_port("3000").unwrap(), 3000);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "-1", "abc", "", "80a", " 80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_guest_sees_the_rest_of_the_path_and_the_query() {
        assert_eq!(guest_target("/sandboxes/dev/proxy/3000", None), "/");
        assert_eq!(guest_target("/sandboxes/dev/proxy/3000/", None), "/");
        assert_eq!(
            guest_target("/sandboxes/dev/proxy/3000/a/b%20c", Some("x=1&y")),
            "/a/b%20c?x=1&y"
        );
        assert_eq!(guest_target("/sandboxes/dev/proxy/3000//x", None), "//x");
    }
}
