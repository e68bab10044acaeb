//! Finding the three virtio disks and telling them apart by content.
//!
//! The host attaches base image, sandbox disk and config drive as `vda`,
//! `vdb`, `vdc`, but lohar does not trust the order: each disk is
//! recognised by its first bytes (an ext4 label, or the config drive magic).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::config_drive::{ConfigDrive, MAX_CONFIG_BYTES, RAW_HEADER, RAW_MAGIC};

use super::error::BootError;

/// Label of the per-sandbox writable disk.
pub const SANDBOX_LABEL: &str = "bhatti-disk";
/// Label of the (unsupported here) ext4 config drive variant.
pub const EXT4_CONFIG_LABEL: &str = "bhatti-config";
/// Base images are labelled `bhatti-<tier>`.
pub const BASE_LABEL_PREFIX: &str = "bhatti-";
/// Disks the boot waits for before identifying them.
pub const EXPECTED: [&str; 3] = ["/dev/vda", "/dev/vdb", "/dev/vdc"];

const EXT4_MAGIC_OFFSET: usize = 1080;
const EXT4_LABEL_OFFSET: usize = 1144;
/// Bytes read from each disk to identify it.
pub const PROBE_BYTES: usize = EXT4_LABEL_OFFSET + 16;

/// What a disk's first bytes say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// A read-only base image (`bhatti-<tier>`).
    Base { label: String },
    /// The sandbox's writable disk.
    Sandbox,
    /// A raw config drive.
    Config,
    /// An ext4 config drive.
    Ext4Config,
    /// Anything else (an extra disk; ignored).
    Other,
}

/// Classifies a disk from its first [`PROBE_BYTES`] bytes (fewer is "other").
pub fn classify(head: &[u8]) -> DiskKind {
    if head.starts_with(RAW_MAGIC) {
        return DiskKind::Config;
    }
    if head.len() < PROBE_BYTES || head[EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2] != [0x53, 0xEF] {
        return DiskKind::Other;
    }
    let raw = &head[EXT4_LABEL_OFFSET..EXT4_LABEL_OFFSET + 16];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let Ok(label) = std::str::from_utf8(&raw[..end]) else {
        return DiskKind::Other;
    };
    match label {
        SANDBOX_LABEL => DiskKind::Sandbox,
        EXT4_CONFIG_LABEL => DiskKind::Ext4Config,
        l if l.len() > BASE_LABEL_PREFIX.len() && l.starts_with(BASE_LABEL_PREFIX) => {
            DiskKind::Base {
                label: l.to_string(),
            }
        }
        _ => DiskKind::Other,
    }
}

/// The three disks, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    pub base: PathBuf,
    pub base_label: String,
    pub sandbox: PathBuf,
    pub config: PathBuf,
}

/// Assigns roles to classified disks; every role exactly once.
pub fn assign(found: &[(PathBuf, DiskKind)]) -> Result<Disks, BootError> {
    let mut base: Option<(PathBuf, String)> = None;
    let mut sandbox: Option<PathBuf> = None;
    let mut config: Option<PathBuf> = None;
    fn put(slot: &mut Option<PathBuf>, role: &'static str, p: &Path) -> Result<(), BootError> {
        match slot {
            Some(first) => Err(BootError::DuplicateDisk {
                role,
                first: first.clone(),
                second: p.to_path_buf(),
            }),
            None => {
                *slot = Some(p.to_path_buf());
                Ok(())
            }
        }
    }
    for (path, kind) in found {
        match kind {
            DiskKind::Base { label } => {
                let mut slot = base.as_ref().map(|(p, _)| p.clone());
                put(&mut slot, "base image", path)?;
                base = Some((path.clone(), label.clone()));
            }
            DiskKind::Sandbox => put(&mut sandbox, "sandbox disk", path)?,
            DiskKind::Config => put(&mut config, "config drive", path)?,
            DiskKind::Ext4Config => return Err(BootError::Ext4ConfigDrive { path: path.clone() }),
            DiskKind::Other => {}
        }
    }
    let listing = || {
        found
            .iter()
            .map(|(p, k)| format!("{}: {k:?}", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = |role| BootError::MissingDisk {
        role,
        found: listing(),
    };
    let (base, base_label) =
        base.ok_or_else(|| missing("base image (ext4 labelled bhatti-<tier>)"))?;
    Ok(Disks {
        base,
        base_label,
        sandbox: sandbox.ok_or_else(|| missing("sandbox disk (ext4 labelled bhatti-disk)"))?,
        config: config.ok_or_else(|| missing("config drive (BHATTICD)"))?,
    })
}

/// Waits (bounded) for `vda`..`vdc` to appear, then identifies every
/// `/dev/vd*` disk.
pub fn find(timeout: Duration) -> Result<Disks, BootError> {
    let end = Instant::now() + timeout;
    while !EXPECTED.iter().all(|d| Path::new(d).exists()) {
        if Instant::now() >= end {
            let present: Vec<_> = EXPECTED.iter().filter(|d| Path::new(d).exists()).collect();
            return Err(BootError::Timeout {
                what: format!("disks {EXPECTED:?} (present: {present:?})"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let names = virtio_disks()?;
    let mut found = Vec::new();
    for name in names {
        // A persistent volume (its serial says so): never a base image,
        // sandbox disk or config drive, whatever a guest wrote into it.
        if serial(&name).is_some_and(|s| s.starts_with(VOLUME_SERIAL_PREFIX)) {
            continue;
        }
        let path = Path::new("/dev").join(name);
        let mut head = Vec::with_capacity(PROBE_BYTES);
        std::fs::File::open(&path)
            .and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut head))
            .map_err(BootError::io("read", &path))?;
        let kind = classify(&head);
        found.push((path, kind));
    }
    assign(&found)
}

/// Serials of the host's volume drives (`bhv-<n>`).
pub const VOLUME_SERIAL_PREFIX: &str = "bhv-";
/// Label of every volume's ext4 (the host's `image::disk::VOLUME_LABEL`).
pub const VOLUME_LABEL: &str = "bhvol";
const EXT4_UUID_OFFSET: usize = 1128;

/// The serial of disk `name` (`vdb`), as the VMM set it, if any.
fn serial(name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/sys/block/{name}/serial")).ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_owned())
}

/// The ext4 UUID in a disk's first [`PROBE_BYTES`] bytes, if it is an
/// ext4 labelled [`VOLUME_LABEL`], as text (`xxxxxxxx-xxxx-…`).
pub fn volume_uuid(head: &[u8]) -> Option<String> {
    if head.len() < PROBE_BYTES || head[EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2] != [0x53, 0xEF] {
        return None;
    }
    let raw = &head[EXT4_LABEL_OFFSET..EXT4_LABEL_OFFSET + 16];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if &raw[..end] != VOLUME_LABEL.as_bytes() {
        return None;
    }
    let u = &head[EXT4_UUID_OFFSET..EXT4_UUID_OFFSET + 16];
    let hex =
        |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    Some(format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    ))
}

/// Finds the disk of each volume: by its serial (QEMU sets `bhv-<n>`),
/// else (Firecracker sets no serials) by the UUID of an ext4 labelled
/// [`VOLUME_LABEL`] among the disks without a serial. Waits (bounded) for
/// late disks. Device order is never trusted.
pub fn find_volumes(
    volumes: &[proto::config_drive::VolumeMount],
    timeout: Duration,
) -> Result<Vec<PathBuf>, BootError> {
    let end = Instant::now() + timeout;
    loop {
        let names = virtio_disks()?;
        let mut serials = Vec::new();
        let mut uuids = Vec::new();
        for name in &names {
            let path = Path::new("/dev").join(name);
            match serial(name) {
                Some(s) => serials.push((s, path)),
                None => {
                    let mut head = Vec::with_capacity(PROBE_BYTES);
                    let read = std::fs::File::open(&path)
                        .and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut head));
                    if read.is_ok() {
                        if let Some(u) = volume_uuid(&head) {
                            uuids.push((u, path));
                        }
                    }
                }
            }
        }
        let found: Vec<Option<PathBuf>> = volumes
            .iter()
            .map(|v| {
                let by_serial = serials.iter().find(|(s, _)| *s == v.serial);
                let by_uuid = || {
                    let mut m = uuids
                        .iter()
                        .filter(|(u, _)| u.eq_ignore_ascii_case(&v.uuid));
                    // Two disks with one UUID: trust neither.
                    match (m.next(), m.next()) {
                        (Some(one), None) => Some(one),
                        _ => None,
                    }
                };
                by_serial.or_else(by_uuid).map(|(_, p)| p.clone())
            })
            .collect();
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        if Instant::now() >= end {
            let missing: Vec<_> = volumes
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|(v, _)| format!("{} (uuid {}) for {}", v.serial, v.uuid, v.mount))
                .collect();
            return Err(BootError::Timeout {
                what: format!("volume disks {missing:?}"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads and decodes the raw config drive with `read(2)`, without mounting.
pub fn read_config(path: &Path) -> Result<ConfigDrive, BootError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take((RAW_HEADER + MAX_CONFIG_BYTES) as u64)
                .read_to_end(&mut bytes)
        })
        .map_err(BootError::io("read", path))?;
    proto::config_drive::decode_raw(&bytes).map_err(|source| BootError::ConfigDrive {
        path: path.to_path_buf(),
        source,
    })
}

/// The names of the virtio disks in `/dev` (`vda`, `vdb`, …), sorted.
fn virtio_disks() -> Result<Vec<String>, BootError> {
    let mut names: Vec<String> = std::fs::read_dir("/dev")
        .map_err(BootError::io("list", "/dev"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 3 && n.starts_with("vd"))
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4(label: &str) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2].copy_from_slice(&[0x53, 0xEF]);
        b[EXT4_LABEL_OFFSET..EXT4_LABEL_OFFSET + label.len()].copy_from_slice(label.as_bytes());
        b
    }

    #[test]
    fn classifies_by_content() {
        assert_eq!(
            classify(&ext4("bhatti-minimal")),
            DiskKind::Base {
                label: "bhatti-minimal".into()
            }
        );
        assert_eq!(classify(&ext4("bhatti-disk")), DiskKind::Sandbox);
        assert_eq!(classify(&ext4("bhatti-config")), DiskKind::Ext4Config);
        assert_eq!(classify(&ext4("bhatti-")), DiskKind::Other);
        assert_eq!(classify(&ext4("rootfs")), DiskKind::Other);
        assert_eq!(classify(b"BHATTICD\x01\0\0\0"), DiskKind::Config);
        let mut no_magic = ext4("bhatti-disk");
        no_magic[EXT4_MAGIC_OFFSET] = 0;
        assert_eq!(classify(&no_magic), DiskKind::Other);
        assert_eq!(classify(&[]), DiskKind::Other);
        assert_eq!(classify(&ext4("bhatti-disk")[..1100]), DiskKind::Other);
    }

    #[test]
    fn volume_uuids() {
        let mut b = ext4(VOLUME_LABEL);
        b[EXT4_UUID_OFFSET..EXT4_UUID_OFFSET + 16].copy_from_slice(&[
            0x2b, 0x5e, 0x3f, 0x0e, 0x9a, 0x1c, 0x4d, 0x2b, 0x8e, 0x7f, 0x01, 0x23, 0x45, 0x67,
            0x89, 0xab,
        ]);
        assert_eq!(
            volume_uuid(&b).as_deref(),
            Some("2b5e3f0e-9a1c-4d2b-8e7f-0123456789ab")
        );
        // A volume is "other" to the role assignment.
        assert_eq!(classify(&b), DiskKind::Other);
        assert_eq!(volume_uuid(&ext4("bhatti-disk")), None);
        assert_eq!(volume_uuid(&b[..1000]), None);
    }

    #[test]
    fn assigns_roles_whatever_the_order() {
        let base = DiskKind::Base {
            label: "bhatti-tiny".into(),
        };
        let found = vec![
            ("/dev/vda".into(), DiskKind::Config),
            ("/dev/vdb".into(), base.clone()),
            ("/dev/vdc".into(), DiskKind::Other),
            ("/dev/vdd".into(), DiskKind::Sandbox),
        ];
        let d = assign(&found).unwrap();
        assert_eq!(d.base, PathBuf::from("/dev/vdb"));
        assert_eq!(d.base_label, "bhatti-tiny");
        assert_eq!(d.sandbox, PathBuf::from("/dev/vdd"));
        assert_eq!(d.config, PathBuf::from("/dev/vda"));
    }

    #[test]
    fn missing_duplicate_and_ext4_config_are_errors() {
        let base = DiskKind::Base {
            label: "bhatti-tiny".into(),
        };
        let e = assign(&[
            ("/dev/vda".into(), base.clone()),
            ("/dev/vdb".into(), DiskKind::Sandbox),
        ])
        .unwrap_err();
        assert!(matches!(e, BootError::MissingDisk { role, .. } if role.starts_with("config")));
        let e = assign(&[
            ("/dev/vda".into(), base.clone()),
            ("/dev/vdb".into(), base.clone()),
        ])
        .unwrap_err();
        assert!(matches!(e, BootError::DuplicateDisk { .. }), "{e:?}");
        let e = assign(&[
            ("/dev/vda".into(), base),
            ("/dev/vdb".into(), DiskKind::Sandbox),
            ("/dev/vdc".into(), DiskKind::Ext4Config),
        ])
        .unwrap_err();
        assert!(matches!(e, BootError::Ext4ConfigDrive { .. }), "{e:?}");
    }
}
