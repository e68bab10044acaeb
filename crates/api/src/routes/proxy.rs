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
