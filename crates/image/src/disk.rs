//! Per-sandbox disks. The base image is never copied: each sandbox gets a
//! directory under `DATA/sandboxes/` holding a small sparse ext4 disk (the
//! overlay upper layer) and its config drive. Destroying a sandbox removes
//! that directory and nothing else.
//!
//! The writable disk's root holds `upper/` and `work/` (overlayfs upperdir
//! and workdir); lohar mounts `overlay` with the base image as lowerdir.
//!
//! Everything here is private to the daemon's user: the sandboxes root and
//! each sandbox directory are 0700, the disk 0600 (it holds the guest's
//! files; the config drive, with the agent token, is 0600 too). A guest's
//! disk is another tenant's data, and other local users have no business
//! reading it.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{io, Error, Result};
use crate::fsutil::Staging;
use crate::mkfs::{make_ext4, Ext4Spec};

/// File name of the writable disk inside a sandbox directory.
pub const SANDBOX_DISK: &str = "disk.ext4";
/// File name of the config drive inside a sandbox directory.
pub const CONFIG_DRIVE: &str = "config.img";
/// Smallest writable disk.
pub const MIN_DISK_BYTES: u64 = 16 << 20;
/// Largest writable disk.
pub const MAX_DISK_BYTES: u64 = 1 << 40;

/// Creates `dir/disk.ext4`: a sparse ext4 image of `size` bytes with a
/// journal (it is written to), `upper/` and `work/` directories.
pub fn create_sandbox_disk(dir: &Path, size: u64) -> Result<PathBuf> {
    if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&size) {
        return Err(Error::DiskSize {
            size,
            min: MIN_DISK_BYTES,
            max: MAX_DISK_BYTES,
        });
    }
    if let Some(root) = dir.parent() {
        private_dir(root)?;
    }
    private_dir(dir)?;
    let staging = Staging::new(dir, ".disk")?;
    let root = staging.path().join("root");
    // The disk's root and `upper/` become the guest's `/` through the
    // overlay: 0755 whatever the daemon's umask (0700 would lock every
    // user but root out of the guest's root directory).
    for d in ["", "upper", "work"] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io("create directory", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &p))?;
    }
    let path = dir.join(SANDBOX_DISK);
    make_ext4(
        &path,
        &Ext4Spec {
            label: "bhatti-disk".into(),
            size_bytes: size,
            journal: true,
            inodes: None,
            source_dir: Some(root),
        },
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", &path))?;
    Ok(path)
}

/// Grows `dir/disk.ext4` to `size` bytes (sparse: nothing is written).
/// Only the file grows; the guest grows its file system to fill the disk
/// at boot. A smaller size than the disk has is refused, and so is a disk
/// that is not a regular file (a symlink is not followed).
pub fn grow_sandbox_disk(dir: &Path, size: u64) -> Result<()> {
    grow_disk_file(dir.join(SANDBOX_DISK), size)
}

/// Label of every volume's file system. Not `bhatti-…`: lohar takes those
/// for base images.
pub const VOLUME_LABEL: &str = "bhvol";
/// uid and gid owning a new volume's root directory (the sandbox user).
pub const VOLUME_OWNER: u32 = 1000;

/// Creates the volume file `path` (its parent directory, and that one's
/// parent, made 0700): a sparse ext4 of `size` bytes with a journal,
/// labelled [`VOLUME_LABEL`], with file system UUID `uuid`, mode 0600.
/// Volumes live outside every sandbox directory: destroying a sandbox
/// never touches them.
pub fn create_volume(path: &Path, size: u64, uuid: &str) -> Result<()> {
    if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&size) {
        return Err(Error::DiskSize {
            size,
            min: MIN_DISK_BYTES,
            max: MAX_DISK_BYTES,
        });
    }
    if let Some(dir) = path.parent() {
        if let Some(root) = dir.parent() {
            private_dir(root)?;
        }
        private_dir(dir)?;
    }
    let made = crate::mkfs::make_volume_ext4(path, size, VOLUME_LABEL, uuid, VOLUME_OWNER)
        .and_then(|()| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(io("chmod", path))
        });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Grows the volume file `path` to `size` bytes (as [`grow_sandbox_disk`]).
pub fn grow_volume(path: &Path, size: u64) -> Result<()> {
    grow_disk_file(path.to_path_buf(), size)
}

/// Removes the volume file `path` (gone already is fine; a symlink or
/// directory is refused).
pub fn remove_volume(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => std::fs::remove_file(path).map_err(io("remove", path)),
        Ok(_) => Err(Error::NotADisk {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("stat", path)(e)),
    }
}

/// Copies the volume file `src` to the new file `dst` (0600; a fresh
/// name, in a directory made private by [`create_volume`]): a reflink (`FICLONE`) where the
/// file system shares blocks, else a byte copy of the data extents only
/// (`SEEK_DATA`/`SEEK_HOLE` and `copy_file_range`), so the holes stay
/// holes. Bytes are copied; the file system inside is never read as one.
/// Made under a temporary name and renamed at the end: a failed copy
/// leaves no `dst`.
pub fn clone_volume(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::symlink_metadata(src).map_err(io("stat", src))?;
    if !meta.is_file() {
        return Err(Error::NotADisk {
            path: src.to_path_buf(),
        });
    }
    let from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .map_err(io("open", src))?;
    let tmp = dst.with_extension("ext4.clone");
    let _ = std::fs::remove_file(&tmp);
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let copied = copy_sparse(&from, &to, meta.len())
        .map_err(io("copy into", &tmp))
        .and_then(|()| to.sync_all().map_err(io("sync", &tmp)))
        .and_then(|()| std::fs::rename(&tmp, dst).map_err(io("rename to", dst)));
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// `to` becomes a copy of the `len` bytes of `from`, holes kept.
fn copy_sparse(from: &std::fs::File, to: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    // SAFETY: both descriptors are open for the whole call.
    if unsafe { libc::ioctl(fo, libc::FICLONE, fi) } == 0 {
        return Ok(());
    }
    to.set_len(len)?;
    let mut pos: u64 = 0;
    while pos < len {
        let off = libc::off_t::try_from(pos).map_err(std::io::Error::other)?;
        // SAFETY: plain syscalls on an open descriptor.
        let data = unsafe { libc::lseek(fi, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut at, end) = (data, hole.min(len as libc::off_t));
        while at < end {
            let (mut i, mut o) = (at, at);
            let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
            // SAFETY: the offsets are locals the call may advance.
            let n = unsafe { libc::copy_file_range(fi, &mut i, fo, &mut o, want, 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the source shrank while it was copied",
                ));
            }
            at += n as libc::off_t;
        }
        pos = end as u64;
    }
    Ok(())
}

fn grow_disk_file(path: PathBuf, size: u64) -> Result<()> {
    if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&size) {
        return Err(Error::DiskSize {
            size,
            min: MIN_DISK_BYTES,
            max: MAX_DISK_BYTES,
        });
    }
    // The sandbox directory is the daemon's alone (0700), so nothing can
    // swap the file between this look and the open.
    let meta = std::fs::symlink_metadata(&path).map_err(io("stat", &path))?;
    if !meta.is_file() {
        return Err(Error::NotADisk { path });
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    if size < meta.len() {
        return Err(Error::DiskShrink {
            path,
            size,
            current: meta.len(),
        });
    }
    if size == meta.len() {
        return Ok(());
    }
    file.set_len(size).map_err(io("resize", &path))?;
    file.sync_all().map_err(io("sync", &path))
}

/// Makes `dir` (and any missing parents, 0700 too) a directory only its
/// owner may enter: created 0700, or set to 0700 when it exists with more.
/// For the data directory, the sandboxes root and each sandbox directory.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create directory", dir))?;
    let mode = std::fs::metadata(dir)
        .map_err(io("stat", dir))?
        .permissions()
        .mode();
    if mode & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", dir))?;
    }
    Ok(())
}

/// Checks that a sandbox id is a plain name: 1..=64 of `[A-Za-z0-9_-]`.
pub fn valid_sandbox_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Removes the sandbox directory `dir`, which must be a real directory
/// directly under `root` (the sandboxes root). Anything else (the root
/// itself, a nested path, a symlink, a path with `..`) is refused.
pub fn destroy_sandbox_dir(root: &Path, dir: &Path) -> Result<()> {
    let refuse = || Error::OutsideSandboxRoot {
        path: dir.to_owned(),
        root: root.to_owned(),
    };
    if dir
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(refuse());
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(refuse)?;
    if !valid_sandbox_id(name) {
        return Err(refuse());
    }
    let root_real = std::fs::canonicalize(root).map_err(io("resolve", root))?;
    let parent = dir.parent().ok_or_else(refuse)?;
    let parent_real = std::fs::canonicalize(parent).map_err(io("resolve", parent))?;
    if parent_real != root_real {
        return Err(refuse());
    }
    let target = root_real.join(name);
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("stat", &target)(e)),
    };
    if !meta.is_dir() {
        return Err(refuse());
    }
    tracing::info!(dir = %target.display(), "removing sandbox directory");
    std::fs::remove_dir_all(&target).map_err(io("remove", &target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_clones_are_exact_private_and_keep_holes() {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("a.ext4");
        let dst = tmp.path().join("b.ext4");
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [0u64, 5 << 20, (64 << 20) - 4096] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[at as u8 ^ 0x5a; 4096]).unwrap();
        }
        f.sync_all().unwrap();
        clone_volume(&src, &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(a == b, "the copy differs");
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(meta.blocks() * 512 < 8 << 20, "sparse: {}", meta.blocks());
        // No temporary file is left; a symlink is not followed.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let link = tmp.path().join("l.ext4");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert!(clone_volume(&link, &tmp.path().join("c.ext4")).is_err());
    }

    #[test]
    fn volumes_are_private_sparse_labelled_ext4() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes/u-1/vol-1.ext4");
        let uuid = "2b5e3f0e-9a1c-4d2b-8e7f-0123456789ab";
        create_volume(&path, 64 << 20, uuid).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 16 << 20, "sparse: {}", meta.blocks());
        assert_eq!(meta.mode() & 0o777, 0o600);
        for d in [
            path.parent().unwrap(),
            path.parent().unwrap().parent().unwrap(),
        ] {
            assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o777, 0o700);
        }
        // The superblock says ext4, our label and UUID (read as bytes: the
        // test made the file, no guest wrote it).
        let head = std::fs::read(&path).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xEF]);
        assert_eq!(
            &head[1144..1144 + VOLUME_LABEL.len()],
            VOLUME_LABEL.as_bytes()
        );
        let hex: String = head[1128..1144]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, uuid.replace('-', ""));
        grow_volume(&path, 128 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 << 20);
        assert!(matches!(
            grow_volume(&path, 64 << 20),
            Err(Error::DiskShrink { .. })
        ));
        assert!(matches!(
            create_volume(&dir.path().join("v/u/x.ext4"), 1, uuid),
            Err(Error::DiskSize { .. })
        ));
        remove_volume(&path).unwrap();
        assert!(!path.exists());
        remove_volume(&path).unwrap();
    }

    #[test]
    fn disks_grow_sparse_and_never_shrink() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("sb1");
        let disk = create_sandbox_disk(&sb, 32 << 20).unwrap();
        let blocks = std::fs::metadata(&disk).unwrap().blocks();
        grow_sandbox_disk(&sb, 64 << 20).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.blocks(), blocks, "growing writes nothing");
        grow_sandbox_disk(&sb, 64 << 20).unwrap();
        assert!(matches!(
            grow_sandbox_disk(&sb, 32 << 20),
            Err(Error::DiskShrink { .. })
        ));
        assert!(matches!(
            grow_sandbox_disk(&sb, MAX_DISK_BYTES + 1),
            Err(Error::DiskSize { .. })
        ));
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 << 20);
        // A symlink in the disk's place is not followed.
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        std::fs::remove_file(&disk).unwrap();
        std::os::unix::fs::symlink(&other, &disk).unwrap();
        assert!(matches!(
            grow_sandbox_disk(&sb, 64 << 20),
            Err(Error::NotADisk { .. })
        ));
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 1);
    }

    #[test]
    fn private_dirs_are_made_0700_and_existing_ones_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = dir.path().join("sandboxes");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sb = root.join("sb1");
        create_sandbox_disk(&sb, MIN_DISK_BYTES).unwrap();
        assert_eq!(
            mode(&root),
            0o700,
            "an existing sandboxes root is tightened"
        );
        private_dir(&dir.path().join("a/b")).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        // Nothing under the root is open to others.
        let out = std::process::Command::new("find")
            .args([root.as_os_str(), "-perm".as_ref(), "/o+rwx".as_ref()])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    }

    #[test]
    fn disk_is_sparse_ext4_with_overlay_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("sb1");
        let disk = create_sandbox_disk(&sb, 256 << 20).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 < 32 << 20,
            "allocated {} bytes",
            meta.blocks() * 512
        );
        let out = std::process::Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&disk)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("upper") && listing.contains("work"),
            "{listing}"
        );
        let names: Vec<_> = std::fs::read_dir(&sb)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SANDBOX_DISK)]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sb), 0o700, "sandbox directory");
        assert_eq!(mode(&disk), 0o600, "disk");
        assert!(matches!(
            create_sandbox_disk(&sb, 1 << 20),
            Err(Error::DiskSize { .. })
        ));
    }

    #[test]
    fn destroy_only_direct_children() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("sandboxes");
        let sb = root.join("sb-1");
        std::fs::create_dir_all(sb.join("x")).unwrap();
        let outside = base.path().join("precious");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        for bad in [
            root.clone(),
            outside.clone(),
            root.join("sb-1/x"),
            root.join("../precious"),
            root.join("link"),
            base.path().join("other/sb-1"),
        ] {
            assert!(
                destroy_sandbox_dir(&root, &bad).is_err(),
                "{}",
                bad.display()
            );
        }
        assert!(outside.exists() && sb.exists());
        destroy_sandbox_dir(&root, &sb).unwrap();
        assert!(!sb.exists() && root.exists() && outside.exists());
        destroy_sandbox_dir(&root, &sb).unwrap(); // idempotent
    }
}
