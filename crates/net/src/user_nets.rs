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
    #[error("the range {range} cannot be cut into /{prefix} networks")]
    BadRange { range: Subnet, prefix: u8 },
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
        if prefix < range.prefix() || prefix > crate::subnet::MAX_PREFIX {
            return Err(UserNetError::BadRange { range, prefix });
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

    fn config_for(&self, index: u32) -> NetworkConfig {
        NetworkConfig {
            bridge: format!("{}{index}", self.bridge_prefix),
            subnet: self.subnet_at(index),
            tap_prefix: format!("{}{index}", self.tap_prefix),
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
            ("bhu0", "10.210.0.0/24".into(), "tu0")
        );
        assert_eq!(
            (b.bridge.as_str(), b.subnet.to_string()),
            ("bhu1", "10.210.1.0/24".into())
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
        assert_eq!(n.release("b").unwrap().bridge, "bhu1");
        assert_eq!(n.assign("e").unwrap().bridge, "bhu1");
        assert_eq!(n.get("nobody"), None);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<UserNetworks>(&json).unwrap(), n);
    }

    #[test]
    fn refuses_ranges_that_do_not_divide() {
        let range: Subnet = "10.210.0.0/24".parse().unwrap();
        assert!(UserNetworks::new(range, 16, "bhu", "tu").is_err());
        assert!(UserNetworks::new(range, 31, "bhu", "tu").is_err());
    }
}
