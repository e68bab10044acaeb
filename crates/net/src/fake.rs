//! [`FakeNetOps`]: an in-memory [`NetOps`] for tests of the logic above it
//! (this crate's [`crate::Network`], the orchestrator) that must run
//! without root. It enforces what the kernel would (unique names, TAPs
//! need an existing bridge, deleting what is absent reports `false`) and
//! can be told to fail a named operation once.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use crate::error::{NetError, Result};
use crate::guard::TapGuard;
use crate::names::check_ifname;
use crate::ops::NetOps;
use crate::subnet::Mac;

/// What a fake link is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A bridge.
    Bridge,
    /// A TAP that `owner` may open.
    Tap {
        /// Owner uid.
        owner: u32,
    },
}

/// One fake link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    /// Bridge or TAP.
    pub kind: Kind,
    /// The bridge a TAP is attached to.
    pub master: Option<String>,
    /// MAC, when set.
    pub mac: Option<Mac>,
    /// Address and prefix (bridges).
    pub addr: Option<(Ipv4Addr, u8)>,
    /// Whether it is up.
    pub up: bool,
}

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<String, FakeLink>,
    neighbours: BTreeMap<(String, Ipv4Addr), Mac>,
    guards: BTreeMap<String, TapGuard>,
    learned: BTreeMap<String, Vec<(Ipv4Addr, std::time::Duration)>>,
    fail: Option<&'static str>,
    calls: Vec<String>,
}

/// In-memory [`NetOps`].
#[derive(Debug, Default)]
pub struct FakeNetOps {
    state: Mutex<State>,
}

impl FakeNetOps {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next call of `op` (a [`NetOps`] method name) fail.
    pub fn fail_next(&self, op: &'static str) {
        self.state().fail = Some(op);
    }

    /// The link called `name`.
    pub fn link(&self, name: &str) -> Option<FakeLink> {
        self.state().links.get(name).cloned()
    }

    /// Every link name, sorted.
    pub fn links(&self) -> Vec<String> {
        self.state().links.keys().cloned().collect()
    }

    /// The neighbour entry for `ip` on `dev`.
    pub fn neighbour(&self, dev: &str, ip: Ipv4Addr) -> Option<Mac> {
        self.state().neighbours.get(&(dev.to_owned(), ip)).copied()
    }

    /// The guard installed on `tap`.
    pub fn guard(&self, tap: &str) -> Option<TapGuard> {
        self.state().guards.get(tap).cloned()
    }

    /// What [`NetOps::allow_learned`] added to `tap`'s guard since it was
    /// last installed, in order.
    pub fn learned(&self, tap: &str) -> Vec<(Ipv4Addr, std::time::Duration)> {
        self.state().learned.get(tap).cloned().unwrap_or_default()
    }

    /// Every call so far (`create_tap bt0a070002`, …), in order.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn enter(&self, op: &'static str, arg: &str) -> Result<MutexGuard<'_, State>> {
        let mut s = self.state();
        s.calls.push(format!("{op} {arg}"));
        if s.fail == Some(op) {
            s.fail = None;
            return Err(NetError::Command {
                op: op.to_owned(),
                command: format!("fake {op} {arg}"),
                status: "exit status: 2".into(),
                stderr: "injected failure".into(),
            });
        }
        Ok(s)
    }
}

fn command_error(op: &str, arg: &str, stderr: &str) -> NetError {
    NetError::Command {
        op: op.to_owned(),
        command: format!("fake {op} {arg}"),
        status: "exit status: 2".into(),
        stderr: stderr.to_owned(),
    }
}

impl NetOps for FakeNetOps {
    fn create_bridge(&self, name: &str, mac: Mac, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        check_ifname(name)?;
        let mut s = self.enter("create_bridge", name)?;
        let link = s.links.entry(name.to_owned()).or_insert(FakeLink {
            kind: Kind::Bridge,
            master: None,
            mac: None,
            addr: None,
            up: false,
        });
        if link.kind != Kind::Bridge {
            return Err(NetError::WrongKind {
                name: name.to_owned(),
                found: "tun".into(),
                wanted: "bridge",
            });
        }
        link.mac = Some(mac);
        link.addr = Some((addr, prefix));
        link.up = true;
        Ok(())
    }

    fn create_tap(&self, name: &str, owner_uid: u32, bridge: &str) -> Result<()> {
        check_ifname(name)?;
        let mut s = self.enter("create_tap", name)?;
        if s.links.contains_key(name) {
            return Err(command_error("create_tap", name, "File exists"));
        }
        if s.links.get(bridge).map(|l| &l.kind) != Some(&Kind::Bridge) {
            return Err(command_error("create_tap", name, "no such bridge"));
        }
        s.links.insert(
            name.to_owned(),
            FakeLink {
                kind: Kind::Tap { owner: owner_uid },
                master: Some(bridge.to_owned()),
                mac: None,
                addr: None,
                up: true,
            },
        );
        Ok(())
    }

    fn set_link_up(&self, name: &str, mac: Option<Mac>) -> Result<()> {
        let mut s = self.enter("set_link_up", name)?;
        let link = s
            .links
            .get_mut(name)
            .ok_or_else(|| command_error("set_link_up", name, "Cannot find device"))?;
        if mac.is_some() {
            link.mac = mac;
        }
        link.up = true;
        Ok(())
    }

    fn delete_link(&self, name: &str) -> Result<bool> {
        let mut s = self.enter("delete_link", name)?;
        let existed = s.links.remove(name).is_some();
        // Like the kernel: a bridge's neighbours go with it.
        s.neighbours.retain(|(dev, _), _| dev != name);
        Ok(existed)
    }

    fn list_links(&self, prefix: &str) -> Result<Vec<String>> {
        let s = self.enter("list_links", prefix)?;
        Ok(s.links
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn set_neighbour(&self, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        let mut s = self.enter("set_neighbour", dev)?;
        if !s.links.contains_key(dev) {
            return Err(command_error("set_neighbour", dev, "Cannot find device"));
        }
        s.neighbours.insert((dev.to_owned(), ip), mac);
        Ok(())
    }

    fn delete_neighbour(&self, dev: &str, ip: Ipv4Addr) -> Result<bool> {
        let mut s = self.enter("delete_neighbour", dev)?;
        Ok(s.neighbours.remove(&(dev.to_owned(), ip)).is_some())
    }

    fn guard_tap(&self, guard: &TapGuard) -> Result<()> {
        check_ifname(&guard.tap)?;
        let mut s = self.enter("guard_tap", &guard.tap)?;
        s.guards.insert(guard.tap.clone(), guard.clone());
        s.learned.remove(&guard.tap);
        Ok(())
    }

    fn allow_learned(&self, tap: &str, addrs: &[(Ipv4Addr, std::time::Duration)]) -> Result<()> {
        let mut s = self.enter("allow_learned", tap)?;
        if !s.guards.contains_key(tap) {
            return Err(command_error(
                "allow_learned",
                tap,
                "No such file or directory",
            ));
        }
        s.learned
            .entry(tap.to_owned())
            .or_default()
            .extend_from_slice(addrs);
        Ok(())
    }

    fn unguard_tap(&self, tap: &str) -> Result<()> {
        let mut s = self.enter("unguard_tap", tap)?;
        s.guards.remove(tap);
        s.learned.remove(tap);
        Ok(())
    }
}
