//! Kernel modules from the initramfs: the release check and loading
//! `/etc/lohar/modules.load` in order with `finit_module(2)`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::error::BootError;

/// The initramfs' record of the kernel it was built for.
pub const KERNEL_RELEASE_FILE: &str = "/etc/lohar/kernel-release";
/// Module load order, one path relative to `/lib/modules/<release>/` a line.
pub const MODULES_LOAD_FILE: &str = "/etc/lohar/modules.load";

/// Fails when the initramfs belongs to another kernel than the running one.
pub fn check_release() -> Result<String, BootError> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .map_err(BootError::io("read", p))
    };
    let expected = read(KERNEL_RELEASE_FILE)?;
    let running = read("/proc/sys/kernel/osrelease")?;
    if expected != running {
        return Err(BootError::KernelMismatch { expected, running });
    }
    Ok(running)
}

/// The module paths of a `modules.load` text, validated: relative, ending
/// in `.ko`, no `..`. Blank lines and `#` comments are skipped.
pub fn parse_list(text: &str) -> Result<Vec<&str>, BootError> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(line, entry)| {
            let ok = entry.ends_with(".ko")
                && !entry.starts_with('/')
                && entry.split('/').all(|c| !c.is_empty() && c != "..");
            if ok {
                Ok(entry)
            } else {
                Err(BootError::BadModuleList {
                    line,
                    entry: entry.to_string(),
                })
            }
        })
        .collect()
}

/// Loads every listed module in file order; one already present counts as
/// loaded. Returns how many were listed.
pub fn load_all(release: &str) -> Result<usize, BootError> {
    let text = std::fs::read_to_string(MODULES_LOAD_FILE)
        .map_err(BootError::io("read", MODULES_LOAD_FILE))?;
    let root = Path::new("/lib/modules").join(release);
    let list = parse_list(&text)?;
    for entry in &list {
        load(&root.join(entry))?;
    }
    Ok(list.len())
}

fn load(path: &PathBuf) -> Result<(), BootError> {
    let file = std::fs::File::open(path).map_err(BootError::io("open", path))?;
    // SAFETY: finit_module reads the module from a valid open descriptor;
    // the parameter string is a static NUL-terminated empty string and the
    // flags are zero.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            0 as libc::c_int,
        )
    };
    match Errno::result(r) {
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(source) => Err(BootError::Module {
            path: path.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_load_order() {
        let text =
            "kernel/drivers/virtio/virtio_ring.ko\n\n# comment\n kernel/fs/overlayfs/overlay.ko \n";
        assert_eq!(
            parse_list(text).unwrap(),
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/fs/overlayfs/overlay.ko"
            ]
        );
    }

    #[test]
    fn rejects_paths_outside_the_tree() {
        for (text, line) in [
            ("a.ko\n/abs/b.ko\n", 2),
            ("../../etc/x.ko\n", 1),
            ("kernel//x.ko\n", 1),
            ("kernel/x.ko.xz\n", 1),
        ] {
            match parse_list(text) {
                Err(BootError::BadModuleList { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
