//! Share links and the browser terminal: configuration (`[share]`),
//! tokens, the per-client-IP limit on token attempts, and the terminal
//! page's files, built into the binary (docs/clients.md).
//!
//! A share token (`bhs_` + 32 random bytes, hex) opens one sandbox's
//! terminal and nothing else. The store keeps only its SHA-256. The URL
//! carries it in the fragment (`/share/#t=…`), which browsers never send;
//! the page sends it in an `Authorization` header (`GET /share/info`) and
//! in the WebSocket's first message (`GET /share/ws`), so no request line
//! — the only part of a request the daemon's logs and metrics ever see,
//! as a route template — holds it.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::ratelimit::{Class, RateLimiter};

pub const TOKEN_PREFIX: &str = "bhs_";
/// Where the terminal page is, on the API listener.
pub const PAGE_PATH: &str = "/share/";

/// `[share]`: share links of sandboxes' browser terminals.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareConfig {
    /// A link's lifetime when `ttl_secs` is not given.
    pub default_ttl_secs: u64,
    /// The longest lifetime a link may ask for.
    pub max_ttl_secs: u64,
    /// Live links per sandbox.
    pub max_per_sandbox: u32,
    /// Token attempts (`GET /share/info`, `GET /share/ws`) per client IP
    /// (IPv6: per /64) per minute.
    pub attempts_per_min: u32,
    /// The base of the URLs links are given with (`https://bhatti.example.com`);
    /// empty: `http://` and the request's `Host`.
    pub base_url: String,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig {
            default_ttl_secs: 3600,
            max_ttl_secs: 7 * 24 * 3600,
            max_per_sandbox: 20,
            attempts_per_min: 60,
            base_url: String::new(),
        }
    }
}

impl ShareConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ttl_secs == 0 || self.default_ttl_secs == 0 {
            return Err("share.default_ttl_secs and share.max_ttl_secs must be at least 1".into());
        }
        if self.default_ttl_secs > self.max_ttl_secs {
            return Err("share.default_ttl_secs must not exceed share.max_ttl_secs".into());
        }
        // A year: expiry times stay far from any overflow.
        if self.max_ttl_secs > 366 * 24 * 3600 {
            return Err("share.max_ttl_secs must be at most 31622400 (366 days)".into());
        }
        if self.max_per_sandbox == 0 || self.attempts_per_min == 0 {
            return Err(
                "share.max_per_sandbox and share.attempts_per_min must be at least 1".into(),
            );
        }
        let b = &self.base_url;
        if !(b.is_empty() || b.starts_with("http://") || b.starts_with("https://")) {
            return Err("share.base_url must be empty or start with http:// or https://".into());
        }
        Ok(())
    }

    /// A request's lifetime, checked: 400 outside 1..=max.
    pub fn ttl(&self, asked: Option<u64>) -> Result<u64, ApiError> {
        match asked {
            None => Ok(self.default_ttl_secs),
            Some(t) if t >= 1 && t <= self.max_ttl_secs => Ok(t),
            Some(t) => Err(ApiError::BadRequest(format!(
                "ttl_secs {t} is out of range: 1 to {} (share.max_ttl_secs)",
                self.max_ttl_secs
            ))),
        }
    }

    /// The base of a link's URL for a request with these headers.
    pub fn base(&self, headers: &HeaderMap) -> String {
        if !self.base_url.is_empty() {
            return self.base_url.trim_end_matches('/').to_string();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .unwrap_or("127.0.0.1:8700");
        format!("http://{host}")
    }
}

/// A fresh token, shown to its maker once.
pub fn generate_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| ApiError::Internal(format!("no randomness for a share token: {e}")))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// What the store keeps of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` looks like one: the prefix and 64 hex digits. Anything
/// else is refused without a database read.
pub fn well_formed(token: &str) -> bool {
    token
        .strip_prefix(TOKEN_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Client addresses tracked before those whose buckets refilled are
/// forgotten.
const MAX_TRACKED: usize = 4096;

/// The per-client-IP limit on token attempts.
#[derive(Debug)]
pub struct ShareGuard {
    limiter: RateLimiter,
}

impl ShareGuard {
    pub fn new(config: &ShareConfig) -> ShareGuard {
        let n = config.attempts_per_min;
        ShareGuard {
            limiter: RateLimiter::new(n, n, n),
        }
    }

    /// Charges one attempt to `peer`'s address (IPv6: its /64).
    pub fn attempt(&self, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let key = crate::publish::client::limit_key(ip).to_string();
        self.limiter.prune_over(MAX_TRACKED);
        self.limiter
            .check(&key, Class::Read)
            .map_err(|retry_after| ApiError::RateLimited { retry_after })
    }
}

/// The Content-Security-Policy of the page's files: scripts, styles,
/// fonts, images and connections from the daemon only; no plugins, no
/// framing, no forms, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page's policy: [`CSP`], and `<style>` elements carrying this
/// answer's nonce. xterm.js writes its cell metrics and colours into
/// `<style>` elements it creates; the page's script gives each the nonce
/// (it reads it from the page). No inline script or style attribute runs.
pub fn page_csp(nonce: &str) -> String {
    CSP.replace(
        "style-src 'self';",
        &format!("style-src 'self' 'nonce-{nonce}';"),
    )
}

/// Where the page's HTML takes the nonce.
const NONCE_SLOT: &str = "__CSP_NONCE__";

/// One of the page's files.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The page and its files: ours from `web/share/`, xterm.js from
/// `web/vendor/` (copied from npm by `web/vendor.sh`, see web/README.md).
const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../../web/share/index.html"),
    },
    Asset {
        name: "term.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/share/term.js"),
    },
    Asset {
        name: "term.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../../web/share/term.css"),
    },
    Asset {
        name: "xterm.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/vendor/xterm.js"),
    },
    Asset {
        name: "xterm.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../../web/vendor/xterm.css"),
    },
    Asset {
        name: "addon-fit.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/vendor/addon-fit.js"),
    },
];

/// The headers every answer of the page and its files carries.
pub fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

/// The page (`name` empty) or one of its files; 404 for anything else.
pub fn asset(name: &str) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::NotFound(format!("no file '{name}' in the terminal page"))
            .into_response();
    };
    if a.name.is_empty() {
        return page(a.body);
    }
    let mut resp = a.body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    // Files change with the daemon: revalidated.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure_headers(h);
    resp
}

/// The page, with a fresh nonce in its HTML and its policy.
fn page(html: &[u8]) -> Response {
    let nonce = match crate::keys::random_hex(16) {
        Ok(n) => n,
        Err(e) => {
            return ApiError::Internal(format!("no randomness for a nonce: {e}")).into_response()
        }
    };
    let body = String::from_utf8_lossy(html).replace(NONCE_SLOT, &nonce);
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure_headers(h);
    if let Ok(v) = HeaderValue::from_str(&page_csp(&nonce)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_well_formed_and_hashed() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert!(well_formed(&a), "{a}");
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        for bad in [
            "",
            "bhs_",
            "bht_00",
            &a[..a.len() - 1],
            &format!("{a}0"),
            &a.replace("bhs_", "bhx_"),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn ttls_are_bounded() {
        let c = ShareConfig::default();
        assert_eq!(c.ttl(None).unwrap(), 3600);
        assert_eq!(c.ttl(Some(1)).unwrap(), 1);
        assert_eq!(c.ttl(Some(c.max_ttl_secs)).unwrap(), c.max_ttl_secs);
        assert!(c.ttl(Some(0)).is_err());
        assert!(c.ttl(Some(c.max_ttl_secs + 1)).is_err());
        let mut bad = c.clone();
        bad.default_ttl_secs = bad.max_ttl_secs + 1;
        assert!(bad.validate().is_err());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn link_bases_come_from_config_or_a_sane_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9000"));
        let mut c = ShareConfig::default();
        assert_eq!(c.base(&h), "http://127.0.0.1:9000");
        h.insert(header::HOST, HeaderValue::from_static("evil.com/x?"));
        assert_eq!(c.base(&h), "http://127.0.0.1:8700");
        c.base_url = "https://b.example.com/".into();
        assert_eq!(c.base(&h), "https://b.example.com");
    }

    #[test]
    fn every_asset_is_served_with_the_policy() {
        for name in [
            "term.js",
            "term.css",
            "xterm.js",
            "xterm.css",
            "addon-fit.js",
        ] {
            let r = asset(name);
            assert_eq!(r.status(), 200, "{name}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        }
        // The page: a nonce for styles, a new one each time.
        let (a, b) = (asset(""), asset(""));
        let csp = |r: &Response| {
            r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .to_string()
        };
        assert!(csp(&a).contains("style-src 'self' 'nonce-"), "{}", csp(&a));
        assert!(!csp(&a).contains("unsafe"), "{}", csp(&a));
        assert_ne!(csp(&a), csp(&b));
        assert_eq!(asset("../Cargo.toml").status(), 404);
    }
}
