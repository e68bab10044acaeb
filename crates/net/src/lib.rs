//! Host networking for bhatti sandboxes.
//!
//! Owns everything between a VM's virtio-net device and the host: the
//! bridge a network's VMs share, one TAP per VM, the IPv4 pool those VMs
//! take their static addresses from, the MAC derived from each address, and
//! the neighbour entry pre-seeded for each new VM.
//!
//! * [`Subnet`], [`Mac`] — addresses; [`Mac::for_ip`] is stable per address.
//! * [`IpPool`] — pure allocation bookkeeping (gateway `.1`, never the
//!   network or broadcast address), serde-able for the store.
//! * [`TapNamer`] — TAP names within `IFNAMSIZ` that encode the address.
//! * [`NetOps`] — the privileged operations, as a trait: [`IpRoute`] runs
//!   iproute2's `ip`; [`fake::FakeNetOps`] is in memory for tests without
//!   root.
//! * [`Network`] — one bridge + pool: `setup` (bridge, orphan TAP cleanup),
//!   `attach` (address, TAP, neighbour; undone on failure), `detach`.
//!
//! * [`Firewall`] — bhatti's iptables chains: no traffic between users'
//!   bridges, no new connections from sandboxes to the host but DNS and
//!   ping to their own gateway, no private/link-local/reserved
//!   destinations ([`DEFAULT_DENY`], adjusted by [`FirewallConfig`]'s
//!   allow and deny), no DNAT'd host ports, NAT out; idempotent, never
//!   touching rules bhatti did not create.
//! * [`guard`] — per-TAP anti-spoofing (own MAC and IPv4, ARP included;
//!   nothing but IPv4 and ARP) and the per-sandbox [`Egress`] policy, in an
//!   nftables bridge table.
//!
//! * [`dns`] — the gateway's DNS responder: sandbox names answered, the rest
//!   relayed upstream; answers for names on a sandbox's allow-list open
//!   their addresses in its guard ([`egress`]).
//!
//! Everything acts in the calling thread's network namespace. Per-user
//! networks come later (docs/networking.md says what exists).

mod cidr;
pub mod dns;
pub mod egress;
mod error;
pub mod fake;
mod firewall;
pub mod guard;
mod iproute;
mod names;
mod network;
mod ops;
mod pool;
mod subnet;
mod user_nets;

pub use cidr::{default_deny, Cidr, CidrError, DEFAULT_DENY};
pub use egress::{AllowEntry, Egress, EgressError, NamePattern, NameSets};
pub use error::{NetError, Result};
pub use firewall::{
    plan as firewall_plan, Firewall, FirewallConfig, Iptables, IptablesCommand, Rule, CHAINS,
    CHAIN_EGRESS, CHAIN_FORWARD, CHAIN_INPUT, CHAIN_NAT,
};
pub use guard::TapGuard;
pub use iproute::{remove_guards, IpRoute};
pub use names::{check_ifname, TapNamer, MAX_IFNAME, MAX_TAP_PREFIX};
pub use network::{
    Attachment, Network, NetworkConfig, DEFAULT_BRIDGE, DEFAULT_SUBNET, DEFAULT_TAP_PREFIX,
};
pub use ops::NetOps;
pub use pool::{IpPool, PoolError};
pub use subnet::{Mac, Subnet, SubnetError, MAC_PREFIX, MAX_PREFIX, MIN_PREFIX};
pub use user_nets::{UserNetError, UserNetworks};
