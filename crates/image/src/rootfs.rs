//! Root filesystem tiers, staged in a directory and packed with
//! `mkfs.ext4 -d`.
//!
//! * `tiny`: busybox from Debian's `busybox-static`, its applet links, a
//!   passwd/group with `root` and `lohar` (uid 1000), `/workspace`.
//! * `minimal`: Debian bookworm `minbase` by `mmdebstrap` through the host's
//!   apt mirror, plus the tools agents expect, `lohar` with passwordless sudo.
//! * `browser`: minimal plus Chromium, fonts and Python Playwright driving it.
//! * `docker`: minimal plus Docker Engine, the kernel modules it needs and a
//!   boot service (`/etc/bhatti/boot`) that starts `dockerd`.
//!
//! All are read-only base images: no journal, no reserved blocks; each
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
/// Packages the browser tier adds to minimal: Debian's Chromium and a
/// modest set of fonts.
pub const BROWSER_PACKAGES: &[&str] = &["chromium", "fonts-liberation", "fonts-dejavu-core"];
/// The Python Playwright (PyPI) installed in the browser tier, set up to
/// drive the system Chromium.
pub const PLAYWRIGHT_VERSION: &str = "1.65.2";
/// Where the browser tier keeps Playwright's browser links (each user's
/// `~/.cache/ms-playwright` links here too).
pub const PLAYWRIGHT_BROWSERS: &str = "/opt/ms-playwright";
/// Packages the docker tier adds to minimal: Docker Engine, and `kmod`
/// (`modprobe`, `depmod`) for the kernel modules it needs.
pub const DOCKER_PACKAGES: &[&str] = &["docker.io", "containerd", "runc", "iptables", "kmod"];
/// The kernel modules the docker tier carries (with their dependencies):
/// every module under these directories of the modules tree...
pub const DOCKER_MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/net/bridge/",
];
/// ...and these: overlayfs, veth pairs, the other virtual links Docker's
/// network drivers use.
pub const DOCKER_MODULES: &[&str] = &[
    "overlay",
    "veth",
    "bridge",
    "br_netfilter",
    "macvlan",
    "ipvlan",
    "vxlan",
    "dummy",
];
/// The docker tier's boot service, `/etc/bhatti/boot` (lohar runs it as
/// root at every boot, the sandbox's own `init` as its arguments).
pub const DOCKER_BOOT: &str = r#"#!/bin/sh
# bhatti docker tier: starts Docker Engine at boot. lohar runs this as root
# on every boot; its arguments, if any, are the sandbox's own init command.
# dockerd's output goes to /var/log/bhatti-init.log.
modprobe -a overlay bridge br_netfilter veth nf_tables nft_compat nft_chain_nat \
  nf_nat nf_conntrack xt_conntrack xt_MASQUERADE xt_addrtype iptable_nat iptable_filter \
  || echo "bhatti-boot: some kernel modules did not load"
# overlay2 cannot use the overlay root as its upper layer: Docker's data
# lives on the sandbox disk itself.
mkdir -p /run/bhatti/disk/docker /var/lib/docker
mountpoint -q /var/lib/docker || mount --bind /run/bhatti/disk/docker /var/lib/docker
if [ $# -gt 0 ]; then
  dockerd &
  exec "$@"
fi
exec dockerd
"#;
const TINY_RECIPE: u32 = 1;
const MINIMAL_RECIPE: u32 = 2;
// Bump a recipe when its build changes in a way the inputs do not show
// (a hook script, the boot service, a file written into the image).
const BROWSER_RECIPE: u32 = 1;
const DOCKER_RECIPE: u32 = 1;

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

/// Inputs of a browser build: minimal's, the added packages and the
/// Playwright version.
pub fn browser_inputs(sources: &[SourceEntry]) -> Inputs {
    let mut inputs = minimal_inputs(sources);
    inputs.recipe = BROWSER_RECIPE;
    inputs
        .other
        .insert("browser_include".into(), BROWSER_PACKAGES.join(","));
    inputs
        .other
        .insert("playwright".into(), PLAYWRIGHT_VERSION.into());
    inputs
}

/// Inputs of a docker build: minimal's, the added packages, the module set
/// and the kernel package (its modules are copied into the image).
pub fn docker_inputs(sources: &[SourceEntry], kernel: &Inputs) -> Inputs {
    let mut inputs = minimal_inputs(sources);
    inputs.recipe = DOCKER_RECIPE;
    inputs.packages = kernel.packages.clone();
    inputs
        .other
        .insert("docker_include".into(), DOCKER_PACKAGES.join(","));
    inputs.other.insert(
        "modules".into(),
        format!(
            "{};{}",
            DOCKER_MODULE_DIRS.join(","),
            DOCKER_MODULES.join(",")
        ),
    );
    inputs
}

/// The Debian tier's extra work.
#[derive(Debug, Clone)]
pub enum Extra {
    /// Minimal itself.
    None,
    /// Chromium, fonts, Playwright.
    Browser {
        /// Scratch directory for the build's hook script.
        work: PathBuf,
    },
    /// Docker Engine, and the kernel's modules from this tree.
    Docker {
        /// `DATA/images/kernel/modules/<release>`.
        modules_dir: PathBuf,
        /// The kernel release.
        release: String,
    },
}

/// The browser tier's mmdebstrap hook (run with the new root as `$1`,
/// `/proc`, `/sys` and `/dev` mounted): Playwright from PyPI into the
/// system Python, no browser download, then links where Playwright looks
/// for its Chromium and headless shell, both to the system Chromium. The
/// link paths are Playwright's own: its `executable_path`, then each path
/// a launch reports missing. `$2`: a CA bundle for pip (the host's).
const BROWSER_HOOK: &str = r#"set -eu
root=$1
cert=
if [ -n "${2:-}" ] && [ -f "$2" ]; then
  cp "$2" "$root/tmp/bhatti-pip-ca.crt"
  cert=--cert=/tmp/bhatti-pip-ca.crt
fi
# A clean environment: none of the host's pip or CA variables (which name
# host paths) leaks into the image's tools.
clean="env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
chroot "$root" $clean PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 python3 -m pip install --quiet \
  --break-system-packages --no-cache-dir --disable-pip-version-check $cert "playwright==$3"
rm -f "$root/tmp/bhatti-pip-ca.crt"
chroot "$root" $clean PLAYWRIGHT_BROWSERS_PATH="$4" python3 - <<'PY'
import os, re
from playwright.sync_api import sync_playwright, Error

def link(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        os.symlink("/usr/bin/chromium", path)
    print("playwright: linked", path, "to /usr/bin/chromium")

with sync_playwright() as p:
    link(p.chromium.executable_path)
    for _ in range(3):
        try:
            b = p.chromium.launch(timeout=120000)
            print("playwright: launched Chromium", b.version)
            b.close()
            break
        except Error as e:
            m = re.search(r"Executable doesn't exist at (\S+)", str(e))
            if not m:
                raise
            link(m.group(1))
    else:
        raise SystemExit("playwright: no launchable Chromium")
PY
"#;

/// Stages the minimal tier in `root` (which must not exist yet or be empty).
pub fn stage_minimal(sources: &[SourceEntry], root: &Path) -> Result<()> {
    stage_debian(sources, root, &Extra::None)
}

/// Stages minimal, or a tier built on it (`extra`), in `root`.
pub fn stage_debian(sources: &[SourceEntry], root: &Path, extra: &Extra) -> Result<()> {
    let mut include: Vec<&str> = MINIMAL_PACKAGES.to_vec();
    match extra {
        Extra::None => {}
        Extra::Browser { .. } => include.extend(BROWSER_PACKAGES),
        Extra::Docker { .. } => include.extend(DOCKER_PACKAGES),
    }
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--quiet", "--variant=minbase", "--mode=root"])
        .arg(format!("--include={}", include.join(",")))
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
    if let Extra::Browser { work } = extra {
        let hook = work.join("browser-hook.sh");
        write_file(&hook, BROWSER_HOOK, 0o644)?;
        // pip's TLS trusts what the host's does (a host behind a TLS proxy).
        let ca = std::env::var("PIP_CERT")
            .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
        cmd.arg(format!(
            "--customize-hook=sh {} \"$1\" {} {} {}",
            hook.display(),
            shell_quote(&ca),
            PLAYWRIGHT_VERSION,
            PLAYWRIGHT_BROWSERS
        ));
    }
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
    match extra {
        Extra::None => {}
        Extra::Browser { .. } => finish_browser(root)?,
        Extra::Docker {
            modules_dir,
            release,
        } => finish_docker(root, modules_dir, release)?,
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Each user's `~/.cache/ms-playwright` (where Playwright looks without
/// `PLAYWRIGHT_BROWSERS_PATH`) links to the shared links; login shells get
/// the variables too.
fn finish_browser(root: &Path) -> Result<()> {
    for (home, owner) in [("root", None), ("home/lohar", Some(LOHAR_UID))] {
        let cache = root.join(home).join(".cache");
        make_dir(&cache, 0o755, owner)?;
        let link = cache.join("ms-playwright");
        std::os::unix::fs::symlink(PLAYWRIGHT_BROWSERS, &link).map_err(io("symlink", &link))?;
    }
    let vars = format!(
        "PLAYWRIGHT_BROWSERS_PATH={PLAYWRIGHT_BROWSERS}\nPLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1\n"
    );
    let env = root.join("etc/environment");
    let mut text = std::fs::read_to_string(&env).unwrap_or_default();
    text.push_str(&vars);
    write_file(&env, &text, 0o644)?;
    write_file(
        &root.join("etc/profile.d/playwright.sh"),
        &format!(
            "export PLAYWRIGHT_BROWSERS_PATH={PLAYWRIGHT_BROWSERS}\nexport PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1\n"
        ),
        0o644,
    )
}

/// The module closure Docker needs, as plain `.ko` files under
/// `/lib/modules/<release>` with `depmod`'s indexes (so `modprobe` and the
/// kernel's own module requests work), `lohar` in the `docker` group, and
/// the boot service that starts `dockerd`.
fn finish_docker(root: &Path, modules_dir: &Path, release: &str) -> Result<()> {
    let dep_path = modules_dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path).map_err(io("read", &dep_path))?;
    let graph = crate::kmod::parse_modules_dep(&dep)?;
    let builtin_path = modules_dir.join("modules.builtin");
    let builtin: std::collections::BTreeSet<String> = std::fs::read_to_string(&builtin_path)
        .map_err(io("read", &builtin_path))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(crate::kmod::name_of)
        .collect();
    let mut wanted: Vec<String> = graph
        .iter()
        .filter(|(_, (path, _))| DOCKER_MODULE_DIRS.iter().any(|d| path.starts_with(d)))
        .map(|(name, _)| name.clone())
        .collect();
    wanted.extend(DOCKER_MODULES.iter().map(|m| m.to_string()));
    let paths = crate::kmod::resolve(&graph, &builtin, &wanted)?;
    let dest = root.join("lib/modules").join(release);
    for rel in &paths {
        let data = crate::kmod::read_module(&modules_dir.join(rel))?;
        let plain = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel.clone(),
        };
        let to = dest.join(&plain);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
        }
        std::fs::write(&to, data).map_err(io("write", &to))?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let from = modules_dir.join(f);
        if from.is_file() {
            std::fs::copy(&from, dest.join(f)).map_err(io("copy", &from))?;
        }
    }
    run(Command::new("chroot").arg(root).args(["depmod", release]))?;
    run(Command::new("chroot")
        .arg(root)
        .args(["usermod", "--append", "--groups", "docker", "lohar"]))?;
    write_file(&root.join("etc/bhatti/boot"), DOCKER_BOOT, 0o755)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apt::PackageRef;

    #[test]
    fn each_debian_tier_has_inputs_of_its_own() {
        let sources = vec![SourceEntry {
            uri: "http://deb.debian.org/debian".into(),
            suite: "bookworm".into(),
            components: vec!["main".into()],
        }];
        let kernel = Inputs {
            recipe: 1,
            packages: vec![PackageRef {
                name: "linux-image-6.1.0-57-cloud-amd64".into(),
                version: "6.1.192-3".into(),
                arch: None,
            }],
            other: BTreeMap::new(),
        };
        let minimal = minimal_inputs(&sources);
        let browser = browser_inputs(&sources);
        let docker = docker_inputs(&sources, &kernel);
        assert_ne!(minimal, browser);
        assert_ne!(minimal, docker);
        assert_ne!(browser, docker);
        assert_eq!(browser.other["playwright"], PLAYWRIGHT_VERSION);
        // The docker tier carries the kernel's modules: a new kernel
        // package is a new docker image.
        assert_eq!(docker.packages, kernel.packages);
        let mut newer = kernel.clone();
        newer.packages[0].version = "6.1.193-1".into();
        assert_ne!(docker_inputs(&sources, &newer), docker);
    }

    #[test]
    fn the_docker_boot_service_starts_dockerd_and_then_the_sandbox_init() {
        assert!(DOCKER_BOOT.starts_with("#!/bin/sh\n"));
        assert!(DOCKER_BOOT.contains("exec \"$@\""));
        assert!(DOCKER_BOOT.trim_end().ends_with("exec dockerd"));
        assert_eq!(shell_quote("a'b"), r#"'a'\''b'"#);
    }
}
