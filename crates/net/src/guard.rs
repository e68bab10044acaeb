//! The TAP guard: what a VM may put on its bridge, enforced where its
//! frames enter the host — the bridge's `prerouting` hook, in an nftables
//! `bridge` table of bhatti's own (`bridge bhatti`).
//!
//! Every frame from a sandbox's TAP must carry the sandbox's MAC as its
//! source; ARP must claim the sandbox's own MAC and IPv4 address; IPv4
//! must come from the sandbox's own address; nothing but IPv4 and ARP
//! passes (no IPv6, no VLAN tags, no other ethertypes). With that, a
//! source address on the host means that sandbox, which the firewall
//! ([`crate::Firewall`]), the DNS responder and rp_filter then rely on.
//!
//! Why nftables' bridge family and not iptables `physdev` + `-m mac`:
//! iptables only sees bridged frames on hosts that load `br_netfilter`,
//! never sees ARP, and frames between two sandboxes of one user never
//! leave the bridge; the bridge hook sees every frame a TAP sends,
//! whatever its type or destination, on every host with nftables
//! (Linux 3.18+). Why not `ebtables`: on current distributions it is a
//! front end that writes these same nftables rules, with one command per
//! rule and no transactions; `nft -f` replaces a TAP's rules in one
//! atomic transaction.
//!
//! Layout (one chain and one set per TAP, found through a verdict map, so
//! a frame meets only its own TAP's rules however many there are):
//!
//! ```text
//! table bridge bhatti {
//!   map taps { type ifname : verdict }          "tu0ad20002" : jump t_7475…
//!   chain prerouting { hook prerouting priority -300; iifname vmap @taps }
//!   set e_7475… { type ipv4_addr; flags interval }   egress allow-list
//!   set d_7475… { type ipv4_addr; flags timeout }    learned from DNS
//!   chain t_7475… { ether saddr != MAC drop; arp …; ip saddr != IP drop; [egress]; ether type ip accept; drop }
//! }
//! ```
//!
//! The per-sandbox egress policy ([`Egress`]) lives in the same chain:
//! `None` lets IPv4 go only to the gateway (its DNS and ping), `Allow`
//! only to the gateway, the listed prefixes and — when the list holds
//! names — the addresses in the `d_` set, which the DNS relay fills from
//! its answers for those names, each with the record's TTL
//! ([`crate::egress::NameSets`]). It narrows what the firewall allows and
//! never widens it: a listed private prefix (or a name answered with a
//! private address) is still denied unless the operator allows it too.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::cidr::Cidr;
pub use crate::egress::Egress;
use crate::subnet::Mac;

/// The nftables table bhatti's TAP guards live in.
pub const GUARD_TABLE: &str = "bhatti";

/// Everything a TAP's guard needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapGuard {
    /// The TAP.
    pub tap: String,
    /// The sandbox's MAC.
    pub mac: Mac,
    /// The sandbox's address.
    pub ip: Ipv4Addr,
    /// Its gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// Where it may send.
    pub egress: Egress,
    /// Addresses the DNS relay learned for names on its allow-list, with
    /// the time they have left (kept when a guard is replaced).
    pub learned: Vec<(Ipv4Addr, Duration)>,
}

/// nftables names for a TAP: `t_`/`e_` and the name in hex (interface
/// names may hold `-` and `.`, which nftables identifiers may not).
fn names(tap: &str) -> (String, String) {
    let hex = hex(tap);
    (format!("t_{hex}"), format!("e_{hex}"))
}

fn hex(tap: &str) -> String {
    tap.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The set of addresses learned from DNS answers for a TAP (`d_` and the
/// name in hex): IPv4 elements with timeouts.
pub fn learned_set(tap: &str) -> String {
    format!("d_{}", hex(tap))
}

/// `1.2.3.4 timeout 60s` (whole seconds, at least one).
fn timed(addr: Ipv4Addr, left: Duration) -> String {
    format!("{addr} timeout {}s", left.as_secs().max(1))
}

/// The `nft -f` script that allows a TAP's guest to reach `addrs` for the
/// time given with each (learned from DNS answers), restarting the timeout
/// of an address already there: each is declared (a no-op when present),
/// deleted and added again, in one transaction. Pure.
pub fn learn_script(tap: &str, addrs: &[(Ipv4Addr, Duration)]) -> String {
    let (t, set) = (GUARD_TABLE, learned_set(tap));
    let mut s = String::new();
    for (addr, left) in addrs {
        let _ = write!(
            s,
            "add element bridge {t} {set} {{ {addr} }}\n\
             delete element bridge {t} {set} {{ {addr} }}\n\
             add element bridge {t} {set} {{ {} }}\n",
            timed(*addr, *left)
        );
    }
    s
}

/// The table, the map and the base chain with its one rule: declared
/// (which creates what is missing and leaves the rest) and the base chain
/// refilled in the same transaction, so it holds exactly one rule.
fn base() -> String {
    format!(
        "table bridge {GUARD_TABLE} {{\n\
         \tmap taps {{ type ifname : verdict; }}\n\
         \tchain prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
         }}\n\
         flush chain bridge {GUARD_TABLE} prerouting\n\
         add rule bridge {GUARD_TABLE} prerouting iifname vmap @taps\n"
    )
}

/// The `nft -f` script that installs (or replaces) `g`. Pure.
pub fn guard_script(g: &TapGuard) -> String {
    let (chain, set) = names(&g.tap);
    let dset = learned_set(&g.tap);
    let t = GUARD_TABLE;
    let (tap, mac, ip, gw) = (&g.tap, g.mac, g.ip, g.gateway);
    let mut s = base();
    let _ = write!(
        s,
        "add chain bridge {t} {chain}\n\
         flush chain bridge {t} {chain}\n\
         add set bridge {t} {set} {{ type ipv4_addr; flags interval; }}\n\
         flush set bridge {t} {set}\n\
         add set bridge {t} {dset} {{ type ipv4_addr; flags timeout; }}\n\
         flush set bridge {t} {dset}\n"
    );
    let names = !g.egress.names().is_empty();
    if names && !g.learned.is_empty() {
        let elems: Vec<String> = g.learned.iter().map(|(a, l)| timed(*a, *l)).collect();
        let _ = writeln!(
            s,
            "add element bridge {t} {dset} {{ {} }}",
            elems.join(", ")
        );
    }
    let mut allowed: Vec<String> = Vec::new();
    match &g.egress {
        Egress::Public => {}
        Egress::None => allowed.push(gw.to_string()),
        Egress::Allow(_) => {
            allowed.push(gw.to_string());
            allowed.extend(g.egress.cidrs().iter().map(Cidr::to_string));
        }
    }
    if !allowed.is_empty() {
        let _ = writeln!(
            s,
            "add element bridge {t} {set} {{ {} }}",
            allowed.join(", ")
        );
    }
    let rule = |s: &mut String, r: &str| {
        let _ = writeln!(s, "add rule bridge {t} {chain} {r}");
    };
    rule(&mut s, &format!("ether saddr != {mac} drop"));
    // Only Ethernet/IPv4 ARP, so the address checks read the fields they mean.
    rule(&mut s, "arp hlen != 6 drop");
    rule(&mut s, "arp plen != 4 drop");
    rule(&mut s, "arp ptype != ip drop");
    rule(&mut s, &format!("arp saddr ether != {mac} drop"));
    rule(&mut s, &format!("arp saddr ip != {ip} drop"));
    rule(&mut s, "ether type arp accept");
    rule(&mut s, &format!("ip saddr != {ip} drop"));
    if names {
        // Listed prefixes, or addresses the gateway's DNS gave for listed names.
        rule(
            &mut s,
            &format!("ip daddr != @{set} ip daddr != @{dset} drop"),
        );
    } else if g.egress != Egress::Public {
        rule(&mut s, &format!("ip daddr != @{set} drop"));
    }
    rule(&mut s, "ether type ip accept");
    rule(&mut s, "drop");
    let _ = writeln!(
        s,
        "add element bridge {t} taps {{ \"{tap}\" : jump {chain} }}"
    );
    s
}

/// The `nft -f` script that removes a TAP's guard, whether or not it
/// exists: everything is declared first (a no-op for what exists), then
/// deleted, in one transaction. Pure.
pub fn unguard_script(tap: &str) -> String {
    let (chain, set) = names(tap);
    let dset = learned_set(tap);
    let t = GUARD_TABLE;
    let mut s = base();
    let _ = write!(
        s,
        "add chain bridge {t} {chain}\n\
         add set bridge {t} {set} {{ type ipv4_addr; flags interval; }}\n\
         add set bridge {t} {dset} {{ type ipv4_addr; flags timeout; }}\n\
         add element bridge {t} taps {{ \"{tap}\" : jump {chain} }}\n\
         delete element bridge {t} taps {{ \"{tap}\" }}\n\
         flush chain bridge {t} {chain}\n\
         delete chain bridge {t} {chain}\n\
         delete set bridge {t} {set}\n\
         delete set bridge {t} {dset}\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(egress: Egress) -> TapGuard {
        TapGuard {
            tap: "tu0ad20002".into(),
            mac: Mac::for_ip(Ipv4Addr::new(10, 210, 0, 2)),
            ip: Ipv4Addr::new(10, 210, 0, 2),
            gateway: Ipv4Addr::new(10, 210, 0, 1),
            egress,
            learned: Vec::new(),
        }
    }

    #[test]
    fn names_are_nft_identifiers_and_unambiguous() {
        let (c, s) = names("tu-a.b");
        assert_eq!(
            (c.as_str(), s.as_str()),
            ("t_74752d612e62", "e_74752d612e62")
        );
        assert_ne!(names("tu-a").0, names("tu_a").0);
        assert!(c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }

    #[test]
    fn a_public_guard_pins_mac_arp_and_source_and_drops_other_ethertypes() {
        let s = guard_script(&guard(Egress::Public));
        let rules: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix("add rule bridge bhatti t_74753061643230303032 "))
            .collect();
        assert_eq!(
            rules,
            [
                "ether saddr != 02:b4:0a:d2:00:02 drop",
                "arp hlen != 6 drop",
                "arp plen != 4 drop",
                "arp ptype != ip drop",
                "arp saddr ether != 02:b4:0a:d2:00:02 drop",
                "arp saddr ip != 10.210.0.2 drop",
                "ether type arp accept",
                "ip saddr != 10.210.0.2 drop",
                "ether type ip accept",
                "drop",
            ]
        );
        assert!(s.contains("flush chain bridge bhatti t_74753061643230303032\n"));
        assert!(s.ends_with(
            "add element bridge bhatti taps { \"tu0ad20002\" : jump t_74753061643230303032 }\n"
        ));
        assert!(!s.contains("add element bridge bhatti e_"), "no allow-list");
        // The base chain is refilled, never appended to.
        assert_eq!(s.matches("add rule bridge bhatti prerouting").count(), 1);
        assert!(s.contains("flush chain bridge bhatti prerouting\n"));
    }

    #[test]
    fn egress_none_and_allow_lists_narrow_ipv4_destinations() {
        let none = guard_script(&guard(Egress::None));
        assert!(none.contains("add element bridge bhatti e_74753061643230303032 { 10.210.0.1 }\n"));
        assert!(none.contains("ip daddr != @e_74753061643230303032 drop\n"));
        let allow = guard_script(&guard(
            Egress::allow(&["203.0.113.10", "10.1.2.0/24"]).unwrap(),
        ));
        assert!(allow.contains(
            "add element bridge bhatti e_74753061643230303032 { 10.210.0.1, 203.0.113.10/32, 10.1.2.0/24 }\n"
        ));
        // The source check comes before the destination check.
        let src = allow.find("ip saddr != 10.210.0.2 drop").unwrap();
        let dst = allow.find("ip daddr != @e_").unwrap();
        assert!(src < dst);
    }

    #[test]
    fn unguard_declares_then_deletes() {
        let s = unguard_script("tu0ad20002");
        let add = s.find("add chain bridge bhatti t_").unwrap();
        let del = s.find("delete chain bridge bhatti t_").unwrap();
        assert!(add < del);
        assert!(s.contains("delete element bridge bhatti taps { \"tu0ad20002\" }"));
        assert!(s.contains("delete set bridge bhatti e_"));
    }
}
