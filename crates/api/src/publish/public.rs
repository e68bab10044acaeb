//! The public proxy: its own socket, no API key. A request is routed to a
//! publication (by host or path, see [`super::route`]), admitted (per
//! client IP rate limit, a cap on sandboxes waking at once, a cap on
//! requests in flight per publication), its sandbox woken and the request
//! forwarded by [`Service::public_proxy`] (the same path, and the same
//! keep-hot mark, as the authenticated proxy) to the published port —
//! never to any other port: the port comes from the publication, not from
//! the request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::client::{limit_key, TrustedProxies};
use super::gate::{Inflight, WakeGate};
use super::listener::{ConnLimits, ListenConfig};
use super::route::{route, Route};
use crate::config::DaemonConfig;
use crate::error::ApiError;
use crate::ratelimit::{Class, RateLimiter};
use crate::service::Service;
use crate::state::{blocking, AppState};

/// What a caller over a cap is told to wait, seconds.
const RETRY_AFTER_SECS: u64 = 1;
/// How often rate-limit buckets of clients gone quiet are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the public proxy's handler shares.
#[derive(Debug, Clone)]
pub struct PublicState {
    service: Arc<Service>,
    store: Arc<store::Store>,
    config: Arc<DaemonConfig>,
    limiter: Arc<RateLimiter>,
    wakes: Arc<WakeGate>,
    inflight: Arc<Inflight>,
    trusted: TrustedProxies,
    /// The daemon's state, for the browser terminal (`/share/…`, `bhatti
    /// publish --shell`).
    app: AppState,
}

impl PublicState {
    /// The public proxy's state over the daemon's service and store, with
    /// limits of its own from `[publish]`.
    pub fn new(app: &AppState) -> PublicState {
        let p = &app.config.publish;
        PublicState {
            service: app.service.clone(),
            store: app.store.clone(),
            config: app.config.clone(),
            limiter: Arc::new(RateLimiter::new(
                p.requests_per_min,
                p.requests_per_min,
                p.requests_per_min,
            )),
            wakes: Arc::new(WakeGate::new(p.max_concurrent_wakes)),
            inflight: Arc::new(Inflight::new(p.max_inflight)),
            // Checked with the rest of the configuration at start.
            trusted: p.trusted().unwrap_or_default(),
            app: app.clone(),
        }
    }
}

/// Every path and method goes to one handler.
pub fn router(state: PublicState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Serves the public proxy on `listener` until `stop` turns true (or its
/// sender is dropped), then lets requests in flight finish. Connections
/// are held to `[publish]`'s header-read timeout and connection caps
/// ([`super::listener`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: PublicState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limiter = state.limiter.clone();
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tick.tick().await;
            limiter.prune();
        }
    });
    let p = &state.config.publish;
    let config = ListenConfig {
        header_read_timeout: p.header_read_timeout(),
        limits: ConnLimits::new(
            p.max_connections,
            p.max_connections_per_ip,
            state.trusted.clone(),
        ),
        tls,
    };
    let served = super::listener::serve(listener, router(state), config, stop).await;
    pruner.abort();
    served
}

/// A JSON error with `Retry-After`.
fn unavailable(message: String) -> Response {
    let mut resp = ApiError::Unavailable(message).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

fn not_found(message: String) -> Response {
    ApiError::NotFound(message).into_response()
}

/// Errors of waking a sandbox, as the public sees them: no internals (the
/// sandbox's name, its owner, the VMM's complaint) — those are logged.
fn wake_error(alias: &str, e: ApiError) -> Response {
    tracing::warn!(%alias, error = %e, "public request: the sandbox is not available");
    match e {
        ApiError::NotFound(_) => not_found(format!("no publication '{alias}'")),
        ApiError::RateLimited { .. } | ApiError::Unavailable(_) => {
            unavailable(format!("'{alias}' is not available right now; retry later"))
        }
        _ => ApiError::BadGateway(format!("the sandbox behind '{alias}' could not be started"))
            .into_response(),
    }
}

/// The host a request names: its `Host` header, or the authority of an
/// absolute-form target.
fn host_of(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

async fn handle(State(s): State<PublicState>, req: Request) -> Response {
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        // The listener always sets it.
        return ApiError::Internal("no peer address".into()).into_response();
    };
    // Limited as the real client: behind a trusted proxy, the one it
    // forwards for; otherwise the peer, whatever its headers claim.
    let client = limit_key(s.trusted.client(peer, req.headers()));
    if let Err(retry_after) = s.limiter.check(&client.to_string(), Class::Read) {
        return ApiError::RateLimited { retry_after }.into_response();
    }
    let host = host_of(&req);
    let domain = s.config.publish.domain();
    if super::route::is_share(host.as_deref(), domain.as_deref(), req.uri().path()) {
        return crate::routes::share::public(req, s.app.clone()).await;
    }
    let routed = route(
        host.as_deref(),
        domain.as_deref(),
        req.uri().path(),
        req.uri().query(),
    );
    let (alias, target, prefix) = match routed {
        Route::Unknown => return not_found("no published service here".into()),
        Route::Redirect { alias, location } => (alias, Err(location), None),
        Route::Publication {
            alias,
            path_and_query,
            prefix,
        } => (alias, Ok(path_and_query), prefix),
    };
    let publication = {
        let store = s.store.clone();
        let a = alias.clone();
        match blocking(move || store.publication_by_alias(&a)).await {
            Ok(Some(p)) => p,
            Ok(None) => return not_found(format!("no publication '{alias}'")),
            Err(e) => return e.into_response(),
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(location) => {
            let mut resp = StatusCode::PERMANENT_REDIRECT.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return resp;
        }
    };
    let Some(slot) = s.inflight.enter(&publication.id) else {
        return unavailable(format!("'{alias}' has too many requests in flight"));
    };
    // Requests that must wake the sandbox take a wake permit (shared by
    // all requests waking the same one) for as long as the wake takes.
    let waking = if s.service.needs_wake(&publication.sandbox_id) {
        match s.wakes.enter(&publication.sandbox_id) {
            Some(p) => Some(p),
            None => {
                return unavailable(format!(
                    "too many sandboxes are waking; retry '{alias}' shortly"
                ))
            }
        }
    } else {
        None
    };
    // Where the guest's paths are for the caller; never the caller's word.
    // Nor who the caller is: X-Forwarded-* as this proxy vouches for them.
    let mut req = req;
    let own_proto = if s.config.publish.https() {
        "https"
    } else {
        "http"
    };
    let forwarded = s.trusted.forwarded_as(peer, req.headers(), own_proto);
    req.extensions_mut().insert(forwarded);
    let forwarded_prefix = header::HeaderName::from_static("x-forwarded-prefix");
    req.headers_mut().remove(&forwarded_prefix);
    if let Some(v) = prefix
        .as_deref()
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        req.headers_mut().insert(forwarded_prefix, v);
    }
    // The alias, not the sandbox's name, goes into error messages. The
    // slot lasts as long as the exchange: until the body has been sent,
    // or an upgraded connection closes.
    match s
        .service
        .public_proxy(&publication, waking, req, &target, &alias, slot)
        .await
    {
        Ok(mut resp) => {
            // Path routes share one origin: the guest's cookies stay under
            // its prefix, nothing widens to the origin (super::origin).
            super::origin::confine(resp.headers_mut(), prefix.as_deref());
            resp
        }
        Err(e) => wake_error(&alias, e),
    }
}
