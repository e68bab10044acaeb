//! Looking up built images: [`ImageStore::resolve`] turns an image name into
//! the paths a VMM needs, or says precisely what is missing.

use std::path::PathBuf;

use crate::layout::{Arch, Layout, Tier, MANIFEST};
use crate::oci::spec::RunConfig;
use crate::oci::OciImages;

/// Why an image cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such image name.
    #[error("unknown image '{name}' (images here: {known})")]
    UnknownImage {
        /// The name asked for.
        name: String,
        /// The images that exist: the built tiers and the OCI images
        /// (`none` when there are none).
        known: String,
    },
    /// The image (or an artifact it needs) has not been built.
    #[error("image '{name}' is not built; run `bhatti image build --tier {tier}{arch_flag}` ({missing} is missing)")]
    NotBuilt {
        /// The image name.
        name: String,
        /// The tier whose build makes what is missing (an OCI image needs
        /// the kernel and initramfs any tier's build makes).
        tier: String,
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
    /// The image's name.
    pub name: String,
    /// The tier, for a built-in tier; `None` for an OCI image.
    pub tier: Option<Tier>,
    /// An OCI image's run configuration (Env, WorkingDir, User, …).
    pub run_config: Option<RunConfig>,
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

    /// The names of the images that can be resolved here: the built tiers,
    /// then the OCI images.
    pub fn names(&self) -> Vec<String> {
        let l = &self.layout;
        let mut names: Vec<String> = Tier::ALL
            .into_iter()
            .filter(|t| l.rootfs(*t).is_file() && l.tier_dir(*t).join(MANIFEST).is_file())
            .map(|t| t.name().to_owned())
            .collect();
        names.extend(self.oci().list().into_iter().map(|i| i.name));
        names
    }

    /// The OCI images of this layout.
    pub fn oci(&self) -> OciImages {
        OciImages::new(self.layout.clone())
    }

    /// Resolves an image name (a tier, `tiny` or `minimal`, or an OCI
    /// image's name) to its artifacts. Every artifact and its manifest must
    /// exist; an OCI image shares the tiers' kernel and initramfs.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, StoreError> {
        let l = &self.layout;
        let tier = Tier::from_name(name);
        let oci = match tier {
            Some(_) => None,
            None => Some(self.oci().get(name).ok_or_else(|| {
                let known = self.names();
                StoreError::UnknownImage {
                    name: name.to_owned(),
                    known: if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    },
                }
            })?),
        };
        let (rootfs, rootfs_manifest) = match tier {
            Some(t) => (l.rootfs(t), l.tier_dir(t).join(MANIFEST)),
            None => (
                self.oci().rootfs(name),
                self.oci().image_dir(name).join(MANIFEST),
            ),
        };
        let required = [
            l.boot_kernel(),
            l.vmlinuz(),
            l.kernel_release_file(),
            l.kernel_dir().join(MANIFEST),
            l.initramfs(),
            l.initramfs_dir().join(MANIFEST),
            rootfs.clone(),
            rootfs_manifest,
        ];
        if let Some(missing) = required.iter().find(|p| !p.is_file()) {
            return Err(StoreError::NotBuilt {
                name: name.to_owned(),
                tier: tier.map_or("tiny", |t| t.name()).to_owned(),
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
            name: name.to_owned(),
            tier,
            run_config: oci.map(|o| o.config),
            arch: l.arch(),
            vmlinux: l.boot_kernel(),
            vmlinuz: l.vmlinuz(),
            kernel_release,
            initramfs: l.initramfs(),
            rootfs,
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
        assert_eq!(
            err,
            StoreError::UnknownImage {
                name: "foo".into(),
                known: "none".into()
            }
        );
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

    #[test]
    fn oci_images_resolve_and_unknown_lists_what_exists() {
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
        std::fs::write(l.kernel_release_file(), "6.1\n").unwrap();
        let store = ImageStore::new(l.clone());
        let oci = store.oci();
        let d = oci.image_dir("app");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rootfs.ext4"), b"x").unwrap();
        std::fs::write(d.join(MANIFEST), "{}").unwrap();
        let img = crate::oci::OciImage {
            name: "app".into(),
            source: "r/app:1".into(),
            digest: "sha256:00".into(),
            architecture: "amd64".into(),
            config: RunConfig {
                working_dir: Some("/srv".into()),
                ..Default::default()
            },
            layers: vec![],
            config_digest: None,
            rootfs_bytes: 1,
            created_unix: 0,
        };
        std::fs::write(
            d.join(crate::oci::images::IMAGE_JSON),
            serde_json::to_vec(&img).unwrap(),
        )
        .unwrap();
        let r = store.resolve("app").unwrap();
        assert_eq!((r.name.as_str(), r.tier), ("app", None));
        assert_eq!(r.rootfs, d.join("rootfs.ext4"));
        assert_eq!(r.run_config.unwrap().working_dir.as_deref(), Some("/srv"));
        assert_eq!(store.resolve("tiny").unwrap().tier, Some(Tier::Tiny));
        let err = store.resolve("nope").unwrap_err().to_string();
        assert_eq!(err, "unknown image 'nope' (images here: tiny, app)");
        // Without a kernel an OCI image says what to build.
        std::fs::remove_file(l.vmlinux()).unwrap();
        let err = store.resolve("app").unwrap_err().to_string();
        assert!(
            err.starts_with("image 'app' is not built; run `bhatti image build --tier tiny`"),
            "{err}"
        );
    }
}
