//! [`IpRoute`]: [`NetOps`] through iproute2's `ip` command.
//!
//! Why not rtnetlink in-process: one `ip` invocation costs ~2 ms here (a
//! bridge, a TAP and a neighbour entry — 7 commands — took 13 ms in a
//! namespace), against a VM boot of over a second; the `ip` binary is on
//! every host we target, its messages are what operators already know, and
//! the crate stays free of a netlink stack and its async runtime coupling.
//! Revisit when per-VM setup shows up in a profile (snapshot restores at
//! tens of milliseconds).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::error::{NetError, Result};
use crate::guard::{guard_script, learn_script, unguard_script, TapGuard};
use crate::names::check_ifname;
use crate::ops::NetOps;
use crate::subnet::Mac;

/// [`NetOps`] by running `ip` (iproute2, with JSON output: 4.13 or later)
/// and, for TAP guards, `nft` (nftables).
#[derive(Debug, Clone)]
pub struct IpRoute {
    program: PathBuf,
    nft: PathBuf,
}

impl Default for IpRoute {
    fn default() -> Self {
        IpRoute::new("ip")
    }
}

/// One link as `ip -j -d link show` prints it (the fields we read).
#[derive(Debug, Deserialize)]
struct LinkJson {
    ifname: String,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

/// What a failed command printed, to tell "absent" from real failures.
struct Failure {
    error: NetError,
    stderr: String,
}

impl IpRoute {
    /// Uses `program` as the `ip` binary.
    pub fn new(program: impl Into<PathBuf>) -> IpRoute {
        IpRoute {
            program: program.into(),
            nft: PathBuf::from("nft"),
        }
    }

    /// Runs `nft -f -` with `script` on its standard input (one transaction).
    fn nft(&self, op: &str, script: &str) -> Result<()> {
        tracing::debug!(%script, "nft");
        let spawn = |source| NetError::Spawn {
            program: self.nft.clone(),
            source,
        };
        let mut child = Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(NetError::Command {
                op: op.to_owned(),
                command: format!("{} -f -", self.nft.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    fn run_raw(&self, op: &str, args: &[&str]) -> std::result::Result<String, Failure> {
        let command = format!("{} {}", self.program.display(), args.join(" "));
        tracing::debug!(%command, "net");
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|source| Failure {
                error: NetError::Spawn {
                    program: self.program.clone(),
                    source,
                },
                stderr: String::new(),
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if !out.status.success() {
            return Err(Failure {
                error: NetError::Command {
                    op: op.to_owned(),
                    command,
                    status: out.status.to_string(),
                    stderr: stderr.clone(),
                },
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, op: &str, args: &[&str]) -> Result<String> {
        self.run_raw(op, args).map_err(|f| f.error)
    }

    /// The link called `name`, if it exists.
    fn link(&self, name: &str) -> Result<Option<LinkJson>> {
        let args = ["-j", "-d", "link", "show", "dev", name];
        match self.run_raw(&format!("look up link {name}"), &args) {
            Ok(out) => {
                let mut links: Vec<LinkJson> =
                    serde_json::from_str(&out).map_err(|source| NetError::Parse {
                        command: format!("ip {}", args.join(" ")),
                        source,
                    })?;
                Ok(links.pop())
            }
            Err(f) if f.stderr.contains("does not exist") => Ok(None),
            Err(f) => Err(f.error),
        }
    }
}

/// Writes a `/proc/sys` file (of the calling thread's network namespace).
fn sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        path: path.into(),
        source,
    })
}

/// Disables IPv6 on a link; a kernel without IPv6 has nothing to disable.
fn disable_ipv6(name: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    sysctl(&path, "1")
}

impl NetOps for IpRoute {
    fn create_bridge(&self, name: &str, mac: Mac, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        check_ifname(name)?;
        match self.link(name)? {
            None => {
                self.run(
                    &format!("create bridge {name}"),
                    &["link", "add", "name", name, "type", "bridge"],
                )?;
            }
            Some(link) => {
                let kind = link
                    .linkinfo
                    .and_then(|i| i.info_kind)
                    .unwrap_or_else(|| "device".to_owned());
                if kind != "bridge" {
                    return Err(NetError::WrongKind {
                        name: link.ifname,
                        found: kind,
                        wanted: "bridge",
                    });
                }
            }
        }
        // Before it comes up: no IPv6 (so no link-local address a guest
        // could reach host services on `[::]` through), strict reverse-path
        // filtering (a packet from a guest must come from an address routed
        // back through this bridge), ARP answered only for the bridge's own
        // address (not the host's others).
        disable_ipv6(name)?;
        sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "1")?;
        sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/arp_ignore"), "1")?;
        let cidr = format!("{addr}/{prefix}");
        self.run(
            &format!("address bridge {name}"),
            &["addr", "replace", &cidr, "dev", name],
        )?;
        self.set_link_up(name, Some(mac))
    }

    fn create_tap(&self, name: &str, owner_uid: u32, bridge: &str) -> Result<()> {
        check_ifname(name)?;
        check_ifname(bridge)?;
        let uid = owner_uid.to_string();
        self.run(
            &format!("create TAP {name}"),
            &["tuntap", "add", "dev", name, "mode", "tap", "user", &uid],
        )?;
        let attached = disable_ipv6(name).and_then(|()| {
            self.run(
                &format!("attach TAP {name} to {bridge}"),
                &["link", "set", "dev", name, "master", bridge, "up"],
            )
            .map(drop)
        });
        if let Err(e) = attached {
            // Do not leave a half-made TAP behind; the attach error is the
            // one worth reporting.
            if let Err(cleanup) = self.delete_link(name) {
                tracing::warn!(tap = name, error = %cleanup, "removing a TAP that failed to attach");
            }
            return Err(e);
        }
        Ok(())
    }

    fn set_link_up(&self, name: &str, mac: Option<Mac>) -> Result<()> {
        check_ifname(name)?;
        let mac = mac.map(|m| m.to_string());
        let mut args = vec!["link", "set", "dev", name];
        if let Some(m) = &mac {
            args.extend(["address", m.as_str()]);
        }
        args.push("up");
        self.run(&format!("set link {name} up"), &args).map(drop)
    }

    fn delete_link(&self, name: &str) -> Result<bool> {
        check_ifname(name)?;
        match self.run_raw(
            &format!("delete link {name}"),
            &["link", "del", "dev", name],
        ) {
            Ok(_) => Ok(true),
            Err(f) if f.stderr.contains("Cannot find device") => Ok(false),
            Err(f) => Err(f.error),
        }
    }

    fn list_links(&self, prefix: &str) -> Result<Vec<String>> {
        let args = ["-j", "link", "show"];
        let out = self.run("list links", &args)?;
        let links: Vec<LinkJson> =
            serde_json::from_str(&out).map_err(|source| NetError::Parse {
                command: format!("ip {}", args.join(" ")),
                source,
            })?;
        let mut names: Vec<String> = links
            .into_iter()
            .map(|l| l.ifname)
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    fn set_neighbour(&self, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        check_ifname(dev)?;
        let (ip, mac) = (ip.to_string(), mac.to_string());
        self.run(
            &format!("add neighbour {ip} on {dev}"),
            &[
                "neigh",
                "replace",
                &ip,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ],
        )
        .map(drop)
    }

    fn delete_neighbour(&self, dev: &str, ip: Ipv4Addr) -> Result<bool> {
        check_ifname(dev)?;
        let ip = ip.to_string();
        match self.run_raw(
            &format!("delete neighbour {ip} on {dev}"),
            &["neigh", "del", &ip, "dev", dev],
        ) {
            Ok(_) => Ok(true),
            // The entry is gone, or so is the device it was on.
            Err(f)
                if f.stderr.contains("No such file or directory")
                    || f.stderr.contains("Cannot find device") =>
            {
                Ok(false)
            }
            Err(f) => Err(f.error),
        }
    }

    fn guard_tap(&self, guard: &TapGuard) -> Result<()> {
        check_ifname(&guard.tap)?;
        self.nft(&format!("guard TAP {}", guard.tap), &guard_script(guard))
    }

    fn allow_learned(&self, tap: &str, addrs: &[(Ipv4Addr, std::time::Duration)]) -> Result<()> {
        check_ifname(tap)?;
        if addrs.is_empty() {
            return Ok(());
        }
        self.nft(
            &format!("allow learned addresses on TAP {tap}"),
            &learn_script(tap, addrs),
        )
    }

    fn unguard_tap(&self, tap: &str) -> Result<()> {
        check_ifname(tap)?;
        self.nft(&format!("unguard TAP {tap}"), &unguard_script(tap))
    }
}

/// Removes every TAP guard (the `bridge bhatti` table): `bhatti serve
/// --cleanup`. `Ok(false)` when there was none.
pub fn remove_guards() -> Result<bool> {
    let t = crate::guard::GUARD_TABLE;
    let ip = IpRoute::default();
    // Declared first, so the delete cannot fail for its absence.
    let existed = Command::new(&ip.nft)
        .args(["list", "table", "bridge", t])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| NetError::Spawn {
            program: ip.nft.clone(),
            source,
        })?
        .success();
    ip.nft(
        "remove the TAP guards",
        &format!(
            "add table bridge {t}
delete table bridge {t}
"
        ),
    )?;
    Ok(existed)
}
