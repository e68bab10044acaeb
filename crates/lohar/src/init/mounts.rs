//! Every mount of the boot, in order, and the switch into the new root.
//!
//! ```text
//! initramfs:  /dev devtmpfs, /proc, /sys
//!             /run tmpfs  ─┬─ /run/bhatti/base  ext4 ro   (base image)
//!                          └─ /run/bhatti/disk  ext4 rw   (sandbox disk: upper/ work/)
//!             /newroot overlay(lower=base, upper=disk/upper, work=disk/work)
//!             move /dev /proc /sys /run into /newroot, free the initramfs,
//!             chdir /newroot, mount --move . /, chroot .
//! new root:   /dev/pts devpts, /dev/shm tmpfs, /sys/fs/cgroup cgroup2,
//!             /dev/fd and /dev/std{in,out,err} symlinks
//! ```
//!
//! `/tmp` stays on the sandbox disk (the overlay), not tmpfs: guest RAM is
//! small and is what a snapshot saves, while agents write large scratch
//! files; the disk is where they belong, as on a stock Debian install.
//! `/run` is tmpfs and carries the disk mounts, so they stay reachable from
//! the new root (shutdown remounts the disk read-only there).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::MsFlags;

use super::disks::Disks;
use super::error::BootError;

/// Where the base image is mounted (in the new root too, once /run moves).
pub const BASE_MNT: &str = "/run/bhatti/base";
/// Where the sandbox disk is mounted.
pub const DISK_MNT: &str = "/run/bhatti/disk";
const NEWROOT: &str = "/newroot";

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(|source_err| {
        BootError::Mount {
            fstype: fstype.to_string(),
            source_dev: source.to_string(),
            target: target.into(),
            source: source_err,
        }
    })
}

fn mkdir(path: &str, mode: u32) -> Result<(), BootError> {
    match std::fs::create_dir(path) {
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(BootError::io("chmod", path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(BootError::io("create directory", path)(e)),
    }
}

fn move_mount(from: &str, to: &str) -> Result<(), BootError> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(
        |source| BootError::MoveMount {
            from: from.into(),
            to: to.into(),
            source,
        },
    )
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// `/dev`, `/proc`, `/sys` in the initramfs.
pub fn early() -> Result<(), BootError> {
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None)?;
    mount("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None)
}

/// Mounts the base image and the sandbox disk under a tmpfs `/run` and the
/// overlay root at `/newroot`.
pub fn assemble_root(disks: &Disks) -> Result<(), BootError> {
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mkdir("/run/bhatti", 0o700)?;
    mkdir(BASE_MNT, 0o755)?;
    mkdir(DISK_MNT, 0o755)?;
    mount(
        &disks.base.display().to_string(),
        BASE_MNT,
        "ext4",
        MsFlags::MS_RDONLY,
        None,
    )?;
    mount(
        &disks.sandbox.display().to_string(),
        DISK_MNT,
        "ext4",
        MsFlags::empty(),
        None,
    )?;
    // A disk the host grew while the VM was down: fill it. Not fatal: the
    // sandbox still boots with the file system it has.
    match super::grow::fill_device(&disks.sandbox, Path::new(DISK_MNT)) {
        Ok(g) if g.after > g.before => eprintln!(
            "lohar: grew the sandbox disk's file system from {} to {} MiB",
            (g.before * g.block_size) >> 20,
            (g.after * g.block_size) >> 20
        ),
        Ok(_) => {}
        Err(e) => eprintln!("lohar: cannot grow the sandbox disk's file system: {e}"),
    }
    mkdir(&format!("{DISK_MNT}/upper"), 0o755)?;
    mkdir(&format!("{DISK_MNT}/work"), 0o755)?;
    mkdir(NEWROOT, 0o755)?;
    let opts = format!("lowerdir={BASE_MNT},upperdir={DISK_MNT}/upper,workdir={DISK_MNT}/work");
    mount("overlay", NEWROOT, "overlay", MsFlags::empty(), Some(&opts))
}

/// Moves the API filesystems and `/run` into the new root, frees the
/// initramfs' files and makes the new root `/`. The process keeps running
/// the (now unlinked) initramfs binary.
pub fn switch_root() -> Result<(), BootError> {
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{NEWROOT}{dir}");
        mkdir(&target, 0o755)?;
        move_mount(dir, &target)?;
    }
    free_initramfs();
    let chdir = |p: &str| {
        nix::unistd::chdir(p).map_err(|source| BootError::SwitchRoot {
            op: "chdir",
            source,
        })
    };
    chdir(NEWROOT)?;
    move_mount(".", "/")?;
    nix::unistd::chroot(".").map_err(|source| BootError::SwitchRoot {
        op: "chroot",
        source,
    })?;
    chdir("/")
}

/// Deletes the initramfs' files (modules, the binary's directory entry)
/// without crossing into mounts: its RAM is otherwise held for the VM's
/// life. Failures only cost memory, so they are logged, not fatal.
fn free_initramfs() {
    fn clear(dir: &Path, dev: u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.dev() != dev {
                continue; // a mount point (/newroot)
            }
            let removed = if meta.is_dir() {
                clear(&path, dev);
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::debug!(path = %path.display(), error = %e, "freeing the initramfs");
            }
        }
    }
    match std::fs::symlink_metadata("/") {
        Ok(root) => clear(Path::new("/"), root.dev()),
        Err(e) => tracing::debug!(error = %e, "freeing the initramfs"),
    }
}

/// Mounts inside the new root: devpts, `/dev/shm`, cgroup2, `/dev/fd`
/// links; makes sure `/tmp` exists with mode 1777.
pub fn late(tty_gid: Option<u32>) -> Result<(), BootError> {
    mkdir("/dev/pts", 0o755)?;
    let pts = match tty_gid {
        Some(gid) => format!("ptmxmode=0666,mode=0620,gid={gid}"),
        None => "ptmxmode=0666,mode=0620".to_string(),
    };
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&pts),
    )?;
    mkdir("/dev/shm", 0o1777)?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mkdir("/sys/fs/cgroup", 0o755)?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        Some("nsdelegate"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(BootError::io("symlink", link)(e)),
        }
    }
    mkdir("/tmp", 0o1777)?;
    std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777))
        .map_err(BootError::io("chmod", "/tmp"))
}

/// Where volumes are mounted (for the poweroff remount). PID 1 is
/// single-threaded: set once at boot, read at poweroff.
static VOLUME_MOUNTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Mounts each volume (`devs[i]` is `volumes[i]`'s disk) in the new root:
/// ext4, nosuid and nodev, read-only when asked (without journal replay:
/// the disk itself is read-only), the mount point made (`mkdir -p`) if
/// missing. A read-write volume the host grew is grown to fill its disk.
pub fn mount_volumes(
    volumes: &[proto::config_drive::VolumeMount],
    devs: &[std::path::PathBuf],
) -> Result<(), BootError> {
    let mut done = Vec::new();
    for (v, dev) in volumes.iter().zip(devs) {
        // Paths were validated when the config drive was decoded.
        std::fs::create_dir_all(&v.mount).map_err(BootError::io("create directory", &v.mount))?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let data = if v.read_only {
            flags |= MsFlags::MS_RDONLY;
            Some("norecovery")
        } else {
            None
        };
        mount(&dev.display().to_string(), &v.mount, "ext4", flags, data)?;
        if !v.read_only {
            match super::grow::fill_device(dev, Path::new(&v.mount)) {
                Ok(g) if g.after > g.before => eprintln!(
                    "lohar: grew volume {} from {} to {} MiB",
                    v.mount,
                    (g.before * g.block_size) >> 20,
                    (g.after * g.block_size) >> 20
                ),
                Ok(_) => {}
                Err(e) => eprintln!("lohar: cannot grow volume {}: {e}", v.mount),
            }
            done.push(v.mount.clone());
        }
    }
    let _ = VOLUME_MOUNTS.set(done);
    Ok(())
}

/// For poweroff: makes the read-write volumes, the root and the sandbox
/// disk read-only, so the disks' journals are flushed and they are marked
/// clean. Returns what failed.
pub fn remount_read_only() -> Vec<String> {
    let mut failed = Vec::new();
    let volumes = VOLUME_MOUNTS.get().map(Vec::as_slice).unwrap_or_default();
    for target in volumes.iter().map(String::as_str).chain(["/", DISK_MNT]) {
        if let Err(e) = nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            failed.push(format!("{target}: {e}"));
        }
    }
    failed
}
