//! The per-boot config drive: what lohar needs to configure a sandbox
//! (hostname, agent token, environment, files, init command), and its raw
//! on-disk encoding.
//!
//! It lives here, beside the wire protocol, because both ends use it: the
//! image pipeline (`bhatti-image`) writes it and lohar reads it at boot,
//! without either depending on the other. The layout (also in
//! `docs/guest-image.md`):
//!
//! ```text
//! 0   8  magic  "BHATTICD"
//! 8   4  format version, u32 little-endian (1)
//! 12  4  JSON length N, u32 little-endian (N <= 1 MiB)
//! 16  N  UTF-8 JSON of ConfigDrive (unknown fields rejected)
//! …      zero padding to a multiple of 4096 bytes
//! ```
//!
//! Decoding validates every field, so what lohar applies (paths, env names,
//! the token) is already known to be well formed.

use std::collections::BTreeMap;

/// Magic at offset 0 of a raw config drive.
pub const RAW_MAGIC: &[u8; 8] = b"BHATTICD";
/// Version of the raw container format.
pub const RAW_FORMAT_VERSION: u32 = 1;
/// Upper bound of the JSON document.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// File name of the JSON document on an ext4 config drive.
pub const EXT4_CONFIG_FILE: &str = "lohar.json";
/// Bytes before the JSON document: magic, version, length.
pub const RAW_HEADER: usize = 16;
/// A raw image is padded to a multiple of this.
pub const RAW_ALIGN: usize = 4096;
/// uid (and gid) of the sandbox user, the default owner of config files.
pub const SANDBOX_UID: u32 = 1000;

/// Why a config drive could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigDriveError {
    /// The raw image does not start with the magic.
    #[error("Not a bhatti config drive")]
    BadMagic,
    /// The raw image has a container version we do not know.
    #[error("Unsupported config drive format version {0}")]
    UnsupportedVersion(u32),
    /// The JSON length is larger than the image or the limit.
    #[error("Config length {len} exceeds {limit} bytes")]
    TooLarge {
        /// Declared or encoded length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The JSON does not match [`ConfigDrive`].
    #[error("Invalid config JSON: {0}")]
    Json(String),
    /// A field is invalid.
    #[error("Invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: String,
        /// Why.
        reason: &'static str,
    },
}

/// A file lohar writes into the guest before starting anything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Absolute guest path.
    pub path: String,
    /// UTF-8 contents (binary files go through the agent's file API).
    pub content: String,
    /// Permission bits.
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    /// Owner uid and gid.
    #[serde(default = "default_owner")]
    pub owner: u32,
}

fn default_file_mode() -> u32 {
    0o644
}
fn default_owner() -> u32 {
    SANDBOX_UID
}

/// A command lohar starts once the sandbox is configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitCommand {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (default `/workspace`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Who it runs as, in an OCI image's `User` syntax (see
    /// [`ExecDefaults::user`]): set when the command is the image's own
    /// `Entrypoint` + `Cmd`. Root when absent (a sandbox's `init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The agent configuration carried by a config drive (`/lohar.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDrive {
    /// Guest hostname.
    pub hostname: String,
    /// Per-sandbox agent token (the AUTH secret).
    pub token: String,
    /// Environment for every exec (below request env).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files to write at boot.
    #[serde(default)]
    pub files: Vec<ConfigFile>,
    /// Command to start at boot.
    #[serde(default)]
    pub init: Option<InitCommand>,
    /// Persistent volumes to mount once the root is assembled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Exec defaults from an OCI image's config (absent for the tiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_defaults: Option<ExecDefaults>,
    /// Commands run as root rather than the sandbox user: only for the
    /// daemon's own short-lived utility VMs (a volume's tar export or
    /// import, which must read and restore every owner and mode), never
    /// for a user's sandbox.
    #[serde(default, skip_serializing_if = "is_false")]
    pub agent_as_root: bool,
}

/// Who commands run as and where, when the sandbox's image says (an OCI
/// image's `User` and `WorkingDir`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecDefaults {
    /// `user`, `uid`, `user:group` or `uid:gid`, looked up in the guest's
    /// `/etc/passwd` and `/etc/group`; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Working directory of commands that name none (and of `init`);
    /// `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl ExecDefaults {
    /// Checks the user (names and ids of `[A-Za-z0-9._-]`, at most one
    /// `:`) and the directory (absolute, no NUL).
    pub fn validate(&self) -> Result<(), ConfigDriveError> {
        if let Some(u) = &self.user {
            let parts: Vec<&str> = u.split(':').collect();
            let ok = u.len() <= 256
                && (1..=2).contains(&parts.len())
                && parts.iter().all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                });
            if !ok {
                return Err(invalid(
                    format!("user '{u}'"),
                    "must be user, uid, user:group or uid:gid of [A-Za-z0-9._-]",
                ));
            }
        }
        if let Some(c) = &self.cwd {
            if !c.starts_with('/') || c.contains('\0') || c.len() > 4096 {
                return Err(invalid(
                    format!("working directory '{c}'"),
                    "must be an absolute path without NUL, at most 4096 bytes",
                ));
            }
        }
        Ok(())
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Most volumes one sandbox may mount.
pub const MAX_VOLUMES: usize = 8;

/// Guest paths a volume may not be mounted on, nor inside, nor above:
/// the system's own directories (the root, the kernel's file systems,
/// what the image ships, where lohar keeps its mounts).
pub const RESERVED_MOUNTS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/bhatti",
    "/var/run",
];

/// A persistent volume as the guest sees it: which disk, where, how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// The virtio-blk serial the host gave the disk (`bhv-<n>`), read
    /// from `/sys/block/vd*/serial`.
    pub serial: String,
    /// The ext4 UUID the volume was made with: how the disk is found when
    /// the VMM cannot set serials (Firecracker).
    pub uuid: String,
    /// Absolute, normalised guest path (see [`check_mount`]).
    pub mount: String,
    /// Mounted read-only (the host also attaches the disk read-only).
    #[serde(default)]
    pub read_only: bool,
}

/// Why a mount path is refused, if it is: it must be absolute and
/// normalised, not `/`, at most 255 bytes, and neither inside, on nor
/// above a [`RESERVED_MOUNTS`] path.
pub fn check_mount(path: &str) -> Result<(), &'static str> {
    let normal = path.starts_with('/')
        && path.len() <= 255
        && !path.contains('\0')
        && path
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normal {
        return Err("must be an absolute, normalised path (no '.', '..', '//' or trailing '/')");
    }
    if path == "/" {
        return Err("must not be '/'");
    }
    let under = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
    if RESERVED_MOUNTS
        .iter()
        .any(|r| under(path, r) || under(r, path))
    {
        return Err("overlaps a system path (/bin /boot /dev /etc /lib* /proc /run /sbin /sys /usr /var/lib/bhatti /var/run)");
    }
    Ok(())
}

fn invalid(field: impl Into<String>, reason: &'static str) -> ConfigDriveError {
    ConfigDriveError::Invalid {
        field: field.into(),
        reason,
    }
}

impl ConfigDrive {
    /// Checks every field: an RFC 1123 hostname, a token of 16..=256
    /// printable ASCII bytes, POSIX env names, absolute normalised file paths.
    pub fn validate(&self) -> Result<(), ConfigDriveError> {
        let h = &self.hostname;
        if h.is_empty() || h.len() > 253 {
            return Err(invalid("hostname", "must be 1..=253 bytes"));
        }
        for label in h.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(invalid(
                    "hostname",
                    "labels are 1..=63 of [A-Za-z0-9-], no leading or trailing '-'",
                ));
            }
        }
        if !(16..=256).contains(&self.token.len())
            || !self.token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid("token", "must be 16..=256 printable ASCII bytes"));
        }
        if let Some(d) = &self.exec_defaults {
            d.validate()?;
        }
        for key in self.env.keys() {
            let mut bytes = key.bytes();
            let first_ok = bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
            if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(invalid(
                    format!("env name '{key}'"),
                    "must match [A-Za-z_][A-Za-z0-9_]*",
                ));
            }
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return Err(invalid("env value", "must not contain NUL"));
        }
        for f in &self.files {
            let ok = f.path.starts_with('/')
                && !f.path.contains('\0')
                && f.path
                    .split('/')
                    .skip(1)
                    .all(|c| !c.is_empty() && c != "." && c != "..");
            if !ok {
                return Err(invalid(
                    format!("file path '{}'", f.path),
                    "must be absolute and normalised",
                ));
            }
            if f.mode > 0o7777 {
                return Err(invalid(
                    format!("mode of '{}'", f.path),
                    "must be at most 0o7777",
                ));
            }
        }
        if self.volumes.len() > MAX_VOLUMES {
            return Err(invalid("volumes", "at most 8 per sandbox"));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if let Err(reason) = check_mount(&v.mount) {
                return Err(invalid(format!("mount path '{}'", v.mount), reason));
            }
            let serial_ok = v.serial.len() <= 20
                && v.serial
                    .strip_prefix("bhv-")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !serial_ok {
                return Err(invalid(format!("volumes[{i}].serial"), "must be bhv-<n>"));
            }
            let uuid_ok = v.uuid.len() == 36
                && v.uuid.bytes().enumerate().all(|(j, b)| {
                    if [8, 13, 18, 23].contains(&j) {
                        b == b'-'
                    } else {
                        b.is_ascii_hexdigit()
                    }
                });
            if !uuid_ok {
                return Err(invalid(format!("volumes[{i}].uuid"), "must be a UUID"));
            }
            let dup = self.volumes[..i]
                .iter()
                .any(|w| w.serial == v.serial || w.uuid == v.uuid || w.mount == v.mount);
            if dup {
                return Err(invalid(
                    format!("volumes[{i}]"),
                    "serial, uuid and mount must be unique",
                ));
            }
        }
        if let Some(init) = &self.init {
            if init.argv.is_empty() || init.argv.iter().any(|a| a.contains('\0')) {
                return Err(invalid("init.argv", "must be non-empty without NUL bytes"));
            }
            if init.user.is_some() {
                ExecDefaults {
                    user: init.user.clone(),
                    cwd: None,
                }
                .validate()
                .map_err(|_| invalid("init.user", "must be user, uid, user:group or uid:gid"))?;
            }
        }
        Ok(())
    }

    /// Validates and serialises the JSON document (at most [`MAX_CONFIG_BYTES`]).
    pub fn to_json(&self) -> Result<Vec<u8>, ConfigDriveError> {
        self.validate()?;
        let json = serde_json::to_vec(self).map_err(|e| ConfigDriveError::Json(e.to_string()))?;
        if json.len() > MAX_CONFIG_BYTES {
            return Err(ConfigDriveError::TooLarge {
                len: json.len(),
                limit: MAX_CONFIG_BYTES,
            });
        }
        Ok(json)
    }

    /// Parses and validates the JSON document.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigDriveError> {
        let cfg: Self =
            serde_json::from_slice(json).map_err(|e| ConfigDriveError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Encodes a raw config drive image (see the module docs for the layout).
pub fn encode_raw(cfg: &ConfigDrive) -> Result<Vec<u8>, ConfigDriveError> {
    let json = cfg.to_json()?;
    let mut out = Vec::with_capacity((RAW_HEADER + json.len()).next_multiple_of(RAW_ALIGN));
    out.extend_from_slice(RAW_MAGIC);
    out.extend_from_slice(&RAW_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize((RAW_HEADER + json.len()).next_multiple_of(RAW_ALIGN), 0);
    Ok(out)
}

/// Decodes a raw config drive image (what lohar does with the device's bytes).
pub fn decode_raw(bytes: &[u8]) -> Result<ConfigDrive, ConfigDriveError> {
    if bytes.get(..8) != Some(RAW_MAGIC.as_slice()) {
        return Err(ConfigDriveError::BadMagic);
    }
    let word = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(ConfigDriveError::BadMagic)
    };
    let version = word(8)?;
    if version != RAW_FORMAT_VERSION {
        return Err(ConfigDriveError::UnsupportedVersion(version));
    }
    let len = word(12)? as usize;
    let limit = MAX_CONFIG_BYTES.min(bytes.len().saturating_sub(RAW_HEADER));
    if len > limit {
        return Err(ConfigDriveError::TooLarge { len, limit });
    }
    ConfigDrive::from_json(&bytes[RAW_HEADER..RAW_HEADER + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConfigDrive {
        ConfigDrive {
            hostname: "sb-1.example".into(),
            token: "0123456789abcdef0123".into(),
            env: BTreeMap::from([("FOO".into(), "bar baz".into())]),
            files: vec![ConfigFile {
                path: "/home/lohar/.netrc".into(),
                content: "machine x\n".into(),
                mode: 0o600,
                owner: 1000,
            }],
            init: Some(InitCommand {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                cwd: None,
                user: None,
            }),
            volumes: Vec::new(),
            exec_defaults: None,
            agent_as_root: false,
        }
    }

    #[test]
    fn agent_as_root_is_off_unless_set_and_absent_when_off() {
        let d = sample();
        let json = String::from_utf8(d.to_json().unwrap()).unwrap();
        assert!(!json.contains("agent_as_root"), "{json}");
        assert!(
            !ConfigDrive::from_json(json.as_bytes())
                .unwrap()
                .agent_as_root
        );
        let root = ConfigDrive {
            agent_as_root: true,
            ..sample()
        };
        let back = ConfigDrive::from_json(&root.to_json().unwrap()).unwrap();
        assert!(back.agent_as_root);
    }

    #[test]
    fn raw_roundtrip_and_layout() {
        let cfg = sample();
        let raw = encode_raw(&cfg).unwrap();
        assert_eq!(raw.len() % 4096, 0);
        assert_eq!(&raw[..8], b"BHATTICD");
        assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 1);
        let len = u32::from_le_bytes(raw[12..16].try_into().unwrap()) as usize;
        assert_eq!(
            &raw[16..16 + len],
            serde_json::to_vec(&cfg).unwrap().as_slice()
        );
        assert_eq!(decode_raw(&raw).unwrap(), cfg);
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let cfg = ConfigDrive::from_json(
            br#"{"hostname":"a","token":"0123456789abcdef","files":[{"path":"/x","content":""}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.files[0].mode, 0o644);
        assert_eq!(cfg.files[0].owner, 1000);
        assert!(cfg.env.is_empty() && cfg.init.is_none());
        let err =
            ConfigDrive::from_json(br#"{"hostname":"a","token":"0123456789abcdef","secrets":{}}"#)
                .unwrap_err();
        assert!(matches!(err, ConfigDriveError::Json(m) if m.contains("unknown field")));
    }

    #[test]
    fn validation() {
        let bad = |f: fn(&mut ConfigDrive)| {
            let mut c = sample();
            f(&mut c);
            assert!(
                matches!(c.validate(), Err(ConfigDriveError::Invalid { .. })),
                "{c:?}"
            );
        };
        bad(|c| c.hostname = "-x".into());
        bad(|c| c.hostname = "a..b".into());
        bad(|c| c.hostname = "x".repeat(64));
        bad(|c| c.token = "short".into());
        bad(|c| c.token = "0123456789abcdef 0123".into());
        bad(|c| {
            c.env.insert("1X".into(), "v".into());
        });
        bad(|c| {
            c.env.insert("A=B".into(), "v".into());
        });
        bad(|c| c.files[0].path = "relative".into());
        bad(|c| c.files[0].path = "/a/../etc/shadow".into());
        bad(|c| c.files[0].mode = 0o10000);
        bad(|c| {
            c.init = Some(InitCommand {
                argv: vec![],
                cwd: None,
                user: None,
            })
        });
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn volume_mounts() {
        for ok in [
            "/data",
            "/workspace/cache",
            "/var/lib/postgresql",
            "/home/u/x",
            "/mnt",
        ] {
            assert_eq!(check_mount(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "data",
            "/",
            "/data/",
            "/a//b",
            "/a/./b",
            "/a/../etc",
            "/etc",
            "/etc/x",
            "/usr/local",
            "/lib64",
            "/proc",
            "/sys/fs",
            "/dev/shm",
            "/run",
            "/var/lib/bhatti",
            "/var/lib/bhatti/x",
            "/var/lib",
            "/var",
            "/boot",
        ] {
            assert!(check_mount(bad).is_err(), "{bad:?}");
        }
        let vol = |n: usize, mount: &str| VolumeMount {
            serial: format!("bhv-{n}"),
            uuid: format!("0000000{n}-0000-4000-8000-000000000000"),
            mount: mount.into(),
            read_only: false,
        };
        let mut c = sample();
        c.volumes = vec![vol(0, "/data"), vol(1, "/cache")];
        let back = decode_raw(&encode_raw(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        c.volumes[1].mount = "/data".into();
        assert!(c.validate().is_err(), "two volumes on one path");
        c.volumes[1] = vol(1, "/etc");
        assert!(c.validate().is_err());
        c.volumes[1] = vol(1, "/cache");
        c.volumes[1].serial = "vdb".into();
        assert!(c.validate().is_err());
        c.volumes[1] = vol(1, "/cache");
        c.volumes[1].uuid = "not-a-uuid".into();
        assert!(c.validate().is_err());
        c.volumes = (0..=MAX_VOLUMES)
            .map(|n| vol(n, &format!("/v{n}")))
            .collect();
        assert!(c.validate().is_err(), "too many");
        // A drive without volumes encodes as before.
        let json = String::from_utf8(sample().to_json().unwrap()).unwrap();
        assert!(!json.contains("volumes"));
    }

    #[test]
    fn exec_defaults_validate_and_stay_out_when_absent() {
        let json = String::from_utf8(sample().to_json().unwrap()).unwrap();
        assert!(!json.contains("exec_defaults"));
        let mut c = sample();
        for (user, ok) in [
            ("app", true),
            ("1000", true),
            ("1000:1000", true),
            ("www-data:staff", true),
            ("", false),
            ("a:b:c", false),
            (":1", false),
            ("a b", false),
            ("a\0", false),
        ] {
            c.exec_defaults = Some(ExecDefaults {
                user: Some(user.into()),
                cwd: None,
            });
            assert_eq!(c.validate().is_ok(), ok, "{user:?}");
        }
        for (cwd, ok) in [
            ("/srv/app", true),
            ("/", true),
            ("rel", false),
            ("/a\0", false),
        ] {
            c.exec_defaults = Some(ExecDefaults {
                user: None,
                cwd: Some(cwd.into()),
            });
            assert_eq!(c.validate().is_ok(), ok, "{cwd:?}");
        }
        c.exec_defaults = Some(ExecDefaults {
            user: Some("1000".into()),
            cwd: Some("/srv".into()),
        });
        let back = decode_raw(&encode_raw(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode_raw(b"nope"), Err(ConfigDriveError::BadMagic));
        let mut raw = encode_raw(&sample()).unwrap();
        raw[8] = 2;
        assert_eq!(
            decode_raw(&raw),
            Err(ConfigDriveError::UnsupportedVersion(2))
        );
        let mut raw = encode_raw(&sample()).unwrap();
        raw[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(matches!(
            decode_raw(&raw),
            Err(ConfigDriveError::TooLarge { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64), len in 0u32..100) {
            let mut raw = b"BHATTICD".to_vec();
            raw.extend_from_slice(&1u32.to_le_bytes());
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&tail);
            let _ = decode_raw(&raw);
            let _ = decode_raw(&tail);
        }
    }

    #[test]
    fn decode_rejects_a_truncated_document() {
        let raw = encode_raw(&sample()).unwrap();
        let len = u32::from_le_bytes(raw[12..16].try_into().unwrap()) as usize;
        let cut = &raw[..RAW_HEADER + len - 1];
        assert!(matches!(
            decode_raw(cut),
            Err(ConfigDriveError::TooLarge { .. })
        ));
        assert_eq!(decode_raw(&raw[..12]), Err(ConfigDriveError::BadMagic));
    }
}
