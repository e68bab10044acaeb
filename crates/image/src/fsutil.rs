//! Small filesystem helpers: staging directories that clean up after
//! themselves, atomic replacement of a directory, tree sizes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{io, Result};

/// A build directory removed on drop (a failed removal is logged, not lost).
#[derive(Debug)]
pub(crate) struct Staging {
    path: PathBuf,
}

impl Staging {
    /// Creates `parent/<name>-<pid>`, removing leftovers of an earlier run.
    pub(crate) fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(format!("{name}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
        }
        std::fs::create_dir_all(&path).map_err(io("create directory", &path))?;
        Ok(Self { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove build directory");
            }
        }
    }
}

/// Replaces directory `dest` with `src` (same filesystem). The old `dest`
/// is moved aside first, so `dest` is never half-written.
pub(crate) fn replace_dir(src: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    let old = dest.with_extension(format!("old-{}", std::process::id()));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old).map_err(io("rename", dest))?;
    }
    std::fs::rename(src, dest).map_err(io("rename", src))?;
    if had_old {
        std::fs::remove_dir_all(&old).map_err(io("remove", &old))?;
    }
    Ok(())
}

/// What a directory tree holds, as ext4 will need to store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeUsage {
    /// Bytes of file data rounded up to 4 KiB blocks (directories count one
    /// block, symlinks none).
    pub block_bytes: u64,
    /// Number of inodes (files, directories, links, nodes).
    pub inodes: u64,
}

/// Walks `dir` without following symlinks.
pub fn tree_usage(dir: &Path) -> Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        usage.inodes += 1;
        usage.block_bytes += 4096;
        for entry in std::fs::read_dir(&d).map_err(io("list", &d))? {
            let entry = entry.map_err(io("list", &d))?;
            let meta = entry.metadata().map_err(io("stat", &entry.path()))?;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            usage.inodes += 1;
            if meta.is_file() && meta.nlink() <= 1 {
                usage.block_bytes += meta.len().div_ceil(4096) * 4096;
            } else if meta.is_file() {
                // Hard links: count the data once per link count share.
                usage.block_bytes += meta.len().div_ceil(4096) * 4096 / meta.nlink();
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_and_inodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/a"), vec![1u8; 5000]).unwrap();
        std::os::unix::fs::symlink("d/a", dir.path().join("l")).unwrap();
        let u = tree_usage(dir.path()).unwrap();
        assert_eq!(u.inodes, 4);
        assert_eq!(u.block_bytes, 2 * 4096 + 8192);
    }

    #[test]
    fn staging_cleans_up_and_replace_swaps() {
        let parent = tempfile::tempdir().unwrap();
        let kept;
        {
            let s = Staging::new(parent.path(), "x").unwrap();
            kept = s.path().to_path_buf();
            std::fs::write(kept.join("f"), b"1").unwrap();
            let src = kept.join("new");
            std::fs::create_dir(&src).unwrap();
            std::fs::write(src.join("v"), b"2").unwrap();
            let dest = parent.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            std::fs::write(dest.join("v"), b"1").unwrap();
            replace_dir(&src, &dest).unwrap();
            assert_eq!(std::fs::read(dest.join("v")).unwrap(), b"2");
        }
        assert!(!kept.exists());
        let names: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dest")]);
    }
}
