//! The reverse proxy into a guest: one HTTP request (WebSocket and other
//! upgrades included) forwarded to a TCP port in the sandbox over a fresh
//! agent tunnel (opened by core's guest surface, see
//! [`crate::service::Service::proxy`]). Bodies stream both ways without buffering, so server-sent
//! events arrive one by one. Used by the authenticated
//! `/sandboxes/:id/proxy/:port/…` route and by published aliases.

use std::net::SocketAddr;
use std::time::Duration;

use std::future::Future;

use agent_client::ClientError;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use bhatti_core::{CoreError, GuestTunnel};
use hyper_util::rt::TokioIo;

/// How long the guest server may take to send a response's head (status
/// and headers) once the request is on its way. Bodies are not bounded:
/// an event stream may stay open for as long as both ends want.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Forwards one HTTP request (any method; WebSocket/Upgrade requests
/// included; bodies streamed both ways, unbuffered, so SSE arrives event by
/// event) to 127.0.0.1:`port` in the guest over the tunnel `open` opens
/// (awaited once the request is checked). `path_and_query` is what the
/// guest server sees as the request target (e.g. "/a/b?x=1"). `held` is
/// kept alive for as long as the exchange lasts: until the response body
/// has been sent (or dropped), or, after a `101`, until the upgraded
/// connection closes — for what must last as long as the traffic does (the
/// keep-hot mark, a concurrency slot).
///
/// Never panics; failures become a JSON error response: 502 with a reason
/// when nothing listens on the port (the tunnel is refused), the VM died or
/// the guest server breaks the HTTP exchange, 504 on a timeout.
pub async fn forward_holding<H: Send + Sync + Unpin + 'static>(
    open: impl Future<Output = Result<GuestTunnel, CoreError>>,
    port: u16,
    sandbox_name: &str,
    req: Request,
    path_and_query: &str,
    held: H,
) -> Response {
    match forward_inner(open, port, sandbox_name, req, path_and_query, held).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid request target {target:?}")]
    BadTarget { target: String },
    #[error("nothing is listening on port {port} in sandbox '{sandbox}'")]
    NotListening { port: u16, sandbox: String },
    #[error("cannot reach port {port} in sandbox '{sandbox}': {reason}")]
    TunnelFailed {
        port: u16,
        sandbox: String,
        reason: String,
    },
    #[error("port {port} in sandbox '{sandbox}' did not answer within {after:?}")]
    Timeout {
        port: u16,
        sandbox: String,
        after: Duration,
    },
    #[error("the server on port {port} in sandbox '{sandbox}' broke the HTTP exchange: {reason}")]
    Exchange {
        port: u16,
        sandbox: String,
        reason: String,
    },
}

impl ProxyError {
    /// The HTTP status the caller sees.
    pub fn status(&self) -> StatusCode {
        crate::error::ApiError::from(self.clone()).status()
    }
}

/// The API's one status mapping: a bad target is a 400, a timeout a 504,
/// anything else a 502.
impl From<ProxyError> for crate::error::ApiError {
    fn from(e: ProxyError) -> Self {
        use crate::error::ApiError;
        match e {
            ProxyError::BadTarget { .. } => ApiError::BadRequest(e.to_string()),
            ProxyError::NotListening { .. }
            | ProxyError::TunnelFailed { .. }
            | ProxyError::Exchange { .. } => ApiError::BadGateway(e.to_string()),
            ProxyError::Timeout { .. } => ApiError::GatewayTimeout(e.to_string()),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        tracing::debug!(error = %self, "proxy request failed");
        crate::error::ApiError::from(self).into_response()
    }
}

async fn forward_inner<H: Send + Sync + Unpin + 'static>(
    open: impl Future<Output = Result<GuestTunnel, CoreError>>,
    port: u16,
    sandbox: &str,
    mut req: Request,
    path_and_query: &str,
    held: H,
) -> Result<Response, ProxyError> {
    let target = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    let uri: Uri = match target.parse::<Uri>() {
        Ok(u) if target.starts_with('/') => u,
        _ => {
            return Err(ProxyError::BadTarget {
                target: target.to_string(),
            })
        }
    };
    let upgrade = upgrade_protocol(req.headers());
    // Taken before the request is rebuilt: the caller's side of an upgrade.
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());

    let tunnel = open.await.map_err(|e| tunnel_error(e, port, sandbox))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .map_err(|e| exchange_error(&e, port, sandbox))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "proxied connection ended with an error");
        }
    });

    let (parts, body) = req.into_parts();
    let mut out = axum::http::Request::new(body);
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = request_headers(&parts.headers, upgrade.as_ref(), peer, port);
    // The public proxy decides X-Forwarded-* itself (trusted proxies).
    if let Some(f) = parts.extensions.get::<crate::publish::client::Forwarded>() {
        f.apply(out.headers_mut());
    }

    let sent = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, sender.send_request(out)).await;
    let mut resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(exchange_error(&e, port, sandbox)),
        Err(_) => {
            return Err(ProxyError::Timeout {
                port,
                sandbox: sandbox.to_string(),
                after: RESPONSE_HEAD_TIMEOUT,
            })
        }
    };

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let mut held = Some(held);
    if switching {
        if let Some(client_upgrade) = client_upgrade {
            let guest_upgrade = hyper::upgrade::on(&mut resp);
            let sandbox = sandbox.to_string();
            // Held by the spliced connection from here on.
            let upgrade_held = held.take();
            tokio::spawn(async move {
                let _held = upgrade_held;
                let (client, guest) = match tokio::try_join!(client_upgrade, guest_upgrade) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, %sandbox, port, "upgrade failed");
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut guest = TokioIo::new(guest);
                match tokio::io::copy_bidirectional(&mut client, &mut guest).await {
                    Ok((up, down)) => {
                        tracing::debug!(up, down, %sandbox, port, "upgraded connection closed")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %sandbox, port, "upgraded connection ended")
                    }
                }
            });
        } else {
            // A 101 nobody asked for cannot be relayed.
            return Err(ProxyError::Exchange {
                port,
                sandbox: sandbox.to_string(),
                reason: "switched protocols without an upgrade request".into(),
            });
        }
    }

    let (rparts, rbody) = resp.into_parts();
    let mut back = Response::new(if switching {
        Body::empty()
    } else {
        Body::new(Holding {
            body: rbody,
            _held: held,
        })
    });
    *back.status_mut() = rparts.status;
    *back.headers_mut() = response_headers(&rparts.headers, switching);
    Ok(back)
}

/// Why a tunnel could not be opened, as [`forward_holding`] reports it
/// (502 with a reason, 504 on a timeout).
pub fn tunnel_failure(e: CoreError, port: u16, sandbox_name: &str) -> ProxyError {
    tunnel_error(e, port, sandbox_name)
}

/// A response body that keeps something alive until it is dropped.
struct Holding<B, H> {
    body: B,
    _held: H,
}

impl<B, H> hyper::body::Body for Holding<B, H>
where
    B: hyper::body::Body + Unpin,
    H: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn tunnel_error(e: CoreError, port: u16, sandbox: &str) -> ProxyError {
    let sandbox = sandbox.to_string();
    let CoreError::Agent { source: e, .. } = e else {
        // The VM died, or the sandbox cannot be reached at all.
        return ProxyError::TunnelFailed {
            port,
            sandbox,
            reason: crate::error::error_chain(&e),
        };
    };
    match &e {
        ClientError::Agent {
            code: proto::ErrorCode::ConnectFailed,
            message,
        } => {
            if message.contains("timed out") {
                ProxyError::Timeout {
                    port,
                    sandbox,
                    after: Duration::from_secs(5),
                }
            } else if message.contains("refused") {
                ProxyError::NotListening { port, sandbox }
            } else {
                ProxyError::TunnelFailed {
                    port,
                    sandbox,
                    reason: message.clone(),
                }
            }
        }
        ClientError::Timeout { after, .. } => ProxyError::Timeout {
            port,
            sandbox,
            after: *after,
        },
        _ => ProxyError::TunnelFailed {
            port,
            sandbox,
            reason: crate::error::error_chain(&e),
        },
    }
}

fn exchange_error(e: &hyper::Error, port: u16, sandbox: &str) -> ProxyError {
    ProxyError::Exchange {
        port,
        sandbox: sandbox.to_string(),
        reason: crate::error::error_chain(e),
    }
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` and an
/// `Upgrade` header), if any.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Headers that describe one hop and never travel through a proxy, plus
/// those the `Connection` header names.
fn is_hop_by_hop(name: &HeaderName, connection_listed: &[String]) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || n.starts_with("proxy-")
        || connection_listed.iter().any(|l| l == n)
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether an `Authorization` value carries a bhatti API key.
fn is_bhatti_key(v: &HeaderValue) -> bool {
    v.to_str()
        .ok()
        .and_then(|s| {
            let (scheme, rest) = s.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().starts_with(crate::keys::KEY_PREFIX))
        })
        .unwrap_or(false)
}

/// What the guest server receives: the caller's end-to-end headers, the
/// upgrade it asked for, and X-Forwarded-*; never a bhatti API key.
fn request_headers(
    incoming: &HeaderMap,
    upgrade: Option<&HeaderValue>,
    peer: Option<std::net::IpAddr>,
    port: u16,
) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len() + 4);
    for (name, value) in incoming {
        if is_hop_by_hop(name, &listed) {
            continue;
        }
        if name == header::AUTHORIZATION && is_bhatti_key(value) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(proto) = upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.insert(header::UPGRADE, proto.clone());
    }
    let host = incoming.get(header::HOST).cloned();
    if !out.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
            out.insert(header::HOST, v);
        }
    }
    if let Some(ip) = peer {
        let xff = HeaderName::from_static("x-forwarded-for");
        let value = match incoming.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
            _ => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert(xff, v);
        }
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !out.contains_key(&xfp) {
        out.insert(xfp, HeaderValue::from_static("http"));
    }
    let xfh = HeaderName::from_static("x-forwarded-host");
    if let (false, Some(h)) = (out.contains_key(&xfh), host) {
        out.insert(xfh, h);
    }
    out
}

/// What the caller receives: the guest's end-to-end headers, plus
/// `Connection`/`Upgrade` on a 101.
fn response_headers(incoming: &HeaderMap, switching: bool) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if is_hop_by_hop(name, &listed) && !(switching && is_upgrade_header(name)) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if switching {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    out
}

fn is_upgrade_header(name: &HeaderName) -> bool {
    name == header::UPGRADE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn drops_hop_by_hop_and_the_api_key_keeps_the_rest() {
        let h = map(&[
            ("host", "example.test:8080"),
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic abc"),
            ("authorization", "Bearer bht_0123"),
            ("accept", "text/plain"),
            ("content-length", "3"),
        ]);
        let out = request_headers(&h, None, Some("10.1.2.3".parse().unwrap()), 3000);
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "authorization",
            "upgrade",
        ] {
            assert!(!out.contains_key(gone), "{gone} should be dropped");
        }
        assert_eq!(out["host"], "example.test:8080");
        assert_eq!(out["accept"], "text/plain");
        assert_eq!(out["content-length"], "3");
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "example.test:8080");
    }

    #[test]
    fn keeps_an_application_authorization_and_appends_to_forwarded_for() {
        let h = map(&[
            ("authorization", "Bearer app-token"),
            ("x-forwarded-for", "192.0.2.1"),
        ]);
        let out = request_headers(&h, None, Some("127.0.0.1".parse().unwrap()), 8080);
        assert_eq!(out["authorization"], "Bearer app-token");
        assert_eq!(out["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
        assert_eq!(out["host"], "127.0.0.1:8080");
    }

    #[test]
    fn an_upgrade_keeps_connection_and_upgrade() {
        let h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let proto = upgrade_protocol(&h);
        assert_eq!(proto.as_ref().unwrap(), "websocket");
        let out = request_headers(&h, proto.as_ref(), None, 1);
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert!(upgrade_protocol(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn response_headers_drop_hop_by_hop_unless_switching() {
        let h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "x"),
            ("transfer-encoding", "chunked"),
        ]);
        let plain = response_headers(&h, false);
        assert!(!plain.contains_key("upgrade"));
        assert!(!plain.contains_key("transfer-encoding"));
        let switched = response_headers(&h, true);
        assert_eq!(switched["upgrade"], "websocket");
        assert_eq!(switched["connection"], "upgrade");
        assert_eq!(switched["sec-websocket-accept"], "x");
    }

    fn core(source: ClientError) -> CoreError {
        CoreError::Agent {
            id: "sb-0123456789ab".parse().unwrap(),
            source,
        }
    }

    #[test]
    fn tunnel_failures_map_to_502_or_504_with_a_reason() {
        let agent = |message: &str| {
            core(ClientError::Agent {
                code: proto::ErrorCode::ConnectFailed,
                message: message.into(),
            })
        };
        let e = tunnel_error(
            agent(
                "cannot connect to 127.0.0.1:3000 in the guest: Connection refused (os error 111)",
            ),
            3000,
            "dev",
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            e.to_string(),
            "nothing is listening on port 3000 in sandbox 'dev'"
        );
        let e = tunnel_error(
            agent("connecting to 127.0.0.1:3000 in the guest timed out after 5s"),
            3000,
            "dev",
        );
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let e = tunnel_error(
            core(ClientError::Timeout {
                operation: "tunnel",
                after: Duration::from_secs(30),
            }),
            3000,
            "dev",
        );
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.to_string().contains("did not answer within 30s"), "{e}");
        let e = tunnel_error(
            core(ClientError::Closed {
                operation: "tunnel",
            }),
            3000,
            "dev",
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(
            e.to_string()
                .starts_with("cannot reach port 3000 in sandbox 'dev'"),
            "{e}"
        );
        let dead = CoreError::VmmExited {
            id: "sb-0123456789ab".parse().unwrap(),
            reason: "killed by signal 9".into(),
            serial_tail: String::new(),
        };
        let e = tunnel_error(dead, 3000, "dev");
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.to_string().contains("is dead"), "{e}");
        let e = ProxyError::BadTarget { target: "x".into() };
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bhatti_keys_are_recognised() {
        assert!(is_bhatti_key(&HeaderValue::from_static("Bearer bht_abc")));
        assert!(is_bhatti_key(&HeaderValue::from_static("bearer  bht_abc")));
        assert!(!is_bhatti_key(&HeaderValue::from_static("Bearer other")));
        assert!(!is_bhatti_key(&HeaderValue::from_static("Basic bht_abc")));
        assert!(!is_bhatti_key(&HeaderValue::from_static("garbage")));
    }
}
