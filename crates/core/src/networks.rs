//! [`Networks`]: which bridge a sandbox joins.
//!
//! Two layouts. Without a per-group plan every sandbox joins one network
//! (`CoreConfig::network`, set up at start) — what tests and benches use.
//! With one ([`GroupNetworkConfig`], the daemon's per-user networks) each
//! group — the daemon uses the user id — gets its own bridge and subnet,
//! cut from a range when its first sandbox attaches and torn down when its
//! last one detaches, so two users' sandboxes never share a layer-2
//! segment. Listeners ([`NetworkEvent`]) learn when a bridge comes and
//! goes (the daemon runs a DNS responder on each gateway).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use net::{
    Attachment, Egress, NameSets, NetError, NetOps, Network, NetworkConfig, Subnet, UserNetworks,
};
use tokio::sync::mpsc::UnboundedSender;

/// How per-group networks are carved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupNetworkConfig {
    /// The range every group's subnet comes from (e.g. 10.210.0.0/16).
    pub range: Subnet,
    /// Each group's subnet length (e.g. 24).
    pub prefix: u8,
    /// Bridges are `<bridge_prefix><4 hex digits>` (at most 11 bytes).
    pub bridge_prefix: String,
    /// Every group's TAPs are `<tap_prefix><guest IPv4 in hex>` (at most
    /// 7 bytes).
    pub tap_prefix: String,
}

/// A group network came or went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkEvent {
    /// The bridge exists with its gateway address.
    Up(NetworkConfig),
    /// The bridge is gone.
    Down(NetworkConfig),
}

/// Where on its network a VM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The lowest free address (a new sandbox).
    Any,
    /// This address when it can have it, else any (a sandbox booted again
    /// from its disk: it learns its address at boot).
    Prefer(Ipv4Addr),
    /// This address or nothing (a snapshot restore: the guest's memory
    /// holds it).
    Exactly(Ipv4Addr),
}

impl Placement {
    fn ip(self) -> Option<Ipv4Addr> {
        match self {
            Placement::Any => None,
            Placement::Prefer(ip) | Placement::Exactly(ip) => Some(ip),
        }
    }
}

#[derive(Debug)]
struct Group {
    network: Arc<Network>,
    attached: usize,
}

#[derive(Debug)]
struct Groups {
    plan: UserNetworks,
    live: BTreeMap<String, Group>,
}

/// The networks sandboxes attach to.
#[derive(Debug)]
pub(crate) struct Networks {
    ops: Arc<dyn NetOps>,
    shared: Option<Arc<Network>>,
    groups: Option<Mutex<Groups>>,
    events: Mutex<Option<UnboundedSender<NetworkEvent>>>,
    /// Every sandbox's allow-listed names, for the DNS relay.
    names: Arc<NameSets>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Networks {
    /// Sets up the shared network, or (with a group plan) removes the
    /// group TAPs and bridges a previous run left behind: at start no
    /// sandbox is attached, and each group's bridge is made again when its
    /// first sandbox comes back. Blocks on `ip` commands.
    pub(crate) fn new(
        shared: &NetworkConfig,
        groups: Option<&GroupNetworkConfig>,
        ops: Arc<dyn NetOps>,
    ) -> Result<Networks, NetError> {
        let names = Arc::new(NameSets::new(ops.clone()));
        let Some(plan) = groups else {
            let network =
                Network::setup(shared.clone(), ops.clone(), [])?.with_name_sets(names.clone());
            return Ok(Networks {
                ops,
                shared: Some(Arc::new(network)),
                groups: None,
                events: Mutex::new(None),
                names,
            });
        };
        let user_nets = UserNetworks::new(
            plan.range,
            plan.prefix,
            &plan.bridge_prefix,
            &plan.tap_prefix,
        )
        .map_err(|e| NetError::InvalidConfig(e.to_string()))?;
        if plan.bridge_prefix.starts_with(&plan.tap_prefix) {
            return Err(NetError::InvalidConfig(format!(
                "bridge prefix {} starts with the TAP prefix {}",
                plan.bridge_prefix, plan.tap_prefix
            )));
        }
        for prefix in [&plan.tap_prefix, &plan.bridge_prefix] {
            for link in ops.list_links(prefix)? {
                tracing::info!(%link, "removing a group network link left from before");
                ops.delete_link(&link)?;
            }
        }
        Ok(Networks {
            ops,
            shared: None,
            groups: Some(Mutex::new(Groups {
                plan: user_nets,
                live: BTreeMap::new(),
            })),
            events: Mutex::new(None),
            names,
        })
    }

    /// Every sandbox's allow-listed names and what was learned for them.
    pub(crate) fn name_sets(&self) -> Arc<NameSets> {
        self.names.clone()
    }

    /// The network `att` is on, if it exists.
    fn network_of(&self, att: &Attachment) -> Option<Arc<Network>> {
        self.all()
            .into_iter()
            .find(|n| n.config().bridge == att.bridge)
    }

    /// Replaces the egress policy of the VM on `att`. Blocks on `nft`.
    pub(crate) fn set_egress(&self, att: &Attachment, egress: &Egress) -> Result<(), NetError> {
        let network = self.network_of(att).ok_or_else(|| {
            NetError::InvalidConfig(format!("the bridge {} of {} is gone", att.bridge, att.tap))
        })?;
        network.set_egress(att, egress)
    }

    /// Where bridges coming and going are reported.
    pub(crate) fn subscribe(&self, tx: UnboundedSender<NetworkEvent>) {
        let mut slot = lock(&self.events);
        // Tell a late subscriber what is up already.
        if let Some(groups) = &self.groups {
            for g in lock(groups).live.values() {
                let _ = tx.send(NetworkEvent::Up(g.network.config().clone()));
            }
        }
        *slot = Some(tx);
    }

    fn emit(&self, event: NetworkEvent) {
        if let Some(tx) = &*lock(&self.events) {
            // A dropped receiver only means nobody listens any more.
            let _ = tx.send(event);
        }
    }

    /// Every network that exists now.
    pub(crate) fn all(&self) -> Vec<Arc<Network>> {
        match (&self.shared, &self.groups) {
            (Some(n), _) => vec![n.clone()],
            (None, Some(groups)) => lock(groups)
                .live
                .values()
                .map(|g| g.network.clone())
                .collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Attaches a VM of `group` (ignored without a group plan) where
    /// `placement` says. Blocks on `ip` commands.
    pub(crate) fn attach(
        &self,
        group: &str,
        owner_uid: u32,
        placement: Placement,
        egress: &Egress,
    ) -> Result<Attachment, NetError> {
        let attach = |network: &Network| {
            match placement {
            Placement::Any => network.attach(owner_uid, egress),
            Placement::Exactly(ip) => network.attach_at(owner_uid, ip, egress),
            Placement::Prefer(ip) => network.attach_at(owner_uid, ip, egress).or_else(|e| {
                tracing::info!(%ip, reason = %e, "the old address is not available; taking another");
                network.attach(owner_uid, egress)
            }),
        }
        };
        let Some(groups) = &self.groups else {
            let shared = self
                .shared
                .as_ref()
                .ok_or_else(|| NetError::InvalidConfig("no network is configured".into()))?;
            return attach(shared);
        };
        let mut groups = lock(groups);
        if !groups.live.contains_key(group) {
            let config = match placement.ip() {
                Some(ip) => groups.plan.assign_containing(group, ip),
                None => groups.plan.assign(group),
            }
            .map_err(|e| NetError::InvalidConfig(e.to_string()))?;
            let network = match Network::setup(config.clone(), self.ops.clone(), []) {
                Ok(n) => n.with_name_sets(self.names.clone()),
                Err(e) => {
                    groups.plan.release(group);
                    return Err(e);
                }
            };
            tracing::info!(group, bridge = %config.bridge, subnet = %config.subnet, "group network up");
            groups.live.insert(
                group.to_string(),
                Group {
                    network: Arc::new(network),
                    attached: 0,
                },
            );
            self.emit(NetworkEvent::Up(config));
        }
        let entry = groups
            .live
            .get_mut(group)
            .unwrap_or_else(|| unreachable!("inserted above"));
        let attached = attach(&entry.network);
        match attached {
            Ok(att) => {
                entry.attached += 1;
                Ok(att)
            }
            Err(e) => {
                if entry.attached == 0 {
                    self.tear_down(&mut groups, group);
                }
                Err(e)
            }
        }
    }

    /// Undoes [`Networks::attach`]; the group's bridge goes with its last
    /// VM. Detaching twice is harmless.
    pub(crate) fn detach(&self, att: &Attachment) -> Result<(), NetError> {
        let Some(groups) = &self.groups else {
            return match &self.shared {
                Some(n) => n.detach(att),
                None => Ok(()),
            };
        };
        let mut groups = lock(groups);
        let Some((name, entry)) = groups
            .live
            .iter_mut()
            .find(|(_, g)| g.network.config().bridge == att.bridge)
        else {
            // Its bridge is gone already: remove a TAP that may be left.
            self.ops.delete_link(&att.tap)?;
            return Ok(());
        };
        let name = name.clone();
        let was_attached = entry.network.pool().is_allocated(att.ip);
        let result = entry.network.detach(att);
        if was_attached {
            entry.attached = entry.attached.saturating_sub(1);
        }
        if entry.attached == 0 {
            self.tear_down(&mut groups, &name);
        }
        result
    }

    fn tear_down(&self, groups: &mut Groups, group: &str) {
        if let Some(g) = groups.live.remove(group) {
            if let Err(e) = g.network.teardown() {
                tracing::warn!(group, error = %e, "removing a group's bridge");
            }
            groups.plan.release(group);
            tracing::info!(group, bridge = %g.network.config().bridge, "group network down");
            self.emit(NetworkEvent::Down(g.network.config().clone()));
        }
    }

    /// Removes every bridge and TAP (benches, tests).
    pub(crate) fn teardown_all(&self) -> Result<(), NetError> {
        let mut first = None;
        if let Some(n) = &self.shared {
            if let Err(e) = n.teardown() {
                first.get_or_insert(e);
            }
        }
        if let Some(groups) = &self.groups {
            let mut groups = lock(groups);
            let names: Vec<String> = groups.live.keys().cloned().collect();
            for name in names {
                self.tear_down(&mut groups, &name);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use net::fake::FakeNetOps;

    use super::*;

    fn plan() -> GroupNetworkConfig {
        GroupNetworkConfig {
            range: "10.210.0.0/22".parse().unwrap(),
            prefix: 24,
            bridge_prefix: "bhu".into(),
            tap_prefix: "tu".into(),
        }
    }

    #[test]
    fn groups_get_their_own_bridge_which_goes_with_their_last_vm() {
        let ops = Arc::new(FakeNetOps::default());
        let nets = Networks::new(&NetworkConfig::default(), Some(&plan()), ops.clone()).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        nets.subscribe(tx);
        let a1 = nets
            .attach("alice", 0, Placement::Any, &Egress::Public)
            .unwrap();
        let a2 = nets
            .attach("alice", 0, Placement::Any, &Egress::Public)
            .unwrap();
        let b1 = nets
            .attach("bob", 0, Placement::Any, &Egress::Public)
            .unwrap();
        assert_eq!(a1.bridge, a2.bridge);
        assert_ne!(a1.bridge, b1.bridge);
        assert_eq!(
            (a1.ip.to_string(), b1.ip.to_string()),
            ("10.210.0.2".into(), "10.210.1.2".into())
        );
        assert!(matches!(rx.try_recv(), Ok(NetworkEvent::Up(c)) if c.bridge == a1.bridge));
        assert!(matches!(rx.try_recv(), Ok(NetworkEvent::Up(c)) if c.bridge == b1.bridge));
        assert_eq!(nets.all().len(), 2);

        nets.detach(&a1).unwrap();
        assert!(rx.try_recv().is_err(), "alice still has a sandbox");
        nets.detach(&a2).unwrap();
        nets.detach(&a2).unwrap(); // twice: harmless
        assert!(matches!(rx.try_recv(), Ok(NetworkEvent::Down(c)) if c.bridge == a1.bridge));
        assert_eq!(nets.all().len(), 1);
        assert!(!ops.list_links("bhu").unwrap().contains(&a1.bridge));
        assert!(
            ops.link(&b1.tap).is_some(),
            "alice's bridge took bob's TAP along"
        );

        // Bob's sandbox comes back at its address after alice's network
        // was reused by carol.
        nets.detach(&b1).unwrap();
        let c = nets
            .attach("carol", 0, Placement::Any, &Egress::Public)
            .unwrap();
        assert_eq!(c.bridge, a1.bridge);
        let b = nets
            .attach("bob", 0, Placement::Exactly(b1.ip), &Egress::Public)
            .unwrap();
        assert_eq!(
            (b.ip, b.mac, b.tap.clone()),
            (b1.ip, b1.mac, b1.tap.clone())
        );
    }

    #[test]
    fn an_address_whose_network_went_to_another_group_is_preferred_not_required() {
        let ops = Arc::new(FakeNetOps::default());
        let nets = Networks::new(&NetworkConfig::default(), Some(&plan()), ops).unwrap();
        let old = nets
            .attach("bob", 0, Placement::Any, &Egress::Public)
            .unwrap();
        nets.detach(&old).unwrap();
        // Carol's first sandbox takes the /24 bob's network had.
        let c = nets
            .attach("carol", 0, Placement::Any, &Egress::Public)
            .unwrap();
        assert_eq!(c.bridge, old.bridge);
        // A snapshot cannot move: refused, and nothing is left behind.
        assert!(nets
            .attach("bob", 0, Placement::Exactly(old.ip), &Egress::Public)
            .is_err());
        assert_eq!(nets.all().len(), 1);
        // A fresh boot can: another /24.
        let b = nets
            .attach("bob", 0, Placement::Prefer(old.ip), &Egress::Public)
            .unwrap();
        assert_ne!(b.bridge, old.bridge);
        assert_eq!(b.ip.to_string(), "10.210.1.2");
    }

    #[test]
    fn start_removes_links_left_by_a_previous_run() {
        let ops = Arc::new(FakeNetOps::default());
        {
            let nets =
                Networks::new(&NetworkConfig::default(), Some(&plan()), ops.clone()).unwrap();
            nets.attach("alice", 0, Placement::Any, &Egress::Public)
                .unwrap();
        }
        assert!(!ops.list_links("tu").unwrap().is_empty());
        let _again = Networks::new(&NetworkConfig::default(), Some(&plan()), ops.clone()).unwrap();
        assert!(ops.list_links("tu").unwrap().is_empty());
        assert!(ops.list_links("bhu").unwrap().is_empty());
    }

    #[test]
    fn without_a_plan_everyone_shares_one_network() {
        let ops = Arc::new(FakeNetOps::default());
        let nets = Networks::new(&NetworkConfig::default(), None, ops).unwrap();
        let a = nets
            .attach("alice", 0, Placement::Any, &Egress::Public)
            .unwrap();
        let b = nets
            .attach("bob", 0, Placement::Any, &Egress::Public)
            .unwrap();
        assert_eq!(a.bridge, b.bridge);
        nets.detach(&a).unwrap();
        assert_eq!(nets.all().len(), 1);
    }
}
