//! The daemon's configuration: one TOML file, every field defaulted, and
//! command-line flags over it.
//!
//! Which file: `--config FILE`, else `$BHATTI_CONFIG`, else
//! [`DEFAULT_PATH`] — and when that one does not exist, the built-in
//! defaults. A file named explicitly (flag or variable) must exist.
//! Unknown keys and invalid values are errors that name the key.

use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `bhatti serve` looks when neither `--config` nor
/// `BHATTI_CONFIG` names a file.
pub const DEFAULT_PATH: &str = "/etc/bhatti/config.toml";
/// The environment variable naming the config file.
pub const ENV_VAR: &str = "BHATTI_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} (named by {via}) does not exist")]
    Missing { path: PathBuf, via: &'static str },
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

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config FILE`.
    Flag(PathBuf),
    /// `BHATTI_CONFIG=FILE`.
    Env(PathBuf),
    /// The default path, which exists.
    Default(PathBuf),
    /// The default path does not exist: built-in defaults only.
    BuiltIn(PathBuf),
}

impl ConfigSource {
    /// The file read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Flag(p) | ConfigSource::Env(p) | ConfigSource::Default(p) => Some(p),
            ConfigSource::BuiltIn(_) => None,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Flag(p) => write!(f, "{} (--config)", p.display()),
            ConfigSource::Env(p) => write!(f, "{} ({ENV_VAR})", p.display()),
            ConfigSource::Default(p) => write!(f, "{} (default path)", p.display()),
            ConfigSource::BuiltIn(p) => {
                write!(f, "built-in defaults ({} does not exist)", p.display())
            }
        }
    }
}

/// `bhatti serve` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `auto`, `firecracker`, `qemu-kvm` or `qemu-tcg`.
    pub engine: String,
    /// The guests' architecture, `amd64` or `arm64` (the host's by
    /// default). Another than the host's runs on QEMU+TCG, from the images
    /// `bhatti image build --arch <arch>` built.
    pub arch: String,
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
    /// Share links of sandboxes' browser terminals.
    pub share: crate::share::ShareConfig,
    /// HTTPS on the API socket (`listen`): certificate and key files.
    pub tls: crate::tls::TlsConfig,
    /// Certificates from an ACME server for the API and published aliases.
    pub acme: crate::acme::AcmeConfig,
}

/// `[confinement]`: VMMs run as an unprivileged user, in their own mount
/// namespace, under seccomp, in a cgroup per sandbox (docs/security.md).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThermalConfig {
    pub warm_after_secs: u64,
    pub cold_after_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxDefaults {
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// A sandbox's writable disk when a create names no size.
    pub disk_mb: u64,
    /// The largest disk one sandbox may have (create or grow).
    pub max_sandbox_disk_mb: u64,
    /// New users get these quotas unless `bhatti user create` says otherwise.
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u64,
    /// Disk of all of a user's sandboxes together.
    pub max_disk_mb: u64,
    /// Checkpoints one user may keep.
    pub max_checkpoints: u64,
    /// Make a user's template of an image and shape after their first
    /// create of it boots (in the background), so later creates restore.
    pub auto_templates: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            data_dir: PathBuf::from("/var/lib/bhatti"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            engine: "auto".into(),
            arch: vmm::Arch::host_or_default().name().into(),
            limits: LimitsConfig::default(),
            thermal: ThermalConfig::default(),
            network: NetworkConfig::default(),
            defaults: SandboxDefaults::default(),
            publish: Default::default(),
            confinement: ConfinementConfig::default(),
            admins: Vec::new(),
            share: Default::default(),
            tls: Default::default(),
            acme: Default::default(),
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
            disk_mb: 2048,
            max_sandbox_disk_mb: 64 * 1024,
            max_sandboxes: 10,
            max_cpus: 16,
            max_memory_mb: 16 * 1024,
            max_disk_mb: 50 * 1024,
            max_checkpoints: 32,
            auto_templates: true,
        }
    }
}

impl DaemonConfig {
    /// The configuration `bhatti serve` and `bhatti config check` use:
    /// `flag`, else `BHATTI_CONFIG`, else [`DEFAULT_PATH`] (built-in
    /// defaults when it does not exist).
    pub fn resolve(flag: Option<&Path>) -> Result<(DaemonConfig, ConfigSource), ConfigError> {
        let env = std::env::var_os(ENV_VAR);
        Self::resolve_with(flag, env.as_deref(), Path::new(DEFAULT_PATH))
    }

    /// [`DaemonConfig::resolve`] with the variable's value and the
    /// default path given (tests).
    pub fn resolve_with(
        flag: Option<&Path>,
        env: Option<&OsStr>,
        default: &Path,
    ) -> Result<(DaemonConfig, ConfigSource), ConfigError> {
        if let Some(p) = flag {
            return Ok((
                Self::read(p, Some("--config"))?,
                ConfigSource::Flag(p.into()),
            ));
        }
        if let Some(p) = env.filter(|v| !v.is_empty()) {
            let p = Path::new(p);
            return Ok((Self::read(p, Some(ENV_VAR))?, ConfigSource::Env(p.into())));
        }
        match std::fs::metadata(default) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = DaemonConfig::default();
                config.validate()?;
                Ok((config, ConfigSource::BuiltIn(default.into())))
            }
            _ => Ok((
                Self::read(default, None)?,
                ConfigSource::Default(default.into()),
            )),
        }
    }

    /// Reads, parses and checks one file; `via` says who named it (a
    /// missing file is then its own error).
    fn read(path: &Path, via: Option<&'static str>) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| match via {
            Some(via) if source.kind() == std::io::ErrorKind::NotFound => ConfigError::Missing {
                path: path.to_path_buf(),
                via,
            },
            _ => ConfigError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses a config over the defaults. Errors name the key, with its
    /// section (`limits.exec_per_min: unknown field …`).
    pub fn parse(text: &str) -> Result<DaemonConfig, String> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // toml's message: position, the line, then what is wrong.
            let what = inner.message().trim();
            let at = inner
                .span()
                .map(|s| {
                    let before = &text.as_bytes()[..s.start.min(text.len())];
                    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            if path.is_empty() || path == "." {
                format!("{what}{at}")
            } else {
                format!("{path}: {what}{at}")
            }
        })
    }

    /// The effective configuration as TOML (every default filled in),
    /// values of secret-looking keys replaced by `"<redacted>"`.
    pub fn to_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("the config serializes");
        redact(&mut value);
        toml::to_string_pretty(&value).expect("a TOML table serializes")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir must not be empty".into());
        }
        let l = &self.limits;
        for (key, v) in [
            ("creates_per_min", l.creates_per_min as u64),
            ("execs_per_min", l.execs_per_min as u64),
            ("reads_per_min", l.reads_per_min as u64),
            ("max_json_body", l.max_json_body as u64),
            ("max_exec_output", l.max_exec_output as u64),
        ] {
            if v == 0 {
                return bad(format!("limits.{key} must be at least 1"));
            }
        }
        for (key, v) in [
            ("warm_after_secs", self.thermal.warm_after_secs),
            ("cold_after_secs", self.thermal.cold_after_secs),
        ] {
            if v == 0 {
                return bad(format!("thermal.{key} must be at least 1 second"));
            }
        }
        self.share.validate().map_err(ConfigError::Invalid)?;
        let d = &self.defaults;
        if d.cpus == 0 || d.memory_mb == 0 {
            return bad("defaults.cpus and defaults.memory_mb must be at least 1".into());
        }
        if d.image.is_empty() {
            return bad("defaults.image must not be empty".into());
        }
        let most = bhatti_core::MAX_DISK_MB;
        if !(bhatti_core::MIN_DISK_MB..=most).contains(&d.max_sandbox_disk_mb) {
            return bad(format!(
                "defaults.max_sandbox_disk_mb must be {}..={most}",
                bhatti_core::MIN_DISK_MB
            ));
        }
        if !(bhatti_core::MIN_DISK_MB..=d.max_sandbox_disk_mb).contains(&d.disk_mb) {
            return bad(format!(
                "defaults.disk_mb must be {}..=defaults.max_sandbox_disk_mb ({})",
                bhatti_core::MIN_DISK_MB,
                d.max_sandbox_disk_mb
            ));
        }
        if self.confinement.enabled && self.confinement.user.is_empty() {
            return bad("confinement.user must not be empty".into());
        }
        if !matches!(
            self.engine.as_str(),
            "auto" | "firecracker" | "qemu-kvm" | "qemu-tcg"
        ) {
            return bad(format!(
                "engine '{}' is not one of auto, firecracker, qemu-kvm, qemu-tcg",
                self.engine
            ));
        }
        self.guest_arch()?;
        self.network
            .group_networks()
            .map_err(ConfigError::Invalid)?;
        self.network.egress_cidrs().map_err(ConfigError::Invalid)?;
        if let Some(u) = &self.network.dns_upstream {
            if u.parse::<SocketAddr>().is_err() && u.parse::<std::net::IpAddr>().is_err() {
                return bad(format!(
                    "network.dns_upstream '{u}' is not an address (IP or IP:port)"
                ));
            }
        }
        self.publish.validate().map_err(ConfigError::Invalid)?;
        self.tls.files("tls").map_err(ConfigError::Invalid)?;
        self.acme.validate().map_err(ConfigError::Invalid)?;
        if !self.acme.api_names.is_empty() && self.tls.enabled() {
            return bad("acme.api_names and tls.cert_file both set: choose one for the API".into());
        }
        let redirect = self
            .publish
            .tls
            .redirect_addr()
            .map_err(ConfigError::Invalid)?;
        if redirect.is_some() && !self.publish.tls.files().enabled() && !self.acme.publish_aliases {
            return bad(
                "publish.tls.redirect_listen needs HTTPS on the public socket (publish.tls.cert_file and key_file, or acme.publish_aliases)"
                    .into(),
            );
        }
        if self.acme.publish_aliases {
            if self.publish.domain.is_none() {
                return bad("acme.publish_aliases needs publish.domain (certificates are for <alias>.<domain>)".into());
            }
            if self.publish.tls.files().enabled() {
                return bad(
                    "acme.publish_aliases and publish.tls.cert_file both set: choose one".into(),
                );
            }
        }
        Ok(())
    }

    /// The parsed `arch`.
    pub fn guest_arch(&self) -> Result<vmm::Arch, ConfigError> {
        vmm::Arch::parse(&self.arch).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "arch '{}' is not one of amd64 (x86_64), arm64 (aarch64)",
                self.arch
            ))
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("bhatti.db")
    }
}

/// Whether a key names a secret (its value is not printed). Paths to
/// files holding secrets (`*_file`, `*_path`) are printed.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_file") || k.ends_with("_path") || k.ends_with("_dir") {
        return false;
    }
    ["secret", "password", "token", "key", "hmac"]
        .iter()
        .any(|w| k.split('_').any(|part| part == *w))
}

/// Replaces the values of secret keys, at any depth, by `"<redacted>"`.
fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if is_secret_key(k) && !v.is_table() {
                    *v = toml::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
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

    /// The sections of the config, from the defaults themselves (a new
    /// section is covered by the tests below without listing it).
    fn sections() -> Vec<String> {
        let v = toml::Value::try_from(DaemonConfig::default()).unwrap();
        v.as_table()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone())
            .collect()
    }

    #[test]
    fn every_section_refuses_an_unknown_key_naming_it() {
        let sections = sections();
        for known in [
            "limits",
            "thermal",
            "network",
            "defaults",
            "publish",
            "confinement",
            "share",
        ] {
            assert!(
                sections.iter().any(|s| s == known),
                "{known} in {sections:?}"
            );
        }
        let err = DaemonConfig::parse("listen = \"127.0.0.1:1\"\nbogus_top = 1\n").unwrap_err();
        assert!(err.contains("bogus_top"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        for section in &sections {
            let text = format!("[{section}]\nzz_not_a_key = 1\n");
            let err = DaemonConfig::parse(&text).unwrap_err();
            assert!(err.contains("zz_not_a_key"), "{section}: {err}");
            assert!(
                err.starts_with(&format!("{section}.zz_not_a_key: unknown field")),
                "{section}: the error names the section: {err}"
            );
        }
        assert!(DaemonConfig::parse("[nosuchsection]\nx = 1\n")
            .unwrap_err()
            .contains("nosuchsection"));
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (text, says) in [
            ("listen = \"nope\"", "listen"),
            ("listen = \"127.0.0.1\"", "listen"),
            ("data_dir = \"\"", "data_dir"),
            ("engine = \"vmware\"", "engine"),
            ("arch = \"riscv64\"", "arch 'riscv64'"),
            ("[network]\nuser_prefix = 300", "network.user_prefix"),
            ("[network]\nuser_prefix = 33", "network"),
            ("[network]\nrange = \"10.0.0.0/40\"", "network.range"),
            (
                "[network]\ndns_upstream = \"dns.example\"",
                "network.dns_upstream",
            ),
            ("[network]\nfirewall = \"yes\"", "network.firewall"),
            ("[limits]\nexecs_per_min = -1", "limits.execs_per_min"),
            ("[limits]\nexecs_per_min = 0", "limits.execs_per_min"),
            ("[limits]\nmax_exec_output = 0", "limits.max_exec_output"),
            ("[thermal]\ncold_after_secs = 0", "thermal.cold_after_secs"),
            (
                "[thermal]\nwarm_after_secs = \"x\"",
                "thermal.warm_after_secs",
            ),
            ("[defaults]\ncpus = 0", "defaults.cpus"),
            ("[publish]\nlisten = \"nope:1\"", "publish.listen"),
            (
                "[publish]\ntrusted_proxies = [\"10.0.0.0/99\"]",
                "publish.trusted_proxies",
            ),
            (
                "[confinement]\nmemory_overhead_mib = 1e3",
                "confinement.memory_overhead_mib",
            ),
            (
                "[share]\nmax_ttl_secs = 0",
                "share.default_ttl_secs and share.max_ttl_secs",
            ),
            (
                "[share]\ndefault_ttl_secs = 90000\nmax_ttl_secs = 3600",
                "share.default_ttl_secs",
            ),
            ("[share]\nmax_ttl_secs = 99999999", "share.max_ttl_secs"),
            ("[share]\nattempts_per_min = 0", "share.attempts_per_min"),
            ("[share]\nbase_url = \"ftp://x\"", "share.base_url"),
            ("[tls]\ncert_file = \"/c.pem\"", "tls: set both"),
            (
                "[publish.tls]\nredirect_listen = \"127.0.0.1:80\"",
                "publish.tls.redirect_listen",
            ),
            (
                "[publish.tls]\nredirect_listen = \"nope\"",
                "publish.tls.redirect_listen",
            ),
            ("[acme]\napi_names = [\"a.example\"]", "acme.directory_url"),
            (
                "[acme]\ndirectory_url = \"https://a/d\"\npublish_aliases = true",
                "publish.domain",
            ),
            (
                "[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n[acme]\ndirectory_url = \"https://a/d\"\napi_names = [\"a.example\"]",
                "choose one",
            ),
        ] {
            let err = match DaemonConfig::parse(text) {
                Err(e) => e,
                Ok(c) => c.validate().unwrap_err().to_string(),
            };
            assert!(err.contains(says), "{text}: {err}");
        }
        let c = DaemonConfig::parse("[network]\ndns_upstream = \"192.0.2.1:5353\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn effective_config_round_trips_and_hides_secrets() {
        let c = DaemonConfig::parse("[thermal]\nwarm_after_secs = 7\n").unwrap();
        let text = c.to_toml();
        assert!(text.contains("warm_after_secs = 7"), "{text}");
        assert!(text.contains("cold_after_secs = 1800"), "{text}");
        assert!(text.contains("[confinement]"), "{text}");
        assert_eq!(DaemonConfig::parse(&text).unwrap(), c);

        let mut v: toml::Value = toml::from_str(
            "api_key = \"s1\"\ncert_file = \"/k.pem\"\n[acme]\neab_hmac_key = \"s2\"\ntoken = \"s3\"\nkeys = [\"x\"]\nmonkey = \"ok\"\n",
        )
        .unwrap();
        redact(&mut v);
        let out = toml::to_string(&v).unwrap();
        for secret in ["s1", "s2", "s3"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(
            out.contains("/k.pem") && out.contains("monkey = \"ok\""),
            "{out}"
        );
    }

    #[test]
    fn file_precedence_flag_then_env_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, warm: u64| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("[thermal]\nwarm_after_secs = {warm}\n")).unwrap();
            p
        };
        let flag = write("flag.toml", 1);
        let env = write("env.toml", 2);
        let default = write("default.toml", 3);
        let missing = dir.path().join("missing.toml");
        let warm = |r: Result<(DaemonConfig, ConfigSource), ConfigError>| {
            let (c, s) = r.unwrap();
            (c.thermal.warm_after_secs, s)
        };
        assert_eq!(
            warm(DaemonConfig::resolve_with(
                Some(&flag),
                Some(env.as_os_str()),
                &default
            )),
            (1, ConfigSource::Flag(flag.clone()))
        );
        assert_eq!(
            warm(DaemonConfig::resolve_with(
                None,
                Some(env.as_os_str()),
                &default
            )),
            (2, ConfigSource::Env(env.clone()))
        );
        assert_eq!(
            warm(DaemonConfig::resolve_with(None, None, &default)),
            (3, ConfigSource::Default(default.clone()))
        );
        // An empty variable counts as unset.
        assert_eq!(
            warm(DaemonConfig::resolve_with(
                None,
                Some(OsStr::new("")),
                &default
            )),
            (3, ConfigSource::Default(default.clone()))
        );
        // No default file: the built-in defaults.
        let (c, s) = DaemonConfig::resolve_with(None, None, &missing).unwrap();
        assert_eq!(c, DaemonConfig::default());
        assert_eq!(s, ConfigSource::BuiltIn(missing.clone()));
        assert!(s.to_string().contains("missing.toml does not exist"), "{s}");
        // A missing file named explicitly is an error naming it and who named it.
        for (flag, env, via) in [
            (Some(missing.as_path()), None, "--config"),
            (None, Some(missing.as_os_str()), "BHATTI_CONFIG"),
        ] {
            let err = DaemonConfig::resolve_with(flag, env, &default)
                .unwrap_err()
                .to_string();
            assert!(err.contains("missing.toml") && err.contains(via), "{err}");
        }
        // An existing default that does not parse is an error, not defaults.
        std::fs::write(&default, "[thermal]\nwarm = 1\n").unwrap();
        let err = DaemonConfig::resolve_with(None, None, &default)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default.toml") && err.contains("thermal.warm"),
            "{err}"
        );
        // An unreadable explicit file: named, with the reason.
        let err = DaemonConfig::resolve_with(Some(dir.path()), None, &default).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        // Validation errors name the file too.
        std::fs::write(&flag, "[limits]\nreads_per_min = 0\n").unwrap();
        let err = DaemonConfig::resolve_with(Some(&flag), None, &default)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flag.toml") && err.contains("limits.reads_per_min"),
            "{err}"
        );
    }
}
