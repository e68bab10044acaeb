//! `[publish.tls] redirect_listen`: a plain-HTTP socket that sends every
//! request to the same host and path over HTTPS (308, so methods and
//! bodies are kept). Held to the same header timeout and connection caps
//! as the public socket.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::listener::{ConnLimits, ListenConfig};
use super::PublishConfig;
use crate::error::ApiError;

/// Where redirects point: the HTTPS port, when it is not 443.
#[derive(Debug, Clone)]
struct Target {
    port: Option<u16>,
}

/// The port HTTPS clients are sent to: `public_url`'s when it is an
/// `https://` URL, else the public socket's own; none for 443.
pub fn https_port(publish: &PublishConfig, bound: u16) -> Option<u16> {
    let from_url = publish.public_url.as_deref().and_then(|u| {
        let rest = u.strip_prefix("https://")?;
        let authority = rest.split('/').next()?;
        Some(
            authority
                .rsplit_once(':')
                .filter(|(h, _)| !h.contains(':') || h.ends_with(']'))
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .unwrap_or(443),
        )
    });
    Some(from_url.unwrap_or(bound)).filter(|p| *p != 443)
}

/// The host of a `Host` header, without its port; `None` unless it is a
/// plain name or address (no header injection into `Location`).
fn host_name(value: &str) -> Option<&str> {
    let host = if value.starts_with('[') {
        &value[..=value.find(']')?]
    } else {
        value.split(':').next()?
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    ok.then_some(host)
}

async fn redirect(State(t): State<Arc<Target>>, req: Request) -> Response {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_name)
    else {
        return ApiError::BadRequest("a Host header is required".into()).into_response();
    };
    let port = t.port.map(|p| format!(":{p}")).unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("https://{host}{port}{path}");
    match HeaderValue::from_str(&location) {
        Ok(v) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, v)]).into_response(),
        Err(_) => {
            ApiError::BadRequest("the request target cannot be redirected".into()).into_response()
        }
    }
}

/// Serves redirects on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    publish: &PublishConfig,
    https_port: Option<u16>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let config = ListenConfig {
        header_read_timeout: publish.header_read_timeout(),
        limits: ConnLimits::new(
            publish.max_connections,
            publish.max_connections_per_ip,
            publish.trusted().unwrap_or_default(),
        ),
        tls: None,
    };
    let app = Router::new()
        .fallback(redirect)
        .with_state(Arc::new(Target { port: https_port }));
    super::listener::serve(listener, app, config, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(host_name("a.example.com:8080"), Some("a.example.com"));
        assert_eq!(host_name("[::1]:80"), Some("[::1]"));
        assert_eq!(host_name("a b"), None);
        assert_eq!(host_name(""), None);
        let mut p = PublishConfig::default();
        assert_eq!(https_port(&p, 8443), Some(8443));
        assert_eq!(https_port(&p, 443), None);
        p.public_url = Some("https://pv.example.com".into());
        assert_eq!(https_port(&p, 8443), None);
        p.public_url = Some("https://pv.example.com:9443/x".into());
        assert_eq!(https_port(&p, 8443), Some(9443));
        p.public_url = Some("http://pv.example.com:9000".into());
        assert_eq!(https_port(&p, 8443), Some(8443));
    }
}
