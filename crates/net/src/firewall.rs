//! The sandbox firewall, with iptables.
//!
//! Why iptables rather than nftables: it is on every Debian/Ubuntu host
//! (on current ones as the `iptables-nft` front end, so the rules land in
//! nftables anyway), coexists with Docker's and firewalld's own iptables
//! chains, and its `-C` check makes idempotent insertion straightforward.
//!
//! bhatti owns three chains and jumps to them from the built-in ones:
//!
//! ```text
//! filter FORWARD     -j BHATTI-FWD   sandbox ⇄ sandbox and sandbox → world
//! filter INPUT       -j BHATTI-IN    sandbox → host
//! nat    POSTROUTING -j BHATTI-NAT   masquerade sandbox subnets going out
//! ```
//!
//! Applying flushes and refills only those chains and adds a jump only
//! when it is missing, so any number of daemon restarts leave exactly one
//! copy of each rule, and rules bhatti did not create are never touched.
//! [`Firewall::remove`] deletes the jumps and the chains.
//!
//! Policy, for packets a sandbox sends (its source address is its own: the
//! TAP guard in [`crate::guard`] drops anything else before it reaches
//! these chains):
//!
//! * **Its own user's sandboxes**: they share one bridge, where frames are
//!   switched without reaching these chains; on hosts that send bridged
//!   frames through iptables (`br_netfilter`), `physdev
//!   --physdev-is-bridged` — which only matches frames that stay on one
//!   bridge — accepts them, without a rule per bridge, so bridges come and
//!   go with users without touching the rules.
//! * **Other users' sandboxes, and anything else opening a connection into
//!   a sandbox bridge**: dropped (`-o bh+`); replies pass.
//! * **A port the host publishes through DNAT** (Docker's `-p`): the host's
//!   `nat PREROUTING` rewrites the destination *before* these filter
//!   chains see the packet, so a destination check alone would judge the
//!   rewritten address. `--ctstate DNAT` matches every connection whose
//!   destination was rewritten, wherever to, and drops it (FORWARD and INPUT).
//! * **The host itself**: only DNS and pings, and only to the gateway of
//!   the bridge the packet came in on (`addrtype --dst-type LOCAL
//!   --limit-iface-in`): not the host's other addresses, not another
//!   user's gateway. Replies to connections the host opened (the agent,
//!   the proxies) pass.
//! * **Everything else** goes through [`CHAIN_EGRESS`]: the operator's
//!   `allow` prefixes are accepted, [`crate::DEFAULT_DENY`] (private,
//!   link-local/metadata, CGNAT, loopback, multicast, reserved) and the
//!   operator's `deny` prefixes are rejected (an ICMP error, so a guest's
//!   `npm install` fails at once instead of hanging), and the rest — the
//!   public internet — is accepted and masqueraded.

use std::process::Command;
use std::sync::Arc;

use crate::cidr::{default_deny, Cidr};
use crate::error::{NetError, Result};
use crate::subnet::Subnet;

pub const CHAIN_FORWARD: &str = "BHATTI-FWD";
pub const CHAIN_INPUT: &str = "BHATTI-IN";
pub const CHAIN_NAT: &str = "BHATTI-NAT";
/// Where a sandbox's packets to the world are judged by destination.
pub const CHAIN_EGRESS: &str = "BHATTI-EGRESS";

/// What the rules cover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirewallConfig {
    /// Prefix every sandbox bridge name starts with (`bh` matches `bhatti0`,
    /// `bhu1`, …); rules use it as an iptables wildcard (`bh+`).
    pub bridge_prefix: String,
    /// Sandbox subnets to masquerade (the whole per-user range will do).
    pub subnets: Vec<Subnet>,
    /// Destinations sandboxes may reach although the default denies them
    /// (`[network] allow_cidrs`: a LAN registry). Allow beats deny.
    pub allow: Vec<Cidr>,
    /// Destinations denied on top of [`crate::DEFAULT_DENY`]
    /// (`[network] deny_cidrs`).
    pub deny: Vec<Cidr>,
}

/// One rule: table, chain and the arguments after `-A <chain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub args: Vec<String>,
}

fn rule(table: &'static str, chain: &'static str, args: &str) -> Rule {
    Rule {
        table,
        chain,
        args: args.split_whitespace().map(String::from).collect(),
    }
}

/// How a denied destination is refused: at once, so the guest's client
/// fails fast rather than timing out.
const REJECT: &str = "-j REJECT --reject-with icmp-admin-prohibited";

/// The contents of bhatti's chains for `cfg`, in order. Pure.
pub fn plan(cfg: &FirewallConfig) -> Vec<Rule> {
    let any = format!("{}+", cfg.bridge_prefix);
    let fwd = |args: &str| rule("filter", CHAIN_FORWARD, args);
    let input = |args: &str| rule("filter", CHAIN_INPUT, args);
    let egress = |args: &str| rule("filter", CHAIN_EGRESS, args);
    // The gateway of the bridge the packet came in on, and no other
    // address of the host.
    let own_gateway = "-m addrtype --dst-type LOCAL --limit-iface-in";
    let mut rules = vec![
        fwd("-m physdev --physdev-is-bridged -j ACCEPT"),
        fwd(&format!(
            "-o {any} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        )),
        fwd(&format!("-o {any} -j DROP")),
        fwd(&format!("-i {any} -m conntrack --ctstate DNAT -j DROP")),
        fwd(&format!("-i {any} -j {CHAIN_EGRESS}")),
        input(&format!(
            "-i {any} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        )),
        input(&format!("-i {any} -m conntrack --ctstate DNAT -j DROP")),
        input(&format!(
            "-i {any} -p udp --dport 53 {own_gateway} -j ACCEPT"
        )),
        input(&format!(
            "-i {any} -p tcp --dport 53 {own_gateway} -j ACCEPT"
        )),
        // Pinging the gateway is how anyone first checks a network; an
        // echo request opens nothing.
        input(&format!(
            "-i {any} -p icmp --icmp-type echo-request {own_gateway} -j ACCEPT"
        )),
        input(&format!("-i {any} -j DROP")),
    ];
    for c in &cfg.allow {
        rules.push(egress(&format!("-d {c} -j ACCEPT")));
    }
    for c in default_deny().iter().chain(&cfg.deny) {
        rules.push(egress(&format!("-d {c} {REJECT}")));
    }
    rules.push(egress("-j ACCEPT"));
    for s in &cfg.subnets {
        rules.push(rule(
            "nat",
            CHAIN_NAT,
            &format!("-s {s} ! -o {any} -j MASQUERADE"),
        ));
    }
    rules
}

/// Every chain bhatti owns: (table, chain).
pub const CHAINS: [(&str, &str); 4] = [
    ("filter", CHAIN_FORWARD),
    ("filter", CHAIN_INPUT),
    ("filter", CHAIN_EGRESS),
    ("nat", CHAIN_NAT),
];

/// The jumps from built-in chains into bhatti's: (table, built-in, ours).
pub const JUMPS: [(&str, &str, &str); 3] = [
    ("filter", "FORWARD", CHAIN_FORWARD),
    ("filter", "INPUT", CHAIN_INPUT),
    ("nat", "POSTROUTING", CHAIN_NAT),
];

/// Runs iptables; `Ok(false)` when the command ran and failed (as `-C`
/// does for a missing rule).
pub trait Iptables: Send + Sync + std::fmt::Debug {
    fn run(&self, table: &str, args: &[&str]) -> Result<bool>;
}

/// The real `iptables` (with `-w`, waiting for the xtables lock).
#[derive(Debug, Clone)]
pub struct IptablesCommand {
    pub program: String,
}

impl Default for IptablesCommand {
    fn default() -> Self {
        IptablesCommand {
            program: "iptables".into(),
        }
    }
}

impl Iptables for IptablesCommand {
    fn run(&self, table: &str, args: &[&str]) -> Result<bool> {
        let out = Command::new(&self.program)
            .args(["-w", "-t", table])
            .args(args)
            .output()
            .map_err(|source| NetError::Spawn {
                program: self.program.clone().into(),
                source,
            })?;
        Ok(out.status.success())
    }
}

/// Applies and removes bhatti's rules.
#[derive(Debug, Clone)]
pub struct Firewall {
    ipt: Arc<dyn Iptables>,
}

impl Firewall {
    pub fn new(ipt: Arc<dyn Iptables>) -> Firewall {
        Firewall { ipt }
    }

    fn must(&self, table: &str, args: &[&str], op: &str) -> Result<()> {
        if self.ipt.run(table, args)? {
            Ok(())
        } else {
            Err(NetError::Command {
                op: op.to_string(),
                command: format!("iptables -t {table} {}", args.join(" ")),
                status: "failed".into(),
                stderr: String::new(),
            })
        }
    }

    /// Makes the rules exactly [`plan`]`(cfg)`. Idempotent.
    pub fn apply(&self, cfg: &FirewallConfig) -> Result<()> {
        for (table, chain) in CHAINS {
            // -N fails when the chain exists; -L tells which.
            if !self.ipt.run(table, &["-L", chain, "-n"])? {
                self.must(table, &["-N", chain], &format!("create chain {chain}"))?;
            }
            self.must(table, &["-F", chain], &format!("flush chain {chain}"))?;
        }
        for r in plan(cfg) {
            let mut args = vec!["-A", r.chain];
            args.extend(r.args.iter().map(String::as_str));
            self.must(r.table, &args, &format!("add a rule to {}", r.chain))?;
        }
        for (table, builtin, chain) in JUMPS {
            if !self.ipt.run(table, &["-C", builtin, "-j", chain])? {
                self.must(
                    table,
                    &["-I", builtin, "1", "-j", chain],
                    &format!("jump from {builtin} to {chain}"),
                )?;
            }
        }
        tracing::info!(bridges = %format!("{}+", cfg.bridge_prefix), "firewall rules applied");
        Ok(())
    }

    /// Removes bhatti's jumps and chains (`bhatti serve --cleanup`).
    pub fn remove(&self) -> Result<()> {
        for (table, builtin, chain) in JUMPS {
            while self.ipt.run(table, &["-C", builtin, "-j", chain])? {
                self.must(
                    table,
                    &["-D", builtin, "-j", chain],
                    &format!("unhook {chain}"),
                )?;
            }
        }
        // Flush them all before deleting any: BHATTI-FWD jumps to BHATTI-EGRESS.
        for (table, chain) in CHAINS {
            if self.ipt.run(table, &["-L", chain, "-n"])? {
                self.must(table, &["-F", chain], &format!("flush chain {chain}"))?;
            }
        }
        for (table, chain) in CHAINS {
            if self.ipt.run(table, &["-L", chain, "-n"])? {
                self.must(table, &["-X", chain], &format!("delete chain {chain}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(cfg: &FirewallConfig) -> Vec<String> {
        plan(cfg)
            .iter()
            .map(|r| format!("{} {} {}", r.table, r.chain, r.args.join(" ")))
            .collect()
    }

    fn cfg() -> FirewallConfig {
        FirewallConfig {
            bridge_prefix: "bh".into(),
            subnets: vec!["10.210.1.0/24".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn plan_isolates_bridges_guards_the_host_denies_private_ranges_and_masquerades() {
        let deny = |c: &str| {
            format!("filter BHATTI-EGRESS -d {c} -j REJECT --reject-with icmp-admin-prohibited")
        };
        let mut want: Vec<String> = [
            "filter BHATTI-FWD -m physdev --physdev-is-bridged -j ACCEPT",
            "filter BHATTI-FWD -o bh+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "filter BHATTI-FWD -o bh+ -j DROP",
            "filter BHATTI-FWD -i bh+ -m conntrack --ctstate DNAT -j DROP",
            "filter BHATTI-FWD -i bh+ -j BHATTI-EGRESS",
            "filter BHATTI-IN -i bh+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "filter BHATTI-IN -i bh+ -m conntrack --ctstate DNAT -j DROP",
            "filter BHATTI-IN -i bh+ -p udp --dport 53 -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT",
            "filter BHATTI-IN -i bh+ -p tcp --dport 53 -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT",
            "filter BHATTI-IN -i bh+ -p icmp --icmp-type echo-request -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT",
            "filter BHATTI-IN -i bh+ -j DROP",
        ]
        .map(String::from)
        .to_vec();
        for c in [
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "192.168.0.0/16",
            "198.18.0.0/15",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ] {
            want.push(deny(c));
        }
        want.push("filter BHATTI-EGRESS -j ACCEPT".into());
        want.push("nat BHATTI-NAT -s 10.210.1.0/24 ! -o bh+ -j MASQUERADE".into());
        assert_eq!(text(&cfg()), want);
    }

    #[test]
    fn operator_allows_come_first_and_denies_add_to_the_default() {
        let c = FirewallConfig {
            allow: vec!["192.168.77.0/24".parse().unwrap()],
            deny: vec!["203.0.113.66".parse().unwrap()],
            ..cfg()
        };
        let rules = text(&c);
        let egress: Vec<&String> = rules
            .iter()
            .filter(|r| r.contains("BHATTI-EGRESS -"))
            .collect();
        assert_eq!(
            egress.first().map(|s| s.as_str()),
            Some("filter BHATTI-EGRESS -d 192.168.77.0/24 -j ACCEPT"),
            "allow beats the default deny"
        );
        let last_two: Vec<&str> = egress[egress.len() - 2..]
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            last_two,
            [
                "filter BHATTI-EGRESS -d 203.0.113.66/32 -j REJECT --reject-with icmp-admin-prohibited",
                "filter BHATTI-EGRESS -j ACCEPT",
            ]
        );
        // Everything else is the default plan.
        let without: Vec<String> = rules
            .iter()
            .filter(|r| !r.contains("192.168.77.0/24 -j ACCEPT") && !r.contains("203.0.113.66"))
            .cloned()
            .collect();
        assert_eq!(without, text(&cfg()));
    }

    #[test]
    fn every_chain_a_rule_names_is_one_bhatti_owns() {
        for r in plan(&cfg()) {
            assert!(CHAINS.contains(&(r.table, r.chain)), "{r:?}");
            if let Some(i) = r.args.iter().position(|a| a == "-j") {
                let target = &r.args[i + 1];
                if target.starts_with("BHATTI") {
                    assert!(CHAINS.iter().any(|(_, c)| c == target), "{target}");
                }
            }
        }
    }
}
