//! HTTPS on the daemon's sockets: certificates from PEM files (rustls,
//! ring), checked at start (a missing or unreadable file, or a key that is
//! not the certificate's, stops the daemon naming the file), read again
//! when the files change (checked at each handshake) or on demand
//! (SIGHUP), and a short HTTP 400 for a client that speaks plain HTTP to
//! an HTTPS port.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// `[tls]` (the API socket) and `[publish.tls]` (the public proxy): both
/// files, or neither (plain HTTP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM: the server's certificate first, then
    /// its intermediates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The two files when TLS is on; `section` names the config section
    /// in the error when only one is set.
    pub fn files(&self, section: &str) -> Result<Option<(&Path, &Path)>, String> {
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) if !c.as_os_str().is_empty() && !k.as_os_str().is_empty() => {
                Ok(Some((c, k)))
            }
            _ => Err(format!(
                "{section}: set both cert_file and key_file (or neither, for plain HTTP)"
            )),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the TLS certificate file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("the TLS key file {path} holds no usable PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the TLS certificate file {path} is not a valid certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("the TLS key file {key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What a pair of files looked like when read: a change to either (a new
/// file renamed over it, or a write) makes them be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp([(u64, u64, i64, i64, u64); 2]);

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
    };
    Some(Stamp([one(cert)?, one(key)?]))
}

/// Reads and checks a certificate chain and its key.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::BadKey {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) => Ok(pair),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(pair),
        Err(e) => Err(TlsError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<Stamp>,
    pair: Arc<CertifiedKey>,
    /// The files as they were when reading them last failed: not tried
    /// again (nor logged again) until they change once more.
    failed: Option<Stamp>,
}

/// A certificate and key from files, served to every handshake and read
/// again when the files change.
#[derive(Debug)]
pub struct CertFiles {
    /// Names the socket in logs (`api`, `public`).
    name: &'static str,
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded>,
}

impl CertFiles {
    /// Reads the pair; any problem is an error naming the file.
    pub fn open(name: &'static str, cert: &Path, key: &Path) -> Result<Arc<CertFiles>, TlsError> {
        let stamp = stamp(cert, key);
        let pair = load_pair(cert, key)?;
        Ok(Arc::new(CertFiles {
            name,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            loaded: Mutex::new(Loaded {
                stamp,
                pair: Arc::new(pair),
                failed: None,
            }),
        }))
    }

    /// Reads the files again now (SIGHUP). On an error the certificate
    /// in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.cert, &self.key);
        let pair = load_pair(&self.cert, &self.key)?;
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        l.stamp = stamp;
        l.pair = Arc::new(pair);
        l.failed = None;
        tracing::info!(socket = self.name, cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// The pair to serve: read again first when the files changed since.
    fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.cert, &self.key);
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now != l.stamp && now != l.failed {
            match load_pair(&self.cert, &self.key) {
                Ok(pair) => {
                    l.pair = Arc::new(pair);
                    l.stamp = now;
                    l.failed = None;
                    tracing::info!(socket = self.name, cert = %self.cert.display(),
                        "TLS certificate files changed: reloaded");
                }
                Err(e) => {
                    // Half-written files (a certificate renewed before its
                    // key) are tried again once they change again.
                    l.failed = now;
                    tracing::warn!(socket = self.name, error = %e,
                        "TLS certificate files changed but cannot be used; keeping the previous certificate");
                }
            }
        }
        l.pair.clone()
    }

    /// A rustls server config serving this pair (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The certificates a daemon serves, to read again on SIGHUP.
#[derive(Debug, Clone, Default)]
pub struct TlsReloader(pub Vec<Arc<CertFiles>>);

impl TlsReloader {
    /// Reads every pair again; errors are logged and the old pair stays.
    pub fn reload_all(&self) {
        for c in &self.0 {
            if let Err(e) = c.reload() {
                tracing::error!(socket = c.name, error = %e,
                    "TLS reload failed; keeping the previous certificate");
            }
        }
    }
}

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// Requests a plain-HTTP client has sent that are read (and dropped)
/// before the answer, so that closing does not reset the connection
/// under the answer.
const PLAIN_DRAIN: usize = 16 * 1024;

/// What a plain-HTTP client gets from an HTTPS port.
pub fn plain_http_answer() -> Vec<u8> {
    let body = r#"{"error":"this port speaks HTTPS; use an https:// URL"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether a new connection is a TLS client (its first byte starts a
/// handshake), waiting up to `deadline` for that byte. One that starts
/// with anything else gets [`plain_http_answer`] and is closed: `false`,
/// as for one that closes without a byte.
pub async fn sniff(tcp: &mut TcpStream, deadline: Duration) -> io::Result<bool> {
    let first = tokio::time::timeout(deadline, async {
        let mut b = [0u8; 1];
        let n = tcp.peek(&mut b).await?;
        Ok::<_, io::Error>((n > 0).then_some(b[0]))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))??;
    match first {
        None => Ok(false),
        Some(TLS_HANDSHAKE) => Ok(true),
        Some(_) => {
            answer_plain(tcp).await;
            Ok(false)
        }
    }
}

/// A connection that is a TLS client gets the handshake, within
/// `deadline`; one that is not is answered (see [`sniff`]): `None`.
pub async fn accept<IO>(
    acceptor: &TlsAcceptor,
    mut tcp: TcpStream,
    wrap: impl FnOnce(TcpStream) -> IO,
    deadline: Duration,
) -> io::Result<Option<TlsStream<IO>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !sniff(&mut tcp, deadline).await? {
        return Ok(None);
    }
    tokio::time::timeout(deadline, acceptor.accept(wrap(tcp)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake took too long"))?
        .map(Some)
}

/// Reads the plain request's head (bounded, briefly), answers 400, closes.
async fn answer_plain(tcp: &mut TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while seen.len() < PLAIN_DRAIN {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tcp.write_all(&plain_http_answer()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// How many handshakes may be in progress on the API socket at once;
/// beyond it new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// How long a client of the API socket has to complete its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The API socket with TLS, for `axum::serve`: connections are accepted
/// and their handshakes done on tasks of their own (a slow client does
/// not hold others up); finished ones come out of [`accept`].
#[derive(Debug)]
pub struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting and closes the socket.
        self.task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match accept(&acceptor, tcp, |t| t, HANDSHAKE_DEADLINE).await {
                        Ok(Some(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready, task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither() {
        let c = TlsConfig::default();
        assert_eq!(c.files("tls").unwrap(), None);
        let c = TlsConfig {
            cert_file: Some("/c.pem".into()),
            key_file: None,
        };
        assert!(c.files("tls").unwrap_err().contains("tls: set both"));
    }

    #[test]
    fn the_plain_answer_is_well_formed() {
        let a = String::from_utf8(plain_http_answer()).unwrap();
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("https://"));
    }

    #[test]
    fn pairs_are_checked_and_reloaded_when_the_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (c1, k1) = make("one.test");
        let (c2, k2) = make("two.test");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        // Missing files are named.
        let e = CertFiles::open("t", &cert, &key).unwrap_err().to_string();
        assert!(e.contains("cert.pem"), "{e}");
        std::fs::write(&cert, &c1).unwrap();
        let e = CertFiles::open("t", &cert, &key).unwrap_err().to_string();
        assert!(e.contains("key.pem"), "{e}");
        // A key of another certificate.
        std::fs::write(&key, &k2).unwrap();
        let e = CertFiles::open("t", &cert, &key).unwrap_err().to_string();
        assert!(e.contains("does not match") && e.contains("key.pem"), "{e}");
        // Not PEM at all.
        std::fs::write(&key, "garbage").unwrap();
        let e = CertFiles::open("t", &cert, &key).unwrap_err().to_string();
        assert!(e.contains("key.pem"), "{e}");
        std::fs::write(&key, &k1).unwrap();
        let files = CertFiles::open("t", &cert, &key).unwrap();
        let first = files.current().cert[0].clone();
        // A half-renewed pair (new certificate, old key) keeps the old one.
        std::fs::write(&cert, &c2).unwrap();
        assert_eq!(files.current().cert[0], first);
        std::fs::write(&key, &k2).unwrap();
        let second = files.current().cert[0].clone();
        assert_ne!(second, first);
        assert_eq!(
            second.as_ref(),
            load_pair(&cert, &key).unwrap().cert[0].as_ref()
        );
    }
}
