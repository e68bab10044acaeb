//! The per-boot config drive: what lohar needs to configure a sandbox
//! (hostname, agent token, environment, files, init command).
//!
//! Two encodings:
//! * [`ConfigDriveFormat::Raw`] (default): a filesystem-less block device
//!   image. lohar reads the device directly:
//!   ```text
//!   0   8  magic  "BHATTICD"
//!   8   4  format version, u32 little-endian (1)
//!   12  4  JSON length N, u32 little-endian (N <= 1 MiB)
//!   16  N  UTF-8 JSON of ConfigDrive
//!   …      zero padding to a multiple of 4096 bytes
//!   ```
//!   Writing it is a single small file write (microseconds), where
//!   `mkfs.ext4 -d` costs tens of milliseconds and lohar would need to mount.
//! * [`ConfigDriveFormat::Ext4`]: an ext4 image holding `/lohar.json`.
//!
//! The types and the raw codec live in `proto::config_drive` (lohar decodes
//! the drive without depending on this crate) and are re-exported here.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{io, Result};
use crate::fsutil::Staging;
use crate::mkfs::{make_ext4, Ext4Spec};

pub use proto::config_drive::{
    decode_raw, encode_raw, ConfigDrive, ConfigDriveError, ConfigFile, InitCommand,
    MAX_CONFIG_BYTES, RAW_FORMAT_VERSION, RAW_MAGIC,
};

/// File name of the JSON document on an ext4 config drive.
pub const EXT4_CONFIG_FILE: &str = "lohar.json";

/// How a config drive is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigDriveFormat {
    /// Length-prefixed JSON on a raw block device (fast; the default).
    #[default]
    Raw,
    /// ext4 filesystem with `/lohar.json`.
    Ext4,
}

/// Writes the config drive for one boot at `path` (mode 0600: it holds the
/// agent token). Written to a temp file and renamed into place.
pub fn write_config_drive(path: &Path, cfg: &ConfigDrive, format: ConfigDriveFormat) -> Result<()> {
    let tmp = path.with_extension("tmp");
    match format {
        ConfigDriveFormat::Raw => {
            let bytes = encode_raw(cfg)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
        }
        ConfigDriveFormat::Ext4 => {
            let json = cfg.to_json()?;
            let parent = path.parent().unwrap_or(Path::new("."));
            let staging = Staging::new(parent, ".config-drive")?;
            let src = staging.path().join("root");
            std::fs::create_dir(&src).map_err(io("create directory", &src))?;
            let file = src.join(EXT4_CONFIG_FILE);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .and_then(|mut f| f.write_all(&json))
                .map_err(io("write", &file))?;
            make_ext4(
                &tmp,
                &Ext4Spec {
                    label: "bhatti-config".into(),
                    size_bytes: (json.len() as u64 + (2 << 20)).next_multiple_of(1 << 20),
                    journal: false,
                    inodes: Some(16),
                    source_dir: Some(src),
                },
            )?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io("chmod", &tmp))?;
        }
    }
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

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
    fn writes_both_formats_private() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("config.img");
        write_config_drive(&raw, &sample(), ConfigDriveFormat::Raw).unwrap();
        assert_eq!(decode_raw(&std::fs::read(&raw).unwrap()).unwrap(), sample());
        let ext4 = dir.path().join("config.ext4");
        write_config_drive(&ext4, &sample(), ConfigDriveFormat::Ext4).unwrap();
        for p in [&raw, &ext4] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /lohar.json"])
            .arg(&ext4)
            .output()
            .unwrap();
        assert_eq!(ConfigDrive::from_json(&out.stdout).unwrap(), sample());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
    }
}
