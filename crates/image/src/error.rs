//! The pipeline-level error type. Parsers keep their own error enums
//! ([`crate::bzimage::BzImageError`], [`crate::kmod::KmodError`], …); this one
//! wraps them with the operation that failed.

use std::path::{Path, PathBuf};

use crate::apt::AptError;
use crate::bzimage::BzImageError;
use crate::cmd::CommandError;
use crate::config_drive::ConfigDriveError;
use crate::kmod::KmodError;
use crate::mirror::MirrorError;
use crate::store::StoreError;

/// Errors from building images and managing sandbox disks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// What was being done (`"read"`, `"create directory"`, …).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("External tool failed")]
    Command(#[from] CommandError),
    /// Fetching a Debian package failed.
    #[error("Fetching a Debian package failed")]
    Apt(#[from] AptError),
    /// The kernel image could not be unpacked.
    #[error("Cannot extract vmlinux from {path}")]
    Vmlinux {
        /// The `vmlinuz`.
        path: PathBuf,
        /// Why.
        #[source]
        source: BzImageError,
    },
    /// Module metadata could not be read or resolved.
    #[error("Kernel modules")]
    Kmod(#[from] KmodError),
    /// The host's apt mirror could not be determined.
    #[error("Finding the host's Debian mirror")]
    Mirror(#[from] MirrorError),
    /// A manifest could not be parsed or written.
    #[error("Bad manifest {path}")]
    Manifest {
        /// Manifest file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The kernel package does not have the expected layout.
    #[error("Kernel package {package} has no {what}")]
    KernelPackage {
        /// Package name and version.
        package: String,
        /// What is missing.
        what: &'static str,
    },
    /// The minimal tier runs Debian's maintainer scripts, which need the
    /// guest's architecture to execute on this host.
    #[error("the minimal image cannot be built for {arch} on this host: mmdebstrap runs {arch} maintainer scripts, which needs {arch} binaries to execute on this host (qemu-user registered in binfmt_misc), and bhatti does not set that up; build the tiny tier here, or build minimal on an {arch} host")]
    ForeignMinimal {
        /// The guest architecture.
        arch: crate::layout::Arch,
    },
    /// An arm64 kernel is not a valid `Image`.
    #[error("{path} is not an arm64 kernel Image: {reason}")]
    Arm64Image {
        /// The `vmlinuz`.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The release in the bzImage header disagrees with the modules tree.
    #[error("Kernel release mismatch: vmlinuz says '{header}', modules tree is '{modules}'")]
    ReleaseMismatch {
        /// From the setup header.
        header: String,
        /// From `/lib/modules/<release>`.
        modules: String,
    },
    /// A file the build needs as input is missing.
    #[error("Input {what} not found at {path}")]
    MissingInput {
        /// Which input.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// Image lookup failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Config drive encoding failed.
    #[error("Config drive")]
    ConfigDrive(#[from] ConfigDriveError),
    /// A sandbox path is not a direct child of the sandboxes root.
    #[error("Refusing to touch {path}: not a sandbox directory under {root}")]
    OutsideSandboxRoot {
        /// The path given.
        path: PathBuf,
        /// The sandboxes root.
        root: PathBuf,
    },
    /// A disk size is out of range.
    #[error("Disk size {size} bytes is outside {min}..={max}")]
    DiskSize {
        /// Requested size.
        size: u64,
        /// Minimum.
        min: u64,
        /// Maximum.
        max: u64,
    },
    /// A sandbox disk is not a regular file.
    #[error("{path} is not a disk image file")]
    NotADisk {
        /// The path.
        path: PathBuf,
    },
    /// A disk would shrink.
    #[error("{path} is {current} bytes; disks only grow, and {size} is smaller")]
    DiskShrink {
        /// The disk.
        path: PathBuf,
        /// Asked for.
        size: u64,
        /// What it is.
        current: u64,
    },
}

/// Shorthand for mapping an I/O error to [`Error::Io`].
pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
