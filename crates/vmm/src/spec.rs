//! The engine-neutral description of one VM, and its validation.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes
/// including the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Everything an engine needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Number of vCPUs (at least 1).
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest kernel: an uncompressed ELF `vmlinux` (Firecracker needs it;
    /// QEMU microvm boots it fastest through its PVH entry) or, for QEMU only,
    /// a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Engines may append what they need (QEMU adds
    /// `tsc_early_khz=`).
    pub cmdline: String,
    /// Block devices, in guest order (`vda`, `vdb`, …).
    pub drives: Vec<DriveSpec>,
    /// Optional network interface backed by a host TAP.
    pub net: Option<NetSpec>,
    /// File receiving the guest serial console.
    pub serial_log: PathBuf,
    /// Directory for the engine's sockets and logs; created if missing.
    pub work_dir: PathBuf,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
}

/// Drives whose id starts with this are files of the sandbox that live
/// outside its work directory (persistent volumes): a confined VMM is made
/// their owner as it is of the work directory's files.
pub const VOLUME_DRIVE_PREFIX: &str = "bhv-";

/// One virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    /// Identifier (letters, digits, `-`, `_`), unique within the VM. QEMU
    /// also gives it to the guest as the disk's serial (its first 20 bytes;
    /// Firecracker cannot set serials).
    pub id: String,
    /// Host file (raw image).
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// A virtio-net device backed by a host TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Host TAP name (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// Where guest RAM is allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum MemoryBacking {
    /// Anonymous memory: a snapshot must copy all of RAM.
    Anonymous,
    /// RAM is this file, mapped shared (QEMU `memory-backend-file,share=on`):
    /// a QEMU snapshot saves only device state and a restore maps the same
    /// file lazily. Firecracker (which always uses anonymous memory at boot)
    /// writes its snapshot's memory file here instead.
    File {
        /// The memory file (created if missing).
        path: PathBuf,
    },
    /// RAM starts as this file's content, mapped private (QEMU
    /// `memory-backend-file,share=off`): copy-on-write, so the guest
    /// costs the host what it changes, and the file is never written by
    /// the mapping. What a restore from a capture runs on: any number of
    /// VMs may start from one file. A snapshot of such a VM carries its
    /// RAM in the state file.
    Private {
        /// The memory image (must exist).
        path: PathBuf,
    },
}

impl MemoryBacking {
    /// The shared memory file, if any (the one a snapshot may leave guest
    /// RAM in).
    pub fn file(&self) -> Option<&Path> {
        match self {
            MemoryBacking::Anonymous | MemoryBacking::Private { .. } => None,
            MemoryBacking::File { path } => Some(path),
        }
    }

    /// Any file behind guest RAM, shared or private.
    pub fn path(&self) -> Option<&Path> {
        match self {
            MemoryBacking::Anonymous => None,
            MemoryBacking::File { path } | MemoryBacking::Private { path } => Some(path),
        }
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A MAC that is not six `:`-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address: {0:?}")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| BadMac(s.into()))?;
            if p.len() != 2 {
                return Err(BadMac(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = BadMac;
    fn try_from(s: String) -> Result<Self, BadMac> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> VmmError {
    VmmError::InvalidSpec {
        field: field.into(),
        reason: reason.into(),
    }
}

fn require_file(field: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

impl VmSpec {
    /// A spec with the given kernel and directories and no devices.
    pub fn new(kernel: impl Into<PathBuf>, work_dir: impl Into<PathBuf>) -> Self {
        let work_dir = work_dir.into();
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            drives: Vec::new(),
            net: None,
            serial_log: work_dir.join("serial.log"),
            work_dir,
            memory: MemoryBacking::Anonymous,
        }
    }

    /// Checks everything that can be checked before a VMM starts: counts,
    /// files that must exist, identifiers that end up in command lines or
    /// URLs, socket path lengths. `max_vcpus` is the engine's limit.
    pub fn validate(&self, max_vcpus: u32) -> Result<()> {
        if self.vcpus == 0 {
            return Err(invalid("vcpus", "must be at least 1"));
        }
        if self.vcpus > max_vcpus {
            return Err(invalid(
                "vcpus",
                format!("{} exceeds the engine's limit of {max_vcpus}", self.vcpus),
            ));
        }
        if self.memory_mib < 32 {
            return Err(invalid(
                "memory_mib",
                format!("{} MiB is below the 32 MiB minimum", self.memory_mib),
            ));
        }
        require_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            require_file("initrd", initrd)?;
        }
        if self.cmdline.contains('\n') || self.cmdline.contains('\0') {
            return Err(invalid("cmdline", "contains a newline or NUL"));
        }
        let mut ids = HashSet::new();
        for (i, d) in self.drives.iter().enumerate() {
            let ok = !d.id.is_empty()
                && d.id.len() <= 32
                && d.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(invalid(
                    format!("drives[{i}].id"),
                    format!("{:?}: use 1-32 of [A-Za-z0-9_-]", d.id),
                ));
            }
            if !ids.insert(d.id.as_str()) {
                return Err(invalid(
                    format!("drives[{i}].id"),
                    format!("{:?} is used twice", d.id),
                ));
            }
            require_file(&format!("drives[{i}].path"), &d.path)?;
        }
        if let Some(net) = &self.net {
            let ok = !net.tap.is_empty()
                && net.tap.len() <= 15
                && net
                    .tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return Err(invalid(
                    "net.tap",
                    format!("{:?}: use 1-15 of [A-Za-z0-9._-]", net.tap),
                ));
            }
            if net.mac.0[0] & 1 == 1 {
                return Err(invalid(
                    "net.mac",
                    format!("{} is a multicast address", net.mac),
                ));
            }
        }
        if self.work_dir.as_os_str().is_empty() {
            return Err(invalid("work_dir", "is empty"));
        }
        // The longest socket name any engine puts there.
        let sock = self.work_dir.join("firecracker.sock");
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "work_dir",
                format!(
                    "{} is too long for a Unix socket path ({MAX_SOCKET_PATH} bytes)",
                    self.work_dir.display()
                ),
            ));
        }
        if self.serial_log.as_os_str().is_empty() {
            return Err(invalid("serial_log", "is empty"));
        }
        if let Some(path) = self.memory.path() {
            if path.as_os_str().is_empty() {
                return Err(invalid("memory.path", "is empty"));
            }
        }
        Ok(())
    }

    /// Creates the work directory and the parents of the serial log and
    /// memory file.
    pub(crate) fn prepare_dirs(&self) -> Result<()> {
        let mut dirs = vec![self.work_dir.clone()];
        dirs.extend(self.serial_log.parent().map(Path::to_path_buf));
        dirs.extend(
            self.memory
                .file()
                .and_then(Path::parent)
                .map(Path::to_path_buf),
        );
        for d in dirs.into_iter().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(&d).map_err(|source| VmmError::Prepare { path: d, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_in(dir: &Path) -> VmSpec {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"not really").unwrap();
        VmSpec::new(kernel, dir.join("w"))
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        let d = tempfile::tempdir().unwrap();
        spec_in(d.path()).validate(32).unwrap();
    }

    #[test]
    fn rejects_zero_vcpus_and_too_many() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec_in(d.path());
        s.vcpus = 0;
        let e = s.validate(32).unwrap_err();
        assert!(
            matches!(&e, VmmError::InvalidSpec { field, .. } if field == "vcpus"),
            "{e}"
        );
        s.vcpus = 33;
        assert!(s
            .validate(32)
            .unwrap_err()
            .to_string()
            .contains("limit of 32"));
    }

    #[test]
    fn rejects_missing_kernel_and_drive() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec_in(d.path());
        s.kernel = d.path().join("nope");
        let e = s.validate(32).unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("nope"), "{e}");
        let mut s = spec_in(d.path());
        s.drives.push(DriveSpec {
            id: "root".into(),
            path: d.path().join("missing.img"),
            read_only: true,
        });
        assert!(s
            .validate(32)
            .unwrap_err()
            .to_string()
            .contains("drives[0].path"));
    }

    #[test]
    fn rejects_bad_and_duplicate_drive_ids() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        std::fs::write(&img, b"").unwrap();
        for bad in ["", "a,b", "a b", "x/y", &"z".repeat(33)] {
            let mut s = spec_in(d.path());
            s.drives.push(DriveSpec {
                id: bad.into(),
                path: img.clone(),
                read_only: false,
            });
            assert!(s.validate(32).is_err(), "{bad:?} accepted");
        }
        let mut s = spec_in(d.path());
        for _ in 0..2 {
            s.drives.push(DriveSpec {
                id: "root".into(),
                path: img.clone(),
                read_only: false,
            });
        }
        assert!(s
            .validate(32)
            .unwrap_err()
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn rejects_bad_tap_names_and_multicast_macs() {
        let d = tempfile::tempdir().unwrap();
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let mut s = spec_in(d.path());
        s.net = Some(NetSpec {
            tap: "tap-with-a-long-name".into(),
            mac,
        });
        assert!(s.validate(32).is_err());
        s.net = Some(NetSpec {
            tap: "tap0".into(),
            mac: "01:00:5e:00:00:01".parse().unwrap(),
        });
        assert!(s
            .validate(32)
            .unwrap_err()
            .to_string()
            .contains("multicast"));
        s.net = Some(NetSpec {
            tap: "tap0".into(),
            mac,
        });
        s.validate(32).unwrap();
    }

    #[test]
    fn rejects_work_dirs_too_long_for_a_socket() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec_in(d.path());
        s.work_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        assert!(s.validate(32).unwrap_err().to_string().contains("too long"));
    }

    #[test]
    fn mac_parses_and_prints() {
        let m: MacAddr = "02:AB:cd:00:10:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:10:ff");
        for bad in [
            "",
            "02:ab:cd:00:10",
            "02:ab:cd:00:10:ff:00",
            "2:ab:cd:00:10:ff",
            "zz:ab:cd:00:10:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:ab:cd:00:10:ff\"");
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
    }
}
