//! The daemon's network services around the users' bridges: the firewall
//! (egress policy and NAT out), and a DNS responder on each user's
//! gateway, which answers only its own network's guests, with the
//! addresses of their own user's sandboxes, and relays every other name
//! upstream through the daemon's one bounded relay. Bridges come and go
//! with users' sandboxes; core reports them ([`bhatti_core::NetworkEvent`])
//! and the responders follow. (Each TAP's guard — anti-spoofing — is put
//! in place by `net::Network` as the TAP is made.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::DaemonConfig;
use crate::service::StartError;

/// How often the name table is rebuilt from the store (it is also rebuilt
/// right after every create and destroy).
const REFRESH: Duration = Duration::from_secs(2);

/// Sandbox addresses by user and name, for the DNS responder.
#[derive(Debug, Default)]
pub struct GuestNames {
    entries: RwLock<Vec<(Ipv4Addr, String, String)>>,
}

impl GuestNames {
    /// The address of `name` among the sandboxes of the user whose sandbox
    /// is asking from `from`; `None` for strangers and unknown names.
    pub fn lookup(&self, name: &str, from: IpAddr) -> Option<Ipv4Addr> {
        let IpAddr::V4(from) = from else {
            return None;
        };
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let user = entries.iter().find(|(ip, _, _)| *ip == from)?.1.clone();
        entries
            .iter()
            .find(|(_, u, n)| *u == user && n.eq_ignore_ascii_case(name))
            .map(|(ip, _, _)| *ip)
    }

    /// Rebuilds the table from the store.
    pub async fn refresh(&self, store: &Arc<store::Store>) {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.all_sandboxes()).await {
            Ok(Ok(rows)) => {
                let fresh = rows
                    .into_iter()
                    .filter_map(|r| {
                        let ip = r.ip.as_deref()?.parse().ok()?;
                        Some((ip, r.user_id, r.name))
                    })
                    .collect();
                *self.entries.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the DNS table"),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the DNS table"),
        }
    }
}

fn firewall_config(config: &DaemonConfig) -> Result<net::FirewallConfig, StartError> {
    let plan = config
        .network
        .group_networks()
        .map_err(StartError::Config)?;
    let (allow, deny) = config.network.egress_cidrs().map_err(StartError::Config)?;
    Ok(net::FirewallConfig {
        bridge_prefix: plan.bridge_prefix,
        subnets: vec![plan.range],
        allow,
        deny,
    })
}

/// Removes bhatti's firewall rules and TAP guards (`bhatti serve --cleanup`).
pub fn cleanup() -> Result<(), net::NetError> {
    net::Firewall::new(Arc::new(net::IptablesCommand::default())).remove()?;
    net::remove_guards().map(drop)
}

/// Applies the firewall (when enabled), turns on forwarding for NAT, and
/// starts the name-table refresher and the task that keeps a DNS
/// responder on every user's gateway while their bridge exists.
pub async fn start(
    config: &DaemonConfig,
    store: Arc<store::Store>,
    names: Arc<GuestNames>,
    core: &bhatti_core::SandboxManager,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    if config.network.firewall {
        let fw = firewall_config(config)?;
        tokio::task::spawn_blocking(move || {
            net::Firewall::new(Arc::new(net::IptablesCommand::default())).apply(&fw)
        })
        .await
        .map_err(|e| StartError::Config(e.to_string()))?
        .map_err(|e| StartError::Config(format!("applying the firewall: {e}")))?;
        // NAT out needs the host to forward; sandboxes have no way out otherwise.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            tracing::warn!(error = %e, "cannot enable IPv4 forwarding; sandboxes will not reach the outside");
        }
    } else {
        tracing::warn!(
            "firewall disabled by configuration: sandboxes can reach the host and each other"
        );
    }
    let upstream = match &config.network.dns_upstream {
        Some(u) => u
            .parse::<SocketAddr>()
            .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| {
                StartError::Config(format!("network.dns_upstream '{u}' is not an address"))
            })?,
        None => std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| net::dns::upstream_from_resolv_conf(&t))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 53], 53))),
    };
    tracing::info!(%upstream, "DNS responders relay unknown names here");
    let relay = net::dns::Relay::bind(upstream, net::dns::RelayLimits::default())
        .await
        .map_err(|e| StartError::Config(format!("DNS relay to {upstream}: {e}")))?;
    // Answers for names on a sandbox's egress allow-list open their
    // addresses in its TAP's guard.
    relay.learn_into(core.name_sets());
    let relaying = tokio::spawn(relay.clone().run());
    names.refresh(&store).await;
    let lookup_names = names.clone();
    let lookup: net::dns::NameLookup =
        Arc::new(move |n: &str, from: IpAddr| lookup_names.lookup(n, from));
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    core.subscribe_networks(tx);
    let responders = tokio::spawn(keep_responders(events, lookup, relay));
    let refresher = tokio::spawn(async move {
        let mut every = tokio::time::interval(REFRESH);
        loop {
            every.tick().await;
            names.refresh(&store).await;
        }
    });
    Ok(vec![responders, refresher, relaying])
}

/// The responders by bridge; dropping this stops them all.
#[derive(Debug, Default)]
struct Responders(std::collections::HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for Responders {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Binds a gateway's port 53. A bridge that went and came back may still
/// have its old responder's socket bound while that task is being
/// cancelled: retry briefly.
async fn bind_gateway(gateway: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let mut tries = 0;
    loop {
        match tokio::net::UdpSocket::bind(gateway).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

/// Starts a responder on each gateway that comes up and stops it when its
/// bridge goes.
async fn keep_responders(
    mut events: tokio::sync::mpsc::UnboundedReceiver<bhatti_core::NetworkEvent>,
    lookup: net::dns::NameLookup,
    relay: Arc<net::dns::Relay>,
) {
    let mut running = Responders::default();
    while let Some(event) = events.recv().await {
        match event {
            bhatti_core::NetworkEvent::Up(net) => {
                let gateway = SocketAddr::from((net.subnet.gateway(), 53));
                let socket = match bind_gateway(gateway).await {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        tracing::error!(%gateway, error = %e, "cannot serve DNS on a user's gateway; their sandboxes will not resolve names");
                        continue;
                    }
                };
                tracing::info!(%gateway, bridge = %net.bridge, "DNS responder up");
                let lookup = lookup.clone();
                let relay = relay.clone();
                // Only this network's guests are answered.
                let clients = net::Cidr::from(net.subnet);
                let task = tokio::spawn(async move {
                    if let Err(e) =
                        net::dns::serve(socket, lookup, "bhatti".into(), relay, clients).await
                    {
                        tracing::error!(%gateway, error = %e, "a DNS responder stopped");
                    }
                });
                if let Some(old) = running.0.insert(net.bridge, task) {
                    old.abort();
                }
            }
            bhatti_core::NetworkEvent::Down(net) => {
                if let Some(task) = running.0.remove(&net.bridge) {
                    task.abort();
                    tracing::info!(bridge = %net.bridge, "DNS responder down");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_only_within_the_askers_user() {
        let names = GuestNames::default();
        *names.entries.write().unwrap() = vec![
            ("10.0.0.2".parse().unwrap(), "alice".into(), "web".into()),
            ("10.0.0.3".parse().unwrap(), "alice".into(), "db".into()),
            ("10.0.0.4".parse().unwrap(), "bob".into(), "db".into()),
        ];
        let from_alice: IpAddr = "10.0.0.2".parse().unwrap();
        let from_bob: IpAddr = "10.0.0.4".parse().unwrap();
        assert_eq!(
            names.lookup("db", from_alice),
            Some("10.0.0.3".parse().unwrap())
        );
        assert_eq!(
            names.lookup("DB", from_bob),
            Some("10.0.0.4".parse().unwrap())
        );
        assert_eq!(
            names.lookup("web", from_bob),
            None,
            "bob cannot see alice's names"
        );
        assert_eq!(
            names.lookup("web", "10.0.0.99".parse().unwrap()),
            None,
            "strangers get nothing"
        );
    }
}
