//! The guest kernel: Debian's `linux-image-cloud-amd64` (or `-arm64`),
//! fetched with `apt-get download` (nothing is installed on the host; the
//! `.deb` is unpacked with `dpkg-deb -x` in a build directory), and its
//! modules tree kept with a generated `modules.dep`. amd64: the ELF
//! `vmlinux` is extracted from the bzImage `vmlinuz`. arm64: `vmlinuz` is an
//! arm64 `Image` (Debian ships it uncompressed; a gzip'd one is
//! decompressed), checked by its header magic and kept as `Image`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apt::{Apt, PackageRef};
use crate::bzimage::{extract_vmlinux, Compression};
use crate::error::{io, Error, Result};
use crate::fsutil::{replace_dir, Staging};
use crate::kmod::ModuleIndex;
use crate::layout::{Arch, Layout, MANIFEST};
use crate::manifest::{Inputs, Manifest};

/// The Debian meta-package that tracks the current amd64 cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The same for arm64.
pub const KERNEL_META_PACKAGE_ARM64: &str = "linux-image-cloud-arm64";
/// Offset and value of the magic in an arm64 `Image` header
/// (Documentation/arch/arm64/booting.rst).
const ARM64_MAGIC: (usize, &[u8; 4]) = (0x38, b"ARM\x64");
/// Bumped when the kernel artifact's recipe changes.
const RECIPE: u32 = 1;

/// What the kernel step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// The concrete kernel package.
    pub package: PackageRef,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// Compression the bzImage payload used (amd64).
    pub compression: Option<Compression>,
    /// PVH entry point of `vmlinux`.
    pub pvh_entry: Option<u64>,
    /// Number of modules in the tree.
    pub modules: usize,
}

/// The meta-package of `arch`'s cloud kernel.
pub fn kernel_meta_package(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => KERNEL_META_PACKAGE,
        Arch::Arm64 => KERNEL_META_PACKAGE_ARM64,
    }
}

/// The concrete kernel package the meta-package of `arch` currently points at.
pub fn kernel_package(apt: &Apt, arch: Arch) -> Result<PackageRef> {
    Ok(apt.resolve_meta(kernel_meta_package(arch), "linux-image-")?)
}

/// Checks an arm64 kernel (decompressing a gzip'd one) and returns the
/// plain `Image`, which must name `release` in its version string.
pub fn arm64_image(vmlinuz: &[u8], path: &Path, release: &str) -> Result<Vec<u8>> {
    let bad = |reason| Error::Arm64Image {
        path: path.to_owned(),
        reason,
    };
    let image = if vmlinuz.starts_with(&[0x1f, 0x8b]) {
        crate::cmd::run_with_input(std::process::Command::new("gzip").arg("-dc"), vmlinuz)?
    } else {
        vmlinuz.to_vec()
    };
    let (at, magic) = ARM64_MAGIC;
    if image.get(at..at + magic.len()) != Some(&magic[..]) {
        return Err(bad("no ARM\\x64 magic at 0x38"));
    }
    let banner = format!("Linux version {release} ");
    if !image.windows(banner.len()).any(|w| w == banner.as_bytes()) {
        return Err(bad("its version string does not name the modules' release"));
    }
    Ok(image)
}

/// The manifest inputs of a kernel build from `package`.
pub fn kernel_inputs(package: &PackageRef) -> Inputs {
    Inputs {
        recipe: RECIPE,
        packages: vec![package.clone()],
        other: BTreeMap::new(),
    }
}

/// Reads the release of the kernel already in `layout`.
pub fn installed_release(layout: &Layout) -> Result<String> {
    let path = layout.kernel_release_file();
    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
    Ok(text.trim().to_owned())
}

fn single_entry(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut found = None;
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found = Some(entry.path());
        }
    }
    Ok(found)
}

/// Unpacks `package` in a staging directory: (staging, root, out, vmlinuz
/// path, release from its file name, modules tree).
fn unpack(
    apt: &Apt,
    layout: &Layout,
    package: &PackageRef,
) -> Result<(Staging, PathBuf, PathBuf, String, PathBuf)> {
    let build_root = layout.build_dir();
    std::fs::create_dir_all(&build_root).map_err(io("create directory", &build_root))?;
    let staging = Staging::new(&build_root, "kernel")?;
    let dl = staging.path().join("deb");
    let root = staging.path().join("root");
    let out = staging.path().join("out");
    for d in [&dl, &root, &out] {
        std::fs::create_dir_all(d).map_err(io("create directory", d))?;
    }
    let deb = apt.download(package, &dl)?;
    apt.extract(&deb, &root)?;
    let missing = |what| Error::KernelPackage {
        package: package.to_string(),
        what,
    };
    let vmlinuz_path =
        single_entry(&root.join("boot"), "vmlinuz-")?.ok_or_else(|| missing("boot/vmlinuz-*"))?;
    let release = vmlinuz_path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let modules_src = [root.join("lib/modules"), root.join("usr/lib/modules")]
        .into_iter()
        .map(|d| d.join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| missing("lib/modules/<release>"))?;
    Ok((staging, out, vmlinuz_path, release, modules_src))
}

fn build_arm64_kernel(apt: &Apt, layout: &Layout, package: &PackageRef) -> Result<KernelInfo> {
    let started = Instant::now();
    let (_staging, out, vmlinuz_path, release, modules_src) = unpack(apt, layout, package)?;
    tracing::info!(package = %package, elapsed_ms = started.elapsed().as_millis(), "kernel package unpacked");
    let vmlinuz = std::fs::read(&vmlinuz_path).map_err(io("read", &vmlinuz_path))?;
    let image = arm64_image(&vmlinuz, &vmlinuz_path, &release)?;
    let write = |name: &str, data: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, data).map_err(io("write", &p))
    };
    write("Image", &image)?;
    write("vmlinuz", &vmlinuz)?;
    write("release", format!("{release}\n").as_bytes())?;
    let modules_dest = out.join("modules").join(&release);
    std::fs::create_dir_all(out.join("modules")).map_err(io("create directory", &out))?;
    std::fs::rename(&modules_src, &modules_dest).map_err(io("rename", &modules_src))?;
    let index = ModuleIndex::scan(&modules_dest)?;
    let dep_path = modules_dest.join("modules.dep");
    std::fs::write(&dep_path, index.to_modules_dep()?).map_err(io("write", &dep_path))?;
    let manifest = Manifest::new(
        "kernel",
        kernel_inputs(package),
        &out,
        &["Image", "vmlinuz", "release"],
        started.elapsed().as_millis() as u64,
    )?;
    manifest.save(&out.join(MANIFEST))?;
    replace_dir(&out, &layout.kernel_dir())?;
    Ok(KernelInfo {
        package: package.clone(),
        release,
        compression: None,
        pvh_entry: None,
        modules: index.modules.len(),
    })
}

/// Downloads `package`, extracts `vmlinux`, `vmlinuz` and the modules tree,
/// and installs them under `layout.kernel_dir()` (replacing what was there).
pub fn build_kernel(apt: &Apt, layout: &Layout, package: &PackageRef) -> Result<KernelInfo> {
    if layout.arch() == Arch::Arm64 {
        return build_arm64_kernel(apt, layout, package);
    }
    let started = Instant::now();
    let build_root = layout.build_dir();
    std::fs::create_dir_all(&build_root).map_err(io("create directory", &build_root))?;
    let staging = Staging::new(&build_root, "kernel")?;
    let dl = staging.path().join("deb");
    let root = staging.path().join("root");
    let out = staging.path().join("out");
    for d in [&dl, &root, &out] {
        std::fs::create_dir_all(d).map_err(io("create directory", d))?;
    }
    let deb = apt.download(package, &dl)?;
    apt.extract(&deb, &root)?;
    tracing::info!(package = %package, elapsed_ms = started.elapsed().as_millis(), "kernel package unpacked");

    let missing = |what| Error::KernelPackage {
        package: package.to_string(),
        what,
    };
    let vmlinuz_path =
        single_entry(&root.join("boot"), "vmlinuz-")?.ok_or_else(|| missing("boot/vmlinuz-*"))?;
    let file_release = vmlinuz_path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let modules_src = [root.join("lib/modules"), root.join("usr/lib/modules")]
        .into_iter()
        .map(|d| d.join(&file_release))
        .find(|d| d.is_dir())
        .ok_or_else(|| missing("lib/modules/<release>"))?;

    let vmlinuz = std::fs::read(&vmlinuz_path).map_err(io("read", &vmlinuz_path))?;
    let vmlinux = extract_vmlinux(&vmlinuz).map_err(|source| Error::Vmlinux {
        path: vmlinuz_path.clone(),
        source,
    })?;
    let release = vmlinux
        .release
        .clone()
        .unwrap_or_else(|| file_release.clone());
    if release != file_release {
        return Err(Error::ReleaseMismatch {
            header: release,
            modules: file_release,
        });
    }
    tracing::info!(
        release = %release,
        compression = ?vmlinux.compression,
        vmlinux_bytes = vmlinux.elf.len(),
        pvh_entry = ?vmlinux.pvh_entry,
        "vmlinux extracted"
    );

    let write = |name: &str, data: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, data).map_err(io("write", &p))
    };
    write("vmlinux", &vmlinux.elf)?;
    write("vmlinuz", &vmlinuz)?;
    write("release", format!("{release}\n").as_bytes())?;
    let modules_dest = out.join("modules").join(&release);
    std::fs::create_dir_all(out.join("modules")).map_err(io("create directory", &out))?;
    std::fs::rename(&modules_src, &modules_dest).map_err(io("rename", &modules_src))?;
    let index = ModuleIndex::scan(&modules_dest)?;
    let dep_path = modules_dest.join("modules.dep");
    std::fs::write(&dep_path, index.to_modules_dep()?).map_err(io("write", &dep_path))?;

    let manifest = Manifest::new(
        "kernel",
        kernel_inputs(package),
        &out,
        &["vmlinux", "vmlinuz", "release"],
        started.elapsed().as_millis() as u64,
    )?;
    manifest.save(&out.join(MANIFEST))?;
    replace_dir(&out, &layout.kernel_dir())?;
    Ok(KernelInfo {
        package: package.clone(),
        release,
        compression: Some(vmlinux.compression),
        pvh_entry: vmlinux.pvh_entry,
        modules: index.modules.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pretend arm64 Image: header magic at 0x38 and a version banner.
    fn image(release: &str) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[..2].copy_from_slice(b"MZ");
        v[0x38..0x3c].copy_from_slice(b"ARM\x64");
        v.extend_from_slice(format!("Linux version {release} (debian-kernel@…)").as_bytes());
        v
    }

    #[test]
    fn arm64_images_are_checked_and_gzip_is_undone() {
        let p = Path::new("/x/vmlinuz");
        let rel = "6.1.0-57-cloud-arm64";
        let plain = image(rel);
        assert_eq!(arm64_image(&plain, p, rel).unwrap(), plain);
        let gz = crate::cmd::run_with_input(std::process::Command::new("gzip").arg("-c"), &plain)
            .unwrap();
        assert_eq!(arm64_image(&gz, p, rel).unwrap(), plain);
        let e = arm64_image(&plain, p, "6.1.0-58-cloud-arm64").unwrap_err();
        assert!(e.to_string().contains("does not name"), "{e}");
        let mut x86 = plain.clone();
        x86[0x38..0x3c].copy_from_slice(b"\0\0\0\0");
        let e = arm64_image(&x86, p, rel).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        assert!(arm64_image(b"MZ", p, rel).is_err());
        assert_eq!(kernel_meta_package(Arch::Arm64), "linux-image-cloud-arm64");
    }
}
