//! [`SandboxSpec`]: what a user asks for, and its validation — pure, and
//! done before anything is created.

use std::collections::BTreeMap;

use image::config_drive::ConfigDriveError;
use image::{ConfigDrive, ConfigFile, InitCommand};
use serde::{Deserialize, Serialize};

/// Image used when a spec names none.
pub const DEFAULT_IMAGE: &str = "minimal";
/// vCPUs when a spec names none.
pub const DEFAULT_CPUS: u32 = 1;
/// Memory when a spec names none.
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Smallest writable disk a spec may ask for.
pub const MIN_DISK_MB: u64 = 64;
/// Largest writable disk a spec may ask for.
pub const MAX_DISK_MB: u64 = image::disk::MAX_DISK_BYTES >> 20;

/// A sandbox to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Name, unique among live sandboxes; also the guest hostname:
    /// 1..=63 of `[a-z0-9-]`, not starting or ending with `-`.
    pub name: String,
    /// Image (`tiny`, `minimal`).
    #[serde(default = "default_image")]
    pub image: String,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    /// Writable disk in MiB ([`crate::CoreConfig::disk_bytes`] when
    /// absent). Grown with [`crate::SandboxManager::grow_disk`] while no VM runs; lohar
    /// grows the file system to fill the disk at every boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Environment of every command (below a request's own env).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text files written into the guest at boot.
    #[serde(default)]
    pub files: Vec<ConfigFile>,
    /// Command started at boot.
    #[serde(default)]
    pub init: Option<InitCommand>,
    /// Sandboxes of one network group share a bridge and subnet, and no
    /// other sandbox is on it (the daemon uses the user id). Ignored when
    /// the manager runs one shared network.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network_group: String,
    /// Where it may send, on top of the daemon's firewall (its TAP's
    /// guard; [`net::Egress`]). Applied at every attach (create, boot
    /// again, adoption after a daemon restart) and changed on a running
    /// sandbox with [`crate::SandboxManager::set_egress`].
    #[serde(default, skip_serializing_if = "net::Egress::is_public")]
    pub egress: net::Egress,
    /// Persistent volumes, each an extra disk (`bhv-<n>`, in this order)
    /// that lohar mounts at `mount`. Part of the spec, so every boot,
    /// restore and adoption attaches the same drives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Commands run as root in the guest: the daemon's own utility VMs
    /// only (see [`proto::config_drive::ConfigDrive::agent_as_root`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_as_root: bool,
}

/// A persistent volume attached to a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The volume file on the host (outside every sandbox directory).
    pub path: std::path::PathBuf,
    /// Its file system's UUID (how lohar finds it without serials).
    pub uuid: String,
    /// Absolute guest path.
    pub mount: String,
    /// Attached and mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeSpec {
    /// Drive id, and guest-visible serial, of the `i`th volume.
    pub fn drive_id(i: usize) -> String {
        format!("{}{i}", vmm::VOLUME_DRIVE_PREFIX)
    }
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}
fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_memory() -> u32 {
    DEFAULT_MEMORY_MB
}

impl SandboxSpec {
    /// A spec with defaults for everything but the name and image.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> SandboxSpec {
        SandboxSpec {
            name: name.into(),
            image: image.into(),
            cpus: DEFAULT_CPUS,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_mb: None,
            env: BTreeMap::new(),
            files: Vec::new(),
            init: None,
            network_group: String::new(),
            egress: net::Egress::Public,
            volumes: Vec::new(),
            agent_as_root: false,
        }
    }
}

/// Bounds on what a spec may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most vCPUs per sandbox.
    pub max_cpus: u32,
    /// Least memory (the Debian kernel and initramfs need room).
    pub min_memory_mb: u32,
    /// Most memory per sandbox.
    pub max_memory_mb: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_cpus: 32,
            min_memory_mb: 128,
            max_memory_mb: 64 * 1024,
        }
    }
}

impl Limits {
    /// The defaults, narrowed to this host: no more vCPUs than host CPUs,
    /// no more memory than the host has.
    pub fn for_host() -> Limits {
        let d = Limits::default();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(d.max_cpus);
        let mem = host_memory_mb().unwrap_or(d.max_memory_mb);
        Limits {
            max_cpus: d.max_cpus.min(cpus).max(1),
            min_memory_mb: d.min_memory_mb,
            max_memory_mb: d.max_memory_mb.min(mem).max(d.min_memory_mb),
        }
    }
}

fn host_memory_mb() -> Option<u32> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    u32::try_from(kb / 1024).ok()
}

/// Why a spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The name is not a valid hostname label.
    #[error("Invalid name {name:?}: {reason}")]
    Name {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Too few or too many vCPUs.
    #[error("cpus must be 1..={max}, got {got}")]
    Cpus {
        /// Asked for.
        got: u32,
        /// Limit.
        max: u32,
    },
    /// Too little or too much memory.
    #[error("memory_mb must be {min}..={max}, got {got}")]
    Memory {
        /// Asked for.
        got: u32,
        /// Lower limit.
        min: u32,
        /// Upper limit.
        max: u32,
    },
    /// Too small or too large a disk.
    #[error("disk_size_mb must be {min}..={max}, got {got}")]
    Disk {
        /// Asked for.
        got: u64,
        /// Lower limit.
        min: u64,
        /// Upper limit.
        max: u64,
    },
    /// A volume's host path is not absolute.
    #[error("volume file {path:?} is not an absolute path")]
    Volume {
        /// The path.
        path: std::path::PathBuf,
    },
    /// env, files, init or volume mounts are invalid.
    #[error("Invalid guest configuration")]
    Guest(#[source] ConfigDriveError),
}

fn check_name(name: &str) -> Result<(), SpecError> {
    let reason = if name.is_empty() || name.len() > 63 {
        Some("must be 1..=63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may only hold [a-z0-9-]")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SpecError::Name {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

impl SandboxSpec {
    /// Checks the spec against `limits` (the image name is checked against
    /// the image store by the caller). Pure: nothing is touched.
    pub fn validate(&self, limits: &Limits) -> Result<(), SpecError> {
        check_name(&self.name)?;
        if !(1..=limits.max_cpus).contains(&self.cpus) {
            return Err(SpecError::Cpus {
                got: self.cpus,
                max: limits.max_cpus,
            });
        }
        if !(limits.min_memory_mb..=limits.max_memory_mb).contains(&self.memory_mb) {
            return Err(SpecError::Memory {
                got: self.memory_mb,
                min: limits.min_memory_mb,
                max: limits.max_memory_mb,
            });
        }
        if let Some(mb) = self.disk_mb {
            if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&mb) {
                return Err(SpecError::Disk {
                    got: mb,
                    min: MIN_DISK_MB,
                    max: MAX_DISK_MB,
                });
            }
        }
        if let Some(v) = self.volumes.iter().find(|v| !v.path.is_absolute()) {
            return Err(SpecError::Volume {
                path: v.path.clone(),
            });
        }
        // The config drive's own validation covers env names, file paths
        // and modes, and init; a placeholder token stands in for the real one.
        self.config_drive("0".repeat(32))
            .validate()
            .map_err(SpecError::Guest)
    }

    /// The config drive for this spec with `token`.
    pub(crate) fn config_drive(&self, token: String) -> ConfigDrive {
        ConfigDrive {
            hostname: self.name.clone(),
            token,
            env: self.env.clone(),
            files: self.files.clone(),
            init: self.init.clone(),
            volumes: self
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| proto::config_drive::VolumeMount {
                    serial: VolumeSpec::drive_id(i),
                    uuid: v.uuid.clone(),
                    mount: v.mount.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            exec_defaults: None,
            agent_as_root: self.agent_as_root,
        }
    }
}

/// Most arguments, and bytes in all, of an image's `Entrypoint` + `Cmd`
/// that become a boot command (beyond, it is not run, with a warning).
const MAX_IMAGE_COMMAND_ARGS: usize = 256;
const MAX_IMAGE_COMMAND_BYTES: usize = 64 << 10;

/// Puts an OCI image's config under the sandbox's own settings: its `Env`
/// below the spec's env (entries the config drive cannot carry — no `=`,
/// a name outside `[A-Za-z_][A-Za-z0-9_]*`, a NUL — are dropped with a
/// warning), its `User` and `WorkingDir` as the exec defaults (a `User`
/// lohar could not parse is dropped: commands then run as root, the OCI
/// default), and its `Entrypoint` + `Cmd` as the boot command, run as that
/// user, when the sandbox has no `init` of its own (what `docker run
/// IMAGE` and a Fly machine run).
pub(crate) fn apply_image_config(cfg: &mut ConfigDrive, rc: &image::oci::spec::RunConfig) {
    for entry in rc.env.iter().flatten() {
        let Some((k, v)) = entry.split_once('=') else {
            tracing::warn!(entry, "image env entry without '=' dropped");
            continue;
        };
        let mut bytes = k.bytes();
        let name_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok || v.contains('\0') {
            tracing::warn!(name = k, "image env entry the guest cannot take dropped");
            continue;
        }
        cfg.env.entry(k.to_owned()).or_insert_with(|| v.to_owned());
    }
    let mut defaults = proto::config_drive::ExecDefaults {
        user: rc.user.clone().filter(|u| !u.is_empty()),
        cwd: rc.working_dir.clone().filter(|c| !c.is_empty()),
    };
    let check = |d: &proto::config_drive::ExecDefaults| d.validate().is_ok();
    if !check(&proto::config_drive::ExecDefaults {
        user: defaults.user.clone(),
        cwd: None,
    }) {
        tracing::warn!(user = ?defaults.user, "image User the guest cannot parse dropped");
        defaults.user = None;
    }
    if !check(&proto::config_drive::ExecDefaults {
        user: None,
        cwd: defaults.cwd.clone(),
    }) {
        tracing::warn!(cwd = ?defaults.cwd, "image WorkingDir that is not absolute dropped");
        defaults.cwd = None;
    }
    if cfg.init.is_none() {
        cfg.init = image_command(rc, defaults.user.clone());
    }
    cfg.exec_defaults = Some(defaults);
}

/// The image's `Entrypoint` followed by its `Cmd`, as a boot command run
/// as `user`; none when both are empty or it is too big or malformed.
fn image_command(rc: &image::oci::spec::RunConfig, user: Option<String>) -> Option<InitCommand> {
    let argv: Vec<String> = rc
        .entrypoint
        .iter()
        .flatten()
        .chain(rc.cmd.iter().flatten())
        .cloned()
        .collect();
    if argv.is_empty() {
        return None;
    }
    let bytes: usize = argv.iter().map(String::len).sum();
    if argv.len() > MAX_IMAGE_COMMAND_ARGS
        || bytes > MAX_IMAGE_COMMAND_BYTES
        || argv[0].is_empty()
        || argv.iter().any(|a| a.contains('\0'))
    {
        tracing::warn!(
            args = argv.len(),
            bytes,
            "the image's Entrypoint/Cmd is too big or malformed; it is not run"
        );
        return None;
    }
    Some(InitCommand {
        argv,
        cwd: None,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_entrypoint_and_cmd_are_the_boot_command_unless_the_spec_has_one() {
        let rc = image::oci::spec::RunConfig {
            user: Some("app".into()),
            entrypoint: Some(vec!["/entry.sh".into(), "-x".into()]),
            cmd: Some(vec!["serve".into()]),
            ..Default::default()
        };
        let spec = SandboxSpec::new("a", "app");
        let mut cfg = spec.config_drive("t".repeat(32));
        apply_image_config(&mut cfg, &rc);
        let init = cfg.init.clone().unwrap();
        assert_eq!(init.argv, ["/entry.sh", "-x", "serve"]);
        assert_eq!((init.user.as_deref(), init.cwd), (Some("app"), None));
        cfg.validate().unwrap();

        // Cmd alone; no User: root (no user on the command).
        let only_cmd = image::oci::spec::RunConfig {
            cmd: Some(vec!["nginx".into(), "-g".into(), "daemon off;".into()]),
            ..Default::default()
        };
        let mut cfg = spec.config_drive("t".repeat(32));
        apply_image_config(&mut cfg, &only_cmd);
        let init = cfg.init.unwrap();
        assert_eq!(init.argv, ["nginx", "-g", "daemon off;"]);
        assert_eq!(init.user, None);

        // The sandbox's own init wins.
        let mut own = SandboxSpec::new("a", "app");
        own.init = Some(InitCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), "mine".into()],
            cwd: None,
            user: None,
        });
        let mut cfg = own.config_drive("t".repeat(32));
        apply_image_config(&mut cfg, &rc);
        assert_eq!(cfg.init.unwrap().argv[2], "mine");

        // Nothing to run, or too much: no boot command.
        for rc in [
            image::oci::spec::RunConfig::default(),
            image::oci::spec::RunConfig {
                cmd: Some(vec!["x".into(); MAX_IMAGE_COMMAND_ARGS + 1]),
                ..Default::default()
            },
            image::oci::spec::RunConfig {
                cmd: Some(vec!["x".repeat(MAX_IMAGE_COMMAND_BYTES + 1)]),
                ..Default::default()
            },
            image::oci::spec::RunConfig {
                entrypoint: Some(vec![String::new()]),
                ..Default::default()
            },
        ] {
            let mut cfg = spec.config_drive("t".repeat(32));
            apply_image_config(&mut cfg, &rc);
            assert_eq!(cfg.init, None);
        }

        // A User lohar cannot parse is dropped from the command too.
        let bad_user = image::oci::spec::RunConfig {
            user: Some("a b".into()),
            cmd: Some(vec!["run".into()]),
            ..Default::default()
        };
        let mut cfg = spec.config_drive("t".repeat(32));
        apply_image_config(&mut cfg, &bad_user);
        assert_eq!(cfg.init.clone().unwrap().user, None);
        cfg.validate().unwrap();
    }

    #[test]
    fn image_config_goes_under_the_spec() {
        let mut spec = SandboxSpec::new("a", "app");
        spec.env.insert("MINE".into(), "spec".into());
        let mut cfg = spec.config_drive("t".repeat(32));
        let rc = image::oci::spec::RunConfig {
            env: Some(vec![
                "MINE=image".into(),
                "PATH=/opt/bin:/usr/bin".into(),
                "EMPTY=".into(),
                "NOEQUALS".into(),
                "BAD-NAME=x".into(),
            ]),
            working_dir: Some("/srv/app".into()),
            user: Some("1000:1000".into()),
            entrypoint: None,
            cmd: None,
        };
        apply_image_config(&mut cfg, &rc);
        assert_eq!(cfg.env["MINE"], "spec");
        assert_eq!(cfg.env["PATH"], "/opt/bin:/usr/bin");
        assert_eq!(cfg.env["EMPTY"], "");
        assert!(!cfg.env.contains_key("NOEQUALS") && !cfg.env.contains_key("BAD-NAME"));
        let d = cfg.exec_defaults.clone().unwrap();
        assert_eq!(
            (d.user.as_deref(), d.cwd.as_deref()),
            (Some("1000:1000"), Some("/srv/app"))
        );
        cfg.validate().unwrap();
        let rc = image::oci::spec::RunConfig {
            user: Some("a b".into()),
            working_dir: Some("relative".into()),
            ..Default::default()
        };
        apply_image_config(&mut cfg, &rc);
        assert_eq!(cfg.exec_defaults, Some(Default::default()));
        cfg.validate().unwrap();
    }

    const LIMITS: Limits = Limits {
        max_cpus: 4,
        min_memory_mb: 128,
        max_memory_mb: 4096,
    };

    fn spec() -> SandboxSpec {
        SandboxSpec::new("dev-1", "tiny")
    }

    #[test]
    fn defaults_and_serde() {
        let s: SandboxSpec = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(s.image, DEFAULT_IMAGE);
        assert_eq!((s.cpus, s.memory_mb), (DEFAULT_CPUS, DEFAULT_MEMORY_MB));
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"name":"a","gpu":1}"#).is_err());
        s.validate(&Limits::default()).unwrap();
        // A spec stored before egress policies existed is public; a
        // public one is stored as before.
        assert_eq!(s.egress, net::Egress::Public);
        assert!(!serde_json::to_string(&s).unwrap().contains("egress"));
        let mut e = s.clone();
        e.egress = net::Egress::allow(&["api.example.com", "10.1.2.0/24"]).unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            json.contains(r#""egress":{"allow":["api.example.com","10.1.2.0/24"]}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SandboxSpec>(&json).unwrap(), e);
    }

    #[test]
    fn names() {
        for ok in ["a", "dev-1", "0", &"x".repeat(63)] {
            let mut s = spec();
            s.name = ok.into();
            s.validate(&LIMITS).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"x".repeat(64)] {
            let mut s = spec();
            s.name = bad.into();
            assert!(
                matches!(s.validate(&LIMITS), Err(SpecError::Name { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cpus_and_memory_bounds() {
        for (cpus, ok) in [
            (0, false),
            (1, true),
            (4, true),
            (5, false),
            (u32::MAX, false),
        ] {
            let mut s = spec();
            s.cpus = cpus;
            assert_eq!(s.validate(&LIMITS).is_ok(), ok, "cpus {cpus}");
        }
        for (mem, ok) in [
            (0, false),
            (127, false),
            (128, true),
            (4096, true),
            (4097, false),
            (u32::MAX, false),
        ] {
            let mut s = spec();
            s.memory_mb = mem;
            assert_eq!(s.validate(&LIMITS).is_ok(), ok, "memory {mem}");
        }
        let mut s = spec();
        s.cpus = 0;
        assert_eq!(
            s.validate(&LIMITS).unwrap_err().to_string(),
            "cpus must be 1..=4, got 0"
        );
        s.cpus = 1;
        s.memory_mb = 1 << 30;
        assert_eq!(
            s.validate(&LIMITS).unwrap_err().to_string(),
            "memory_mb must be 128..=4096, got 1073741824"
        );
    }

    #[test]
    fn disk_bounds() {
        for (mb, ok) in [
            (None, true),
            (Some(0), false),
            (Some(MIN_DISK_MB - 1), false),
            (Some(MIN_DISK_MB), true),
            (Some(MAX_DISK_MB), true),
            (Some(MAX_DISK_MB + 1), false),
            (Some(u64::MAX), false),
        ] {
            let mut s = spec();
            s.disk_mb = mb;
            assert_eq!(s.validate(&LIMITS).is_ok(), ok, "disk {mb:?}");
        }
        // Specs stored before disk sizes existed read back as the default.
        let old: SandboxSpec = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(old.disk_mb, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("disk_mb"));
    }

    #[test]
    fn guest_config_is_checked() {
        let mut s = spec();
        s.env.insert("1BAD".into(), "x".into());
        assert!(matches!(s.validate(&LIMITS), Err(SpecError::Guest(_))));
        let mut s = spec();
        s.files.push(ConfigFile {
            path: "relative/path".into(),
            content: String::new(),
            mode: 0o644,
            owner: 1000,
        });
        assert!(matches!(s.validate(&LIMITS), Err(SpecError::Guest(_))));
        let mut s = spec();
        s.init = Some(InitCommand {
            argv: vec![],
            cwd: None,
            user: None,
        });
        assert!(matches!(s.validate(&LIMITS), Err(SpecError::Guest(_))));
    }

    #[test]
    fn host_limits_are_sane() {
        let l = Limits::for_host();
        assert!(l.max_cpus >= 1 && l.max_cpus <= Limits::default().max_cpus);
        assert!(l.max_memory_mb >= l.min_memory_mb);
    }
}
