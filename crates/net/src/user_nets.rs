//! Per-user networks: each user gets a subnet of its own, carved from one
//! range, and a bridge and TAP prefix named after its index — so two users'
//! sandboxes never share a layer-2 segment and the firewall can tell them
//! apart by bridge. Pure bookkeeping, serde-able for the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::network::NetworkConfig;
use crate::subnet::Subnet;

/// Why a user network could not be assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserNetError {
    #[error("the range {range} cannot be cut into /{prefix} networks (at most 65536 of them)")]
    BadRange { range: Subnet, prefix: u8 },
    #[error("the {what} prefix '{prefix}' is too long (at most {max} bytes)")]
    PrefixTooLong {
        what: &'static str,
        prefix: String,
        max: usize,
    },
    #[error("every /{prefix} network of {range} is in use ({count} users)")]
    Exhausted {
        range: Subnet,
        prefix: u8,
        count: usize,
    },
}

/// The networks of every user, by index into the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNetworks {
    range: Subnet,
    prefix: u8,
    /// Bridge names are `<bridge_prefix><index>`; TAP prefixes `<tap_prefix><index>`.
    bridge_prefix: String,
    tap_prefix: String,
    by_user: BTreeMap<String, u32>,
}

impl UserNetworks {
    /// Users' networks are the `/prefix` networks of `range`, e.g. the
    /// /24s of 10.210.0.0/16.
    pub fn new(
        range: Subnet,
        prefix: u8,
        bridge_prefix: &str,
        tap_prefix: &str,
    ) -> Result<UserNetworks, UserNetError> {
        if prefix < range.prefix()
            || prefix > crate::subnet::MAX_PREFIX
            || prefix - range.prefix() > 16
        {
            return Err(UserNetError::BadRange { range, prefix });
        }
        for (what, p, max) in [
            ("bridge", bridge_prefix, crate::names::MAX_IFNAME - 4),
            ("TAP", tap_prefix, crate::names::MAX_TAP_PREFIX),
        ] {
            if p.len() > max {
                return Err(UserNetError::PrefixTooLong {
                    what,
                    prefix: p.to_string(),
                    max,
                });
            }
        }
        Ok(UserNetworks {
            range,
            prefix,
            bridge_prefix: bridge_prefix.to_string(),
            tap_prefix: tap_prefix.to_string(),
            by_user: BTreeMap::new(),
        })
    }

    fn capacity(&self) -> u32 {
        1 << (self.prefix - self.range.prefix())
    }

    fn subnet_at(&self, index: u32) -> Subnet {
        let size = 1u32 << (32 - self.prefix);
        let network = u32::from(self.range.network()) + index * size;
        Subnet::new(network.into(), self.prefix)
            .unwrap_or_else(|e| unreachable!("an aligned network inside the range: {e}"))
    }

    /// Bridges carry the index as four hex digits (fixed width, so no
    /// bridge name is a prefix of another). TAPs share one prefix: their
    /// names hold the guest address, unique across users' subnets, and a
    /// network's orphan cleanup only looks at TAPs of its own subnet.
    fn config_for(&self, index: u32) -> NetworkConfig {
        NetworkConfig {
            bridge: format!("{}{index:04x}", self.bridge_prefix),
            subnet: self.subnet_at(index),
            tap_prefix: self.tap_prefix.clone(),
            dns: Some(self.subnet_at(index).gateway()),
        }
    }

    /// The user's network, assigned on first use (lowest free index).
    pub fn assign(&mut self, user: &str) -> Result<NetworkConfig, UserNetError> {
        if let Some(&i) = self.by_user.get(user) {
            return Ok(self.config_for(i));
        }
        let used: std::collections::BTreeSet<u32> = self.by_user.values().copied().collect();
        let index =
            (0..self.capacity())
                .find(|i| !used.contains(i))
                .ok_or(UserNetError::Exhausted {
                    range: self.range,
                    prefix: self.prefix,
                    count: self.by_user.len(),
                })?;
        self.by_user.insert(user.to_string(), index);
        Ok(self.config_for(index))
    }

    /// Like [`UserNetworks::assign`], but prefers the network holding
    /// `ip` when it is free: a sandbox booted again after a daemon restart
    /// keeps its address (and MAC, and TAP name) even though users'
    /// networks are assigned afresh in whatever order their sandboxes come
    /// back.
    pub fn assign_containing(
        &mut self,
        user: &str,
        ip: std::net::Ipv4Addr,
    ) -> Result<NetworkConfig, UserNetError> {
        if !self.by_user.contains_key(user) && self.range.contains(ip) {
            let size = 1u32 << (32 - self.prefix);
            let index = (u32::from(ip) - u32::from(self.range.network())) / size;
            if !self.by_user.values().any(|&i| i == index) {
                self.by_user.insert(user.to_string(), index);
                return Ok(self.config_for(index));
            }
        }
        self.assign(user)
    }

    /// Bridge names are `<bridge_prefix>` and four hex digits.
    pub fn bridge_prefix(&self) -> &str {
        &self.bridge_prefix
    }

    /// Every user's TAPs are `<tap_prefix>` and the guest address in hex.
    pub fn tap_prefix(&self) -> &str {
        &self.tap_prefix
    }

    /// The range users' networks are cut from.
    pub fn range(&self) -> Subnet {
        self.range
    }

    /// The user's network if one is assigned.
    pub fn get(&self, user: &str) -> Option<NetworkConfig> {
        self.by_user.get(user).map(|&i| self.config_for(i))
    }

    /// Gives the user's network back (with their last sandbox).
    pub fn release(&mut self, user: &str) -> Option<NetworkConfig> {
        self.by_user.remove(user).map(|i| self.config_for(i))
    }

    /// Every assigned network (for the firewall).
    pub fn all(&self) -> Vec<NetworkConfig> {
        self.by_user.values().map(|&i| self.config_for(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets() -> UserNetworks {
        UserNetworks::new("10.210.0.0/22".parse().unwrap(), 24, "bhu", "tu").unwrap()
    }

    #[test]
    fn users_get_their_own_subnet_bridge_and_tap_prefix() {
        let mut n = nets();
        let a = n.assign("alice").unwrap();
        let b = n.assign("bob").unwrap();
        assert_eq!(
            (
                a.bridge.as_str(),
                a.subnet.to_string(),
                a.tap_prefix.as_str()
            ),
            ("bhu0000", "10.210.0.0/24".into(), "tu")
        );
        assert_eq!(
            (b.bridge.as_str(), b.subnet.to_string()),
            ("bhu0001", "10.210.1.0/24".into())
        );
        assert_eq!(a.dns, Some("10.210.0.1".parse().unwrap()));
        assert_eq!(n.assign("alice").unwrap(), a, "stable");
        assert!(a.validate().is_ok() && b.validate().is_ok());
        assert_eq!(n.all().len(), 2);
    }

    #[test]
    fn released_networks_are_reused_and_the_range_is_finite() {
        let mut n = nets();
        for u in ["a", "b", "c", "d"] {
            n.assign(u).unwrap();
        }
        assert!(matches!(
            n.assign("e"),
            Err(UserNetError::Exhausted { count: 4, .. })
        ));
        assert_eq!(n.release("b").unwrap().bridge, "bhu0001");
        assert_eq!(n.assign("e").unwrap().bridge, "bhu0001");
        assert_eq!(n.get("nobody"), None);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<UserNetworks>(&json).unwrap(), n);
    }

    #[test]
    fn a_returning_sandbox_gets_the_network_holding_its_address() {
        let mut n = nets();
        n.assign("bob").unwrap(); // takes index 0
        let a = n
            .assign_containing("alice", "10.210.2.7".parse().unwrap())
            .unwrap();
        assert_eq!(a.subnet.to_string(), "10.210.2.0/24");
        // Taken already: the next free one.
        let c = n
            .assign_containing("carol", "10.210.0.9".parse().unwrap())
            .unwrap();
        assert_eq!(c.subnet.to_string(), "10.210.1.0/24");
        // Outside the range: the next free one.
        let d = n
            .assign_containing("dave", "192.168.1.2".parse().unwrap())
            .unwrap();
        assert_eq!(d.subnet.to_string(), "10.210.3.0/24");
        // Already assigned: unchanged.
        assert_eq!(
            n.assign_containing("alice", "10.210.3.9".parse().unwrap())
                .unwrap(),
            a
        );
    }

    #[test]
    fn bridge_names_never_prefix_each_other() {
        let mut n = UserNetworks::new("10.0.0.0/16".parse().unwrap(), 28, "bhu", "tu").unwrap();
        let names: Vec<String> = (0..20)
            .map(|i| n.assign(&format!("u{i}")).unwrap().bridge)
            .collect();
        for a in &names {
            for b in &names {
                assert!(a == b || !b.starts_with(a.as_str()), "{a} prefixes {b}");
            }
        }
        assert!(n.assign("x").unwrap().validate().is_ok());
    }

    #[test]
    fn refuses_ranges_that_do_not_divide() {
        let range: Subnet = "10.210.0.0/24".parse().unwrap();
        assert!(UserNetworks::new(range, 16, "bhu", "tu").is_err());
        assert!(UserNetworks::new(range, 31, "bhu", "tu").is_err());
        assert!(UserNetworks::new(range, 28, "bhu", "tuuuuuuu").is_err());
        assert!(UserNetworks::new(range, 28, "bhatti-users", "tu").is_err());
    }
}
