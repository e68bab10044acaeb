//! The public listener's connections: HTTP/1.1 with a deadline on every
//! request head (slow-loris, idle keep-alive), at most `max_connections`
//! open at once and `max_connections_per_ip` from one client address.
//! A connection over a cap is answered with a short 503 and closed at once,
//! so descriptors never pile up; an admitted one holds its slot for as long
//! as its socket lives (a WebSocket's too: the slot goes with the socket
//! into the upgrade).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::client::{limit_key, TrustedProxies};

/// What a connection over a cap reads before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-type: application/json\r\ncontent-length: 45\r\n\r\n{\"error\":\"too many connections; retry later\"}";

/// How long accepting pauses after an error that is not one connection's
/// (out of descriptors): a busy loop would not help.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Admission of connections: a total and a per-address cap.
#[derive(Debug)]
pub struct ConnLimits {
    total: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    trusted: TrustedProxies,
}

/// One admitted connection's slot; given back when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    _total: OwnedSemaphorePermit,
    ip: Option<IpAddr>,
    limits: Arc<ConnLimits>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut per = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(max: usize, per_ip_max: usize, trusted: TrustedProxies) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: Arc::new(Semaphore::new(max.max(1))),
            per_ip_max: per_ip_max.max(1),
            per_ip: Mutex::new(HashMap::new()),
            trusted,
        })
    }

    /// A slot for a connection from `peer`, or `None` over a cap. Trusted
    /// proxies count against the total only.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<ConnSlot> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        let ip = if self.trusted.trusts(peer) {
            None
        } else {
            let key = limit_key(peer);
            let mut per = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = per.entry(key).or_insert(0);
            if *n >= self.per_ip_max {
                return None;
            }
            *n += 1;
            Some(key)
        };
        Some(ConnSlot {
            _total: total,
            ip,
            limits: self.clone(),
        })
    }
}

/// A socket with its slot: the slot lasts exactly as long as the socket.
struct Admitted {
    tcp: TcpStream,
    _slot: ConnSlot,
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Errors of one connection that `accept` reports; the listener is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Resolves when `stop` turns true or its sender is gone.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: dropped here.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// How the listener serves.
#[derive(Clone)]
pub struct ListenConfig {
    pub header_read_timeout: Duration,
    pub limits: Arc<ConnLimits>,
    /// HTTPS: connections must start with a TLS handshake (done within
    /// `header_read_timeout`); a plain-HTTP one gets a short 400.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for ListenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenConfig")
            .field("header_read_timeout", &self.header_read_timeout)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A connection's stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Serves `app` on `listener` until `stop` turns true (or its sender is
/// dropped); then stops accepting, closes idle connections, lets requests
/// in flight finish and returns. Upgraded connections (WebSockets) live
/// on, each with its slot, until they close.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            // Err: the daemon dropped the sender; stop as well.
            () = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "public proxy: accept failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(slot) = config.limits.admit(peer.ip()) else {
            tracing::debug!(%peer, "public proxy: connection over the cap refused");
            // Best effort, never waits: the socket is closed right after.
            let _ = tcp.try_write(REFUSED);
            drop(tcp);
            continue;
        };
        // As on the API socket: without TCP_NODELAY a streamed response's
        // second small write waits for the client's delayed ACK (40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let inner = TowerToHyperService::new(app.clone());
        let service = hyper::service::service_fn(move |mut req| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            inner.call(req)
        });
        let mut stop = stop.clone();
        let http = http.clone();
        let tls = config.tls.clone();
        let deadline = config.header_read_timeout;
        conns.spawn(async move {
            let io: Box<dyn Io> = match tls {
                None => Box::new(Admitted { tcp, _slot: slot }),
                Some(acceptor) => {
                    let wrap = |tcp| Admitted { tcp, _slot: slot };
                    match crate::tls::accept(&acceptor, tcp, wrap, deadline).await {
                        Ok(Some(tls)) => Box::new(tls),
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "public TLS handshake failed");
                            return;
                        }
                    }
                }
            };
            let conn = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "public connection ended");
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_address() {
        let trusted = TrustedProxies::new(vec!["10.0.0.1".parse().unwrap()]);
        let l = ConnLimits::new(4, 2, trusted);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "a third from one address");
        let _b1 = l.admit(b).unwrap();
        // A trusted proxy is not held to the per-address cap…
        let _p1 = l.admit(proxy).unwrap();
        // …but to the total.
        assert!(l.admit(proxy).is_none());
        drop(a1);
        assert!(l.admit(b).is_some());
        // IPv6 clients count per /64.
        let l = ConnLimits::new(8, 1, TrustedProxies::default());
        let _v6 = l.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(l.admit("2001:db8::2".parse().unwrap()).is_none());
        assert!(l.admit("2001:db8:0:1::2".parse().unwrap()).is_some());
    }

    #[test]
    fn slots_are_given_back_and_forgotten() {
        let l = ConnLimits::new(2, 1, TrustedProxies::default());
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..5 {
            let s = l.admit(ip).unwrap();
            assert!(l.admit(ip).is_none());
            drop(s);
        }
        assert!(l.per_ip.lock().unwrap().is_empty());
        assert_eq!(l.total.available_permits(), 2);
    }

    #[test]
    fn the_refusal_is_well_formed() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains("too many connections"));
    }
}
