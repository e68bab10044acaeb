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
//! Policy: traffic between two sandbox bridges is dropped (a user's
//! sandboxes share one bridge, where frames are switched without
//! reaching these chains; an accept for bridged frames — `physdev
//! --physdev-is-bridged`, which only ever matches frames that stay on one
//! bridge — keeps that true on hosts that send bridged frames through
//! iptables with `br_netfilter`, without a rule per bridge, so bridges can
//! come and go with users without touching the rules); sandboxes may not open
//! connections to the host except DNS (and pings) to their gateway; replies to
//! connections the host opened (the agent, proxies) pass; sandboxes reach
//! the outside through NAT.

use std::process::Command;
use std::sync::Arc;

use crate::error::{NetError, Result};
use crate::subnet::Subnet;

pub const CHAIN_FORWARD: &str = "BHATTI-FWD";
pub const CHAIN_INPUT: &str = "BHATTI-IN";
pub const CHAIN_NAT: &str = "BHATTI-NAT";

/// What the rules cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Prefix every sandbox bridge name starts with (`bh` matches `bhatti0`,
    /// `bhu1`, …); rules use it as an iptables wildcard (`bh+`).
    pub bridge_prefix: String,
    /// Sandbox subnets to masquerade (the whole per-user range will do).
    pub subnets: Vec<Subnet>,
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

/// The contents of bhatti's chains for `cfg`, in order. Pure.
pub fn plan(cfg: &FirewallConfig) -> Vec<Rule> {
    let any = format!("{}+", cfg.bridge_prefix);
    let mut rules = vec![rule(
        "filter",
        CHAIN_FORWARD,
        "-m physdev --physdev-is-bridged -j ACCEPT",
    )];
    rules.extend([
        rule(
            "filter",
            CHAIN_FORWARD,
            &format!("-i {any} -o {any} -j DROP"),
        ),
        rule(
            "filter",
            CHAIN_FORWARD,
            &format!("-o {any} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ),
        rule("filter", CHAIN_FORWARD, &format!("-o {any} -j DROP")),
        rule("filter", CHAIN_FORWARD, &format!("-i {any} -j ACCEPT")),
        rule(
            "filter",
            CHAIN_INPUT,
            &format!("-i {any} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ),
        rule(
            "filter",
            CHAIN_INPUT,
            &format!("-i {any} -p udp --dport 53 -j ACCEPT"),
        ),
        rule(
            "filter",
            CHAIN_INPUT,
            &format!("-i {any} -p tcp --dport 53 -j ACCEPT"),
        ),
        // Pinging the gateway is how anyone first checks a network; an
        // echo request opens nothing.
        rule(
            "filter",
            CHAIN_INPUT,
            &format!("-i {any} -p icmp --icmp-type echo-request -j ACCEPT"),
        ),
        rule("filter", CHAIN_INPUT, &format!("-i {any} -j DROP")),
    ]);
    for s in &cfg.subnets {
        rules.push(rule(
            "nat",
            CHAIN_NAT,
            &format!("-s {s} ! -o {any} -j MASQUERADE"),
        ));
    }
    rules
}

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
        for (table, _, chain) in JUMPS {
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
            if self.ipt.run(table, &["-L", chain, "-n"])? {
                self.must(table, &["-F", chain], &format!("flush chain {chain}"))?;
                self.must(table, &["-X", chain], &format!("delete chain {chain}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_isolates_bridges_guards_the_host_and_masquerades() {
        let cfg = FirewallConfig {
            bridge_prefix: "bh".into(),
            subnets: vec!["10.210.1.0/24".parse().unwrap()],
        };
        let text: Vec<String> = plan(&cfg)
            .iter()
            .map(|r| format!("{} {} {}", r.table, r.chain, r.args.join(" ")))
            .collect();
        assert_eq!(
            text,
            [
                "filter BHATTI-FWD -m physdev --physdev-is-bridged -j ACCEPT",
                "filter BHATTI-FWD -i bh+ -o bh+ -j DROP",
                "filter BHATTI-FWD -o bh+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "filter BHATTI-FWD -o bh+ -j DROP",
                "filter BHATTI-FWD -i bh+ -j ACCEPT",
                "filter BHATTI-IN -i bh+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "filter BHATTI-IN -i bh+ -p udp --dport 53 -j ACCEPT",
                "filter BHATTI-IN -i bh+ -p tcp --dport 53 -j ACCEPT",
                "filter BHATTI-IN -i bh+ -p icmp --icmp-type echo-request -j ACCEPT",
                "filter BHATTI-IN -i bh+ -j DROP",
                "nat BHATTI-NAT -s 10.210.1.0/24 ! -o bh+ -j MASQUERADE",
            ]
        );
    }
}
