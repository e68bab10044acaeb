//! The daemon's network services around the sandboxes' bridge: the
//! firewall (and NAT out), and the DNS responder on the gateway, which
//! answers each guest with the addresses of its own user's sandboxes and
//! relays every other name upstream.

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
    let subnet: net::Subnet = config
        .network
        .subnet
        .parse()
        .map_err(|e| StartError::Config(format!("network.subnet: {e}")))?;
    Ok(net::FirewallConfig {
        bridge_prefix: config.network.bridge.clone(),
        bridges: vec![config.network.bridge.clone()],
        subnets: vec![subnet],
    })
}

/// Removes bhatti's firewall rules (`bhatti serve --cleanup`).
pub fn cleanup() -> Result<(), net::NetError> {
    net::Firewall::new(Arc::new(net::IptablesCommand::default())).remove()
}

/// Applies the firewall (when enabled), turns on forwarding for NAT, and
/// starts the DNS responder on the gateway and its name-table refresher.
pub async fn start(
    config: &DaemonConfig,
    store: Arc<store::Store>,
    names: Arc<GuestNames>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    let subnet: net::Subnet = config
        .network
        .subnet
        .parse()
        .map_err(|e| StartError::Config(format!("network.subnet: {e}")))?;
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
    let gateway = SocketAddr::from((subnet.gateway(), 53));
    let socket = tokio::net::UdpSocket::bind(gateway)
        .await
        .map_err(|e| StartError::Config(format!("cannot serve DNS on {gateway}: {e}")))?;
    tracing::info!(%gateway, %upstream, "DNS responder");
    names.refresh(&store).await;
    let lookup_names = names.clone();
    let lookup: net::dns::NameLookup =
        Arc::new(move |n: &str, from: IpAddr| lookup_names.lookup(n, from));
    let dns = tokio::spawn(async move {
        if let Err(e) = net::dns::serve(Arc::new(socket), lookup, "bhatti".into(), upstream).await {
            tracing::error!(error = %e, "the DNS responder stopped");
        }
    });
    let refresher = tokio::spawn(async move {
        let mut every = tokio::time::interval(REFRESH);
        loop {
            every.tick().await;
            names.refresh(&store).await;
        }
    });
    Ok(vec![dns, refresher])
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
