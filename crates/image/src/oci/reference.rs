//! Image references: `[registry[:port]/]repository[:tag][@sha256:<hex>]`,
//! with Docker Hub's defaults (`docker.io`, `library/`, `latest`).

use std::fmt;

/// The registry a reference without one names.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The tag of a reference without tag or digest.
pub const DEFAULT_TAG: &str = "latest";

/// Why a reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference '{reference}': {reason}")]
pub struct ReferenceError {
    /// The text given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, …
    pub registry: String,
    /// `library/debian`, `org/app`, …
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest was given).
    pub tag: Option<String>,
    /// `sha256:<64 hex>`; when given it, not the tag, selects the manifest.
    pub digest: Option<String>,
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !is_alnum(b[0] as char) || !is_alnum(b[b.len() - 1] as char) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if is_alnum(c) {
            i += 1;
            continue;
        }
        // A separator run, then an alphanumeric must follow.
        let start = i;
        while i < b.len() && !is_alnum(b[i] as char) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

/// A registry host: `host[:port]`, host labels of `[A-Za-z0-9-]`, or a
/// bracketed IPv6 address.
fn valid_registry(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return false,
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(p) = port {
        if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return false;
        }
    }
    match host {
        None => true,
        Some(h) => {
            !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                })
        }
    }
}

fn valid_tag(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

/// Whether `s` is `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

impl Reference {
    /// Parses a reference.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let err = |reason| ReferenceError {
            reference: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(err("empty"));
        }
        if text.len() > 512 {
            return Err(err("longer than 512 characters"));
        }
        if text.contains("://") {
            return Err(err(
                "a reference has no scheme (write host/repo, not https://host/repo)",
            ));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return Err(err(
                        "the digest must be sha256: and 64 lowercase hex digits",
                    ));
                }
                (r, Some(d.to_owned()))
            }
            None => (text, None),
        };
        // The tag follows the last ':' after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if !valid_tag(tag) {
                    return Err(err(
                        "invalid tag (letters, digits, '_', '.', '-'; at most 128)",
                    ));
                }
                (&rest[..last_slash + i], Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(err("no repository name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[')
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                if !valid_registry(first) {
                    return Err(err("invalid registry host"));
                }
                (first.to_owned(), path.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if path.len() > 255 {
            return Err(err("repository longer than 255 characters"));
        }
        if !path.split('/').all(valid_component) {
            return Err(err(
                "invalid repository (lowercase letters, digits and single separators ._- between them)",
            ));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            _ => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host the registry API answers on (Docker Hub's differs from its
    /// name).
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What goes after `/manifests/`: the digest if any, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// A default local image name: the repository's last component.
    pub fn default_name(&self) -> String {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
            .to_owned()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("debian");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        let r = p("org/app:1.2");
        assert_eq!(r.repository, "org/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        assert_eq!(p("docker.io/debian:12").repository, "library/debian");
    }

    #[test]
    fn registries_ports_tags_digests() {
        let r = p("localhost:5000/a/b:v1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "a/b", Some("v1"))
        );
        assert_eq!(r.api_host(), "localhost:5000");
        let r = p("localhost/x");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );
        let r = p(&format!("ghcr.io/o/r@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.manifest_reference(), D);
        let r = p(&format!("127.0.0.1:5000/r:t@{D}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.manifest_reference(), D);
        let r = p("[::1]:5000/r");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(p("a__b/c-d--e.f").repository, "a__b/c-d--e.f");
        assert_eq!(p("ghcr.io/o/app:latest").default_name(), "app");
        // Round trip through Display.
        for s in ["docker.io/library/debian:latest", "localhost:5000/a/b:v1"] {
            assert_eq!(p(s).to_string(), s);
        }
    }

    #[test]
    fn malformed_is_a_typed_error() {
        for bad in [
            "",
            "Debian",
            "debian:",
            "debian:bad tag",
            "debian:-x",
            "debian@sha256:abc",
            "debian@md5:0123",
            "https://ghcr.io/o/r",
            "a//b",
            "a/b/",
            "/a",
            "a..b",
            "-a",
            "a-",
            "host:0/r",
            "host:99999/r",
            "host:port/r",
            "[zz]:5000/r",
            "local host/r",
            "r:t:t",
            ":tag",
            "ghcr.io/",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert_eq!(e.reference, bad);
            assert!(e.to_string().starts_with("invalid image reference"), "{e}");
        }
        assert!(Reference::parse(&"a".repeat(600)).is_err());
        assert!(Reference::parse(&format!("a:{}", "t".repeat(129))).is_err());
    }
}
