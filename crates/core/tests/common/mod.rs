//! Helpers shared by the core suites.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

pub mod workload;

/// The image files `ImageStore::resolve` needs for `tier`, relative to
/// the data directory.
pub fn image_files(tier: &str) -> Vec<PathBuf> {
    [
        "images/kernel/vmlinux",
        "images/kernel/vmlinuz",
        "images/kernel/release",
        "images/kernel/manifest.json",
        "images/initramfs/initramfs.cpio",
        "images/initramfs/manifest.json",
    ]
    .iter()
    .map(PathBuf::from)
    .chain([
        PathBuf::from(format!("images/{tier}/rootfs.ext4")),
        PathBuf::from(format!("images/{tier}/manifest.json")),
    ])
    .collect()
}

/// Makes `dst` an image directory for `tier` whose files link to those in
/// `src` (or, with `src = None`, are placeholders), leaving out `missing`.
pub fn image_dir(dst: &Path, src: Option<&Path>, tier: &str, missing: &[&str]) {
    for rel in image_files(tier) {
        if missing.iter().any(|m| rel == Path::new(m)) {
            continue;
        }
        let to = dst.join(&rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        match src {
            Some(src) => std::os::unix::fs::symlink(src.join(&rel), &to).unwrap(),
            None if rel.ends_with("release") => std::fs::write(&to, "6.1.0-test\n").unwrap(),
            None => std::fs::write(&to, b"placeholder").unwrap(),
        }
    }
}

/// Processes whose command line mentions `needle` (a sandbox directory).
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes may exit while we look.
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// Entries of a directory (empty when it does not exist).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The QEMU binary the VM suites need.
pub const QEMU: &str = "qemu-system-x86_64";

/// Whether the VM suites cannot run here (printing why).
pub fn skip() -> bool {
    if !testkit::is_root() {
        testkit::cannot_run("the VM tests need root");
        return true;
    }
    if std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .is_err()
    {
        testkit::cannot_run(&format!("{QEMU} is not installed"));
        return true;
    }
    false
}

/// A core configuration over a fresh data directory in the current
/// namespace, reading images from the shared test cache, with generous boot
/// timeouts (several TCG guests boot at once on two shared cores).
pub fn vm_config(
    data: &Path,
    bridge: &str,
    subnet: &str,
    tap_prefix: &str,
) -> bhatti_core::CoreConfig {
    let mut config = bhatti_core::CoreConfig::new(data);
    config.image_dir = testkit::image_cache();
    config.network = net::NetworkConfig {
        bridge: bridge.into(),
        subnet: subnet.parse().unwrap(),
        tap_prefix: tap_prefix.into(),
        dns: None,
    };
    config.disk_bytes = 256 << 20;
    config.boot_timeout = std::time::Duration::from_secs(90);
    config
}
