//! Certificates from an ACME server (RFC 8555) with the TLS-ALPN-01
//! challenge (RFC 8737): the validation server opens a TLS connection to
//! the name on port 443 offering only `acme-tls/1`, and the socket that
//! serves the name answers it with a self-signed certificate carrying the
//! key authorization's digest. No other port is needed.
//!
//! - The API's names (`[acme] api_names`) are ordered at start; until the
//!   first certificate arrives the API's handshakes fail.
//! - Published aliases (`[acme] publish_aliases`, with `[publish]
//!   domain`) are ordered on demand: the first handshake naming
//!   `<alias>.<domain>` of an existing publication starts the order (that
//!   handshake fails; the next ones, once issued, succeed).
//! - Every `check_interval_secs` certificates within `renew_before_days`
//!   of expiry are ordered again and swapped in without a restart.
//! - The account and the certificates live under `DATA/acme/`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The ALPN protocol of TLS-ALPN-01 validation connections.
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How long a name whose order failed waits before it is ordered again.
const RETRY_FAILED: Duration = Duration::from_secs(60);

/// `[acme]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME server's directory (`https://…/directory`). Unset: ACME
    /// is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_url: Option<String>,
    /// Contacts for the account (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// PEM roots for the ACME server's own HTTPS, instead of the system's
    /// (a test CA such as pebble's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Names the API's certificate is for; the first is served to clients
    /// that send no (or another) name. Empty: the API's TLS is `[tls]`'s.
    pub api_names: Vec<String>,
    /// Certificates for `<alias>.<domain>` of published ports, ordered on
    /// demand (needs `[publish] domain`, and no `[publish.tls]` files).
    pub publish_aliases: bool,
    /// Certificates expiring within this many days are renewed.
    pub renew_before_days: u32,
    /// How often expiry is checked, seconds.
    pub check_interval_secs: u64,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory_url: None,
            contact: Vec::new(),
            ca_file: None,
            api_names: Vec::new(),
            publish_aliases: false,
            renew_before_days: 30,
            check_interval_secs: 3600,
        }
    }
}

impl AcmeConfig {
    pub fn enabled(&self) -> bool {
        self.directory_url.is_some()
    }

    pub fn validate(&self) -> Result<(), String> {
        let Some(url) = &self.directory_url else {
            if !self.api_names.is_empty() || self.publish_aliases {
                return Err(
                    "acme.api_names and acme.publish_aliases need acme.directory_url".into(),
                );
            }
            return Ok(());
        };
        if !url.starts_with("https://") {
            return Err(format!(
                "acme.directory_url '{url}': expected an https:// URL"
            ));
        }
        for n in &self.api_names {
            if !is_dns_name(n) {
                return Err(format!("acme.api_names: '{n}' is not a DNS name"));
            }
        }
        if self.check_interval_secs == 0 {
            return Err("acme.check_interval_secs must be at least 1".into());
        }
        Ok(())
    }
}

fn is_dns_name(n: &str) -> bool {
    let n = n.trim_end_matches('.');
    !n.is_empty()
        && n.len() <= 253
        && n.contains('.')
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("ACME: {0}")]
    Other(String),
    #[error("ACME storage {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate in use and when it expires (seconds since the epoch).
#[derive(Debug, Clone)]
struct Held {
    key: Arc<CertifiedKey>,
    not_after: i64,
}

/// Which socket a resolver serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Public,
}

/// Whether an alias has a publication (the public side orders only for
/// those).
pub type AliasCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What the sockets' resolvers and the ordering task share.
pub struct AcmeState {
    config: AcmeConfig,
    dir: PathBuf,
    /// `[publish] domain`, lowercase, when aliases are ordered.
    domain: Option<String>,
    alias_exists: AliasCheck,
    certs: RwLock<HashMap<String, Held>>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    wanted: Mutex<HashSet<String>>,
    failed: Mutex<HashMap<String, Instant>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for AcmeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeState")
            .field("dir", &self.dir)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A pair from PEM text; its expiry.
fn held_from_pem(chain: &[u8], key: &[u8]) -> Result<Held, String> {
    let certs = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let first = certs.first().ok_or("no certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| format!("certificate: {e}"))?;
    let not_after = parsed.validity().not_after.timestamp();
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key PEM: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("key: {e}"))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match()
        .map_err(|e| format!("key and certificate: {e}"))?;
    Ok(Held {
        key: Arc::new(pair),
        not_after,
    })
}

/// The TLS-ALPN-01 answer for `name`: self-signed, with the
/// `id-pe-acmeIdentifier` extension holding the key authorization's
/// SHA-256.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl AcmeState {
    /// The state over `DATA/acme`, with the certificates stored there
    /// loaded (one that does not load is ordered again).
    pub fn open(
        config: &AcmeConfig,
        data_dir: &Path,
        domain: Option<String>,
        alias_exists: AliasCheck,
    ) -> Result<Arc<AcmeState>, AcmeError> {
        let dir = data_dir.join("acme");
        let certs_dir = dir.join("certs");
        std::fs::create_dir_all(&certs_dir).map_err(|source| AcmeError::Io {
            path: certs_dir.clone(),
            source,
        })?;
        let mut certs = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&certs_dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "crt") {
                    let (Some(name), Ok(chain), Ok(key)) = (
                        path.file_stem()
                            .and_then(|s| s.to_str())
                            .map(str::to_string),
                        std::fs::read(&path),
                        std::fs::read(path.with_extension("key")),
                    ) else {
                        continue;
                    };
                    match held_from_pem(&chain, &key) {
                        Ok(h) => {
                            certs.insert(name, h);
                        }
                        Err(e) => tracing::warn!(path = %path.display(), error = %e,
                            "stored ACME certificate unusable; ordering it again"),
                    }
                }
            }
        }
        let state = Arc::new(AcmeState {
            config: config.clone(),
            dir,
            domain: domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase()),
            alias_exists,
            certs: RwLock::new(certs),
            challenges: Mutex::default(),
            wanted: Mutex::default(),
            failed: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        });
        for n in &config.api_names {
            state.want(&n.to_ascii_lowercase());
        }
        Ok(state)
    }

    /// Asks the ordering task for `name` (unless held, or failed lately).
    fn want(&self, name: &str) {
        if self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
        {
            return;
        }
        if lock(&self.failed)
            .get(name)
            .is_some_and(|t| t.elapsed() < RETRY_FAILED)
        {
            return;
        }
        if lock(&self.wanted).insert(name.to_string()) {
            self.wake.notify_one();
        }
    }

    fn held(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|h| h.key.clone())
    }

    /// The alias of `<alias>.<domain>`, when it is one.
    fn alias_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let domain = self.domain.as_deref()?;
        let alias = name.strip_suffix(domain)?.strip_suffix('.')?;
        (!alias.is_empty() && !alias.contains('.')).then_some(alias)
    }

    /// A resolver for one socket.
    pub fn resolver(self: &Arc<Self>, role: Role) -> Arc<AcmeResolver> {
        Arc::new(AcmeResolver {
            state: self.clone(),
            role,
        })
    }

    /// The rustls config of one socket (HTTP/1.1 and `acme-tls/1`).
    pub fn server_config(
        self: &Arc<Self>,
        role: Role,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver(role));
        config.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// Orders what is wanted and renews what is due, until the daemon
    /// stops (the task is aborted).
    pub async fn run(self: Arc<Self>) {
        let account = loop {
            match self.account().await {
                Ok(a) => break a,
                Err(e) => {
                    tracing::error!(error = %e, "ACME account unavailable; retrying in 30 s");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        };
        let every = Duration::from_secs(self.config.check_interval_secs.max(1));
        let mut next_check = tokio::time::Instant::now() + every;
        loop {
            let mut todo: Vec<String> = lock(&self.wanted).iter().cloned().collect();
            if tokio::time::Instant::now() >= next_check {
                next_check = tokio::time::Instant::now() + every;
                let due = now_secs() + i64::from(self.config.renew_before_days) * 86_400;
                let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
                todo.extend(
                    certs
                        .iter()
                        .filter(|(_, h)| h.not_after <= due)
                        .map(|(n, _)| n.clone()),
                );
            }
            todo.sort();
            todo.dedup();
            for name in todo {
                match self.issue(&account, &name).await {
                    Ok(()) => {
                        lock(&self.failed).remove(&name);
                    }
                    Err(e) => {
                        tracing::warn!(%name, error = %e, "ACME order failed");
                        lock(&self.failed).insert(name.clone(), Instant::now());
                    }
                }
                lock(&self.challenges).remove(&name);
                lock(&self.wanted).remove(&name);
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(next_check) => {}
            }
        }
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = || match &self.config.ca_file {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let path = self.dir.join("account.json");
        if let Ok(text) = std::fs::read(&path) {
            if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&text) {
                return Ok(builder()?.from_credentials(creds).await?);
            }
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let url = self.config.directory_url.clone().unwrap_or_default();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                url,
                None,
            )
            .await?;
        let text = serde_json::to_vec(&creds).map_err(|e| AcmeError::Other(e.to_string()))?;
        write_private(&path, &text)?;
        Ok(account)
    }

    /// One order for `name`, answered by TLS-ALPN-01; the certificate is
    /// stored and served from then on.
    async fn issue(&self, account: &Account, name: &str) -> Result<(), AcmeError> {
        tracing::info!(%name, "ACME: ordering a certificate");
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(AcmeError::Other(format!("authorization {other:?}"))),
                }
                let mut challenge = authz
                    .challenge(ChallengeType::TlsAlpn01)
                    .ok_or_else(|| AcmeError::Other("no tls-alpn-01 challenge offered".into()))?;
                let digest = challenge.key_authorization().digest();
                let answer = challenge_cert(name, digest.as_ref()).map_err(AcmeError::Other)?;
                lock(&self.challenges).insert(name.to_string(), answer);
                challenge.set_ready().await?;
            }
        }
        let status = order.poll_ready(&RetryPolicy::default()).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Other(format!("order {status:?}")));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&RetryPolicy::default()).await?;
        let held =
            held_from_pem(chain_pem.as_bytes(), key_pem.as_bytes()).map_err(AcmeError::Other)?;
        let certs_dir = self.dir.join("certs");
        write_private(&certs_dir.join(format!("{name}.key")), key_pem.as_bytes())?;
        write_private(&certs_dir.join(format!("{name}.crt")), chain_pem.as_bytes())?;
        tracing::info!(%name, not_after = held.not_after, "ACME: certificate issued");
        self.certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), held);
        Ok(())
    }
}

/// Writes a file only the daemon reads (0600), atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| AcmeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// One socket's certificate choice.
#[derive(Debug)]
pub struct AcmeResolver {
    state: Arc<AcmeState>,
    role: Role,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase);
        let validation = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if validation {
            return lock(&self.state.challenges).get(name.as_deref()?).cloned();
        }
        match self.role {
            Role::Api => {
                let names = &self.state.config.api_names;
                name.as_deref()
                    .filter(|n| names.iter().any(|a| a.eq_ignore_ascii_case(n)))
                    .and_then(|n| self.state.held(n))
                    .or_else(|| {
                        names
                            .iter()
                            .find_map(|n| self.state.held(&n.to_ascii_lowercase()))
                    })
            }
            Role::Public => {
                let name = name?;
                if let Some(held) = self.state.held(&name) {
                    return Some(held);
                }
                let alias = self.state.alias_of(&name)?;
                if (self.state.alias_exists)(alias) {
                    self.state.want(&name);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let mut c = AcmeConfig::default();
        c.validate().unwrap();
        c.api_names = vec!["api.example.com".into()];
        assert!(c.validate().unwrap_err().contains("directory_url"));
        c.directory_url = Some("http://acme.example/dir".into());
        assert!(c.validate().unwrap_err().contains("https://"));
        c.directory_url = Some("https://acme.example/dir".into());
        c.validate().unwrap();
        c.api_names = vec!["not a name".into()];
        assert!(c.validate().unwrap_err().contains("api_names"));
    }

    #[test]
    fn the_challenge_certificate_carries_the_digest() {
        let digest = [7u8; 32];
        let cert = challenge_cert("a.example.com", &digest).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("id-pe-acmeIdentifier");
        assert!(ext.critical);
        // An OCTET STRING of the 32 bytes.
        assert_eq!(&ext.value[2..], &digest);
    }
}
