//! Snapshot directory layout and its manifest, shared by the engines.
//!
//! A snapshot directory holds the engine's state file(s) and
//! `manifest.json`, written last: a directory without a readable manifest is
//! not a snapshot (a crash mid-save leaves no half-valid snapshot behind).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};
use crate::select::EngineKind;
use crate::spec::VmSpec;

/// Name of the manifest inside a snapshot directory.
pub const MANIFEST: &str = "manifest.json";
/// Device (and, without a shared memory file, RAM) state.
pub const STATE_FILE: &str = "vmstate";
/// Guest memory written by engines that copy it (Firecracker).
pub const MEMORY_FILE: &str = "memory";
/// Version of the manifest format.
pub const FORMAT_VERSION: u32 = 1;

/// What a snapshot contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// All of the VM's state.
    Full,
    /// Only memory dirtied since the previous snapshot (Firecracker).
    Diff,
}

/// Where the guest memory of a snapshot is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SnapshotMemory {
    /// Inside the state file.
    InState,
    /// In the VM's shared memory file, left in place (QEMU + `x-ignore-shared`).
    /// Valid until the VM runs again.
    SharedFile {
        /// The memory file.
        path: PathBuf,
    },
    /// In a separate file written by the snapshot.
    File {
        /// The memory file.
        path: PathBuf,
    },
}

/// The manifest written next to the state files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Engine that wrote it; only the same engine restores it.
    pub engine: EngineKind,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// vCPUs of the VM (must match on restore).
    pub vcpus: u32,
    /// Memory of the VM (must match on restore).
    pub memory_mib: u32,
    /// Where guest memory is.
    pub memory: SnapshotMemory,
    /// The TAP the VM used, so a restore onto another TAP can override it.
    pub tap: Option<String>,
    /// Size of the state file when written (checked before a restore).
    pub state_bytes: u64,
}

/// What [`crate::Vmm::snapshot`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
    /// Bytes written to the state file.
    pub state_bytes: u64,
    /// How long the save took, with the vCPUs stopped.
    pub duration: std::time::Duration,
}

/// Marks the snapshot in `dir` as spent by removing its manifest (synced,
/// so a crash after this call never finds it). A restore calls this once
/// the state is loaded and before the restored guest may run, when the
/// guest's memory is the snapshot's own memory file (QEMU maps it shared):
/// from then on the file no longer
/// matches the saved device state, and restoring it again would hand QEMU
/// queues that disagree with memory ("Failed to load virtio-net"). Without
/// a manifest the directory is no snapshot. Nothing there is fine.
pub fn consume(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(VmmError::SnapshotIo { path, source }),
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| VmmError::SnapshotIo {
            path: dir.to_path_buf(),
            source,
        })
}

/// Makes the snapshot in `dir` a *capture*: a snapshot that does not
/// depend on the VM it was taken of and that any number of new VMs may
/// start from. A snapshot that left guest RAM in the VM's shared memory
/// file gets a copy of that file as `dir/`[`MEMORY_FILE`] (taken while
/// the VM is still stopped: the caller resumes it afterwards, and syncs the
/// copy with [`sync_path`] if it must outlive a crash) and its manifest
/// says so; restores then map that copy privately
/// ([`crate::MemoryBacking::Private`]). A snapshot with RAM in its state
/// file is a capture already. Returns the bytes the copy occupies.
pub fn make_capture(dir: &Path) -> Result<u64> {
    let mut m: SnapshotManifest = {
        let path = dir.join(MANIFEST);
        let body = std::fs::read(&path).map_err(|source| VmmError::SnapshotIo {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&body).map_err(|e| VmmError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            reason: format!("unreadable manifest: {e}"),
        })?
    };
    let SnapshotMemory::SharedFile { path } = &m.memory else {
        return Ok(0);
    };
    let copy = dir.join(MEMORY_FILE);
    let used = copy_sparse(path, &copy)?;
    m.memory = SnapshotMemory::File { path: copy };
    m.write(dir)?;
    Ok(used)
}

/// After a capture directory has been moved (made under a temporary name,
/// then renamed into place), points its manifest at the memory image where
/// it now is.
pub fn relocate_capture(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    let body = std::fs::read(&path).map_err(|source| VmmError::SnapshotIo {
        path: path.clone(),
        source,
    })?;
    let mut m: SnapshotManifest =
        serde_json::from_slice(&body).map_err(|e| VmmError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            reason: format!("unreadable manifest: {e}"),
        })?;
    if let SnapshotMemory::File { path } = &mut m.memory {
        *path = dir.join(MEMORY_FILE);
        m.write(dir)?;
    }
    Ok(())
}

/// Copies `from` to a new file `to` (mode 0600), keeping holes: a
/// copy-on-write clone where the file system has them (`FICLONE`: XFS,
/// btrfs), else only the data extents (`SEEK_DATA`/`SEEK_HOLE`, each
/// copied in the kernel with `copy_file_range`). Returns the bytes of data
/// copied (0 for a clone). Nothing is synced: a caller that needs the copy
/// to survive a crash calls [`sync_path`] (after whatever waits on it).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::SnapshotIo { path, source }
    };
    let src = std::fs::File::open(from).map_err(err(from))?;
    let len = src.metadata().map_err(err(from))?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err(to))?;
    // FICLONE = _IOW(0x94, 9, int).
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
        return Ok(0);
    }
    dst.set_len(len).map_err(err(to))?;
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pos: i64 = 0;
    let mut copied = 0u64;
    let end = len as i64;
    while pos < end {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(err(from)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(err(from)(std::io::Error::last_os_error()));
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in).min(1 << 30) as usize;
            // SAFETY: the offsets are ours; the kernel copies between the
            // two open descriptors.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, want, 0) };
            if n < 0 {
                return Err(err(to)(std::io::Error::last_os_error()));
            }
            if n == 0 {
                break; // the source shrank under us
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Flushes a file, or a directory's entries, to disk.
pub fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| VmmError::SnapshotIo {
            path: path.to_path_buf(),
            source,
        })
}

impl SnapshotManifest {
    /// Writes the manifest atomically (temp file, fsync, rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let io = |source| VmmError::SnapshotIo {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    /// Reads and checks a manifest: version, engine, the VM shape, and that
    /// the state file is still the size it was written with.
    pub fn read_for(dir: &Path, engine: EngineKind, spec: &VmSpec) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let mismatch = |reason: String| VmmError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            reason,
        };
        let body = std::fs::read(&path).map_err(|source| VmmError::SnapshotIo {
            path: path.clone(),
            source,
        })?;
        let m: SnapshotManifest = serde_json::from_slice(&body)
            .map_err(|e| mismatch(format!("unreadable manifest: {e}")))?;
        if m.format_version != FORMAT_VERSION {
            return Err(mismatch(format!(
                "manifest format {} (expected {FORMAT_VERSION})",
                m.format_version
            )));
        }
        if m.engine != engine {
            return Err(mismatch(format!(
                "written by {}, restoring with {engine}",
                m.engine
            )));
        }
        if m.vcpus != spec.vcpus || m.memory_mib != spec.memory_mib {
            return Err(mismatch(format!(
                "snapshot has {} vCPUs / {} MiB, spec has {} / {}",
                m.vcpus, m.memory_mib, spec.vcpus, spec.memory_mib
            )));
        }
        let state = dir.join(STATE_FILE);
        let len = std::fs::metadata(&state)
            .map_err(|source| VmmError::SnapshotIo {
                path: state.clone(),
                source,
            })?
            .len();
        if len != m.state_bytes {
            return Err(mismatch(format!(
                "{} is {len} bytes, manifest says {}",
                state.display(),
                m.state_bytes
            )));
        }
        match &m.memory {
            SnapshotMemory::InState => {}
            SnapshotMemory::SharedFile { path } | SnapshotMemory::File { path } => {
                let meta = std::fs::metadata(path).map_err(|source| VmmError::SnapshotIo {
                    path: path.clone(),
                    source,
                })?;
                if meta.len() < u64::from(m.memory_mib) << 20 {
                    return Err(mismatch(format!(
                        "memory file {} is {} bytes, smaller than {} MiB",
                        path.display(),
                        meta.len(),
                        m.memory_mib
                    )));
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            format_version: FORMAT_VERSION,
            engine: EngineKind::QemuTcg,
            kind: SnapshotKind::Full,
            vcpus: 1,
            memory_mib: 64,
            memory: SnapshotMemory::InState,
            tap: None,
            state_bytes: 5,
        }
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("k");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec::new(&kernel, d.path());
        spec.memory_mib = 64;
        std::fs::write(d.path().join(STATE_FILE), b"12345").unwrap();
        manifest().write(d.path()).unwrap();
        assert_eq!(
            SnapshotManifest::read_for(d.path(), EngineKind::QemuTcg, &spec).unwrap(),
            manifest()
        );
        // The accelerator is part of the machine: TCG state does not restore under KVM.
        assert!(SnapshotManifest::read_for(d.path(), EngineKind::QemuKvm, &spec).is_err());

        let e = SnapshotManifest::read_for(d.path(), EngineKind::Firecracker, &spec).unwrap_err();
        assert!(e.to_string().contains("cannot be restored"), "{e}");
        spec.vcpus = 2;
        assert!(SnapshotManifest::read_for(d.path(), EngineKind::QemuTcg, &spec).is_err());
        spec.vcpus = 1;
        std::fs::write(d.path().join(STATE_FILE), b"1234").unwrap();
        let e = SnapshotManifest::read_for(d.path(), EngineKind::QemuTcg, &spec).unwrap_err();
        assert!(
            matches!(e, VmmError::SnapshotMismatch { ref reason, .. } if reason.contains("4 bytes")),
            "{e}"
        );
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        copy_sparse(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // 64 MiB long, a few KiB allocated.
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
        assert_eq!(m.mode() & 0o777, 0o600);
        // Never over an existing file.
        assert!(copy_sparse(&a, &b).is_err());
    }

    #[test]
    fn a_capture_owns_a_copy_of_the_shared_memory() {
        let d = tempfile::tempdir().unwrap();
        let mem = d.path().join("vm-memory");
        std::fs::write(&mem, vec![3u8; 1 << 20]).unwrap();
        let snap = d.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        std::fs::write(snap.join(STATE_FILE), b"12345").unwrap();
        let mut m = manifest();
        m.memory_mib = 1;
        m.memory = SnapshotMemory::SharedFile { path: mem.clone() };
        m.write(&snap).unwrap();
        make_capture(&snap).unwrap();
        // The VM may run on: the capture no longer reads its file.
        std::fs::write(&mem, b"changed").unwrap();
        let kernel = d.path().join("k");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec::new(&kernel, d.path());
        spec.memory_mib = 1;
        let got = SnapshotManifest::read_for(&snap, EngineKind::QemuTcg, &spec).unwrap();
        assert_eq!(
            got.memory,
            SnapshotMemory::File {
                path: snap.join(MEMORY_FILE)
            }
        );
        assert_eq!(
            std::fs::read(snap.join(MEMORY_FILE)).unwrap(),
            vec![3u8; 1 << 20]
        );
    }

    #[test]
    fn a_directory_without_manifest_is_not_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let spec = VmSpec::new(d.path().join("k"), d.path());
        let e = SnapshotManifest::read_for(d.path(), EngineKind::QemuTcg, &spec).unwrap_err();
        assert!(matches!(e, VmmError::SnapshotIo { .. }), "{e}");
    }
}
