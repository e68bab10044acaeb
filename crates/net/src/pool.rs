//! [`IpPool`]: which guest addresses of one subnet are in use.
//!
//! Pure bookkeeping (no system calls), serde-able so the daemon can store it
//! and rebuild it on restart (or rebuild it by [`IpPool::reserve`]-ing the
//! addresses of the sandboxes it finds).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::subnet::Subnet;

/// Why a pool operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every guest address is taken.
    #[error("no free address in {subnet} ({capacity} guest addresses, all in use)")]
    Exhausted {
        /// The subnet.
        subnet: Subnet,
        /// How many guest addresses it has.
        capacity: u32,
    },
    /// The address is not in the pool's subnet.
    #[error("{ip} is outside {subnet}")]
    OutsideSubnet {
        /// The address.
        ip: Ipv4Addr,
        /// The subnet.
        subnet: Subnet,
    },
    /// The address is the network, gateway or broadcast address.
    #[error("{ip} is the {role} address of {subnet}, never a guest's")]
    NotAGuestAddress {
        /// The address.
        ip: Ipv4Addr,
        /// `network`, `gateway` or `broadcast`.
        role: &'static str,
        /// The subnet.
        subnet: Subnet,
    },
    /// Reserving an address that is already allocated.
    #[error("{ip} is already allocated")]
    InUse {
        /// The address.
        ip: Ipv4Addr,
    },
    /// Releasing an address that is not allocated.
    #[error("{ip} is not allocated")]
    NotAllocated {
        /// The address.
        ip: Ipv4Addr,
    },
}

/// The guest addresses of one subnet: `.1` is the gateway (the bridge), the
/// network and broadcast addresses are never handed out, everything else is
/// allocated lowest-first.
///
/// Lowest-first reuse is safe because a guest's MAC is derived from its IP
/// ([`crate::Mac::for_ip`]): a reused address comes back with the same MAC,
/// so no neighbour cache anywhere holds a wrong entry for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PoolState", into = "PoolState")]
pub struct IpPool {
    subnet: Subnet,
    allocated: BTreeSet<Ipv4Addr>,
}

/// The stored form of a pool; checked on load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolState {
    subnet: Subnet,
    allocated: Vec<Ipv4Addr>,
}

impl TryFrom<PoolState> for IpPool {
    type Error = PoolError;
    fn try_from(s: PoolState) -> Result<IpPool, PoolError> {
        let mut pool = IpPool::new(s.subnet);
        for ip in s.allocated {
            pool.reserve(ip)?;
        }
        Ok(pool)
    }
}

impl From<IpPool> for PoolState {
    fn from(p: IpPool) -> PoolState {
        PoolState {
            subnet: p.subnet,
            allocated: p.allocated.into_iter().collect(),
        }
    }
}

impl IpPool {
    /// An empty pool over `subnet`.
    pub fn new(subnet: Subnet) -> IpPool {
        IpPool {
            subnet,
            allocated: BTreeSet::new(),
        }
    }

    /// The subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// How many guest addresses the subnet has (all but network, gateway
    /// and broadcast).
    pub fn capacity(&self) -> u32 {
        self.subnet.size() - 3
    }

    /// How many are allocated.
    pub fn len(&self) -> usize {
        self.allocated.len()
    }

    /// Whether none is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocated.is_empty()
    }

    /// Whether `ip` is allocated.
    pub fn is_allocated(&self, ip: Ipv4Addr) -> bool {
        self.allocated.contains(&ip)
    }

    /// The allocated addresses, ascending.
    pub fn allocated(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.allocated.iter().copied()
    }

    /// Allocates the lowest free guest address.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, PoolError> {
        // Guest offsets are 2..size-1; the allocated set is ordered, so the
        // first gap is found by walking it alongside the candidates.
        let mut candidate = 2u32;
        for ip in &self.allocated {
            // Offsets are valid: only guest addresses enter the set.
            let off = self.subnet.offset(*ip).unwrap_or(u32::MAX);
            if off != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.subnet.size() - 1 {
            return Err(PoolError::Exhausted {
                subnet: self.subnet,
                capacity: self.capacity(),
            });
        }
        let ip = self.subnet.nth(candidate);
        self.allocated.insert(ip);
        Ok(ip)
    }

    /// Marks a specific address as allocated (recovery, static addresses).
    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), PoolError> {
        self.check_guest(ip)?;
        if !self.allocated.insert(ip) {
            return Err(PoolError::InUse { ip });
        }
        Ok(())
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<(), PoolError> {
        self.check_guest(ip)?;
        if !self.allocated.remove(&ip) {
            return Err(PoolError::NotAllocated { ip });
        }
        Ok(())
    }

    fn check_guest(&self, ip: Ipv4Addr) -> Result<(), PoolError> {
        let subnet = self.subnet;
        let off = subnet
            .offset(ip)
            .ok_or(PoolError::OutsideSubnet { ip, subnet })?;
        let role = match off {
            0 => "network",
            1 => "gateway",
            o if o == subnet.size() - 1 => "broadcast",
            _ => return Ok(()),
        };
        Err(PoolError::NotAGuestAddress { ip, role, subnet })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn pool(s: &str) -> IpPool {
        IpPool::new(s.parse().unwrap())
    }

    #[test]
    fn allocates_every_guest_address_exactly_once() {
        for s in ["10.9.0.0/30", "10.9.0.0/29", "10.9.0.0/24", "10.9.0.0/22"] {
            let mut p = pool(s);
            let subnet = p.subnet();
            let mut seen = HashSet::new();
            for i in 0..p.capacity() {
                let ip = p.allocate().unwrap();
                assert!(subnet.contains(ip));
                assert_ne!(ip, subnet.network(), "{s}");
                assert_ne!(ip, subnet.gateway(), "{s}");
                assert_ne!(ip, subnet.broadcast(), "{s}");
                assert!(seen.insert(ip), "{ip} twice in {s}");
                // Lowest first: the i-th allocation is .2 + i.
                assert_eq!(ip, subnet.nth(2 + i));
            }
            assert_eq!(seen.len() as u32, subnet.size() - 3);
            assert_eq!(
                p.allocate(),
                Err(PoolError::Exhausted {
                    subnet,
                    capacity: subnet.size() - 3
                })
            );
        }
    }

    #[test]
    fn release_makes_the_lowest_address_free_again() {
        let mut p = pool("10.9.0.0/24");
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert_eq!(
            [a, b, c].map(|ip| ip.octets()[3]),
            [2, 3, 4],
            "gateway .1 is never handed out"
        );
        p.release(b).unwrap();
        assert!(!p.is_allocated(b));
        assert_eq!(p.allocate().unwrap(), b);
        assert_eq!(p.allocate().unwrap().octets()[3], 5);
        assert_eq!(p.release(b), Ok(()));
        assert_eq!(p.release(b), Err(PoolError::NotAllocated { ip: b }));
    }

    #[test]
    fn reserve_and_its_errors() {
        let mut p = pool("10.9.0.0/24");
        let s = p.subnet();
        p.reserve(Ipv4Addr::new(10, 9, 0, 2)).unwrap();
        assert_eq!(
            p.reserve(Ipv4Addr::new(10, 9, 0, 2)),
            Err(PoolError::InUse {
                ip: Ipv4Addr::new(10, 9, 0, 2)
            })
        );
        assert_eq!(p.allocate().unwrap(), Ipv4Addr::new(10, 9, 0, 3));
        for (ip, role) in [
            (s.network(), "network"),
            (s.gateway(), "gateway"),
            (s.broadcast(), "broadcast"),
        ] {
            let want = Err(PoolError::NotAGuestAddress {
                ip,
                role,
                subnet: s,
            });
            assert_eq!(p.reserve(ip), want);
            assert_eq!(p.release(ip), want);
        }
        let outside = Ipv4Addr::new(10, 9, 1, 2);
        let want = Err(PoolError::OutsideSubnet {
            ip: outside,
            subnet: s,
        });
        assert_eq!(p.reserve(outside), want);
        assert_eq!(p.release(outside), want);
        assert_eq!(
            p.reserve(s.gateway()).unwrap_err().to_string(),
            "10.9.0.1 is the gateway address of 10.9.0.0/24, never a guest's"
        );
    }

    #[test]
    fn serde_round_trip_and_checks_on_load() {
        let mut p = pool("10.9.0.0/24");
        p.allocate().unwrap();
        p.reserve(Ipv4Addr::new(10, 9, 0, 77)).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"subnet":"10.9.0.0/24","allocated":["10.9.0.2","10.9.0.77"]}"#
        );
        assert_eq!(serde_json::from_str::<IpPool>(&json).unwrap(), p);
        for bad in [
            r#"{"subnet":"10.9.0.0/24","allocated":["10.9.0.1"]}"#,
            r#"{"subnet":"10.9.0.0/24","allocated":["10.9.1.2"]}"#,
            r#"{"subnet":"10.9.0.0/24","allocated":["10.9.0.2","10.9.0.2"]}"#,
            r#"{"subnet":"10.9.0.0/24","allocated":[],"x":1}"#,
        ] {
            assert!(serde_json::from_str::<IpPool>(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate,
        Release(u8),
        Reserve(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Allocate),
            2 => any::<u8>().prop_map(Op::Release),
            1 => any::<u8>().prop_map(Op::Reserve),
        ]
    }

    proptest! {
        /// The pool behaves like a set of guest offsets 2..=size-2 where
        /// allocation takes the smallest free one.
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut p = pool("10.9.0.0/27"); // 32 addresses, 29 guests
            let subnet = p.subnet();
            let mut model: std::collections::BTreeSet<u32> = Default::default();
            for op in ops {
                match op {
                    Op::Allocate => {
                        let free = (2..subnet.size() - 1).find(|o| !model.contains(o));
                        match (p.allocate(), free) {
                            (Ok(ip), Some(o)) => {
                                prop_assert_eq!(ip, subnet.nth(o));
                                model.insert(o);
                            }
                            (Err(PoolError::Exhausted { .. }), None) => {}
                            (got, want) => prop_assert!(false, "{got:?} vs {want:?}"),
                        }
                    }
                    Op::Release(o) | Op::Reserve(o) => {
                        let o = u32::from(o) % 40; // some outside the /27
                        let ip = Ipv4Addr::from(u32::from(subnet.network()) + o);
                        let guest = (2..subnet.size() - 1).contains(&o);
                        let releasing = matches!(op, Op::Release(_));
                        let r = if releasing { p.release(ip) } else { p.reserve(ip) };
                        let ok = guest && (model.contains(&o) == releasing);
                        prop_assert_eq!(r.is_ok(), ok, "{:?} {}", op, ip);
                        if ok {
                            if releasing { model.remove(&o); } else { model.insert(o); }
                        }
                    }
                }
                prop_assert_eq!(p.len(), model.len());
            }
        }
    }
}
