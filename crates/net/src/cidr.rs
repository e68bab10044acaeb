//! [`Cidr`]: any IPv4 prefix (`0.0.0.0/0` to a single address), for
//! firewall policy; and the ranges a sandbox may not reach by default.
//!
//! Unlike [`crate::Subnet`] (a sandbox network, /16 to /30), a `Cidr` may
//! be any length, and a bare address means `/32`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a CIDR was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `a.b.c.d` or `a.b.c.d/len` with len 0..=32.
    #[error("'{0}' is not an IPv4 address or prefix (expected a.b.c.d or a.b.c.d/0..32)")]
    Syntax(String),
    /// Host bits are set (`10.0.0.5/24`).
    #[error("{0} has host bits set")]
    HostBits(String),
}

/// An IPv4 prefix of any length, host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// `addr/prefix`, refusing a prefix over 32 or host bits.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, CidrError> {
        if prefix > 32 {
            return Err(CidrError::Syntax(format!("{addr}/{prefix}")));
        }
        if u32::from(addr) & !mask(prefix) != 0 {
            return Err(CidrError::HostBits(format!("{addr}/{prefix}")));
        }
        Ok(Cidr { addr, prefix })
    }

    /// One address.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr { addr, prefix: 32 }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                (a, p.parse::<u8>().map_err(|_| syntax())?)
            }
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix > 32 {
            return Err(syntax());
        }
        Cidr::new(addr, prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Cidr, CidrError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl From<crate::Subnet> for Cidr {
    fn from(s: crate::Subnet) -> Cidr {
        Cidr {
            addr: s.network(),
            prefix: s.prefix(),
        }
    }
}

/// What a sandbox may not reach unless the operator allows it
/// (`[network] allow_cidrs`), with why: every range that is not the public
/// internet — this host's and its LAN's, the cloud's metadata service,
/// carrier-grade NAT, loopback, multicast, broadcast and reserved space
/// (IANA's special-purpose registry, RFC 6890). The documentation ranges
/// (192.0.2/24, 198.51.100/24, 203.0.113/24) are left out: nothing routes
/// them on the internet, and tests use them as "public" addresses.
pub const DEFAULT_DENY: [(&str, &str); 11] = [
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local: cloud metadata services live here",
    ),
    ("172.16.0.0/12", "private (RFC 1918): Docker's networks too"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the limited broadcast address"),
];

/// [`DEFAULT_DENY`], parsed.
pub fn default_deny() -> Vec<Cidr> {
    DEFAULT_DENY
        .iter()
        .map(|(c, _)| c.parse().unwrap_or_else(|e| panic!("{c}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_matches() {
        let c: Cidr = "192.168.77.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.77.0/24");
        assert!(c.contains(Ipv4Addr::new(192, 168, 77, 1)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 78, 1)));
        let h: Cidr = "169.254.169.254".parse().unwrap();
        assert_eq!(h, Cidr::host(Ipv4Addr::new(169, 254, 169, 254)));
        assert_eq!(h.to_string(), "169.254.169.254/32");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!(
            serde_json::from_str::<Cidr>("\"10.1.2.0/24\"").unwrap(),
            "10.1.2.0/24".parse().unwrap()
        );
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0/8",
            "x",
            "10.0.0.0/+8",
            "::1/128",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits(_))
        ));
    }

    #[test]
    fn the_default_deny_covers_what_a_guest_must_not_reach_and_not_the_internet() {
        let deny = default_deny();
        let denied = |ip: [u8; 4]| deny.iter().any(|c| c.contains(Ipv4Addr::from(ip)));
        for ip in [
            [169, 254, 169, 254],
            [10, 0, 0, 1],
            [172, 17, 0, 2],
            [192, 168, 77, 1],
            [100, 64, 0, 1],
            [127, 0, 0, 1],
            [224, 0, 0, 251],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
        ] {
            assert!(denied(ip), "{ip:?} must be denied");
        }
        for ip in [
            [1, 1, 1, 1],
            [8, 8, 8, 8],
            [203, 0, 113, 10],
            [151, 101, 0, 1],
        ] {
            assert!(!denied(ip), "{ip:?} is public");
        }
    }
}
