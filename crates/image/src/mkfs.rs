//! Making ext4 images with `mkfs.ext4`, optionally populated from a
//! directory (`-d`): no loop mounts, no root-only kernel features.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::run;
use crate::error::{io, Result};
use crate::fsutil::TreeUsage;

/// How to make an ext4 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Spec {
    /// Filesystem label (at most 16 bytes).
    pub label: String,
    /// Image size in bytes (the file is sparse).
    pub size_bytes: u64,
    /// Whether to create a journal. Read-only base images do without.
    pub journal: bool,
    /// Inode count; `None` lets mkfs choose.
    pub inodes: Option<u64>,
    /// Directory whose contents become the filesystem's root.
    pub source_dir: Option<PathBuf>,
}

/// Creates (or overwrites) `path` as an ext4 image.
pub fn make_ext4(path: &Path, spec: &Ext4Spec) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io("create", path))?;
    file.set_len(spec.size_bytes).map_err(io("resize", path))?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-m", "0", "-b", "4096", "-L", &spec.label]);
    // lazy_itable_init: the kernel zeroes inode tables in the background on
    // first mount instead of mkfs writing them now (the file is sparse).
    cmd.args(["-E", "lazy_itable_init=1,lazy_journal_init=1"]);
    if !spec.journal {
        cmd.args(["-O", "^has_journal"]);
    }
    if let Some(n) = spec.inodes {
        cmd.args(["-N", &n.to_string()]);
    }
    if let Some(dir) = &spec.source_dir {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path);
    run(&mut cmd)?;
    Ok(())
}

/// Creates (or overwrites) `path` as an empty ext4 volume of `size`
/// bytes (sparse, with a journal) labelled `label`, with file system UUID
/// `uuid`, whose root directory belongs to `owner` (uid and gid) mode 0755.
pub fn make_volume_ext4(path: &Path, size: u64, label: &str, uuid: &str, owner: u32) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io("create", path))?;
    file.set_len(size).map_err(io("resize", path))?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-m", "0", "-b", "4096", "-L", label, "-U", uuid]);
    cmd.args([
        "-E",
        &format!("lazy_itable_init=1,lazy_journal_init=1,root_owner={owner}:{owner}"),
    ]);
    cmd.arg(path);
    run(&mut cmd)?;
    Ok(())
}

/// Image size for a tree: content plus 10 % and 32 MiB of headroom for
/// metadata, rounded to MiB.
pub fn image_size_for(usage: TreeUsage) -> u64 {
    const MIB: u64 = 1 << 20;
    let inode_tables = usage.inodes * 256;
    let raw = usage.block_bytes + inode_tables;
    (raw + raw / 10 + 32 * MIB).div_ceil(MIB) * MIB
}

/// Inode count for a tree: its inodes plus 25 % and 1024 spare.
pub fn inodes_for(usage: TreeUsage) -> u64 {
    usage.inodes + usage.inodes / 4 + 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_headroom() {
        let u = TreeUsage {
            block_bytes: 100 << 20,
            inodes: 4000,
        };
        let s = image_size_for(u);
        assert!(s >= (100 << 20) + (32 << 20));
        assert_eq!(s % (1 << 20), 0);
        assert_eq!(inodes_for(u), 6024);
    }

    #[test]
    fn makes_populated_sparse_image() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hostname"), "h\n").unwrap();
        let img = dir.path().join("fs.ext4");
        make_ext4(
            &img,
            &Ext4Spec {
                label: "test".into(),
                size_bytes: 16 << 20,
                journal: false,
                inodes: Some(64),
                source_dir: Some(src),
            },
        )
        .unwrap();
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/hostname"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "h\n");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        assert!(meta.blocks() * 512 < 8 << 20, "image should be sparse");
    }
}
