//! [`Network`]: one bridge, its subnet's address pool, and a TAP per
//! attached VM.
//!
//! Today a daemon runs one `Network` (`bhatti0`, one /24). Per-user
//! networks are a map from user to `Network`, each with its own bridge,
//! subnet and TAP prefix: nothing in here assumes there is only one.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::egress::NameSets;
use crate::error::{NetError, Result};
use crate::guard::{Egress, TapGuard};
use crate::names::{check_ifname, TapNamer};
use crate::ops::NetOps;
use crate::pool::IpPool;
use crate::subnet::{Mac, Subnet};

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "bhatti0";
/// Default subnet: inside 10/8, away from the low /16s that home routers,
/// VPNs and Docker (172.17/16) tend to use.
pub const DEFAULT_SUBNET: &str = "10.200.0.0/24";
/// Default TAP name prefix.
pub const DEFAULT_TAP_PREFIX: &str = "bt";

/// How one network is set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Bridge name (at most 15 bytes).
    pub bridge: String,
    /// Subnet; the bridge holds its first address (the gateway).
    pub subnet: Subnet,
    /// Prefix of this network's TAP names (at most 7 bytes). TAPs with
    /// this prefix that no attached VM owns are removed at setup.
    pub tap_prefix: String,
    /// DNS server guests are told to use (`bhatti.dns=`), if any.
    #[serde(default)]
    pub dns: Option<Ipv4Addr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_owned(),
            // A constant that parses; covered by a test.
            subnet: DEFAULT_SUBNET.parse().unwrap_or_else(|e| panic!("{e}")),
            tap_prefix: DEFAULT_TAP_PREFIX.to_owned(),
            dns: None,
        }
    }
}

impl NetworkConfig {
    /// Checks names and that the bridge name cannot be taken for a TAP.
    pub fn validate(&self) -> Result<TapNamer> {
        check_ifname(&self.bridge)?;
        let namer = TapNamer::new(&self.tap_prefix)?;
        if self.bridge.starts_with(&self.tap_prefix) {
            return Err(NetError::InvalidConfig(format!(
                "bridge {} starts with the TAP prefix {} (it would be taken for an orphan TAP)",
                self.bridge, self.tap_prefix
            )));
        }
        Ok(namer)
    }
}

/// A VM's place on a network: everything the VMM and the guest need, and
/// what [`Network::detach`] undoes. Serde-able, to be stored with the
/// sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// The bridge the TAP is on.
    pub bridge: String,
    /// The host TAP.
    pub tap: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The guest's MAC ([`Mac::for_ip`]).
    pub mac: Mac,
    /// The guest's default gateway (the bridge).
    pub gateway: Ipv4Addr,
    /// DNS server for the guest, if any.
    pub dns: Option<Ipv4Addr>,
}

impl Attachment {
    /// The kernel command-line arguments lohar reads to configure `eth0`:
    /// `bhatti.ip=<ip>/<prefix> bhatti.gw=<gw> [bhatti.dns=<dns>]`.
    pub fn kernel_args(&self) -> String {
        let mut s = format!(
            "bhatti.ip={}/{} bhatti.gw={}",
            self.ip, self.prefix, self.gateway
        );
        if let Some(dns) = self.dns {
            s.push_str(&format!(" bhatti.dns={dns}"));
        }
        s
    }
}

/// One bridge with its address pool.
#[derive(Debug)]
pub struct Network {
    config: NetworkConfig,
    namer: TapNamer,
    ops: Arc<dyn NetOps>,
    pool: Mutex<IpPool>,
    /// Where allow-listed names of its sandboxes are registered for the
    /// DNS relay (none: names in a policy are never learned).
    names: Option<Arc<NameSets>>,
}

impl Network {
    /// Creates (or adopts) the bridge with the gateway address and a fixed
    /// MAC, marks `in_use` addresses as allocated (VMs that survive a
    /// daemon restart), and deletes this network's TAPs that belong to no
    /// address in use (left by a crash).
    pub fn setup(
        config: NetworkConfig,
        ops: Arc<dyn NetOps>,
        in_use: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Network> {
        let namer = config.validate()?;
        let mut pool = IpPool::new(config.subnet);
        for ip in in_use {
            pool.reserve(ip)?;
        }
        let gateway = config.subnet.gateway();
        ops.create_bridge(
            &config.bridge,
            Mac::for_ip(gateway),
            gateway,
            config.subnet.prefix(),
        )?;
        for tap in ops.list_links(namer.prefix())? {
            // Networks may share a TAP prefix (per-user networks do): a TAP
            // for another subnet's address is another network's business.
            let owned = namer
                .parse(&tap)
                .is_some_and(|ip| pool.is_allocated(ip) || !config.subnet.contains(ip));
            if !owned {
                tracing::info!(%tap, bridge = %config.bridge, "removing orphan TAP");
                ops.delete_link(&tap)?;
                ops.unguard_tap(&tap)?;
            }
        }
        tracing::info!(bridge = %config.bridge, subnet = %config.subnet, "network ready");
        Ok(Network {
            config,
            namer,
            ops,
            pool: Mutex::new(pool),
            names: None,
        })
    }

    /// Registers its sandboxes' allow-listed names in `names` (the
    /// registry the DNS relay learns into).
    pub fn with_name_sets(mut self, names: Arc<NameSets>) -> Network {
        self.names = Some(names);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// A copy of the address pool (to store, or to inspect).
    pub fn pool(&self) -> IpPool {
        self.lock_pool().clone()
    }

    /// The TAP name a guest address gets.
    pub fn tap_name(&self, ip: Ipv4Addr) -> String {
        self.namer.name_for(ip)
    }

    fn lock_pool(&self) -> MutexGuard<'_, IpPool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates an address and creates its TAP (owned by `owner_uid`, the
    /// user the VMM runs as) on the bridge, guarded with `egress` from the
    /// start, with a pre-seeded neighbour entry. On failure everything done
    /// so far is undone.
    pub fn attach(&self, owner_uid: u32, egress: &Egress) -> Result<Attachment> {
        let ip = self.lock_pool().allocate()?;
        self.attach_ip(owner_uid, ip, egress)
    }

    /// Like [`Network::attach`], at a given address (a sandbox booted
    /// again keeps its address, MAC and TAP name). Fails if the address is
    /// taken or outside the subnet.
    pub fn attach_at(&self, owner_uid: u32, ip: Ipv4Addr, egress: &Egress) -> Result<Attachment> {
        self.lock_pool().reserve(ip)?;
        self.attach_ip(owner_uid, ip, egress)
    }

    /// Creates the TAP and neighbour entry of an address already taken
    /// from the pool.
    fn attach_ip(&self, owner_uid: u32, ip: Ipv4Addr, egress: &Egress) -> Result<Attachment> {
        let a = Attachment {
            bridge: self.config.bridge.clone(),
            tap: self.namer.name_for(ip),
            ip,
            prefix: self.config.subnet.prefix(),
            mac: Mac::for_ip(ip),
            gateway: self.config.subnet.gateway(),
            dns: self.config.dns,
        };
        // The guard is in place before the VM can send its first frame.
        let made = self
            .ops
            .create_tap(&a.tap, owner_uid, &a.bridge)
            .and_then(|()| self.install_guard(&a, egress))
            .and_then(|()| self.ops.set_neighbour(&a.bridge, a.ip, a.mac));
        if let Err(e) = made {
            if let Err(cleanup) = self.detach(&a) {
                tracing::warn!(tap = %a.tap, error = %cleanup, "undoing a failed attach");
            }
            return Err(e);
        }
        tracing::debug!(tap = %a.tap, ip = %a.ip, "attached");
        Ok(a)
    }

    /// Replaces where the VM on `a` may send ([`Egress`]); takes effect
    /// for its next packet, established connections included.
    pub fn set_egress(&self, a: &Attachment, egress: &Egress) -> Result<()> {
        self.install_guard(a, egress)
    }

    /// Installs `a`'s guard with `egress`, registering its names (and
    /// keeping the addresses learned for names it still lists).
    fn install_guard(&self, a: &Attachment, egress: &Egress) -> Result<()> {
        match &self.names {
            Some(names) => names.apply(a.ip, &a.tap, egress, |learned| {
                self.ops.guard_tap(&guard(a, egress.clone(), learned))
            }),
            None => self.ops.guard_tap(&guard(a, egress.clone(), Vec::new())),
        }
    }

    /// Removes the neighbour entry, the TAP and its guard, and releases
    /// the address. Every step is attempted; the first failure is
    /// returned. Detaching twice is harmless.
    pub fn detach(&self, a: &Attachment) -> Result<()> {
        let neigh = self.ops.delete_neighbour(&a.bridge, a.ip).map(drop);
        let tap = self.ops.delete_link(&a.tap).map(drop);
        let unguard = self.ops.unguard_tap(&a.tap);
        if let Some(names) = &self.names {
            names.forget(a.ip);
        }
        let mut pool = self.lock_pool();
        let release = if pool.is_allocated(a.ip) {
            pool.release(a.ip).map_err(NetError::from)
        } else {
            Ok(())
        };
        neigh.and(tap).and(unguard).and(release)
    }

    /// Deletes every TAP of this network and the bridge (a user's last
    /// sandbox gone, tests, benches). VMs still attached lose their
    /// network. TAPs of other subnets that share the prefix are left alone.
    pub fn teardown(&self) -> Result<()> {
        let mut first_err = None;
        match self.ops.list_links(self.namer.prefix()) {
            Ok(taps) => {
                let ours = |tap: &String| {
                    self.namer
                        .parse(tap)
                        .is_none_or(|ip| self.config.subnet.contains(ip))
                };
                for tap in taps.into_iter().filter(ours) {
                    if let (Some(names), Some(ip)) = (&self.names, self.namer.parse(&tap)) {
                        names.forget(ip);
                    }
                    if let Err(e) = self.ops.delete_link(&tap) {
                        first_err.get_or_insert(e);
                    }
                    if let Err(e) = self.ops.unguard_tap(&tap) {
                        first_err.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.ops.delete_link(&self.config.bridge) {
            first_err.get_or_insert(e);
        }
        *self.lock_pool() = IpPool::new(self.config.subnet);
        first_err.map_or(Ok(()), Err)
    }
}

/// The guard for the VM on `a`.
fn guard(
    a: &Attachment,
    egress: Egress,
    learned: Vec<(Ipv4Addr, std::time::Duration)>,
) -> TapGuard {
    TapGuard {
        tap: a.tap.clone(),
        mac: a.mac,
        ip: a.ip,
        gateway: a.gateway,
        egress,
        learned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeNetOps, Kind};

    fn config() -> NetworkConfig {
        NetworkConfig {
            bridge: "br-test".into(),
            subnet: "10.7.0.0/29".parse().unwrap(),
            tap_prefix: "tt".into(),
            dns: None,
        }
    }

    #[test]
    fn default_config_is_valid() {
        let c = NetworkConfig::default();
        c.validate().unwrap();
        assert_eq!(c.subnet.to_string(), DEFAULT_SUBNET);
        assert!(c.subnet.network().octets()[0] == 10);
    }

    #[test]
    fn config_rejects_ambiguous_names() {
        let mut c = config();
        c.bridge = "tt-bridge".into();
        assert!(matches!(c.validate(), Err(NetError::InvalidConfig(_))));
        let mut c = config();
        c.tap_prefix = "toolongx".into();
        assert!(matches!(c.validate(), Err(NetError::InvalidName { .. })));
    }

    #[test]
    fn setup_attach_detach() {
        let ops = Arc::new(FakeNetOps::default());
        let net = Network::setup(config(), ops.clone(), []).unwrap();
        let br = ops.link("br-test").unwrap();
        assert_eq!(br.kind, Kind::Bridge);
        assert_eq!(br.addr, Some(("10.7.0.1".parse().unwrap(), 29)));
        assert_eq!(br.mac, Some(Mac::for_ip("10.7.0.1".parse().unwrap())));
        assert!(br.up);

        let a = net.attach(0, &Egress::Public).unwrap();
        assert_eq!(a.ip, "10.7.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.tap, "tt0a070002");
        assert_eq!(a.mac, Mac::for_ip(a.ip));
        assert_eq!(a.kernel_args(), "bhatti.ip=10.7.0.2/29 bhatti.gw=10.7.0.1");
        let tap = ops.link(&a.tap).unwrap();
        assert_eq!(tap.kind, Kind::Tap { owner: 0 });
        assert_eq!(tap.master.as_deref(), Some("br-test"));
        assert!(tap.up);
        assert_eq!(ops.neighbour("br-test", a.ip), Some(a.mac));
        let g = ops.guard(&a.tap).expect("guarded from the start");
        assert_eq!(
            (g.mac, g.ip, g.gateway, &g.egress),
            (a.mac, a.ip, a.gateway, &Egress::Public)
        );
        let calls = ops.calls();
        let pos = |c: &str| calls.iter().position(|x| x == c).unwrap();
        assert!(pos(&format!("create_tap {}", a.tap)) < pos(&format!("guard_tap {}", a.tap)));
        net.set_egress(&a, &Egress::None).unwrap();
        assert_eq!(ops.guard(&a.tap).unwrap().egress, Egress::None);

        let b = net.attach(1000, &Egress::Public).unwrap();
        assert_eq!(b.ip, "10.7.0.3".parse::<Ipv4Addr>().unwrap());
        net.detach(&a).unwrap();
        assert!(ops.link(&a.tap).is_none());
        assert!(ops.guard(&a.tap).is_none());
        assert_eq!(ops.neighbour("br-test", a.ip), None);
        assert!(!net.pool().is_allocated(a.ip));
        net.detach(&a).unwrap(); // twice is harmless
        assert_eq!(net.attach(0, &Egress::Public).unwrap().ip, a.ip);
    }

    #[test]
    fn pool_exhaustion_is_typed_and_creates_nothing() {
        let ops = Arc::new(FakeNetOps::default());
        let net = Network::setup(config(), ops.clone(), []).unwrap();
        // /29: .2 ..= .6
        for _ in 0..5 {
            net.attach(0, &Egress::Public).unwrap();
        }
        let before = ops.links().len();
        assert!(matches!(
            net.attach(0, &Egress::Public),
            Err(NetError::Pool(crate::PoolError::Exhausted { .. }))
        ));
        assert_eq!(ops.links().len(), before);
    }

    #[test]
    fn failed_attach_is_undone() {
        let ops = Arc::new(FakeNetOps::default());
        let net = Network::setup(config(), ops.clone(), []).unwrap();
        ops.fail_next("set_neighbour");
        let e = net.attach(0, &Egress::Public).unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        assert_eq!(ops.links(), vec!["br-test".to_string()]);
        assert!(net.pool().is_empty());
        ops.fail_next("create_tap");
        assert!(net.attach(0, &Egress::Public).is_err());
        assert!(net.pool().is_empty());
        ops.fail_next("guard_tap");
        assert!(net.attach(0, &Egress::Public).is_err(), "no guard, no TAP");
        assert_eq!(ops.links(), vec!["br-test".to_string()]);
        assert!(net.pool().is_empty());
    }

    #[test]
    fn setup_removes_orphans_and_keeps_taps_in_use() {
        let ops = Arc::new(FakeNetOps::default());
        let net = Network::setup(config(), ops.clone(), []).unwrap();
        let a = net.attach(0, &Egress::Public).unwrap();
        let b = net.attach(0, &Egress::Public).unwrap();
        ops.create_tap("other0", 0, "br-test").unwrap();
        drop(net);
        // Restart: only `a` survived.
        let net = Network::setup(config(), ops.clone(), [a.ip]).unwrap();
        assert!(ops.link(&a.tap).is_some());
        assert!(ops.link(&b.tap).is_none());
        assert!(ops.link("other0").is_some(), "not ours: left alone");
        assert!(net.pool().is_allocated(a.ip));
        assert_eq!(net.attach(0, &Egress::Public).unwrap().ip, b.ip);
        // A stored address outside the subnet is refused.
        assert!(Network::setup(config(), ops.clone(), ["10.8.0.2".parse().unwrap()]).is_err());
        net.teardown().unwrap();
        assert_eq!(ops.links(), vec!["other0".to_string()]);
    }

    #[test]
    fn networks_sharing_a_tap_prefix_leave_each_others_taps_alone() {
        let ops = Arc::new(FakeNetOps::default());
        let other = NetworkConfig {
            bridge: "br-other".into(),
            subnet: "10.7.1.0/29".parse().unwrap(),
            ..config()
        };
        let mine = Network::setup(config(), ops.clone(), []).unwrap();
        let a = mine.attach(0, &Egress::Public).unwrap();
        // Another network with the same prefix comes up: a's TAP stays.
        let theirs = Network::setup(other, ops.clone(), []).unwrap();
        let b = theirs.attach(0, &Egress::Public).unwrap();
        assert!(ops.link(&a.tap).is_some());
        // ...and goes: a's TAP still stays.
        theirs.teardown().unwrap();
        assert!(ops.link(&b.tap).is_none());
        assert!(ops.link(&a.tap).is_some());
        assert!(ops.link("br-other").is_none());
    }
}
