//! Starting the daemon: store, secrets, engine, recovery, listener, and a
//! graceful shutdown.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::DaemonConfig;
use crate::ratelimit::RateLimiter;
use crate::secrets::SecretBox;
use crate::service::Service;
use crate::state::AppState;
use crate::tls::{CertFiles, TlsReloader};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM layer failed to start: {0}")]
    Vms(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("serving failed")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A daemon bound to its address, ready to serve.
#[derive(Debug)]
pub struct Daemon {
    pub state: AppState,
    listener: tokio::net::TcpListener,
    /// Tells endless streams the daemon is shutting down.
    closing: tokio::sync::watch::Sender<bool>,
    /// The public proxy's socket (`[publish] listen`), unless it is off.
    public: Option<tokio::net::TcpListener>,
    /// The certificates of the API socket (`[tls]`) and the public one
    /// (`[publish.tls]`), when they speak HTTPS.
    api_tls: Option<Arc<CertFiles>>,
    public_tls: Option<Arc<CertFiles>>,
    /// `[publish.tls] redirect_listen`: plain HTTP redirected to HTTPS.
    redirect: Option<tokio::net::TcpListener>,
    /// `[acme]`: certificates ordered for the API and published aliases.
    acme: Option<Arc<crate::acme::AcmeState>>,
}

/// How long requests in flight on the public proxy (event streams,
/// WebSockets) may take to finish after shutdown begins.
const PUBLIC_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long API requests in flight (streamed execs, shells, downloads)
/// may take to finish after shutdown begins; then the VM layer shuts
/// down under them and their streams end.
const API_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

impl Daemon {
    /// Opens everything and binds the listener; nothing is served yet.
    pub async fn start(config: DaemonConfig) -> Result<Daemon, ServeError> {
        Daemon::open(config, None).await
    }

    /// [`Daemon::start`] with the VM engine given rather than chosen from
    /// `config.engine`: for tests, which hand in `vmm::fake::FakeEngine`
    /// (its guests are `lohar serve` processes on the host). The daemon
    /// itself never uses it.
    pub async fn start_with_engine(
        config: DaemonConfig,
        engine: impl vmm::Engine + 'static,
    ) -> Result<Daemon, ServeError> {
        Daemon::open(config, Some(Box::new(engine))).await
    }

    async fn open(
        mut config: DaemonConfig,
        engine: Option<Box<dyn vmm::Engine>>,
    ) -> Result<Daemon, ServeError> {
        config
            .validate()
            .map_err(|e| ServeError::Vms(e.to_string()))?;
        // Certificates first: a bad file stops the daemon before it
        // touches anything.
        let (api_tls, public_tls) = open_tls(&config)?;
        config.publish.acme_tls =
            config.acme.enabled() && config.acme.publish_aliases && config.publish.enabled();
        // The data dir is the daemon's alone (0700, even if it existed):
        // disks, memory files, console logs and the database are nobody
        // else's business (docs/security.md).
        image::private_dir(&config.data_dir).map_err(|e| ServeError::DataDir {
            path: config.data_dir.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let store = Arc::new(store::Store::open(&config.db_path())?);
        let secrets = Arc::new(SecretBox::open(&config.data_dir.join("secrets.key"))?);
        let acme = if config.acme.enabled() {
            let aliases = store.clone();
            let exists: crate::acme::AliasCheck =
                Arc::new(move |alias| matches!(aliases.publication_by_alias(alias), Ok(Some(_))));
            Some(
                crate::acme::AcmeState::open(
                    &config.acme,
                    &config.data_dir,
                    config.publish.domain(),
                    exists,
                )
                .map_err(|e| ServeError::Config(e.to_string()))?,
            )
        } else {
            None
        };
        let limiter = Arc::new(RateLimiter::new(
            config.limits.creates_per_min,
            config.limits.execs_per_min,
            config.limits.reads_per_min,
        ));
        let public = bind_public(&mut config).await?;
        let redirect = bind_redirect(&config).await?;
        let config = Arc::new(config);
        let service = Service::start(config.clone(), store.clone(), secrets.clone(), engine)
            .await
            .map_err(|e| ServeError::Vms(crate::error::error_chain(&e)))?;
        let health = service.health();
        let listener = bind(config.listen).await?;
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        Ok(Daemon {
            closing,
            state: AppState {
                shares: Arc::new(crate::share::ShareGuard::new(&config.share)),
                config,
                store,
                secrets,
                limiter,
                health,
                service: Arc::new(service),
                auth_cache: Arc::default(),
                closing: closing_rx,
                followers: Arc::default(),
                e2b: Arc::default(),
            },
            listener,
            public,
            api_tls,
            public_tls,
            redirect,
            acme,
        })
    }

    /// Whether the API socket speaks HTTPS.
    pub fn api_tls(&self) -> bool {
        self.api_tls.is_some() || self.api_acme()
    }

    fn api_acme(&self) -> bool {
        self.acme.is_some() && !self.state.config.acme.api_names.is_empty()
    }

    /// Whether the public socket speaks HTTPS.
    pub fn public_tls(&self) -> bool {
        self.public.is_some() && self.state.config.publish.https()
    }

    /// The redirecting plain-HTTP socket's address, when it is on.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Reads every certificate again when called (SIGHUP).
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader(
            self.api_tls
                .iter()
                .chain(self.public_tls.iter())
                .cloned()
                .collect(),
        )
    }

    /// The public proxy's address, when it is on.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets
    /// in-flight requests finish, and shuts the VM layer down.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let service = self.state.service.clone();
        let (stop_public, stopped) = tokio::sync::watch::channel(false);
        let api_acme = self.api_acme();
        let public_tls = match (&self.public_tls, &self.acme) {
            (Some(c), _) => Some(tokio_rustls::TlsAcceptor::from(c.server_config()?)),
            (None, Some(acme)) if self.state.config.publish.acme_tls => {
                Some(tokio_rustls::TlsAcceptor::from(
                    acme.server_config(crate::acme::Role::Public)
                        .map_err(ServeError::Config)?,
                ))
            }
            _ => None,
        };
        let api_tls = match (&self.api_tls, &self.acme) {
            (Some(c), _) => Some(c.server_config()?),
            (None, Some(acme)) if api_acme => Some(
                acme.server_config(crate::acme::Role::Api)
                    .map_err(ServeError::Config)?,
            ),
            _ => None,
        };
        let ordering = self.acme.clone().map(|acme| tokio::spawn(acme.run()));
        let redirect = match (self.redirect, self.public.as_ref()) {
            (Some(listener), Some(public)) => {
                let bound = public.local_addr().map_err(ServeError::Serve)?.port();
                let port = crate::publish::redirect::https_port(&self.state.config.publish, bound);
                let publish = self.state.config.publish.clone();
                let stopped = stopped.clone();
                Some(tokio::spawn(async move {
                    crate::publish::redirect::serve(listener, &publish, port, stopped).await
                }))
            }
            _ => None,
        };
        let public = self.public.map(|listener| {
            let state = crate::publish::public::PublicState::new(&self.state);
            tokio::spawn(crate::publish::public::serve(
                listener, state, public_tls, stopped,
            ))
        });
        let (began, mut beginning) = tokio::sync::watch::channel(false);
        let closing = self.closing;
        let shutdown = async move {
            shutdown.await;
            // Event streams end now, not at the drain's deadline.
            closing.send_replace(true);
            // send fails only when the public proxy is off or gone.
            let _ = stop_public.send(true);
            let _ = began.send(true);
        };
        let app = crate::routes::router(self.state);
        // Peer addresses for the proxy's X-Forwarded-For.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        // Without TCP_NODELAY a streamed response's head and body go out
        // as two small writes and the second waits for the client's
        // delayed ACK (40 ms): every proxied request would pay it.
        let serving: std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>,
        > = match api_tls {
            None => {
                let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                });
                Box::pin(
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .into_future(),
                )
            }
            Some(server_config) => {
                // TCP_NODELAY is set at accept; the no-op tap gives
                // the listener axum's peer-address plumbing.
                let listener = crate::tls::TlsListener::new(self.listener, server_config)
                    .map_err(ServeError::Serve)?;
                let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
                Box::pin(
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .into_future(),
                )
            }
        };
        // Requests in flight get API_DRAIN to finish; an endless stream
        // (exec of `yes`, a shell left open) must not hold shutdown up.
        let drained = async move {
            let _ = beginning.wait_for(|began| *began).await;
            tokio::time::sleep(API_DRAIN).await;
        };
        tokio::select! {
            served = serving => served.map_err(ServeError::Serve)?,
            () = drained => tracing::warn!(
                "API requests still open after {API_DRAIN:?}; shutting down under them"
            ),
        }
        if let Some(mut task) = public {
            match tokio::time::timeout(PUBLIC_DRAIN, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "the public proxy failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "the public proxy task failed"),
                Err(_) => {
                    tracing::warn!(
                        "public requests still open after {PUBLIC_DRAIN:?}; closing them"
                    );
                    task.abort();
                }
            }
        }
        if let Some(task) = ordering {
            task.abort();
        }
        if let Some(task) = redirect {
            if tokio::time::timeout(PUBLIC_DRAIN, task).await.is_err() {
                tracing::warn!("redirect requests still open after {PUBLIC_DRAIN:?}");
            }
        }
        service.shutdown().await;
        Ok(())
    }
}

/// A socket's certificate, when it speaks HTTPS.
type SocketCerts = Option<Arc<CertFiles>>;

/// The certificates of `[tls]` and `[publish.tls]`, read and checked.
fn open_tls(config: &DaemonConfig) -> Result<(SocketCerts, SocketCerts), ServeError> {
    let open = |name, c: &crate::tls::TlsConfig, section| match c
        .files(section)
        .map_err(ServeError::Config)?
    {
        Some((cert, key)) => Ok::<_, ServeError>(Some(CertFiles::open(name, cert, key)?)),
        None => Ok(None),
    };
    let api = open("api", &config.tls, "tls")?;
    let public = if config.publish.enabled() {
        open("public", &config.publish.tls.files(), "publish.tls")?
    } else {
        None
    };
    Ok((api, public))
}

/// Binds `[publish.tls] redirect_listen`, when the public proxy is on and
/// speaks HTTPS.
async fn bind_redirect(
    config: &DaemonConfig,
) -> Result<Option<tokio::net::TcpListener>, ServeError> {
    if !config.publish.enabled() || !config.publish.https() {
        return Ok(None);
    }
    let Some(addr) = config
        .publish
        .tls
        .redirect_addr()
        .map_err(ServeError::Config)?
    else {
        return Ok(None);
    };
    let listener = bind(addr).await?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "public HTTP → HTTPS redirect listening");
    Ok(Some(listener))
}

/// How long a bind waits for an address that is still in use.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr`, waiting up to [`BIND_RETRY`] while it is in use. A daemon
/// killed while it was starting a child (between fork and exec, the child
/// holds copies of the daemon's sockets) leaves its listeners bound for a
/// moment after it died; the daemon restarted at once must not give up.
async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    let started = std::time::Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < BIND_RETRY =>
            {
                tracing::warn!(%addr, "address in use; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            r => return r.map_err(|source| ServeError::Bind { addr, source }),
        }
    }
}

/// Binds the public proxy's socket, if `[publish]` has one, and writes the
/// bound address back (port 0 becomes the real port, which printed URLs
/// then carry).
async fn bind_public(
    config: &mut DaemonConfig,
) -> Result<Option<tokio::net::TcpListener>, ServeError> {
    let Some(addr) = config.publish.listen_addr().map_err(ServeError::Config)? else {
        return Ok(None);
    };
    let listener = bind(addr).await?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    config.publish.listen = bound.to_string();
    tracing::info!(%bound, "public proxy listening");
    Ok(Some(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bind_waits_for_an_address_freed_soon_and_gives_up_on_one_held() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        // Held past the retry window: the error names the address.
        let err = bind(addr).await.unwrap_err();
        assert!(
            matches!(err, ServeError::Bind { addr: a, .. } if a == addr),
            "{err}"
        );
        // Freed while the bind waits: it succeeds.
        let freer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let listener = bind(addr).await.unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        freer.join().unwrap();
    }
}
