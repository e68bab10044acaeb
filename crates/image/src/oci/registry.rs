//! A client of the OCI distribution API: anonymous, basic (user and
//! password) or a given bearer token, and the bearer-token flow a `401`'s
//! `WWW-Authenticate` asks for. HTTPS unless the registry is marked
//! insecure. Manifest lists and indexes resolve to linux/<guest arch>;
//! every manifest and blob is checked against its digest and the byte
//! budget, and blobs go to the content-addressed cache (a blob already
//! there is not downloaded again).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use reqwest::StatusCode;

use super::blobs::digest_of;
use super::error::OciError;
use super::images::{OciImage, OciImages};
use super::import::{build_from_manifest, Limits, JSON_LIMIT};
use super::reference::{valid_digest, Reference};
use super::spec::{accept_header, Descriptor, Kind, ManifestOrIndex};

/// How to authenticate to the registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// None (public images; a token is still fetched if asked for).
    #[default]
    Anonymous,
    /// User and password: sent to the token endpoint, or as Basic auth.
    Basic {
        /// User.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer token, sent as is.
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Self::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// Options of a pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP (only for a registry explicitly marked insecure).
    pub insecure: bool,
    /// Credentials.
    pub credentials: Credentials,
    /// Byte budgets.
    pub limits: Limits,
    /// Which addresses the pull may connect to (registry, token realm,
    /// redirects); any when absent (an admin's pull on the server).
    pub addresses: Option<AddressPolicy>,
}

/// Decides which IP addresses a pull may connect to: a tenant's pull must
/// not reach the daemon host, its LAN or the cloud's metadata service.
/// Names are checked on every resolution (each connection resolves
/// through it, so a name cannot change its answer between check and use)
/// and literal addresses before every request and redirect.
#[derive(Clone)]
pub struct AddressPolicy(Arc<dyn Fn(IpAddr) -> Result<(), String> + Send + Sync>);

impl AddressPolicy {
    /// A policy answering `Err(why)` for an address it refuses.
    pub fn new(check: impl Fn(IpAddr) -> Result<(), String> + Send + Sync + 'static) -> Self {
        AddressPolicy(Arc::new(check))
    }

    /// Whether the pull may connect to `ip` (why not, if not).
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        (self.0)(ip)
    }

    /// Checks `url`'s host when it is a literal address (names are
    /// checked when resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), AddressRefused> {
        // The URL parser has normalised literal addresses (`0x7f.1` is
        // `127.0.0.1` here; IPv6 comes in brackets).
        let host = url.host_str().unwrap_or_default();
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        self.check(ip)
            .map_err(|why| AddressRefused(format!("{ip} ({why})")))
    }
}

impl std::fmt::Debug for AddressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressPolicy(..)")
    }
}

/// An address a pull may not connect to.
#[derive(Debug, thiserror::Error)]
#[error("{0}, an address pulls may not reach")]
pub struct AddressRefused(String);

/// Resolves names for a pull, keeping only the addresses its policy
/// allows.
struct PolicyResolver(AddressPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.get_or_insert_with(|| {
                            format!("{host} resolves to {} ({why})", a.ip())
                        });
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("{host} has no address"));
                return Err(
                    Box::new(AddressRefused(why)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The image manifest was resolved.
    Manifest {
        /// Its digest.
        digest: String,
        /// Number of layers.
        layers: usize,
        /// Bytes of the config and the layers, as the manifest declares
        /// them (what the pull downloads or finds cached).
        bytes: u64,
    },
    /// A blob was already cached.
    Cached {
        /// The blob.
        digest: String,
        /// Its size.
        size: u64,
    },
    /// A blob was downloaded and verified.
    Downloaded {
        /// The blob.
        digest: String,
        /// Its size.
        size: u64,
    },
    /// The root filesystem is being built.
    Building,
}

/// Pulls images into an [`OciImages`].
#[derive(Debug)]
pub struct Puller {
    client: reqwest::Client,
    images: OciImages,
    opts: PullOptions,
    /// The bearer token obtained (or given) so far.
    token: Option<String>,
    /// Blob bytes downloaded by this puller.
    pub downloaded_bytes: u64,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm=…`)
/// into its scheme and parameters.
pub fn parse_challenge(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((key, value));
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

impl Puller {
    /// A puller storing into `images`.
    pub fn new(images: OciImages, opts: PullOptions) -> Result<Self, OciError> {
        let insecure = opts.insecure;
        let addresses = opts.addresses.clone();
        let mut builder = reqwest::Client::builder();
        if let Some(policy) = &opts.addresses {
            builder = builder.dns_resolver(Arc::new(PolicyResolver(policy.clone())));
        }
        let client = builder
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::custom(move |a| {
                let refused = addresses.as_ref().and_then(|p| p.check_url(a.url()).err());
                if let Some(e) = refused {
                    a.error(e)
                } else if a.previous().len() >= 10 {
                    a.error("too many redirects")
                } else if a.url().scheme() != "https" && !insecure {
                    a.error("redirect to plain HTTP from a registry not marked insecure")
                } else {
                    a.follow()
                }
            }))
            .user_agent(concat!("bhatti/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Unreachable {
                registry: "-".into(),
                message: format!("cannot make an HTTP client: {e}"),
            })?;
        let token = match &opts.credentials {
            Credentials::Token(t) => Some(t.clone()),
            _ => None,
        };
        Ok(Self {
            client,
            images,
            opts,
            token,
            downloaded_bytes: 0,
        })
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if self.opts.insecure { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}/", r.api_host(), r.repository)
    }

    /// Refuses a literal address the policy does not allow.
    fn check_address(&self, r: &Reference, url: &reqwest::Url) -> Result<(), OciError> {
        match &self.opts.addresses {
            Some(p) => p.check_url(url).map_err(|e| OciError::AddressRefused {
                registry: r.registry.clone(),
                message: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn transport(r: &Reference, e: reqwest::Error) -> OciError {
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        let mut refused = None;
        while let Some(s) = src {
            if let Some(a) = s.downcast_ref::<AddressRefused>() {
                refused = Some(a.to_string());
            }
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        if let Some(message) = refused {
            return OciError::AddressRefused {
                registry: r.registry.clone(),
                message,
            };
        }
        OciError::Unreachable {
            registry: r.registry.clone(),
            message,
        }
    }

    fn auth_header(&self) -> Option<HeaderValue> {
        if let Some(t) = &self.token {
            return HeaderValue::from_str(&format!("Bearer {t}")).ok();
        }
        if let Credentials::Basic { username, password } = &self.opts.credentials {
            use base64_lite::encode;
            return HeaderValue::from_str(&format!(
                "Basic {}",
                encode(&format!("{username}:{password}"))
            ))
            .ok();
        }
        None
    }

    /// GET `url` with auth, answering one 401 challenge.
    async fn get(
        &mut self,
        r: &Reference,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, OciError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| OciError::Unreachable {
            registry: r.registry.clone(),
            message: format!("'{url}' is not a URL: {e}"),
        })?;
        self.check_address(r, &parsed)?;
        for attempt in 0..2 {
            let mut headers = HeaderMap::new();
            if let Some(a) = accept {
                headers.insert(ACCEPT, HeaderValue::from_str(a).expect("ascii"));
            }
            if let Some(h) = self.auth_header() {
                headers.insert(AUTHORIZATION, h);
            }
            let resp = self
                .client
                .get(url)
                .headers(headers)
                .send()
                .await
                .map_err(|e| Self::transport(r, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some((scheme, params)) if scheme == "bearer" => {
                    self.fetch_token(r, &params).await?;
                }
                Some((scheme, _))
                    if scheme == "basic"
                        && matches!(self.opts.credentials, Credentials::Basic { .. })
                        && self.token.is_none() =>
                {
                    // Basic credentials were sent and refused.
                    return Err(OciError::Unauthorized {
                        registry: r.registry.clone(),
                        message: "the user name or password is wrong".into(),
                    });
                }
                _ => {
                    return Err(OciError::Unauthorized {
                        registry: r.registry.clone(),
                        message: "authentication required (give --username/--password or --token)"
                            .into(),
                    })
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn fetch_token(
        &mut self,
        r: &Reference,
        params: &[(String, String)],
    ) -> Result<(), OciError> {
        let param = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let unauthorized = |message: String| OciError::Unauthorized {
            registry: r.registry.clone(),
            message,
        };
        let realm = param("realm")
            .ok_or_else(|| unauthorized("a Bearer challenge without a realm".into()))?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|_| unauthorized(format!("the token realm '{realm}' is not a URL")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.opts.insecure => {}
            _ => {
                return Err(unauthorized(format!(
                "the token realm '{realm}' is not HTTPS (mark the registry insecure to allow it)"
            )))
            }
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = param("service") {
                q.append_pair("service", s);
            }
            let scope = param("scope")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
            q.append_pair("scope", &scope);
        }
        self.check_address(r, &url)?;
        let mut req = self.client.get(url);
        if let Credentials::Basic { username, password } = &self.opts.credentials {
            req = req.basic_auth(username, Some(password));
        }
        let resp = req.send().await.map_err(|e| Self::transport(r, e))?;
        if !resp.status().is_success() {
            return Err(unauthorized(format!(
                "the token endpoint answered {}",
                resp.status().as_u16()
            )));
        }
        let body = read_body(r, resp, JSON_LIMIT, "token response").await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|source| OciError::Json {
            what: "token response".into(),
            error: source,
        })?;
        self.token = Some(
            t.token
                .or(t.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| unauthorized("the token endpoint gave no token".into()))?,
        );
        Ok(())
    }

    fn check_status(r: &Reference, resp: &reqwest::Response, what: &str) -> Result<(), OciError> {
        let s = resp.status();
        if s.is_success() {
            return Ok(());
        }
        Err(match s {
            StatusCode::NOT_FOUND => OciError::NotFound {
                registry: r.registry.clone(),
                what: what.to_owned(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::Unauthorized {
                registry: r.registry.clone(),
                message: format!("{} for {what}", s.as_u16()),
            },
            _ => OciError::Registry {
                registry: r.registry.clone(),
                status: s.as_u16(),
                what: what.to_owned(),
                message: s.canonical_reason().unwrap_or("").to_owned(),
            },
        })
    }

    /// Fetches manifest `reference` (tag or digest), verified when named by
    /// digest; returns it, its kind and its digest.
    async fn manifest(
        &mut self,
        r: &Reference,
        reference: &str,
        media_type: Option<&str>,
    ) -> Result<(ManifestOrIndex, Kind, String), OciError> {
        let url = format!("{}manifests/{reference}", self.base(r));
        let resp = self.get(r, &url, Some(&accept_header())).await?;
        let what = format!("manifest {}:{reference}", r.repository);
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(OciError::NotFound {
                registry: r.registry.clone(),
                what,
            });
        }
        Self::check_status(r, &resp, &what)?;
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(r, resp, JSON_LIMIT, &what).await?;
        let digest = digest_of(&body);
        if valid_digest(reference) && digest != reference {
            return Err(OciError::DigestMismatch {
                what,
                expected: reference.to_owned(),
                actual: digest,
            });
        }
        let ct = ct.as_deref().or(media_type);
        let (doc, kind) = ManifestOrIndex::parse(&body, ct)?;
        self.images.blobs().put(&digest, &what, &body, JSON_LIMIT)?;
        Ok((doc, kind, digest))
    }

    /// Downloads blob `d` into the cache unless it is there.
    async fn blob(
        &mut self,
        r: &Reference,
        d: &Descriptor,
        budget: &mut u64,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<(), OciError> {
        let blobs = self.images.blobs();
        if blobs.get(&d.digest, Some(d.size))?.is_some() {
            progress(PullEvent::Cached {
                digest: d.digest.clone(),
                size: d.size,
            });
            return Ok(());
        }
        let what = format!("blob {}", d.digest);
        if d.size > *budget {
            return Err(OciError::TooLarge {
                what,
                limit: *budget,
            });
        }
        let url = format!("{}blobs/{}", self.base(r), d.digest);
        let mut resp = self.get(r, &url, None).await?;
        Self::check_status(r, &resp, &what)?;
        // The descriptor's size is the most accepted; a shorter or altered
        // body fails the digest.
        let mut w = blobs.writer(&d.digest, &what, d.size)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| Self::transport(r, e))? {
            w.write(&chunk)?;
        }
        let n = w.written();
        w.finish()?;
        *budget -= n;
        self.downloaded_bytes += n;
        progress(PullEvent::Downloaded {
            digest: d.digest.clone(),
            size: n,
        });
        Ok(())
    }

    /// Pulls `r` as image `name`.
    pub async fn pull(
        &mut self,
        r: &Reference,
        name: &str,
        progress: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<OciImage, OciError> {
        super::images::validate_name(name)?;
        // Blobs found or written stay until the image is built from them.
        let _in_use = self.images.use_blobs()?;
        let arch = self.images.arch().name();
        let (mut doc, mut kind, mut digest) =
            self.manifest(r, r.manifest_reference(), None).await?;
        if kind == Kind::Index {
            let d = doc.pick(arch, &r.to_string())?.clone();
            let mt = (!d.media_type.is_empty()).then_some(d.media_type.clone());
            (doc, kind, digest) = self.manifest(r, &d.digest, mt.as_deref()).await?;
            if kind != Kind::Manifest {
                return Err(OciError::UnsupportedMediaType(
                    "an index inside an index".into(),
                ));
            }
        }
        progress(PullEvent::Manifest {
            digest: digest.clone(),
            layers: doc.layers.len(),
            bytes: doc
                .config
                .iter()
                .chain(&doc.layers)
                .fold(0u64, |n, d| n.saturating_add(d.size)),
        });
        let mut budget = self.opts.limits.download_bytes;
        let config = doc.config.clone().expect("parse checked");
        self.blob(r, &config, &mut budget, progress).await?;
        for l in doc.layers.clone() {
            self.blob(r, &l, &mut budget, progress).await?;
        }
        progress(PullEvent::Building);
        let images = self.images.clone();
        let limits = self.opts.limits;
        let source = r.to_string();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let blobs = images.blobs();
            build_from_manifest(&images, &name, &source, &digest, &doc, limits, |d, size| {
                blobs
                    .get(d, Some(size))?
                    .ok_or_else(|| OciError::BadDigest(d.to_owned()))
            })
        })
        .await
        .map_err(|e| OciError::Unreachable {
            registry: r.registry.clone(),
            message: format!("the build task failed: {e}"),
        })?
    }
}

async fn read_body(
    r: &Reference,
    mut resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, OciError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Puller::transport(r, e))? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(OciError::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

mod base64_lite {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard base64 with padding.
    pub(super) fn encode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            out.push(T[(n >> 18) as usize & 63] as char);
            out.push(T[(n >> 12) as usize & 63] as char);
            out.push(if c.len() > 1 {
                T[(n >> 6) as usize & 63] as char
            } else {
                '='
            });
            out.push(if c.len() > 2 {
                T[n as usize & 63] as char
            } else {
                '='
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        )
        .unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/debian:pull".into()),
            ]
        );
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!((s.as_str(), p[0].1.as_str()), ("basic", "Registry Realm"));
        assert_eq!(parse_challenge("Bearer realm=\"x").map(|_| ()), None);
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_lite::encode(i), o);
        }
    }

    #[test]
    fn credentials_do_not_print_secrets() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Token("sekrit".into())).contains("sekrit"));
    }
}
