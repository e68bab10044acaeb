//! Growing the sandbox disk's file system to fill its disk. The host only
//! ever makes the disk file larger (`PATCH /sandboxes/:id
//! {"disk_size_mb"}`, while no VM runs); the guest kernel does the ext4
//! part online at the next boot, so no host tool parses a file system the
//! guest has written.

use std::os::fd::AsRawFd;
use std::path::Path;

// <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t).
nix::ioctl_read!(blk_size_bytes, 0x12, 114, u64);
// <linux/ext4.h>: EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64).
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// What a grow did: blocks (of the file system's size) before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    pub block_size: u64,
    pub before: u64,
    pub after: u64,
}

/// Grows the ext4 file system mounted at `mnt`, which lives on block
/// device `dev`, to fill the device. A file system that already fills it
/// is left as it is (the kernel answers at once).
pub fn fill_device(dev: &Path, mnt: &Path) -> std::io::Result<Grown> {
    let device = std::fs::File::open(dev)?;
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
    // points at a live local.
    unsafe { blk_size_bytes(device.as_raw_fd(), &mut bytes) }.map_err(std::io::Error::from)?;
    let root = std::fs::File::open(mnt)?;
    let stat = nix::sys::statvfs::fstatvfs(&root).map_err(std::io::Error::from)?;
    let block_size = stat.fragment_size().max(1);
    let before = stat.blocks();
    let blocks = bytes / block_size;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which
    // points at a live local; the fd is a directory of the ext4 mount.
    unsafe { ext4_resize_fs(root.as_raw_fd(), &blocks) }.map_err(std::io::Error::from)?;
    let after = nix::sys::statvfs::fstatvfs(&root)
        .map_err(std::io::Error::from)?
        .blocks();
    Ok(Grown {
        block_size,
        before,
        after,
    })
}
