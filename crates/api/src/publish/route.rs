//! Which publication a public request is for: by host (`<alias>.<domain>`,
//! when a domain is configured; then only so) or, without a domain, by the
//! first path segment (`/<alias>/rest…`, the guest sees `/rest…`). Pure,
//! so every case is a unit test.

use super::alias;

/// Where a public request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the publication `alias`, with this request target in the guest;
    /// `prefix` is the path the guest's paths are under for the caller
    /// (`/<alias>` on a path route, none on a host route).
    Publication {
        alias: String,
        path_and_query: String,
        prefix: Option<String>,
    },
    /// `/<alias>` without the slash: to `/<alias>/` (relative links in the
    /// guest's pages resolve under the alias only then).
    Redirect { alias: String, location: String },
    /// Names no possible publication.
    Unknown,
}

/// The host part of a `Host` header, lowercased, without a port or a
/// trailing dot.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let h = if h.starts_with('[') {
        // An IPv6 literal never names an alias.
        h
    } else {
        h.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(name, _)| name)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Routes a request: `host` is its `Host` header, `domain` the configured
/// one (lowercase, no leading dot), `path` the raw (still percent-encoded)
/// path and `query` the raw query.
///
/// With a domain, a host `<label>.<domain>` routes to that alias and the
/// path is kept; anything else (a host deeper under the domain, the domain
/// itself, an IP address, no host) is unknown: path routes are off, so
/// that every publication is its own origin. Without a domain, the first
/// path segment picks the publication, whatever the host.
pub fn route(host: Option<&str>, domain: Option<&str>, path: &str, query: Option<&str>) -> Route {
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    if let Some(domain) = domain {
        let name = host.map(host_name).unwrap_or_default();
        let Some(label) = name
            .strip_suffix(domain)
            .and_then(|rest| rest.strip_suffix('.'))
        else {
            return Route::Unknown;
        };
        if label.contains('.') || alias::validate(label).is_err() {
            return Route::Unknown;
        }
        let path = if path.is_empty() { "/" } else { path };
        return Route::Publication {
            alias: label.to_string(),
            path_and_query: format!("{path}{query}"),
            prefix: None,
        };
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Route::Unknown;
    };
    let (segment, tail) = match rest.split_once('/') {
        Some((s, t)) => (s, Some(t)),
        None => (rest, None),
    };
    let Ok(alias) = alias::parse(segment) else {
        return Route::Unknown;
    };
    match tail {
        None => Route::Redirect {
            location: format!("/{alias}/{query}"),
            alias,
        },
        Some(t) => Route::Publication {
            path_and_query: format!("/{t}{query}"),
            prefix: Some(format!("/{alias}")),
            alias,
        },
    }
}

/// Whether a public request is for the browser terminal (`/share/…`,
/// served by the daemon itself: `bhatti publish --shell`): without a
/// domain, on any host (the alias `share` is reserved); with one, only on
/// the domain itself — never on a publication's host, so the terminal is
/// never on a published app's origin.
pub fn is_share(host: Option<&str>, domain: Option<&str>, path: &str) -> bool {
    if !path.starts_with(crate::share::PAGE_PATH) {
        return false;
    }
    match domain {
        None => true,
        Some(d) => host.map(host_name).is_some_and(|h| h == d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminal_is_on_the_bare_domain_or_any_host_without_one() {
        assert!(is_share(Some("1.2.3.4:8081"), None, "/share/"));
        assert!(is_share(None, None, "/share/ws"));
        assert!(!is_share(None, None, "/share"));
        assert!(!is_share(None, None, "/shared/"));
        let d = Some("p.example.com");
        assert!(is_share(Some("P.example.com:443"), d, "/share/term.js"));
        assert!(!is_share(Some("app.p.example.com"), d, "/share/"));
        assert!(!is_share(None, d, "/share/"));
    }

    /// A path route.
    fn publication(alias: &str, pq: &str) -> Route {
        Route::Publication {
            alias: alias.into(),
            path_and_query: pq.into(),
            prefix: Some(format!("/{alias}")),
        }
    }

    /// A host route.
    fn hosted(alias: &str, pq: &str) -> Route {
        Route::Publication {
            alias: alias.into(),
            path_and_query: pq.into(),
            prefix: None,
        }
    }

    #[test]
    fn path_routes() {
        assert_eq!(
            route(None, None, "/myapp/a/b", Some("x=1")),
            publication("myapp", "/a/b?x=1")
        );
        assert_eq!(
            route(None, None, "/myapp/", None),
            publication("myapp", "/")
        );
        assert_eq!(
            route(Some("127.0.0.1:8081"), None, "/MyApp/x%20y", None),
            publication("myapp", "/x%20y")
        );
        assert_eq!(
            route(None, None, "/myapp/a//b/", None),
            publication("myapp", "/a//b/")
        );
        assert_eq!(
            route(None, None, "/myapp", Some("q=2")),
            Route::Redirect {
                alias: "myapp".into(),
                location: "/myapp/?q=2".into()
            }
        );
        for unknown in [
            "/",
            "",
            "//x",
            "/ab/",
            "/api/x",
            "/my_app/x",
            "/%6dyapp/",
            "x/y",
        ] {
            assert_eq!(
                route(None, None, unknown, None),
                Route::Unknown,
                "{unknown}"
            );
        }
    }

    #[test]
    fn host_routes_when_a_domain_is_set() {
        let d = Some("preview.example.com");
        assert_eq!(
            route(Some("myapp.preview.example.com"), d, "/a", Some("b=c")),
            hosted("myapp", "/a?b=c")
        );
        assert_eq!(
            route(Some("MyApp.Preview.Example.COM:8081"), d, "/", None),
            hosted("myapp", "/")
        );
        assert_eq!(
            route(Some("myapp.preview.example.com."), d, "", None),
            hosted("myapp", "/")
        );
        // The path is the guest's: no alias segment is taken off.
        assert_eq!(
            route(Some("myapp.preview.example.com"), d, "/other/x", None),
            hosted("myapp", "/other/x")
        );
        for unknown in [
            "a.b.preview.example.com",
            "api.preview.example.com",
            "ab.preview.example.com",
            "-x-.preview.example.com",
        ] {
            assert_eq!(
                route(Some(unknown), d, "/x/y", None),
                Route::Unknown,
                "{unknown}"
            );
        }
    }

    #[test]
    fn with_a_domain_path_routes_are_off() {
        let d = Some("preview.example.com");
        for host in [
            "preview.example.com",
            "127.0.0.1:8081",
            "[::1]:8081",
            "evilpreview.example.com",
            "myapp.preview.example.com.evil.test",
        ] {
            assert_eq!(
                route(Some(host), d, "/myapp/x", None),
                Route::Unknown,
                "{host}"
            );
        }
        assert_eq!(route(None, d, "/myapp/x", None), Route::Unknown);
        assert_eq!(route(None, d, "/myapp", None), Route::Unknown);
        // Without one, any host takes path routes.
        assert_eq!(
            route(Some("myapp.preview.example.com"), None, "/myapp/x", None),
            publication("myapp", "/x")
        );
    }

    proptest::proptest! {
        #[test]
        fn routing_never_panics(
            host in proptest::option::of("\\PC{0,40}"),
            path in "\\PC{0,60}",
            query in proptest::option::of("\\PC{0,20}"),
        ) {
            for domain in [None, Some("pv.example.com")] {
                if let Route::Publication { alias, path_and_query, .. } =
                    route(host.as_deref(), domain, &path, query.as_deref())
                {
                    proptest::prop_assert!(alias::validate(&alias).is_ok());
                    proptest::prop_assert!(path_and_query.starts_with('/'));
                }
            }
        }
    }
}
