//! Who a public request is from: the peer of the connection, or, when the
//! peer is one of `[publish] trusted_proxies`, the client that proxy says
//! it serves (the right-most untrusted address of `X-Forwarded-For`), and
//! what the guest is told about it (`X-Forwarded-For`, `-Proto`, `-Host`).
//! Pure, so every case is a unit test.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// An IPv4 or IPv6 prefix; a bare address is the whole length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a `trusted_proxies` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an IP address or prefix (a.b.c.d[/len] or v6[/len], host bits clear)")]
pub struct IpNetError(String);

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn mask(prefix: u8, width: u8) -> u128 {
    let all = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    match u32::from(width - prefix) {
        128 => 0,
        shift => (all >> shift) << shift,
    }
}

impl IpNet {
    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (a, width) = bits(self.addr);
        let (b, _) = bits(ip);
        let m = mask(self.prefix, width);
        a & m == b & m
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;
    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let bad = || IpNetError(s.to_string());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width = bits(addr).1;
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= width)
                .ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        };
        if bits(addr).0 & !mask(prefix, width) != 0 {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `[publish] trusted_proxies`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// One `X-Forwarded-For` element as an address: `a.b.c.d`, `a.b.c.d:port`,
/// `v6` or `[v6]:port`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, _) = rest.split_once(']')?;
        return v6
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| IpAddr::V6(a).to_canonical());
    }
    let (v4, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The elements of every `X-Forwarded-For` line, in order.
fn hops(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(&XFF)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|h| h.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|h| !h.is_empty())
        .collect()
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client a request is from. `peer` when it is not a trusted
    /// proxy (its `X-Forwarded-For` is the client's own word, ignored);
    /// otherwise `X-Forwarded-For` is walked from the right, over trusted
    /// proxies, to the first address that is not one: each element was
    /// appended by the trusted hop to its right, so that one is vouched
    /// for. An element that is no address stops the walk at the last
    /// trusted hop (limited as that hop).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in hops(headers).iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }

    /// What the guest is told: from a trusted proxy its `X-Forwarded-For`
    /// with the peer appended, and its `X-Forwarded-Proto`/`-Host` when it
    /// sent them; from anyone else only what this proxy saw itself (the
    /// peer, `http`, the `Host` header) — a client's own `X-Forwarded-*`
    /// would let it claim any address to the guest.
    pub fn forwarded(&self, peer: IpAddr, headers: &HeaderMap) -> Forwarded {
        self.forwarded_as(peer, headers, "http")
    }

    /// [`TrustedProxies::forwarded`] for a socket that speaks `own_proto`
    /// (`https` on a TLS public socket).
    pub fn forwarded_as(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        own_proto: &'static str,
    ) -> Forwarded {
        let peer = peer.to_canonical();
        let trusted = self.trusts(peer);
        let passed = |name: &HeaderName| {
            trusted
                .then(|| headers.get(name).cloned())
                .flatten()
                .filter(|v| !v.is_empty())
        };
        let mut chain = if trusted { hops(headers) } else { Vec::new() };
        chain.push(peer.to_string());
        Forwarded {
            for_: HeaderValue::from_str(&chain.join(", "))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            proto: passed(&XFP).unwrap_or_else(|| HeaderValue::from_static(own_proto)),
            host: passed(&XFH).or_else(|| headers.get(header::HOST).cloned()),
        }
    }
}

/// The `X-Forwarded-*` headers the guest gets, decided by the public proxy
/// and carried to [`crate::proxy`] as a request extension; they replace
/// whatever the request had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub for_: HeaderValue,
    pub proto: HeaderValue,
    pub host: Option<HeaderValue>,
}

impl Forwarded {
    /// Sets them on `out`, replacing any there.
    pub fn apply(&self, out: &mut HeaderMap) {
        out.insert(XFF, self.for_.clone());
        out.insert(XFP, self.proto.clone());
        match &self.host {
            Some(h) => {
                out.insert(XFH, h.clone());
            }
            None => {
                out.remove(XFH);
            }
        }
    }
}

/// The key per-client limits use: an IPv4 address, or an IPv6 address's
/// /64 (one subscriber's usual allocation: a client could otherwise pick a
/// new address for every request).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn prefixes() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")));
        assert!(net("::1").contains(ip("::1")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::5")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        // An IPv4-mapped peer (a listener on [::]) is its IPv4 address.
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "host.example",
            "",
            "2001:db8::1/32",
            "::/129",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn untrusted_peers_are_limited_as_themselves() {
        let none = TrustedProxies::default();
        let h = headers(&[("x-forwarded-for", "198.51.100.7")]);
        assert_eq!(none.client(ip("203.0.113.1"), &h), ip("203.0.113.1"));
        let some = TrustedProxies::new(vec![net("10.0.0.0/8")]);
        assert_eq!(some.client(ip("203.0.113.1"), &h), ip("203.0.113.1"));
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_address_is_the_client() {
        let t = TrustedProxies::new(vec![net("10.0.0.0/8"), net("127.0.0.1")]);
        let peer = ip("10.0.0.5");
        let client = |xff: &[&str]| {
            let pairs: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            t.client(peer, &headers(&pairs))
        };
        assert_eq!(client(&["198.51.100.7"]), ip("198.51.100.7"));
        // What the client wrote itself (left) is not believed.
        assert_eq!(client(&["1.2.3.4, 198.51.100.7"]), ip("198.51.100.7"));
        // Trusted hops are skipped, across header lines too.
        assert_eq!(
            client(&["1.2.3.4, 198.51.100.7", "10.9.9.9, 127.0.0.1"]),
            ip("198.51.100.7")
        );
        assert_eq!(client(&["198.51.100.7:5123"]), ip("198.51.100.7"));
        assert_eq!(client(&["[2001:db8::7]:443"]), ip("2001:db8::7"));
        // No header, or only trusted hops: the furthest trusted hop.
        assert_eq!(client(&[]), peer);
        assert_eq!(client(&["10.1.1.1"]), ip("10.1.1.1"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client(&["198.51.100.7, bogus"]), peer);
        assert_eq!(client(&["bogus, 10.1.1.1"]), ip("10.1.1.1"));
    }

    #[test]
    fn the_guest_hears_only_what_is_vouched_for() {
        let t = TrustedProxies::new(vec![net("10.0.0.0/8")]);
        let h = headers(&[
            ("host", "app.example"),
            ("x-forwarded-for", "1.2.3.4, 198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
        ]);
        let mut out = HeaderMap::new();
        t.forwarded(ip("10.0.0.5"), &h).apply(&mut out);
        assert_eq!(out["x-forwarded-for"], "1.2.3.4, 198.51.100.7, 10.0.0.5");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "app.example.com");

        let mut out = h.clone();
        t.forwarded(ip("203.0.113.1"), &h).apply(&mut out);
        assert_eq!(out["x-forwarded-for"], "203.0.113.1");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "app.example");
        assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);

        let mut out = HeaderMap::new();
        TrustedProxies::default()
            .forwarded(ip("::ffff:127.0.0.1"), &HeaderMap::new())
            .apply(&mut out);
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        assert!(!out.contains_key("x-forwarded-host"));
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(limit_key(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,50}") {
            let _ = s.parse::<IpNet>();
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(s.as_bytes()) {
                h.insert(XFF, v);
            }
            let t = TrustedProxies::new(vec![net("0.0.0.0/0")]);
            let _ = t.client(ip("10.0.0.1"), &h);
        }
    }
}
