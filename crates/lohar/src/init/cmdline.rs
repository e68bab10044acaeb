//! The guest's network settings from the kernel command line.
//!
//! The contract (`docs/guest-image.md`): `bhatti.ip=<ipv4>/<prefix>`
//! `bhatti.gw=<ipv4>` and optionally `bhatti.dns=<ipv4>` (the gateway when
//! absent). No DHCP: the host allocates addresses. The kernel treats dotted
//! words as module parameters, so they reach neither init's argv nor its
//! environment; lohar reads `/proc/cmdline`.

use std::net::Ipv4Addr;

/// Static IPv4 settings of `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
}

/// A missing or malformed network setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A required key is absent.
    #[error("No {0}= (the guest's static network settings)")]
    Missing(&'static str),
    /// A key's value does not parse.
    #[error("Bad {key}={value:?}: {reason}")]
    Bad {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The gateway is not on the guest's subnet, so it cannot be routed to.
    #[error("Gateway {gateway} is outside {ip}/{prefix}")]
    GatewayOffLink {
        gateway: Ipv4Addr,
        ip: Ipv4Addr,
        prefix: u8,
    },
}

impl NetConfig {
    /// The netmask of the prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        mask(self.prefix)
    }

    /// Parses the settings out of a whole kernel command line. The last
    /// occurrence of a key wins, as for kernel parameters.
    pub fn from_cmdline(cmdline: &str) -> Result<NetConfig, CmdlineError> {
        let value = |key: &str| {
            cmdline
                .split_whitespace()
                .rev()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let ip_word = value("bhatti.ip").ok_or(CmdlineError::Missing("bhatti.ip"))?;
        let bad = |key, value: &str, reason| CmdlineError::Bad {
            key,
            value: value.to_string(),
            reason,
        };
        let (ip, prefix) = ip_word
            .split_once('/')
            .ok_or_else(|| bad("bhatti.ip", ip_word, "expected <ipv4>/<prefix>"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| bad("bhatti.ip", ip_word, "not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| bad("bhatti.ip", ip_word, "prefix must be 1..=30"))?;
        let addr = |key: &'static str| -> Result<Option<Ipv4Addr>, CmdlineError> {
            value(key)
                .map(|v| v.parse().map_err(|_| bad(key, v, "not an IPv4 address")))
                .transpose()
        };
        let gateway = addr("bhatti.gw")?.ok_or(CmdlineError::Missing("bhatti.gw"))?;
        let dns = addr("bhatti.dns")?.unwrap_or(gateway);
        let m = u32::from(mask(prefix));
        if u32::from(gateway) & m != u32::from(ip) & m || gateway == ip {
            return Err(CmdlineError::GatewayOffLink {
                gateway,
                ip,
                prefix,
            });
        }
        Ok(NetConfig {
            ip,
            prefix,
            gateway,
            dns,
        })
    }
}

/// The netmask of a prefix length.
pub fn mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "console=ttyS0 quiet panic=-1";

    fn parse(extra: &str) -> Result<NetConfig, CmdlineError> {
        NetConfig::from_cmdline(&format!("{BASE} {extra}"))
    }

    #[test]
    fn parses_ip_gateway_and_dns() {
        let c = parse("bhatti.ip=10.77.0.2/24 bhatti.gw=10.77.0.1 bhatti.dns=10.77.0.53").unwrap();
        assert_eq!(c.ip, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.gateway, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(c.dns, Ipv4Addr::new(10, 77, 0, 53));
    }

    #[test]
    fn dns_defaults_to_the_gateway_and_last_key_wins() {
        let c = parse("bhatti.ip=10.0.0.9/16 bhatti.gw=10.0.0.1 bhatti.ip=10.0.3.4/16").unwrap();
        assert_eq!(c.dns, c.gateway);
        assert_eq!(c.ip, Ipv4Addr::new(10, 0, 3, 4));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 0, 0));
    }

    #[test]
    fn rejects_missing_and_malformed_values() {
        assert_eq!(parse(""), Err(CmdlineError::Missing("bhatti.ip")));
        assert_eq!(
            parse("bhatti.ip=10.0.0.2/24"),
            Err(CmdlineError::Missing("bhatti.gw"))
        );
        // A key that merely starts like ours is not ours.
        assert_eq!(
            parse("bhatti.ipx=10.0.0.2/24 bhatti.gw=10.0.0.1"),
            Err(CmdlineError::Missing("bhatti.ip"))
        );
        for bad in [
            "bhatti.ip=10.0.0.2 bhatti.gw=10.0.0.1",
            "bhatti.ip=10.0.0.2/33 bhatti.gw=10.0.0.1",
            "bhatti.ip=10.0.0.2/0 bhatti.gw=10.0.0.1",
            "bhatti.ip=10.0.0.256/24 bhatti.gw=10.0.0.1",
            "bhatti.ip=10.0.0.2/24 bhatti.gw=gateway",
            "bhatti.ip=10.0.0.2/24 bhatti.gw=10.0.0.1 bhatti.dns=",
        ] {
            assert!(
                matches!(parse(bad), Err(CmdlineError::Bad { .. })),
                "{bad}: {:?}",
                parse(bad)
            );
        }
    }

    #[test]
    fn the_gateway_must_be_on_link() {
        assert!(matches!(
            parse("bhatti.ip=10.0.0.2/24 bhatti.gw=10.0.1.1"),
            Err(CmdlineError::GatewayOffLink { .. })
        ));
        assert!(matches!(
            parse("bhatti.ip=10.0.0.2/24 bhatti.gw=10.0.0.2"),
            Err(CmdlineError::GatewayOffLink { .. })
        ));
        assert!(parse("bhatti.ip=10.0.0.2/23 bhatti.gw=10.0.1.1").is_ok());
    }
}
