//! The daemon's configuration: one TOML file, every field defaulted, and
//! command-line flags over it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// `bhatti serve` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `auto`, `firecracker`, `qemu-kvm` or `qemu-tcg`.
    pub engine: String,
    pub limits: LimitsConfig,
    pub thermal: ThermalConfig,
    pub network: NetworkConfig,
    pub defaults: SandboxDefaults,
    /// The public proxy for published ports.
    pub publish: crate::publish::PublishConfig,
    /// How VMM processes are confined.
    pub confinement: ConfinementConfig,
    /// Names of the users whose keys are admin keys: they see every
    /// user's events and read `GET /metrics`.
    pub admins: Vec<String>,
}

/// `[confinement]`: VMMs run as an unprivileged user, in their own mount
/// namespace, under seccomp, in a cgroup per sandbox (docs/security.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfinementConfig {
    /// On by default; off only where it cannot work (no mount namespaces,
    /// no cgroup controllers). The engine line says which.
    pub enabled: bool,
    /// The VMM user (created with `useradd --system` if missing).
    pub user: String,
    /// The cgroup under which each sandbox's VMM gets its own.
    pub cgroup_parent: String,
    /// Memory a VMM may use beyond guest RAM, MiB.
    pub memory_overhead_mib: u32,
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        let d = vmm::ConfineConfig::default();
        ConfinementConfig {
            enabled: d.enabled,
            user: d.user,
            cgroup_parent: d.cgroup_parent,
            memory_overhead_mib: d.memory_overhead_mib,
        }
    }
}

impl ConfinementConfig {
    /// The engine layer's settings.
    pub fn to_vmm(&self) -> vmm::ConfineConfig {
        vmm::ConfineConfig {
            enabled: self.enabled,
            user: self.user.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            memory_overhead_mib: self.memory_overhead_mib,
            ..vmm::ConfineConfig::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sandbox creations per user per minute.
    pub creates_per_min: u32,
    /// Execs (and shells) per user per minute.
    pub execs_per_min: u32,
    /// Reads (list, inspect, files, sessions) per user per minute.
    pub reads_per_min: u32,
    /// Largest JSON body, bytes.
    pub max_json_body: usize,
    /// Output a collected (non-streaming) exec keeps per stream, bytes;
    /// the rest is dropped and the answer says `stdout_truncated` /
    /// `stderr_truncated`. Streaming exec is not capped.
    pub max_exec_output: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThermalConfig {
    pub warm_after_secs: u64,
    pub cold_after_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The range users' subnets are cut from: each user gets the next free
    /// `/user_prefix` of it (and its own bridge) with their first sandbox,
    /// and gives it back with their last.
    pub range: String,
    /// Length of each user's subnet (24: 253 sandboxes per user).
    pub user_prefix: u8,
    /// Users' bridges are `<bridge_prefix><4 hex digits>` (2..=11 bytes).
    /// At start, links with this prefix are removed (left by a previous
    /// run), so two daemons in one namespace need different prefixes.
    pub bridge_prefix: String,
    /// TAPs are `<tap_prefix><guest IPv4 in hex>` (2..=7 bytes); removed at
    /// start like the bridges.
    pub tap_prefix: String,
    /// Apply bhatti's firewall (no traffic between users' bridges, no new
    /// connections from sandboxes to the host but DNS and ping to their
    /// gateway, no private, link-local, CGNAT, loopback, multicast or
    /// reserved destinations, no DNAT'd host ports, NAT out); off only for
    /// hosts that manage it elsewhere.
    pub firewall: bool,
    /// Destinations sandboxes may reach although the default denies them
    /// (`"192.168.1.10"`, `"10.1.2.0/24"`: a LAN registry). Allow beats deny.
    pub allow_cidrs: Vec<String>,
    /// Destinations denied on top of the default.
    pub deny_cidrs: Vec<String>,
    /// Where the gateways' DNS responders relay names they do not know
    /// (default: the host's first `nameserver`).
    pub dns_upstream: Option<String>,
}

impl NetworkConfig {
    /// `allow_cidrs` and `deny_cidrs`, parsed.
    pub fn egress_cidrs(&self) -> Result<(Vec<net::Cidr>, Vec<net::Cidr>), String> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .map(|c| {
                    c.parse::<net::Cidr>()
                        .map_err(|e| format!("network.{key}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok((
            parse("allow_cidrs", &self.allow_cidrs)?,
            parse("deny_cidrs", &self.deny_cidrs)?,
        ))
    }

    /// The core's plan for users' networks, checked.
    pub fn group_networks(&self) -> Result<bhatti_core::GroupNetworkConfig, String> {
        let range: net::Subnet = self
            .range
            .parse()
            .map_err(|e| format!("network.range '{}': {e}", self.range))?;
        for (key, value) in [
            ("bridge_prefix", &self.bridge_prefix),
            ("tap_prefix", &self.tap_prefix),
        ] {
            if value.len() < 2 {
                return Err(format!(
                    "network.{key} '{value}' is too short (at least 2 bytes: links starting with it are removed at start)"
                ));
            }
            net::check_ifname(value).map_err(|e| format!("network.{key}: {e}"))?;
        }
        if self.bridge_prefix.starts_with(&self.tap_prefix)
            || self.tap_prefix.starts_with(&self.bridge_prefix)
        {
            return Err(
                "network.bridge_prefix and network.tap_prefix must not prefix each other".into(),
            );
        }
        net::UserNetworks::new(
            range,
            self.user_prefix,
            &self.bridge_prefix,
            &self.tap_prefix,
        )
        .map_err(|e| format!("network: {e}"))?;
        Ok(bhatti_core::GroupNetworkConfig {
            range,
            prefix: self.user_prefix,
            bridge_prefix: self.bridge_prefix.clone(),
            tap_prefix: self.tap_prefix.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxDefaults {
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// New users get these quotas unless `bhatti user create` says otherwise.
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            data_dir: PathBuf::from("/var/lib/bhatti"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            engine: "auto".into(),
            limits: LimitsConfig::default(),
            thermal: ThermalConfig::default(),
            network: NetworkConfig::default(),
            defaults: SandboxDefaults::default(),
            publish: Default::default(),
            confinement: ConfinementConfig::default(),
            admins: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            creates_per_min: 10,
            execs_per_min: 120,
            reads_per_min: 600,
            max_json_body: api_types::limits::MAX_JSON_BODY,
            max_exec_output: 16 * 1024 * 1024,
        }
    }
}

impl Default for ThermalConfig {
    fn default() -> Self {
        ThermalConfig {
            warm_after_secs: 30,
            cold_after_secs: 1800,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            range: "10.210.0.0/16".into(),
            user_prefix: 24,
            bridge_prefix: "bhu".into(),
            tap_prefix: "tu".into(),
            firewall: true,
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            dns_upstream: None,
        }
    }
}

impl Default for SandboxDefaults {
    fn default() -> Self {
        SandboxDefaults {
            image: "minimal".into(),
            cpus: 1,
            memory_mb: 512,
            max_sandboxes: 10,
            max_cpus: 16,
            max_memory_mb: 16 * 1024,
        }
    }
}

impl DaemonConfig {
    /// Reads `path` (if given) over the defaults.
    pub fn load(path: Option<&Path>) -> Result<DaemonConfig, ConfigError> {
        let config = match path {
            None => DaemonConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_exec_output == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_exec_output must be at least 1 byte".into(),
            ));
        }
        if l.creates_per_min == 0 || l.execs_per_min == 0 || l.reads_per_min == 0 {
            return Err(ConfigError::Invalid(
                "rate limits must be at least 1 per minute".into(),
            ));
        }
        if self.thermal.warm_after_secs == 0 || self.thermal.cold_after_secs == 0 {
            return Err(ConfigError::Invalid(
                "thermal timers must be at least 1 second".into(),
            ));
        }
        if !matches!(
            self.engine.as_str(),
            "auto" | "firecracker" | "qemu-kvm" | "qemu-tcg"
        ) {
            return Err(ConfigError::Invalid(format!(
                "engine '{}' is not one of auto, firecracker, qemu-kvm, qemu-tcg",
                self.engine
            )));
        }
        self.network
            .group_networks()
            .map_err(ConfigError::Invalid)?;
        self.network.egress_cidrs().map_err(ConfigError::Invalid)?;
        self.publish.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("bhatti.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_settings_are_checked() {
        for (bad, says) in [
            ("range = \"10.210.0.0\"", "network.range"),
            (
                "range = \"10.210.0.0/24\"\nuser_prefix = 16",
                "cannot be cut",
            ),
            ("bridge_prefix = \"b\"", "too short"),
            ("tap_prefix = \"bh\"", "prefix each other"),
            ("tap_prefix = \"t u\"", "tap_prefix"),
            ("allow_cidrs = [\"192.168.1.0/33\"]", "network.allow_cidrs"),
            ("deny_cidrs = [\"10.0.0.1/8\"]", "network.deny_cidrs"),
        ] {
            let c = DaemonConfig::parse(&format!("[network]\n{bad}\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let plan = DaemonConfig::default().network.group_networks().unwrap();
        assert_eq!(plan.range.to_string(), "10.210.0.0/16");
        let c = DaemonConfig::parse(
            "[network]\nallow_cidrs = [\"192.168.77.1\", \"10.1.2.0/24\"]\ndeny_cidrs = [\"203.0.113.0/24\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let (allow, deny) = c.network.egress_cidrs().unwrap();
        assert_eq!(
            allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["192.168.77.1/32", "10.1.2.0/24"]
        );
        assert_eq!(deny[0].to_string(), "203.0.113.0/24");
    }

    #[test]
    fn empty_config_is_all_defaults() {
        assert_eq!(DaemonConfig::parse("").unwrap(), DaemonConfig::default());
    }

    #[test]
    fn parses_sections_and_refuses_unknown_keys() {
        let c = DaemonConfig::parse(
            "data_dir = \"/tmp/b\"\nlisten = \"127.0.0.1:0\"\n[thermal]\nwarm_after_secs = 2\n[limits]\nexecs_per_min = 5\n",
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/b"));
        assert_eq!(c.thermal.warm_after_secs, 2);
        assert_eq!(c.thermal.cold_after_secs, 1800);
        assert_eq!(c.limits.execs_per_min, 5);
        assert!(DaemonConfig::parse("bogus = 1").is_err());
        assert!(DaemonConfig::parse("[limits]\nexec_per_min = 1").is_err());
        let bad = DaemonConfig {
            engine: "vmware".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn confinement_is_on_by_default_and_can_be_turned_off() {
        let d = DaemonConfig::default().confinement.to_vmm();
        assert!(d.enabled);
        assert_eq!(d.user, "bhatti-vmm");
        let c = DaemonConfig::parse(
            "[confinement]\nenabled = false\nuser = \"vmmz\"\nmemory_overhead_mib = 64\n",
        )
        .unwrap()
        .confinement
        .to_vmm();
        assert!(!c.enabled);
        assert_eq!((c.user.as_str(), c.memory_overhead_mib), ("vmmz", 64));
        assert!(DaemonConfig::parse("[confinement]\nenable = false").is_err());
    }
}
