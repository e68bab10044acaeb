//! The HTTP client of the bhatti API (docs/api.md): one method per route,
//! typed with `api_types`, every failure turned into the server's own
//! error message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api_types::{
    CreateSandbox, ErrorBody, ExecBody, Health, Listing, NewSecret, Sandbox, SecretSummary,
    SessionSummary, Written,
};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;

use crate::error::{CliError, Result};

/// A client bound to one server and (optionally) one API token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    /// The warning given when the server wants a newer CLI (once).
    too_old: Arc<OnceLock<String>>,
    /// The TLS settings of `https://` (and `wss://`) connections.
    tls: Arc<rustls::ClientConfig>,
    ca_file: Option<PathBuf>,
}

/// Whether this CLI (`mine`) is older than the server's minimum
/// (`min`, from `X-Bhatti-Min-Client`): the warning to give. Versions are
/// compared as `MAJOR.MINOR.PATCH` numbers (a pre-release suffix is
/// ignored); one that does not parse gives no warning.
pub fn min_version_warning(min: &str, mine: &str) -> Option<String> {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.trim().split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let v = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(v)
    }
    (parse(mine)? < parse(min)?).then(|| {
        format!(
            "warning: this bhatti CLI is {mine}; the server needs {min} or newer — some commands may fail. Upgrade the CLI."
        )
    })
}

/// The roots an `https://` server's certificate must chain to: the
/// system's (its CA bundle, `SSL_CERT_FILE` / `SSL_CERT_DIR`), plus every
/// certificate in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let bad = |reason: String| CliError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(bad("holds no PEM certificate".into()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Remote(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Why a connection failed, if it was the server's certificate: the
/// rustls reason (`UnknownIssuer`, `NotValidForName`, …).
pub fn untrusted_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::InvalidCertificate(c)) = err.downcast_ref::<rustls::Error>() {
            return Some(format!("{c:?}"));
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(rustls::Error::InvalidCertificate(c)) =
                inner.downcast_ref::<rustls::Error>()
            {
                return Some(format!("{c:?}"));
            }
        }
        let text = err.to_string();
        if let Some(at) = text.find("invalid peer certificate: ") {
            return Some(text[at + "invalid peer certificate: ".len()..].to_string());
        }
        cur = err.source();
    }
    None
}

/// Parses and checks a server URL: `http[s]://host[:port][/prefix]`.
pub fn parse_base_url(url: &str) -> Result<Url> {
    let bad = |reason: &str| CliError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let mut u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match u.scheme() {
        "http" | "https" => {}
        _ => return Err(bad("expected http://HOST:PORT or https://HOST[:PORT]")),
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("expected no query or fragment"));
    }
    // A trailing slash would make every route a double slash.
    let path = u.path().trim_end_matches('/').to_string();
    u.set_path(&path);
    Ok(u)
}

/// The message to show for a failed answer: the `{"error": …}` body when
/// there is one, else the status and what text came back.
pub fn error_message(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> String {
    let mut msg = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let reason = status.canonical_reason().unwrap_or("error");
            if text.is_empty() {
                format!("HTTP {} {reason}", status.as_u16())
            } else {
                let short: String = text.chars().take(300).collect();
                format!("HTTP {} {reason}: {short}", status.as_u16())
            }
        }
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(s) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) {
            msg.push_str(&format!(" (retry after {s}s)"));
        }
    }
    msg
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client> {
        Client::with_ca(url, token, None)
    }

    /// A client that also trusts the CA certificates in `ca_file` (PEM)
    /// for an `https://` server.
    pub fn with_ca(url: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<Client> {
        let base = parse_base_url(url)?;
        let tls = tls_config(ca_file)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tls_backend_preconfigured(tls.clone())
            .build()
            .map_err(|source| CliError::Request {
                url: url.to_string(),
                source,
            })?;
        Ok(Client {
            http,
            base,
            token,
            too_old: Arc::new(OnceLock::new()),
            tls: Arc::new(tls),
            ca_file: ca_file.map(Path::to_path_buf),
        })
    }

    /// The CA file given, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// Opens a WebSocket (`ws://`, or `wss://` with this client's TLS
    /// settings).
    pub async fn websocket(
        &self,
        url: &str,
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    > {
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector))
                .await
                .map_err(|e| {
                    if let Some(reason) = untrusted_reason(&e) {
                        return CliError::Untrusted {
                            url: self.base_str(),
                            reason,
                        };
                    }
                    crate::shell::ws_error(url, e)
                })?;
        Ok(ws)
    }

    /// The too-old warning, once a server asked for a newer CLI.
    pub fn too_old(&self) -> Option<&str> {
        self.too_old.get().map(String::as_str)
    }

    /// Warns (once, on stderr) when the answer's server wants a newer CLI.
    fn check_min_version(&self, headers: &HeaderMap) {
        if self.too_old.get().is_some() {
            return;
        }
        let Some(min) = headers
            .get(api_types::response_headers::MIN_CLIENT)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Some(w) = min_version_warning(min, env!("CARGO_PKG_VERSION")) {
            if self.too_old.set(w.clone()).is_ok() {
                eprintln!("{w}");
            }
        }
    }

    /// The server URL as the user would write it (no trailing slash).
    pub fn base_str(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    pub fn token(&self) -> Result<&str> {
        self.token.as_deref().ok_or(CliError::NoToken)
    }

    /// The base URL plus path segments, each percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        u.path_segments_mut()
            .expect("an http URL has path segments")
            .pop_if_empty()
            .extend(segments);
        u
    }

    fn request(&self, method: Method, url: Url, auth: bool) -> Result<RequestBuilder> {
        let rb = self.http.request(method, url);
        Ok(if auth {
            rb.header(AUTHORIZATION, format!("Bearer {}", self.token()?))
        } else {
            rb
        })
    }

    /// Sends, and turns refused connections and error statuses into
    /// `CliError`s carrying the server's message.
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
        self.check_min_version(resp.headers());
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        Err(CliError::Api {
            status: status.as_u16(),
            message: error_message(status, &headers, &body),
        })
    }

    /// A failure below HTTP: connection refused, reset, timed out.
    pub fn transport_error(&self, e: reqwest::Error) -> CliError {
        if let Some(reason) = untrusted_reason(&e) {
            return CliError::Untrusted {
                url: self.base_str(),
                reason,
            };
        }
        if e.is_connect() {
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = s.to_string();
                src = s.source();
            }
            CliError::Connect {
                url: self.base_str(),
                reason,
            }
        } else {
            CliError::Request {
                url: e
                    .url()
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| self.base_str()),
                source: e,
            }
        }
    }

    async fn json<T: DeserializeOwned>(&self, what: &'static str, resp: Response) -> Result<T> {
        let body = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&body).map_err(|source| CliError::Decode { what, source })
    }

    async fn get_json<T: DeserializeOwned>(&self, what: &'static str, url: Url) -> Result<T> {
        let resp = self.send(self.request(Method::GET, url, true)?).await?;
        self.json(what, resp).await
    }

    /// `GET /health` (no token).
    pub async fn health(&self) -> Result<Health> {
        let rb = self
            .request(Method::GET, self.url(&["health"]), false)?
            .timeout(Duration::from_secs(5));
        let resp = self.send(rb).await?;
        self.json("GET /health", resp).await
    }

    pub async fn list(&self) -> Result<Vec<Sandbox>> {
        self.get_json("GET /sandboxes", self.url(&["sandboxes"]))
            .await
    }

    pub async fn get(&self, name: &str) -> Result<Sandbox> {
        self.get_json("GET /sandboxes/:id", self.url(&["sandboxes", name]))
            .await
    }

    /// `POST /sandboxes`: the sandbox, and whether it is new (201) rather
    /// than an existing one of that name (200).
    pub async fn create(&self, body: &CreateSandbox) -> Result<(Sandbox, bool)> {
        let rb = self
            .request(Method::POST, self.url(&["sandboxes"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        let created = resp.status() == StatusCode::CREATED;
        Ok((self.json("POST /sandboxes", resp).await?, created))
    }

    /// `POST /sandboxes/:id/stop` or `/start[?force=true]`.
    pub async fn lifecycle(&self, name: &str, action: &str, force: bool) -> Result<Sandbox> {
        let mut url = self.url(&["sandboxes", name, action]);
        if force {
            url.set_query(Some("force=true"));
        }
        let resp = self.send(self.request(Method::POST, url, true)?).await?;
        self.json("POST /sandboxes/:id/stop|start", resp).await
    }

    /// `PATCH /sandboxes/:id`.
    pub async fn patch(&self, name: &str, body: &api_types::PatchSandbox) -> Result<Sandbox> {
        let rb = self
            .request(Method::PATCH, self.url(&["sandboxes", name]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("PATCH /sandboxes/:id", resp).await
    }

    /// `POST /sandboxes/:id/publish`.
    pub async fn publish(
        &self,
        name: &str,
        body: &api_types::PublishPort,
    ) -> Result<api_types::Published> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["sandboxes", name, "publish"]),
                true,
            )?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/publish", resp).await
    }

    /// `POST /sandboxes/:id/share`.
    pub async fn share(
        &self,
        name: &str,
        body: &api_types::CreateShare,
    ) -> Result<api_types::ShareCreated> {
        let rb = self
            .request(Method::POST, self.url(&["sandboxes", name, "share"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/share", resp).await
    }

    /// `GET /sandboxes/:id/shares`.
    pub async fn shares(&self, name: &str) -> Result<Vec<api_types::Share>> {
        let rb = self.request(Method::GET, self.url(&["sandboxes", name, "shares"]), true)?;
        let resp = self.send(rb).await?;
        self.json("GET /sandboxes/:id/shares", resp).await
    }

    /// `DELETE /sandboxes/:id/shares/:share_id`.
    pub async fn revoke_share(&self, name: &str, id: &str) -> Result<()> {
        let url = self.url(&["sandboxes", name, "shares", id]);
        self.send(self.request(Method::DELETE, url, true)?)
            .await
            .map(drop)
    }

    /// A page path of the daemon (`/share/#t=…`) under this client's
    /// server URL (its scheme, host and any prefix).
    pub fn page_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    /// `DELETE /sandboxes/:id/publish/:port`.
    pub async fn unpublish(&self, name: &str, port: u16) -> Result<()> {
        let url = self.url(&["sandboxes", name, "publish", &port.to_string()]);
        self.send(self.request(Method::DELETE, url, true)?)
            .await
            .map(drop)
    }

    pub async fn destroy(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, self.url(&["sandboxes", name]), true)?;
        self.send(rb).await.map(drop)
    }

    /// `POST /sandboxes/:id/exec`, its output collected.
    pub async fn exec(&self, name: &str, body: &ExecBody) -> Result<api_types::ExecResult> {
        let rb = self
            .request(Method::POST, self.url(&["sandboxes", name, "exec"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/exec", resp).await
    }

    /// `POST /sandboxes/:id/exec` asking for an NDJSON stream.
    pub async fn exec_stream(&self, name: &str, body: &ExecBody) -> Result<Response> {
        let rb = self
            .request(Method::POST, self.url(&["sandboxes", name, "exec"]), true)?
            .header(ACCEPT, "application/x-ndjson")
            .json(body);
        self.send(rb).await
    }

    /// `GET /events[?…]`, with `follow=true` the open NDJSON stream.
    pub async fn events(&self, query: &[(&str, String)], follow: bool) -> Result<Response> {
        let mut url = self.url(&["events"]);
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
            if follow {
                q.append_pair("follow", "true");
            }
        }
        self.send(self.request(Method::GET, url, true)?).await
    }

    /// `GET /admin/status`.
    pub async fn admin_status(&self) -> Result<api_types::AdminStatus> {
        self.get_json("GET /admin/status", self.url(&["admin", "status"]))
            .await
    }

    /// `GET /events` as a list.
    pub async fn event_list(&self, query: &[(&str, String)]) -> Result<Vec<api_types::Event>> {
        let resp = self.events(query, false).await?;
        self.json("GET /events", resp).await
    }

    /// `GET /sandboxes/:id/ports` (wakes the sandbox).
    pub async fn ports(&self, name: &str) -> Result<api_types::PortList> {
        self.get_json(
            "GET /sandboxes/:id/ports",
            self.url(&["sandboxes", name, "ports"]),
        )
        .await
    }

    pub async fn sessions(&self, name: &str) -> Result<Vec<SessionSummary>> {
        self.get_json(
            "GET /sandboxes/:id/sessions",
            self.url(&["sandboxes", name, "sessions"]),
        )
        .await
    }

    /// `GET /sandboxes/:id/files?path=…`: the answer, for its body stream
    /// and headers.
    pub async fn read_file(
        &self,
        name: &str,
        path: &str,
        offset: Option<u64>,
        limit: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Result<Response> {
        let mut url = self.url(&["sandboxes", name, "files"]);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("path", path);
            for (k, v) in [
                ("offset", offset),
                ("limit", limit),
                ("max_bytes", max_bytes),
            ] {
                if let Some(v) = v {
                    q.append_pair(k, &v.to_string());
                }
            }
        }
        self.send(self.request(Method::GET, url, true)?).await
    }

    pub async fn list_dir(&self, name: &str, path: &str) -> Result<Listing> {
        let mut url = self.url(&["sandboxes", name, "files"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("ls", "true");
        self.get_json("GET /sandboxes/:id/files?ls=true", url).await
    }

    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        mode: Option<u32>,
        data: Vec<u8>,
    ) -> Result<Written> {
        let mut url = self.url(&["sandboxes", name, "files"]);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("path", path);
            if let Some(m) = mode {
                q.append_pair("mode", &format!("{m:04o}"));
            }
        }
        let rb = self
            .request(Method::PUT, url, true)?
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data);
        let resp = self.send(rb).await?;
        self.json("PUT /sandboxes/:id/files", resp).await
    }

    pub async fn secrets(&self) -> Result<Vec<SecretSummary>> {
        self.get_json("GET /secrets", self.url(&["secrets"])).await
    }

    pub async fn set_secret(&self, body: &NewSecret) -> Result<SecretSummary> {
        let rb = self
            .request(Method::POST, self.url(&["secrets"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /secrets", resp).await
    }

    pub async fn volumes(&self) -> Result<Vec<api_types::Volume>> {
        self.get_json("GET /volumes", self.url(&["volumes"])).await
    }

    pub async fn volume(&self, name: &str) -> Result<api_types::Volume> {
        self.get_json("GET /volumes/:name", self.url(&["volumes", name]))
            .await
    }

    pub async fn create_volume(&self, body: &api_types::CreateVolume) -> Result<api_types::Volume> {
        let rb = self
            .request(Method::POST, self.url(&["volumes"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /volumes", resp).await
    }

    pub async fn grow_volume(&self, name: &str, size_mb: u64) -> Result<api_types::Volume> {
        let rb = self
            .request(Method::PATCH, self.url(&["volumes", name]), true)?
            .json(&api_types::PatchVolume { size_mb });
        let resp = self.send(rb).await?;
        self.json("PATCH /volumes/:name", resp).await
    }

    pub async fn clone_volume(&self, source: &str, name: &str) -> Result<api_types::Volume> {
        let rb = self
            .request(Method::POST, self.url(&["volumes", source, "clone"]), true)?
            .json(&api_types::CloneVolume {
                name: name.to_string(),
            });
        let resp = self.send(rb).await?;
        self.json("POST /volumes/:name/clone", resp).await
    }

    /// `GET /volumes/:name/archive`: the answer, for its body stream.
    pub async fn export_volume(&self, name: &str) -> Result<Response> {
        let rb = self.request(Method::GET, self.url(&["volumes", name, "archive"]), true)?;
        self.send(rb).await
    }

    /// `PUT /volumes/:name/archive` of the `len` bytes of `file`, streamed.
    pub async fn import_volume(
        &self,
        name: &str,
        file: std::fs::File,
        len: u64,
    ) -> Result<api_types::Volume> {
        let rb = self
            .request(Method::PUT, self.url(&["volumes", name, "archive"]), true)?
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(file_body(file));
        let resp = self.send(rb).await?;
        self.json("PUT /volumes/:name/archive", resp).await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, self.url(&["volumes", name]), true)?;
        self.send(rb).await.map(drop)
    }

    pub async fn checkpoints(&self) -> Result<Vec<api_types::Checkpoint>> {
        self.get_json("GET /checkpoints", self.url(&["checkpoints"]))
            .await
    }

    pub async fn checkpoint(&self, name: &str) -> Result<api_types::Checkpoint> {
        self.get_json("GET /checkpoints/:name", self.url(&["checkpoints", name]))
            .await
    }

    pub async fn create_checkpoint(
        &self,
        sandbox: &str,
        body: &api_types::CreateCheckpoint,
    ) -> Result<api_types::Checkpoint> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["sandboxes", sandbox, "checkpoints"]),
                true,
            )?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/checkpoints", resp).await
    }

    pub async fn restore(
        &self,
        sandbox: &str,
        body: &api_types::RestoreSandbox,
    ) -> Result<api_types::Sandbox> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["sandboxes", sandbox, "restore"]),
                true,
            )?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/restore", resp).await
    }

    pub async fn fork(
        &self,
        sandbox: &str,
        body: &api_types::ForkSandbox,
    ) -> Result<Vec<api_types::Sandbox>> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["sandboxes", sandbox, "fork"]),
                true,
            )?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/fork", resp).await
    }

    pub async fn warm_image(
        &self,
        image: &str,
        body: &api_types::WarmImage,
    ) -> Result<api_types::Template> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["images", image, "templates"]),
                true,
            )?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /images/:name/templates", resp).await
    }

    pub async fn images(&self) -> Result<Vec<api_types::ImageInfo>> {
        self.get_json("GET /images", self.url(&["images"])).await
    }

    pub async fn image(&self, name: &str) -> Result<api_types::ImageInfo> {
        self.get_json("GET /images/:name", self.url(&["images", name]))
            .await
    }

    pub async fn pull_image(&self, body: &api_types::PullImage) -> Result<api_types::Task> {
        let rb = self
            .request(Method::POST, self.url(&["images", "pull"]), true)?
            .json(body);
        let resp = self.send(rb).await?;
        self.json("POST /images/pull", resp).await
    }

    /// `POST /images/import?name=` of the `len` bytes of `file`, streamed.
    pub async fn import_image(
        &self,
        name: &str,
        file: std::fs::File,
        len: u64,
    ) -> Result<api_types::Task> {
        let mut url = self.url(&["images", "import"]);
        url.query_pairs_mut().append_pair("name", name);
        let rb = self
            .request(Method::POST, url, true)?
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(file_body(file));
        let resp = self.send(rb).await?;
        self.json("POST /images/import", resp).await
    }

    pub async fn save_image(&self, sandbox: &str, name: &str) -> Result<api_types::Task> {
        let rb = self
            .request(
                Method::POST,
                self.url(&["sandboxes", sandbox, "save"]),
                true,
            )?
            .json(&api_types::SaveImage {
                name: name.to_owned(),
            });
        let resp = self.send(rb).await?;
        self.json("POST /sandboxes/:id/save", resp).await
    }

    pub async fn delete_image(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, self.url(&["images", name]), true)?;
        self.send(rb).await.map(drop)
    }

    /// `POST` (share) or `DELETE` (unshare) `/images/:name/share[?owner=]`.
    pub async fn share_image(
        &self,
        name: &str,
        owner: Option<&str>,
        share: bool,
    ) -> Result<api_types::ImageInfo> {
        let mut url = self.url(&["images", name, "share"]);
        if let Some(o) = owner {
            url.query_pairs_mut().append_pair("owner", o);
        }
        let method = if share { Method::POST } else { Method::DELETE };
        let resp = self.send(self.request(method, url, true)?).await?;
        self.json("POST|DELETE /images/:name/share", resp).await
    }

    pub async fn task(&self, id: &str) -> Result<api_types::Task> {
        self.get_json("GET /tasks/:id", self.url(&["tasks", id]))
            .await
    }

    pub async fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, self.url(&["checkpoints", name]), true)?;
        self.send(rb).await.map(drop)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, self.url(&["secrets", name]), true)?;
        self.send(rb).await.map(drop)
    }

    /// The `ws://` (`wss://` for an https server) URL of a raw TCP
    /// tunnel to `port` in a sandbox.
    pub fn tunnel_url(&self, name: &str, port: u16) -> Url {
        self.ws_url(self.url(&["sandboxes", name, "tunnel", &port.to_string()]))
    }

    /// The `ws://` (`wss://`) URL of a sandbox's shell.
    pub fn shell_url(&self, name: &str) -> Url {
        self.ws_url(self.url(&["sandboxes", name, "ws"]))
    }

    fn ws_url(&self, mut u: Url) -> Url {
        let scheme = if u.scheme() == "https" { "wss" } else { "ws" };
        u.set_scheme(scheme)
            .expect("http(s) and ws(s) are all special schemes");
        u
    }
}

/// A file as a request body, streamed in 256 KiB reads.
fn file_body(file: std::fs::File) -> reqwest::Body {
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 << 10];
        match std::io::Read::read(&mut file, &mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    reqwest::Body::wrap_stream(chunks)
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:8700").unwrap().as_str(),
            "http://127.0.0.1:8700/"
        );
        assert_eq!(parse_base_url("http://h:1/api/").unwrap().path(), "/api");
        assert!(matches!(
            parse_base_url("127.0.0.1:8700"),
            Err(CliError::BadUrl { .. })
        ));
        assert_eq!(parse_base_url("https://h").unwrap().as_str(), "https://h/");
        assert!(parse_base_url("ftp://h").is_err());
        let c = Client::new("https://h:1/api", None).unwrap();
        assert_eq!(
            c.shell_url("demo").as_str(),
            "wss://h:1/api/sandboxes/demo/ws"
        );
        let e = Client::with_ca("https://h", None, Some(Path::new("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(parse_base_url("http://h/?x=1").is_err());
    }

    #[test]
    fn route_urls_encode_segments() {
        let c = Client::new("http://h:1/", None).unwrap();
        assert_eq!(
            c.url(&["sandboxes", "demo", "exec"]).as_str(),
            "http://h:1/sandboxes/demo/exec"
        );
        assert_eq!(
            c.url(&["sandboxes", "a/b c"]).as_str(),
            "http://h:1/sandboxes/a%2Fb%20c"
        );
        let c = Client::new("http://h:1/api", None).unwrap();
        assert_eq!(c.url(&["health"]).as_str(), "http://h:1/api/health");
        assert_eq!(
            c.shell_url("demo").as_str(),
            "ws://h:1/api/sandboxes/demo/ws"
        );
        assert!(matches!(c.token(), Err(CliError::NoToken)));
    }

    #[test]
    fn error_messages_prefer_the_servers_words() {
        let h = HeaderMap::new();
        assert_eq!(
            error_message(
                StatusCode::NOT_FOUND,
                &h,
                br#"{"error":"no sandbox named x"}"#
            ),
            "no sandbox named x"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, &h, b""),
            "HTTP 502 Bad Gateway"
        );
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, &h, b"  boom\n"),
            "HTTP 500 Internal Server Error: boom"
        );
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            error_message(
                StatusCode::TOO_MANY_REQUESTS,
                &h,
                br#"{"error":"rate limited"}"#
            ),
            "rate limited (retry after 7s)"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refused_connection_names_the_url() {
        // A port that was just bound and released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}"), Some("bht_x".into())).unwrap();
        let e = c.list().await.unwrap_err();
        assert!(matches!(e, CliError::Connect { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("cannot connect to http://127.0.0.1:{port}: ")),
            "{msg}"
        );
        assert!(msg.contains("bhatti serve"), "{msg}");
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn versions_older_than_the_minimum_warn() {
        let w = |min, mine| min_version_warning(min, mine);
        assert!(w("0.2.0", "0.1.9").unwrap().contains("needs 0.2.0"));
        assert!(w("1.0.0", "0.99.99").is_some());
        assert!(w("0.10.0", "0.9.0").is_some(), "numeric, not text");
        for (min, mine) in [
            ("0.1.0", "0.1.0"),
            ("0.1.0", "0.2.0"),
            ("0.9.0", "0.10.0"),
            ("0.1.0", "0.1.1-dev"),
            ("garbage", "0.1.0"),
            ("0.1", "0.0.1"),
            ("0.1.0.0", "0.0.1"),
            ("", "0.0.1"),
        ] {
            assert_eq!(w(min, mine), None, "{min} vs {mine}");
        }
    }

    /// Answers one request on a loopback port with `headers` and a
    /// `/health` body.
    async fn one_answer(headers: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = r#"{"status":"ok","version":"9.9.9","engine":"fake","accelerator":"none","engine_reason":"test"}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
        });
        url
    }

    #[tokio::test]
    async fn a_server_that_needs_a_newer_cli_gets_a_warning_and_an_answer() {
        let url = one_answer("x-bhatti-min-client: 999.0.0\r\n").await;
        let c = Client::new(&url, None).unwrap();
        let h = c.health().await.unwrap();
        assert_eq!(h.version, "9.9.9");
        assert!(
            c.too_old().unwrap().contains("999.0.0"),
            "{:?}",
            c.too_old()
        );
        // Positive control: a server content with this CLI gives none.
        let url = one_answer(concat!(
            "x-bhatti-min-client: ",
            env!("CARGO_PKG_VERSION"),
            "\r\n"
        ))
        .await;
        let c = Client::new(&url, None).unwrap();
        c.health().await.unwrap();
        assert_eq!(c.too_old(), None);
    }
}
