//! Looking up built images: [`ImageStore::resolve`] turns an image name into
//! the paths a VMM needs, or says precisely what is missing.

use std::path::PathBuf;

use crate::layout::{Arch, Layout, Tier, MANIFEST};

/// Why an image cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such image name.
    #[error("unknown image '{name}' (known images: tiny, minimal)")]
    UnknownImage {
        /// The name asked for.
        name: String,
    },
    /// The image (or an artifact it needs) has not been built.
    #[error("image '{name}' is not built; run `bhatti image build --tier {name}{arch_flag}` ({missing} is missing)")]
    NotBuilt {
        /// The image name.
        name: String,
        /// ` --arch <arch>` when the images are not the host's architecture.
        arch_flag: String,
        /// The first missing file.
        missing: PathBuf,
    },
    /// The kernel release file is unreadable.
    #[error("cannot read kernel release from {0}")]
    Release(PathBuf),
}

/// Everything needed to boot one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The tier.
    pub tier: Tier,
    /// The guests' architecture.
    pub arch: Arch,
    /// The kernel the VMM boots: amd64, the ELF `vmlinux` (PVH entry, for
    /// Firecracker and QEMU microvm); arm64, the `Image` (QEMU virt).
    pub vmlinux: PathBuf,
    /// The kernel as Debian ships it (amd64: the compressed bzImage).
    pub vmlinuz: PathBuf,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Initramfs with lohar as `/init`.
    pub initramfs: PathBuf,
    /// Read-only base root filesystem (ext4).
    pub rootfs: PathBuf,
}

/// Read access to the images under a data directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    layout: Layout,
}

impl ImageStore {
    /// A store over `layout`.
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Resolves an image name (`tiny`, `minimal`) to its artifacts. Every
    /// artifact and its manifest must exist.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, StoreError> {
        let tier = Tier::from_name(name).ok_or_else(|| StoreError::UnknownImage {
            name: name.to_owned(),
        })?;
        let l = &self.layout;
        let required = [
            l.boot_kernel(),
            l.vmlinuz(),
            l.kernel_release_file(),
            l.kernel_dir().join(MANIFEST),
            l.initramfs(),
            l.initramfs_dir().join(MANIFEST),
            l.rootfs(tier),
            l.tier_dir(tier).join(MANIFEST),
        ];
        if let Some(missing) = required.iter().find(|p| !p.is_file()) {
            return Err(StoreError::NotBuilt {
                name: name.to_owned(),
                arch_flag: if l.arch().is_host() {
                    String::new()
                } else {
                    format!(" --arch {}", l.arch())
                },
                missing: missing.clone(),
            });
        }
        let release_file = l.kernel_release_file();
        let kernel_release = std::fs::read_to_string(&release_file)
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(StoreError::Release(release_file))?;
        Ok(ResolvedImage {
            tier,
            arch: l.arch(),
            vmlinux: l.boot_kernel(),
            vmlinuz: l.vmlinuz(),
            kernel_release,
            initramfs: l.initramfs(),
            rootfs: l.rootfs(tier),
        })
    }

    /// Resolves the default image ([`Tier::default`]).
    pub fn resolve_default(&self) -> Result<ResolvedImage, StoreError> {
        self.resolve(Tier::default().name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(Layout::for_arch(dir.path(), Arch::Amd64));
        let err = store.resolve("foo").unwrap_err();
        assert_eq!(err, StoreError::UnknownImage { name: "foo".into() });
        let err = store.resolve("tiny").unwrap_err();
        assert!(matches!(&err, StoreError::NotBuilt { name, .. } if name == "tiny"));
        assert!(err
            .to_string()
            .starts_with("image 'tiny' is not built; run `bhatti image build --tier tiny"));
        let arm = ImageStore::new(Layout::for_arch(dir.path(), Arch::Arm64));
        let err = arm.resolve("tiny").unwrap_err().to_string();
        if !Arch::Arm64.is_host() {
            assert!(err.contains("--tier tiny --arch arm64`"), "{err}");
        }
        assert!(err.contains("images/arm64/kernel/Image"), "{err}");
    }

    #[test]
    fn resolves_when_all_artifacts_exist() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::for_arch(dir.path(), Arch::Amd64);
        for d in [l.kernel_dir(), l.initramfs_dir(), l.tier_dir(Tier::Tiny)] {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(MANIFEST), "{}").unwrap();
        }
        for f in [
            l.vmlinux(),
            l.vmlinuz(),
            l.initramfs(),
            l.rootfs(Tier::Tiny),
        ] {
            std::fs::write(f, b"x").unwrap();
        }
        std::fs::write(l.kernel_release_file(), "6.1.0-56-cloud-amd64\n").unwrap();
        let store = ImageStore::new(l.clone());
        let img = store.resolve("tiny").unwrap();
        assert_eq!(img.kernel_release, "6.1.0-56-cloud-amd64");
        assert_eq!(img.rootfs, l.rootfs(Tier::Tiny));
        assert!(matches!(
            store.resolve_default(),
            Err(StoreError::NotBuilt { .. })
        ));
    }
}
