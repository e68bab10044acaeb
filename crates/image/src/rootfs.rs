//! Root filesystem tiers, staged in a directory and packed with
//! `mkfs.ext4 -d`.
//!
//! * `tiny`: busybox from Debian's `busybox-static`, its applet links, a
//!   passwd/group with `root` and `lohar` (uid 1000), `/workspace`.
//! * `minimal`: Debian bookworm `minbase` by `mmdebstrap` through the host's
//!   apt mirror, plus the tools agents expect, `lohar` with passwordless sudo.
//!
//! Both are read-only base images: no journal, no reserved blocks; each
//! sandbox writes to its own overlay disk (see [`crate::disk`]).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{Apt, PackageRef};
use crate::cmd::run;
use crate::error::{io, Error, Result};
use crate::fsutil::tree_usage;
use crate::manifest::Inputs;
use crate::mirror::SourceEntry;
use crate::mkfs::{image_size_for, inodes_for, make_ext4, Ext4Spec};

/// uid and gid of the `lohar` user in every tier.
pub const LOHAR_UID: u32 = 1000;
/// Hostname written into images (lohar sets the sandbox's own at boot).
pub const DEFAULT_HOSTNAME: &str = "bhatti";
/// The busybox package of the tiny tier.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Debian suite of the minimal tier.
pub const MINIMAL_SUITE: &str = "bookworm";
/// Packages added to `minbase` in the minimal tier: what an agent's first
/// commands expect (`pip install` in a venv, `npm install`, a C compiler,
/// git, curl, the usual shell tools and an editor).
pub const MINIMAL_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "sudo",
    "curl",
    "git",
    "python3",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "build-essential",
    "zip",
    "unzip",
    "jq",
    "ripgrep",
    "less",
    "vim-tiny",
    "openssh-client",
    "iproute2",
    "procps",
    "ca-certificates",
];
const TINY_RECIPE: u32 = 1;
const MINIMAL_RECIPE: u32 = 2;

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    std::fs::write(path, contents).map_err(io("write", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}

fn make_dir(path: &Path, mode: u32, owner: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io("create directory", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    if let Some(id) = owner {
        std::os::unix::fs::chown(path, Some(id), Some(id)).map_err(io("chown", path))?;
    }
    Ok(())
}

/// Inputs of a tiny build. `lister`: for a foreign architecture, the
/// host's busybox-static that lists the applets (the foreign binary does
/// not run here).
pub fn tiny_inputs(busybox: &PackageRef, lister: Option<&PackageRef>) -> Inputs {
    Inputs {
        recipe: TINY_RECIPE,
        packages: [Some(busybox), lister]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
        other: BTreeMap::new(),
    }
}

/// Downloads and unpacks busybox-static, returning its binary.
fn unpack_busybox(apt: &Apt, busybox: &PackageRef, work: &Path, tag: &str) -> Result<PathBuf> {
    let deb_dir = work.join(format!("{tag}-deb"));
    let unpacked = work.join(tag);
    for d in [&deb_dir, &unpacked] {
        std::fs::create_dir_all(d).map_err(io("create directory", d))?;
    }
    let deb = apt.download(busybox, &deb_dir)?;
    apt.extract(&deb, &unpacked)?;
    let bin = unpacked.join("bin/busybox");
    if !bin.is_file() {
        return Err(Error::MissingInput {
            what: "busybox binary in busybox-static",
            path: bin,
        });
    }
    Ok(bin)
}

/// Stages the tiny tier in `root` (an empty directory), using `work` for
/// the download. The applet links come from `busybox --list-full`, run on
/// the host: from the image's own busybox, or, for a foreign architecture,
/// from `lister` — the host architecture's busybox-static of the same
/// Debian source, built with the same configuration.
pub fn stage_tiny(
    apt: &Apt,
    busybox: &PackageRef,
    lister: Option<(&Apt, &PackageRef)>,
    work: &Path,
    root: &Path,
) -> Result<()> {
    let bin = unpack_busybox(apt, busybox, work, "busybox")?;
    let list_with = match lister {
        Some((host_apt, pkg)) => unpack_busybox(host_apt, pkg, work, "busybox-host")?,
        None => root.join("bin/busybox"),
    };
    for (dir, mode, owner) in [
        ("bin", 0o755, None),
        ("sbin", 0o755, None),
        ("usr/bin", 0o755, None),
        ("usr/sbin", 0o755, None),
        ("etc", 0o755, None),
        ("dev", 0o755, None),
        ("proc", 0o555, None),
        ("sys", 0o555, None),
        ("run", 0o755, None),
        ("mnt", 0o755, None),
        ("var/tmp", 0o1777, None),
        ("tmp", 0o1777, None),
        ("root", 0o700, None),
        ("home/lohar", 0o755, Some(LOHAR_UID)),
        ("workspace", 0o755, Some(LOHAR_UID)),
    ] {
        make_dir(&root.join(dir), mode, owner)?;
    }
    let target = root.join("bin/busybox");
    std::fs::copy(&bin, &target).map_err(io("copy", &bin))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", &target))?;
    // A static busybox of the host's architecture runs here: ask it for
    // its applets.
    let list = run(Command::new(&list_with).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io("symlink", &link))?;
    }
    let u = LOHAR_UID;
    write_file(
        &root.join("etc/passwd"),
        &format!("root:x:0:0:root:/root:/bin/sh\nlohar:x:{u}:{u}:lohar:/home/lohar:/bin/sh\n"),
        0o644,
    )?;
    write_file(
        &root.join("etc/group"),
        &format!("root:x:0:\nlohar:x:{u}:\n"),
        0o644,
    )?;
    write_file(
        &root.join("etc/shadow"),
        "root:*:19000:0:99999:7:::\nlohar:*:19000:0:99999:7:::\n",
        0o640,
    )?;
    write_file(
        &root.join("etc/hostname"),
        &format!("{DEFAULT_HOSTNAME}\n"),
        0o644,
    )?;
    write_file(
        &root.join("etc/hosts"),
        &format!("127.0.0.1 localhost\n127.0.1.1 {DEFAULT_HOSTNAME}\n"),
        0o644,
    )?;
    Ok(())
}

/// Inputs of a minimal build: the recipe, suite, package list and mirror.
/// (Package versions are not pinned; `force` rebuilds against the mirror's
/// current state.)
pub fn minimal_inputs(sources: &[SourceEntry]) -> Inputs {
    let mut other = BTreeMap::new();
    other.insert("suite".into(), MINIMAL_SUITE.into());
    other.insert("include".into(), MINIMAL_PACKAGES.join(","));
    let lines: Vec<String> = sources.iter().map(SourceEntry::to_line).collect();
    other.insert("sources".into(), lines.join("\n"));
    Inputs {
        recipe: MINIMAL_RECIPE,
        packages: vec![],
        other,
    }
}

/// Stages the minimal tier in `root` (which must not exist yet or be empty).
pub fn stage_minimal(sources: &[SourceEntry], root: &Path) -> Result<()> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--quiet", "--variant=minbase", "--mode=root"])
        .arg(format!("--include={}", MINIMAL_PACKAGES.join(",")))
        // Documentation and translations are dead weight in a sandbox image.
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        ])
        .arg(MINIMAL_SUITE)
        .arg(root);
    for s in sources {
        cmd.arg(s.to_line());
    }
    run(&mut cmd)?;
    let u = LOHAR_UID.to_string();
    run(Command::new("chroot").arg(root).args([
        "useradd",
        "--uid",
        &u,
        "--user-group",
        "--create-home",
        "--home-dir",
        "/home/lohar",
        "--shell",
        "/bin/bash",
        "lohar",
    ]))?;
    write_file(
        &root.join("etc/sudoers.d/lohar"),
        "lohar ALL=(ALL:ALL) NOPASSWD: ALL\n",
        0o440,
    )?;
    write_file(
        &root.join("etc/hostname"),
        &format!("{DEFAULT_HOSTNAME}\n"),
        0o644,
    )?;
    write_file(
        &root.join("etc/hosts"),
        &format!("127.0.0.1 localhost\n127.0.1.1 {DEFAULT_HOSTNAME}\n"),
        0o644,
    )?;
    make_dir(&root.join("workspace"), 0o755, Some(LOHAR_UID))?;
    Ok(())
}

/// Packs a staged root into a read-only base ext4 image sized to its content.
pub fn pack_rootfs(root: &Path, image: &Path, label: &str) -> Result<u64> {
    let usage = tree_usage(root)?;
    let size = image_size_for(usage);
    make_ext4(
        image,
        &Ext4Spec {
            label: label.to_owned(),
            size_bytes: size,
            journal: false,
            inodes: Some(inodes_for(usage)),
            source_dir: Some(root.to_owned()),
        },
    )?;
    Ok(size)
}
