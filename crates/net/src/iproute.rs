//! [`IpRoute`]: [`NetOps`] through iproute2's `ip` command.
//!
//! Why not rtnetlink in-process: one `ip` invocation costs ~2 ms here (a
//! bridge, a TAP and a neighbour entry — 7 commands — took 13 ms in a
//! namespace), against a VM boot of over a second; the `ip` binary is on
//! every host we target, its messages are what operators already know, and
//! the crate stays free of a netlink stack and its async runtime coupling.
//! Revisit when per-VM setup shows up in a profile (snapshot restores at
//! tens of milliseconds).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;

use crate::error::{NetError, Result};
use crate::names::check_ifname;
use crate::ops::NetOps;
use crate::subnet::Mac;

/// [`NetOps`] by running `ip` (iproute2, with JSON output: 4.13 or later).
#[derive(Debug, Clone)]
pub struct IpRoute {
    program: PathBuf,
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
        }
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
        let attached = self.run(
            &format!("attach TAP {name} to {bridge}"),
            &["link", "set", "dev", name, "master", bridge, "up"],
        );
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
}
