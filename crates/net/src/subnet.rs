//! IPv4 subnets (`10.200.0.0/24`) and the MAC addresses derived from
//! guest IPs.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shortest prefix a sandbox network may have (65,534 hosts).
pub const MIN_PREFIX: u8 = 16;
/// Longest prefix: a /30 still holds a gateway and one guest.
pub const MAX_PREFIX: u8 = 30;

/// Why a subnet was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not `a.b.c.d/len`.
    #[error("'{0}' is not an IPv4 subnet (expected a.b.c.d/len)")]
    Syntax(String),
    /// The prefix length is outside what a sandbox network may use.
    #[error("prefix /{prefix} is outside /{MIN_PREFIX}../{MAX_PREFIX}")]
    Prefix {
        /// The prefix asked for.
        prefix: u8,
    },
    /// Host bits are set (`10.0.0.5/24`).
    #[error("{addr}/{prefix} has host bits set (the network is {network}/{prefix})")]
    HostBits {
        /// The address given.
        addr: Ipv4Addr,
        /// The prefix.
        prefix: u8,
        /// What the network address would be.
        network: Ipv4Addr,
    },
}

/// An IPv4 network: address with no host bits set, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Builds a subnet, rejecting host bits and prefixes outside
    /// [`MIN_PREFIX`]..=[`MAX_PREFIX`].
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Subnet, SubnetError> {
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(SubnetError::Prefix { prefix });
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix));
        if masked != network {
            return Err(SubnetError::HostBits {
                addr: network,
                prefix,
                network: masked,
            });
        }
        Ok(Subnet { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The broadcast address (never given to a guest).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// The gateway: the first host address (`.1`), held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    /// Number of addresses in the subnet, network and broadcast included.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// Whether `ip` lies inside the subnet (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// The address at `offset` from the network address.
    pub(crate) fn nth(&self, offset: u32) -> Ipv4Addr {
        debug_assert!(offset < self.size());
        Ipv4Addr::from(u32::from(self.network) + offset)
    }

    /// The offset of `ip` from the network address, if inside.
    pub(crate) fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        self.contains(ip)
            .then(|| u32::from(ip) - u32::from(self.network))
    }
}

fn mask(prefix: u8) -> u32 {
    // prefix is 16..=30 here, so the shift never overflows.
    u32::MAX << (32 - u32::from(prefix))
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let syntax = || SubnetError::Syntax(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Subnet::new(addr, prefix)
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;
    fn try_from(s: String) -> Result<Self, SubnetError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

/// First two octets of every MAC bhatti derives: locally administered
/// (bit 1 of the first octet), unicast (bit 0 clear).
pub const MAC_PREFIX: [u8; 2] = [0x02, 0xb4];

impl Mac {
    /// The MAC of the interface holding `ip`: [`MAC_PREFIX`] followed by the
    /// four octets of the address. Stable across restarts and snapshot
    /// restores, unique as long as IPs are unique on the host, and never
    /// multicast.
    pub fn for_ip(ip: Ipv4Addr) -> Mac {
        let [a, b, c, d] = ip.octets();
        Mac([MAC_PREFIX[0], MAC_PREFIX[1], a, b, c, d])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let s: Subnet = "10.200.0.0/24".parse().unwrap();
        assert_eq!(s.network(), Ipv4Addr::new(10, 200, 0, 0));
        assert_eq!(s.prefix(), 24);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 200, 0, 255));
        assert_eq!(s.size(), 256);
        assert_eq!(s.to_string(), "10.200.0.0/24");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"10.200.0.0/24\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).unwrap(), s);
        let s: Subnet = "10.8.0.0/30".parse().unwrap();
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 8, 0, 3));
        let s: Subnet = "172.16.0.0/16".parse().unwrap();
        assert_eq!(s.broadcast(), Ipv4Addr::new(172, 16, 255, 255));
    }

    #[test]
    fn rejects_bad_subnets() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0/24",
            "10.0.0.0/+4",
            "10.0.0.0/024",
            "x/24",
            "10.0.0.0/24/1",
        ] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(SubnetError::Syntax(_))),
                "{bad:?}"
            );
        }
        for (s, p) in [("10.0.0.0/8", 8), ("10.0.0.0/31", 31), ("0.0.0.0/0", 0)] {
            assert_eq!(s.parse::<Subnet>(), Err(SubnetError::Prefix { prefix: p }));
        }
        let e = "10.0.0.5/24".parse::<Subnet>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.0.0.5/24 has host bits set (the network is 10.0.0.0/24)"
        );
        assert!(serde_json::from_str::<Subnet>("\"10.0.0.1/24\"").is_err());
    }

    #[test]
    fn contains_and_offsets() {
        let s: Subnet = "10.1.2.0/24".parse().unwrap();
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 0)));
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 255)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 3, 0)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 1, 255)));
        assert_eq!(s.offset(Ipv4Addr::new(10, 1, 2, 7)), Some(7));
        assert_eq!(s.offset(Ipv4Addr::new(10, 1, 3, 7)), None);
        assert_eq!(s.nth(9), Ipv4Addr::new(10, 1, 2, 9));
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let m = Mac::for_ip(Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(m.to_string(), "02:b4:0a:c8:00:02");
        assert_eq!(m, Mac::for_ip(Ipv4Addr::new(10, 200, 0, 2)));
        assert_ne!(m, Mac::for_ip(Ipv4Addr::new(10, 200, 0, 3)));
        assert_eq!(m.0[0] & 1, 0, "unicast");
        assert_eq!(m.0[0] & 2, 2, "locally administered");
    }
}
