//! Who commands run as, and the environment they start with.
//!
//! `/etc/passwd` and `/etc/group` are parsed directly rather than through
//! NSS: lohar is a static binary, and static glibc cannot load NSS modules.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{AgentConfig, RunAs};

/// The uid commands get when the agent runs as root and the user exists.
pub const SANDBOX_UID: u32 = 1000;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A resolved user to run commands as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (set only when switching user).
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
    pub shell: String,
    /// The agent must switch to this user (it is not already it).
    pub switch: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
        })
        .collect()
}

/// The identity an OCI image's `User` names (`user`, `uid`, `user:group`,
/// `uid:gid`), looked up in the guest's `passwd` and `group`. A numeric
/// uid need not exist (it runs with home `/`); a name that does not exist
/// is an error.
pub fn run_as_from_image(user: &str, passwd: &str, group: &str) -> Result<RunAs, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let users = parse_passwd(passwd);
    let uid = match u.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => users
            .iter()
            .find(|e| e.name == u)
            .map(|e| e.uid)
            .ok_or_else(|| format!("user '{u}' is not in /etc/passwd"))?,
    };
    let gid = match g {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group '{g}' is not in /etc/group"))?,
        }),
    };
    Ok(RunAs::Uid { uid, gid })
}

/// Groups listing `user` as a member, plus `primary`.
fn parse_groups(text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(gid) = f[2].parse::<u32>() else {
            continue;
        };
        if f[3].split(',').any(|m| m == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

impl Identity {
    /// Resolves the configured identity against this system's user database.
    pub fn resolve(run_as: RunAs) -> Identity {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let euid = nix::unistd::geteuid().as_raw();
        let egid = nix::unistd::getegid().as_raw();
        Self::resolve_from(run_as, &passwd, &group, euid, egid)
    }

    /// Root, as PID 1 starts the boot command: name, home and shell from
    /// `/etc/passwd` (PID 1's own `HOME` is the kernel's `/`).
    pub fn root() -> Identity {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        Self::root_from(&passwd)
    }

    fn root_from(passwd: &str) -> Identity {
        let entry = parse_passwd(passwd).into_iter().find(|u| u.uid == 0);
        Identity {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            name: entry
                .as_ref()
                .map_or_else(|| "root".into(), |e| e.name.clone()),
            home: PathBuf::from(entry.as_ref().map_or("/root", |e| e.home.as_str())),
            shell: entry.map_or_else(|| "/bin/sh".into(), |e| e.shell),
            switch: false,
        }
    }

    fn resolve_from(run_as: RunAs, passwd: &str, group: &str, euid: u32, egid: u32) -> Identity {
        let users = parse_passwd(passwd);
        let find = |uid: u32| users.iter().find(|u| u.uid == uid);
        let target = match run_as {
            RunAs::Auto if euid == 0 && find(SANDBOX_UID).is_some() => Some((SANDBOX_UID, None)),
            RunAs::Auto | RunAs::Agent => None,
            RunAs::Uid { uid, gid } => Some((uid, gid)),
        };
        match target {
            Some((uid, gid)) if uid != euid => {
                let entry = find(uid);
                let gid = gid.or(entry.map(|e| e.gid)).unwrap_or(uid);
                let name = entry.map_or_else(|| uid.to_string(), |e| e.name.clone());
                Identity {
                    uid,
                    gid,
                    groups: parse_groups(group, &name, gid),
                    home: entry.map_or_else(|| PathBuf::from("/"), |e| PathBuf::from(&e.home)),
                    shell: entry.map_or_else(|| "/bin/sh".to_string(), |e| e.shell.clone()),
                    name,
                    switch: true,
                }
            }
            _ => {
                let entry = find(euid);
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .or_else(|| entry.map(|e| PathBuf::from(&e.home)))
                    .unwrap_or_else(|| PathBuf::from("/"));
                Identity {
                    uid: euid,
                    gid: egid,
                    groups: Vec::new(),
                    name: entry.map_or_else(|| euid.to_string(), |e| e.name.clone()),
                    home,
                    shell: entry.map_or_else(|| "/bin/sh".to_string(), |e| e.shell.clone()),
                    switch: false,
                }
            }
        }
    }

    /// The environment a command starts with: defaults, then the agent's
    /// configured env, then the request's env (later layers win).
    pub fn environment(
        &self,
        config: &AgentConfig,
        request: &BTreeMap<String, String>,
        tty: bool,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert("HOME".to_string(), self.home.display().to_string());
        env.insert("USER".to_string(), self.name.clone());
        env.insert("LOGNAME".to_string(), self.name.clone());
        env.insert("SHELL".to_string(), self.shell.clone());
        env.insert("LANG".to_string(), "C.UTF-8".to_string());
        env.insert(
            "TERM".to_string(),
            if tty { "xterm-256color" } else { "dumb" }.to_string(),
        );
        env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        lohar:x:1000:1000::/home/lohar:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:lohar\nlohar:x:1000:\nusers:x:100:other,lohar\n";

    #[test]
    fn image_users_resolve() {
        let r = |u| run_as_from_image(u, PASSWD, GROUP);
        assert_eq!(
            r("lohar"),
            Ok(RunAs::Uid {
                uid: 1000,
                gid: None
            })
        );
        assert_eq!(
            r("1000"),
            Ok(RunAs::Uid {
                uid: 1000,
                gid: None
            })
        );
        assert_eq!(
            r("4242"),
            Ok(RunAs::Uid {
                uid: 4242,
                gid: None
            })
        );
        assert_eq!(r("root"), Ok(RunAs::Uid { uid: 0, gid: None }));
        assert_eq!(
            r("lohar:sudo"),
            Ok(RunAs::Uid {
                uid: 1000,
                gid: Some(27)
            })
        );
        assert_eq!(
            r("5:7"),
            Ok(RunAs::Uid {
                uid: 5,
                gid: Some(7)
            })
        );
        assert!(r("ghost").unwrap_err().contains("ghost"));
        assert!(r("lohar:ghosts").unwrap_err().contains("ghosts"));
        // A uid that has no passwd entry runs with home `/`.
        let id = Identity::resolve_from(r("4242").unwrap(), PASSWD, GROUP, 0, 0);
        assert_eq!((id.uid, id.gid, id.home.to_str()), (4242, 4242, Some("/")));
    }

    #[test]
    fn root_comes_from_passwd_or_defaults() {
        let r = Identity::root_from(PASSWD);
        assert_eq!(
            (
                r.uid,
                r.name.as_str(),
                r.home.to_str(),
                r.shell.as_str(),
                r.switch
            ),
            (0, "root", Some("/root"), "/bin/bash", false)
        );
        let r = Identity::root_from("");
        assert_eq!(
            (r.home.to_str(), r.shell.as_str()),
            (Some("/root"), "/bin/sh")
        );
    }

    #[test]
    fn auto_picks_uid_1000_when_root() {
        let id = Identity::resolve_from(RunAs::Auto, PASSWD, GROUP, 0, 0);
        assert_eq!((id.uid, id.gid, id.switch), (1000, 1000, true));
        assert_eq!(id.name, "lohar");
        assert_eq!(id.home, PathBuf::from("/home/lohar"));
        assert_eq!(id.groups, vec![1000, 27, 100]);
    }

    #[test]
    fn auto_stays_put_without_root_or_user() {
        let id = Identity::resolve_from(RunAs::Auto, PASSWD, GROUP, 1000, 1000);
        assert!(!id.switch);
        let no_user = "root:x:0:0:root:/root:/bin/bash\n";
        let id = Identity::resolve_from(RunAs::Auto, no_user, GROUP, 0, 0);
        assert_eq!((id.uid, id.switch), (0, false));
    }

    #[test]
    fn explicit_uid_uses_passwd_gid_or_override() {
        let id = Identity::resolve_from(
            RunAs::Uid {
                uid: 65534,
                gid: None,
            },
            PASSWD,
            GROUP,
            0,
            0,
        );
        assert_eq!((id.uid, id.gid), (65534, 65534));
        let id = Identity::resolve_from(
            RunAs::Uid {
                uid: 4242,
                gid: Some(7),
            },
            PASSWD,
            GROUP,
            0,
            0,
        );
        assert_eq!((id.uid, id.gid, id.name.as_str()), (4242, 7, "4242"));
    }

    #[test]
    fn env_layers_request_over_config_over_defaults() {
        let id = Identity::resolve_from(RunAs::Auto, PASSWD, GROUP, 0, 0);
        let mut config = AgentConfig::default();
        config.env.insert("A".into(), "config".into());
        config.env.insert("B".into(), "config".into());
        config.env.insert("LANG".into(), "de_DE.UTF-8".into());
        let request = BTreeMap::from([("B".to_string(), "request".to_string())]);
        let env = id.environment(&config, &request, false);
        assert_eq!(env["A"], "config");
        assert_eq!(env["B"], "request");
        assert_eq!(env["LANG"], "de_DE.UTF-8");
        assert_eq!(env["HOME"], "/home/lohar");
        assert_eq!(env["TERM"], "dumb");
    }
}
