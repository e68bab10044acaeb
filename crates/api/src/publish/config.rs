//! `[publish]`: the public proxy's socket, routing and limits.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{IpNet, TrustedProxies};

/// `[publish]` in the daemon's config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// The public proxy's socket (no API key; separate from `listen`).
    /// `""` or `"none"` turns the public proxy, and publishing, off.
    pub listen: String,
    /// When set (e.g. `preview.example.com`), a request whose Host is
    /// `<alias>.<domain>` goes to that publication with its path unchanged,
    /// and path routes (`/<alias>/…`) are off: every publication is its
    /// own origin. Unset: path routes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The base printed URLs start with (`https://preview.example.com`),
    /// when the proxy is reached through something else (TLS terminator,
    /// port mapping). Default: `http://<listen>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Public requests per minute per client IP address (token bucket,
    /// bursts of up to a minute's worth), separate from the API's limits.
    pub requests_per_min: u32,
    /// Sandboxes being woken (warm, cold or stopped) for public requests
    /// at once; a request that would wake one more gets a 503 with
    /// `Retry-After`. Requests for a sandbox already waking wait for it.
    pub max_concurrent_wakes: usize,
    /// Requests in flight per publication (bodies included); over it, 503.
    pub max_inflight: usize,
    /// How long a client may take to send a request's head (request line
    /// and headers), counted from when the connection is ready for it: a
    /// new connection, or an idle keep-alive one after its last answer.
    /// Over it, the connection is closed (slow-loris; idle keep-alive).
    pub header_read_timeout_secs: u64,
    /// Connections open on the public listener at once (upgraded ones,
    /// WebSockets, included). Beyond it a new connection gets a short 503
    /// and is closed at once.
    pub max_connections: usize,
    /// Connections open at once from one client address (an IPv6 client
    /// is its /64), so one client cannot take all of `max_connections`.
    /// Trusted proxies are exempt (they carry many clients).
    pub max_connections_per_ip: usize,
    /// Reverse proxies in front of the public listener (`"10.0.0.0/8"`,
    /// `"127.0.0.1"`, `"::1/128"`). A request from one of them is limited
    /// as the right-most address in its `X-Forwarded-For` that is not a
    /// trusted proxy; any other peer is limited as itself and its
    /// `X-Forwarded-*` headers are ignored (and replaced towards the
    /// guest).
    pub trusted_proxies: Vec<String>,
    /// `[publish.tls]`: HTTPS on the public socket.
    pub tls: PublishTlsConfig,
    /// Set by the daemon when `[acme] publish_aliases` makes the public
    /// socket speak HTTPS (not a config key).
    #[serde(skip)]
    pub acme_tls: bool,
}

/// `[publish.tls]`: the public proxy's certificate (one that covers
/// `*.<domain>` for host routes) and the plain-HTTP socket that redirects
/// to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishTlsConfig {
    /// The certificate chain, PEM (server certificate first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// A plain-HTTP socket whose every request is redirected (308) to the
    /// same host and path over HTTPS (`"0.0.0.0:80"`). `""` or `"none"`:
    /// no such socket.
    pub redirect_listen: String,
}

impl PublishTlsConfig {
    /// The certificate and key, as the API's `[tls]` has them.
    pub fn files(&self) -> crate::tls::TlsConfig {
        crate::tls::TlsConfig {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }

    /// The redirecting socket, or `None` when it is off.
    pub fn redirect_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.redirect_listen.trim() {
            "" | "none" => Ok(None),
            s => s
                .parse()
                .map(Some)
                .map_err(|e| format!("publish.tls.redirect_listen '{s}': {e}")),
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            listen: "127.0.0.1:8081".into(),
            domain: None,
            public_url: None,
            requests_per_min: 600,
            max_concurrent_wakes: 4,
            max_inflight: 64,
            header_read_timeout_secs: 10,
            max_connections: 1024,
            max_connections_per_ip: 128,
            trusted_proxies: Vec::new(),
            tls: PublishTlsConfig::default(),
            acme_tls: false,
        }
    }
}

impl PublishConfig {
    /// The public proxy's socket, or `None` when it is off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.listen.trim() {
            "" | "none" => Ok(None),
            s => s
                .parse()
                .map(Some)
                .map_err(|e| format!("publish.listen '{s}': {e}")),
        }
    }

    /// Whether the public socket speaks HTTPS (certificate files or ACME).
    pub fn https(&self) -> bool {
        self.tls.files().enabled() || self.acme_tls
    }

    /// Whether publishing is on.
    pub fn enabled(&self) -> bool {
        matches!(self.listen_addr(), Ok(Some(_)))
    }

    /// Checks every setting.
    pub fn validate(&self) -> Result<(), String> {
        self.listen_addr()?;
        if let Some(d) = &self.domain {
            check_domain(d)?;
        }
        if let Some(u) = &self.public_url {
            split_url(u)?;
        }
        if self.requests_per_min == 0 {
            return Err("publish.requests_per_min must be at least 1".into());
        }
        if self.max_concurrent_wakes == 0 || self.max_inflight == 0 {
            return Err(
                "publish.max_concurrent_wakes and publish.max_inflight must be at least 1".into(),
            );
        }
        if self.header_read_timeout_secs == 0 {
            return Err("publish.header_read_timeout_secs must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return Err(
                "publish.max_connections and publish.max_connections_per_ip must be at least 1"
                    .into(),
            );
        }
        self.trusted()?;
        self.tls.files().files("publish.tls")?;
        self.tls.redirect_addr()?;
        Ok(())
    }

    /// `trusted_proxies`, parsed.
    pub fn trusted(&self) -> Result<TrustedProxies, String> {
        let nets = self
            .trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .map_err(|e| format!("publish.trusted_proxies: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies::new(nets))
    }

    /// How long a request head may take.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs.max(1))
    }

    /// The domain, lowercase, without a trailing dot.
    pub fn domain(&self) -> Option<String> {
        self.domain
            .as_deref()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
    }

    /// The URL a publication is printed with: `<base>/<alias>/` (path
    /// route), or `<scheme>://<alias>.<domain>[:port]/` with a domain, the
    /// scheme and port taken from `public_url` (or `http` and the listen
    /// port).
    pub fn url_for(&self, alias: &str) -> String {
        self.url_with(Some(alias))
    }

    /// The public proxy's own base URL (no trailing slash): where it
    /// serves the browser terminal (`/share/`) — the domain itself when
    /// one is set.
    pub fn base_url(&self) -> String {
        self.url_with(None).trim_end_matches('/').to_string()
    }

    fn url_with(&self, alias: Option<&str>) -> String {
        let (scheme, authority, prefix) = match self.public_url.as_deref().map(split_url) {
            Some(Ok(parts)) => parts,
            _ => (
                if self.https() {
                    "https".to_string()
                } else {
                    "http".to_string()
                },
                self.listen.trim().to_string(),
                String::new(),
            ),
        };
        match self.domain() {
            Some(domain) => {
                let port = port_of(&authority)
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                match alias {
                    Some(alias) => format!("{scheme}://{alias}.{domain}{port}/"),
                    None => format!("{scheme}://{domain}{port}/"),
                }
            }
            None => match alias {
                Some(alias) => format!("{scheme}://{authority}{prefix}/{alias}/"),
                None => format!("{scheme}://{authority}{prefix}/"),
            },
        }
    }
}

/// The port of an authority (`host:port`, `[v6]:port`), if it has one.
fn port_of(authority: &str) -> Option<&str> {
    let (host, port) = authority.rsplit_once(':')?;
    let bracketed_v6 = host.starts_with('[') && host.ends_with(']');
    (!port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && (bracketed_v6 || !host.contains(':')))
    .then_some(port)
}

/// `scheme://authority[/prefix]` → (scheme, authority, prefix without a
/// trailing '/').
fn split_url(u: &str) -> Result<(String, String, String), String> {
    let bad = |why: &str| format!("publish.public_url '{u}': {why}");
    let (scheme, rest) = u
        .split_once("://")
        .ok_or_else(|| bad("expected http://… or https://…"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    if rest.contains(['?', '#']) || rest.contains(char::is_whitespace) {
        return Err(bad("no query, fragment or spaces"));
    }
    let (authority, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("a host is required (and no user info)"));
    }
    let prefix = if prefix == "/" { String::new() } else { prefix };
    Ok((scheme, authority.to_string(), prefix))
}

/// A domain for host routing: dot-separated DNS labels, leaving room for
/// an alias label in front.
fn check_domain(d: &str) -> Result<(), String> {
    let name = d.trim_end_matches('.');
    let bad = |why: &str| format!("publish.domain '{d}': {why}");
    if name.is_empty() || name.len() > 253 - 64 {
        return Err(bad(
            "must be 1-189 characters (an alias label goes in front)",
        ));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad("each label is 1-63 of letters, digits and inner '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut PublishConfig)) -> PublishConfig {
        let mut c = PublishConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn defaults_are_valid_and_on() {
        let c = PublishConfig::default();
        c.validate().unwrap();
        assert_eq!(
            c.listen_addr().unwrap(),
            Some("127.0.0.1:8081".parse().unwrap())
        );
        assert!(c.enabled());
        assert!(!with(|c| c.listen = String::new()).enabled());
        assert!(!with(|c| c.listen = "none".into()).enabled());
    }

    #[test]
    fn bad_settings_are_refused() {
        for (c, says) in [
            (with(|c| c.listen = "localhost".into()), "publish.listen"),
            (with(|c| c.domain = Some("a..b".into())), "publish.domain"),
            (with(|c| c.domain = Some("-a.b".into())), "publish.domain"),
            (with(|c| c.domain = Some("a_b.c".into())), "publish.domain"),
            (with(|c| c.domain = Some(String::new())), "publish.domain"),
            (
                with(|c| c.public_url = Some("ftp://x".into())),
                "public_url",
            ),
            (
                with(|c| c.public_url = Some("example.com".into())),
                "public_url",
            ),
            (
                with(|c| c.public_url = Some("http://x/?a".into())),
                "public_url",
            ),
            (
                with(|c| c.public_url = Some("http:///p".into())),
                "public_url",
            ),
            (with(|c| c.requests_per_min = 0), "requests_per_min"),
            (with(|c| c.max_concurrent_wakes = 0), "max_concurrent_wakes"),
            (with(|c| c.max_inflight = 0), "max_inflight"),
            (
                with(|c| c.header_read_timeout_secs = 0),
                "header_read_timeout_secs",
            ),
            (with(|c| c.max_connections = 0), "max_connections"),
            (
                with(|c| c.max_connections_per_ip = 0),
                "max_connections_per_ip",
            ),
            (
                with(|c| c.trusted_proxies = vec!["10.0.0.1/8".into()]),
                "trusted_proxies",
            ),
            (
                with(|c| c.trusted_proxies = vec!["proxy.example".into()]),
                "trusted_proxies",
            ),
        ] {
            let e = c.validate().unwrap_err();
            assert!(e.contains(says), "{c:?}: {e}");
        }
        with(|c| c.domain = Some("Preview.Example.com.".into()))
            .validate()
            .unwrap();
        with(|c| c.trusted_proxies = vec!["10.0.0.0/8".into(), "::1".into()])
            .validate()
            .unwrap();
    }

    #[test]
    fn urls() {
        let c = with(|c| c.listen = "127.0.0.1:40123".into());
        assert_eq!(c.url_for("myapp"), "http://127.0.0.1:40123/myapp/");
        let c = with(|c| c.public_url = Some("https://pv.example.com/".into()));
        assert_eq!(c.url_for("myapp"), "https://pv.example.com/myapp/");
        let c = with(|c| c.public_url = Some("https://example.com/preview/".into()));
        assert_eq!(c.url_for("myapp"), "https://example.com/preview/myapp/");
        let c = with(|c| {
            c.listen = "127.0.0.1:40123".into();
            c.domain = Some("Pv.Example.com".into());
        });
        assert_eq!(c.url_for("myapp"), "http://myapp.pv.example.com:40123/");
        let c = with(|c| {
            c.domain = Some("pv.example.com".into());
            c.public_url = Some("https://pv.example.com".into());
        });
        assert_eq!(c.url_for("myapp"), "https://myapp.pv.example.com/");
        let c = with(|c| {
            c.domain = Some("pv.example.com".into());
            c.public_url = Some("http://[::1]:9000".into());
        });
        assert_eq!(c.url_for("myapp"), "http://myapp.pv.example.com:9000/");
        assert_eq!(c.base_url(), "http://pv.example.com:9000");
        let c = with(|c| c.public_url = Some("https://example.com/preview/".into()));
        assert_eq!(c.base_url(), "https://example.com/preview");
        let c = with(|c| c.listen = "127.0.0.1:40123".into());
        assert_eq!(c.base_url(), "http://127.0.0.1:40123");
    }
}
