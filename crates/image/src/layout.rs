//! Where artifacts live under the data directory, and the image tiers.
//!
//! ```text
//! DATA/images/kernel/{vmlinux,vmlinuz,release,manifest.json}
//! DATA/images/kernel/modules/<release>/…      (full modules tree + generated modules.dep)
//! DATA/images/initramfs/{initramfs.cpio,manifest.json}
//! DATA/images/<tier>/{rootfs.ext4,manifest.json}
//! DATA/images/arm64/…                          (the same tree for arm64 guests; kernel/Image)
//! DATA/sandboxes/<id>/…                        (per-sandbox disks, see crate::disk)
//! ```
//!
//! amd64 images keep the top-level paths they always had; every other
//! architecture has its own tree under `images/<arch>/`, whatever the
//! host's architecture is.

use std::path::{Path, PathBuf};

pub use proto::Arch;

/// The default data directory of the daemon.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/bhatti";

/// A root filesystem tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Tier {
    /// busybox only: builds in seconds, for tests.
    Tiny,
    /// Debian bookworm minbase plus the tools agents expect. The default.
    #[default]
    Minimal,
    /// minimal plus headless Chromium, fonts and Python Playwright.
    Browser,
    /// minimal plus Docker Engine, started at boot.
    Docker,
}

impl Tier {
    /// Every tier.
    pub const ALL: [Tier; 4] = [Tier::Tiny, Tier::Minimal, Tier::Browser, Tier::Docker];

    /// The tier's image name.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Tiny => "tiny",
            Tier::Minimal => "minimal",
            Tier::Browser => "browser",
            Tier::Docker => "docker",
        }
    }

    /// Looks a tier up by image name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Paths of every artifact under one data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_dir: PathBuf,
    arch: Arch,
}

/// File name of every manifest.
pub const MANIFEST: &str = "manifest.json";

impl Layout {
    /// A layout rooted at `data_dir` for guests of the host's architecture.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self::for_arch(data_dir, Arch::host_or_default())
    }

    /// A layout rooted at `data_dir` for `arch` guests.
    pub fn for_arch(data_dir: impl Into<PathBuf>, arch: Arch) -> Self {
        Self {
            data_dir: data_dir.into(),
            arch,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The guests' architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// `DATA/images` (amd64), `DATA/images/<arch>` (others).
    pub fn images_dir(&self) -> PathBuf {
        let dir = self.data_dir.join("images");
        match self.arch {
            Arch::Amd64 => dir,
            other => dir.join(other.name()),
        }
    }

    /// `DATA/images/kernel`.
    pub fn kernel_dir(&self) -> PathBuf {
        self.images_dir().join("kernel")
    }

    /// The ELF kernel (amd64).
    pub fn vmlinux(&self) -> PathBuf {
        self.kernel_dir().join("vmlinux")
    }

    /// The uncompressed arm64 `Image`.
    pub fn arm64_image(&self) -> PathBuf {
        self.kernel_dir().join("Image")
    }

    /// The kernel the VMM boots: `vmlinux` (amd64, PVH entry) or `Image`
    /// (arm64).
    pub fn boot_kernel(&self) -> PathBuf {
        match self.arch {
            Arch::Amd64 => self.vmlinux(),
            Arch::Arm64 => self.arm64_image(),
        }
    }

    /// The kernel as Debian ships it (amd64: the bzImage).
    pub fn vmlinuz(&self) -> PathBuf {
        self.kernel_dir().join("vmlinuz")
    }

    /// Text file with the kernel release.
    pub fn kernel_release_file(&self) -> PathBuf {
        self.kernel_dir().join("release")
    }

    /// `DATA/images/kernel/modules/<release>`.
    pub fn modules_dir(&self, release: &str) -> PathBuf {
        self.kernel_dir().join("modules").join(release)
    }

    /// `DATA/images/initramfs`.
    pub fn initramfs_dir(&self) -> PathBuf {
        self.images_dir().join("initramfs")
    }

    /// The initramfs with lohar as `/init`.
    pub fn initramfs(&self) -> PathBuf {
        self.initramfs_dir().join("initramfs.cpio")
    }

    /// `DATA/images/<tier>`.
    pub fn tier_dir(&self, tier: Tier) -> PathBuf {
        self.images_dir().join(tier.name())
    }

    /// The tier's read-only base root filesystem.
    pub fn rootfs(&self, tier: Tier) -> PathBuf {
        self.tier_dir(tier).join("rootfs.ext4")
    }

    /// `DATA/sandboxes`: the only directory sandbox disks are created in.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }

    /// Scratch space for builds (same filesystem, so results can be renamed
    /// into place).
    pub fn build_dir(&self) -> PathBuf {
        self.images_dir().join(".build")
    }
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(DEFAULT_DATA_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_roundtrip() {
        for t in Tier::ALL {
            assert_eq!(Tier::from_name(t.name()), Some(t));
        }
        assert_eq!(Tier::from_name("foo"), None);
        assert_eq!(Tier::default(), Tier::Minimal);
    }

    #[test]
    fn paths() {
        let l = Layout::for_arch("/d", Arch::Amd64);
        assert_eq!(l.vmlinux(), Path::new("/d/images/kernel/vmlinux"));
        assert_eq!(
            l.rootfs(Tier::Tiny),
            Path::new("/d/images/tiny/rootfs.ext4")
        );
        assert_eq!(
            l.modules_dir("6.1"),
            Path::new("/d/images/kernel/modules/6.1")
        );
        assert_eq!(l.sandboxes_dir(), Path::new("/d/sandboxes"));
    }

    #[test]
    fn amd64_keeps_its_paths_and_arm64_has_its_own_tree() {
        let x = Layout::for_arch("/d", Arch::Amd64);
        assert_eq!(x.boot_kernel(), Path::new("/d/images/kernel/vmlinux"));
        assert_eq!(
            x.initramfs(),
            Path::new("/d/images/initramfs/initramfs.cpio")
        );
        let a = Layout::for_arch("/d", Arch::Arm64);
        assert_eq!(a.boot_kernel(), Path::new("/d/images/arm64/kernel/Image"));
        assert_eq!(
            a.initramfs(),
            Path::new("/d/images/arm64/initramfs/initramfs.cpio")
        );
        assert_eq!(
            a.rootfs(Tier::Tiny),
            Path::new("/d/images/arm64/tiny/rootfs.ext4")
        );
        assert_eq!(a.build_dir(), Path::new("/d/images/arm64/.build"));
        assert_eq!(a.sandboxes_dir(), Path::new("/d/sandboxes"));
    }
}
