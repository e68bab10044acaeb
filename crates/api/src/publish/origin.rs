//! What a guest's response may claim for itself in the browser. Path-routed
//! publications (`/<alias>/…`, no `[publish] domain`) share one origin, so
//! a guest's response must not reach beyond its prefix: its cookies are
//! confined to `Path=/<alias>…`, and headers that act on a whole origin or
//! widen a service worker's scope are dropped. On every route a cookie's
//! `Domain` is removed, so it stays with the host it came from (on host
//! routes, `Domain=<domain>` would hand it to every other publication).
//! Pure, so every case is a unit test.

use axum::http::header::{HeaderMap, HeaderName, HeaderValue, SET_COOKIE};

/// Lets a service worker control pages above its script's directory.
const SERVICE_WORKER_ALLOWED: HeaderName = HeaderName::from_static("service-worker-allowed");
/// Clears cookies, storage and caches of the whole origin.
const CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");

/// Rewrites a guest's response headers for the public. `prefix` is the
/// path route's `/<alias>`, `None` on a host route.
pub fn confine(headers: &mut HeaderMap, prefix: Option<&str>) {
    if prefix.is_some() {
        headers.remove(SERVICE_WORKER_ALLOWED);
        headers.remove(CLEAR_SITE_DATA);
    }
    if !headers.contains_key(SET_COOKIE) {
        return;
    }
    let cookies: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    headers.remove(SET_COOKIE);
    for value in cookies {
        // A cookie that is not text cannot be checked: it is not passed on.
        let Some(rewritten) = value
            .to_str()
            .ok()
            .map(|c| confine_cookie(c, prefix))
            .and_then(|c| HeaderValue::from_str(&c).ok())
        else {
            tracing::debug!("public proxy: dropped a Set-Cookie that is not text");
            continue;
        };
        headers.append(SET_COOKIE, rewritten);
    }
}

/// One `Set-Cookie` value with its `Domain` removed and, under `prefix`,
/// its `Path` inside it: a guest path `P` (the guest sees paths without
/// the prefix) becomes `prefix + P`; a path already under the prefix (an
/// app that honours `X-Forwarded-Prefix`) is kept; a `Path` that does not
/// start with `/` is dropped. A cookie without `Path` is left so: the
/// browser then scopes it to the request's directory, which is always
/// under `/<alias>`.
pub fn confine_cookie(cookie: &str, prefix: Option<&str>) -> String {
    let mut parts = cookie.split(';');
    let mut out = parts.next().unwrap_or_default().to_string();
    for attr in parts {
        let (name, value) = match attr.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (attr.trim(), None),
        };
        if name.eq_ignore_ascii_case("domain") {
            continue;
        }
        if let (true, Some(prefix)) = (name.eq_ignore_ascii_case("path"), prefix) {
            let path = value.unwrap_or_default();
            if !path.starts_with('/') {
                continue;
            }
            let under = path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'));
            let path = if under {
                path.to_string()
            } else {
                format!("{prefix}{path}")
            };
            out.push_str("; Path=");
            out.push_str(&path);
            continue;
        }
        out.push(';');
        out.push_str(attr);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Option<&str> = Some("/myapp");

    #[test]
    fn cookie_paths_are_confined_under_the_prefix() {
        for (given, want) in [
            ("sid=1; Path=/", "sid=1; Path=/myapp/"),
            ("sid=1; path=/api", "sid=1; Path=/myapp/api"),
            (
                "sid=1; Path=/; HttpOnly; Secure",
                "sid=1; Path=/myapp/; HttpOnly; Secure",
            ),
            ("sid=1; Path=/myapp", "sid=1; Path=/myapp"),
            ("sid=1; Path=/myapp/x", "sid=1; Path=/myapp/x"),
            // Not under it, only alike.
            ("sid=1; Path=/myappx", "sid=1; Path=/myapp/myappx"),
            ("sid=1; Path=/other/", "sid=1; Path=/myapp/other/"),
            // No Path: the browser's default (the request's directory,
            // under /myapp) stands.
            ("sid=1", "sid=1"),
            ("sid=1; HttpOnly", "sid=1; HttpOnly"),
            // A Path that is no path is dropped (the same default).
            ("sid=1; Path=x", "sid=1"),
            ("sid=1; Path", "sid=1"),
            // Every Path is confined (browsers take the last).
            ("a=b; Path=/x; Path=/", "a=b; Path=/myapp/x; Path=/myapp/"),
            (
                "sid=1; Domain=example.com; Path=/; SameSite=Lax",
                "sid=1; Path=/myapp/; SameSite=Lax",
            ),
        ] {
            assert_eq!(confine_cookie(given, P), want, "{given}");
        }
    }

    #[test]
    fn on_host_routes_only_the_domain_goes() {
        assert_eq!(
            confine_cookie("sid=1; Domain=.pv.example.com; Path=/", None),
            "sid=1; Path=/"
        );
        assert_eq!(confine_cookie("sid=1; DOMAIN=x", None), "sid=1");
        assert_eq!(confine_cookie("sid=1; Path=/a", None), "sid=1; Path=/a");
    }

    #[test]
    fn origin_wide_headers_go_on_path_routes_only() {
        let mut h = HeaderMap::new();
        h.insert("service-worker-allowed", HeaderValue::from_static("/"));
        h.insert("clear-site-data", HeaderValue::from_static("\"*\""));
        h.append(SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
        h.append(SET_COOKIE, HeaderValue::from_static("b=2; Domain=x.test"));
        h.append(SET_COOKIE, HeaderValue::from_bytes(b"c=\xff").unwrap());
        h.insert("content-type", HeaderValue::from_static("text/html"));
        let mut host = h.clone();
        confine(&mut h, P);
        assert!(!h.contains_key("service-worker-allowed"));
        assert!(!h.contains_key("clear-site-data"));
        let cookies: Vec<_> = h.get_all(SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; Path=/myapp/", "b=2"]);
        assert_eq!(h["content-type"], "text/html");

        confine(&mut host, None);
        assert_eq!(host["service-worker-allowed"], "/");
        assert!(host.contains_key("clear-site-data"));
        let cookies: Vec<_> = host.get_all(SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; Path=/", "b=2"]);
    }

    proptest::proptest! {
        #[test]
        fn every_path_ends_up_under_the_prefix(c in "[ -~]{0,60}") {
            let out = confine_cookie(&c, P);
            for attr in out.split(';').skip(1) {
                let attr = attr.trim();
                if let Some((n, v)) = attr.split_once('=') {
                    proptest::prop_assert!(!n.trim().eq_ignore_ascii_case("domain"), "{}", out);
                    if n.trim().eq_ignore_ascii_case("path") {
                        let v = v.trim();
                        proptest::prop_assert!(
                            v == "/myapp" || v.starts_with("/myapp/"),
                            "{} → {}", c, out
                        );
                    }
                } else {
                    proptest::prop_assert!(!attr.eq_ignore_ascii_case("path"), "{}", out);
                }
            }
        }
    }
}
