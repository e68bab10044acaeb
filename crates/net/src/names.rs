//! Interface names: what the kernel accepts (`IFNAMSIZ`), and how TAPs are
//! named after the guest address they carry.

use std::net::Ipv4Addr;

use crate::error::NetError;

/// Longest interface name: `IFNAMSIZ` (16) minus the NUL.
pub const MAX_IFNAME: usize = 15;
/// Hex digits of an IPv4 address in a TAP name.
const IP_HEX: usize = 8;
/// Longest TAP prefix, so that prefix + 8 hex digits fit in [`MAX_IFNAME`].
pub const MAX_TAP_PREFIX: usize = MAX_IFNAME - IP_HEX;

/// Checks an interface name: 1..=15 bytes of `[A-Za-z0-9._-]`, not `.`
/// or `..` (the kernel also refuses `/`, `:` and whitespace; we are
/// stricter so names are safe in command lines and logs).
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() || name.len() > MAX_IFNAME {
        Some("must be 1 to 15 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may only hold [A-Za-z0-9._-]")
    } else if name == "." || name == ".." || name.starts_with('-') {
        Some("must not be '.', '..' or start with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Names TAPs `<prefix><guest IPv4 as 8 hex digits>` (`bt0ac80002` for
/// 10.200.0.2): unique for as long as guest addresses are unique on the
/// host, always within `IFNAMSIZ`, and reversible, so a TAP found on the
/// host after a crash tells which address it served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapNamer {
    prefix: String,
}

impl TapNamer {
    /// A namer with `prefix` (1..=7 bytes, a valid interface name start).
    pub fn new(prefix: &str) -> Result<TapNamer, NetError> {
        check_ifname(prefix)?;
        if prefix.len() > MAX_TAP_PREFIX {
            return Err(NetError::InvalidName {
                name: prefix.to_owned(),
                reason: "a TAP prefix must be at most 7 bytes (IFNAMSIZ)",
            });
        }
        Ok(TapNamer {
            prefix: prefix.to_owned(),
        })
    }

    /// The prefix every TAP name starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The TAP name for a guest address.
    pub fn name_for(&self, ip: Ipv4Addr) -> String {
        format!("{}{:08x}", self.prefix, u32::from(ip))
    }

    /// The guest address a TAP name encodes, if it is one of ours.
    pub fn parse(&self, name: &str) -> Option<Ipv4Addr> {
        let hex = name.strip_prefix(&self.prefix)?;
        if hex.len() != IP_HEX || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u32::from_str_radix(hex, 16).ok().map(Ipv4Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ifnames() {
        for ok in ["bhatti0", "bt0ac80002", "a", "x.y-z_1", &"a".repeat(15)] {
            check_ifname(ok).unwrap();
        }
        for bad in [
            "",
            &"a".repeat(16),
            "a b",
            "a/b",
            "a:b",
            ".",
            "..",
            "-x",
            "é",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tap_names_fit_and_round_trip() {
        let n = TapNamer::new("bt").unwrap();
        let ip = Ipv4Addr::new(10, 200, 0, 2);
        assert_eq!(n.name_for(ip), "bt0ac80002");
        assert_eq!(n.parse("bt0ac80002"), Some(ip));
        for other in [
            "bt0ac8000",
            "bt0ac800022",
            "bx0ac80002",
            "bt0AC80002",
            "bhatti0",
        ] {
            assert_eq!(n.parse(other), None, "{other}");
        }
        let long = TapNamer::new("bhattit").unwrap();
        let name = long.name_for(Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(name.len(), MAX_IFNAME);
        check_ifname(&name).unwrap();
        assert!(TapNamer::new("bhattix0").is_err());
        assert!(TapNamer::new("").is_err());
        assert!(TapNamer::new("b t").is_err());
    }

    proptest! {
        #[test]
        fn every_address_gives_a_valid_reversible_name(ip in any::<u32>(), len in 1usize..=7) {
            let n = TapNamer::new(&"p".repeat(len)).unwrap();
            let ip = Ipv4Addr::from(ip);
            let name = n.name_for(ip);
            prop_assert!(check_ifname(&name).is_ok());
            prop_assert_eq!(n.parse(&name), Some(ip));
        }
    }
}
