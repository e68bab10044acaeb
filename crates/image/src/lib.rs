//! The bhatti guest image pipeline.
//!
//! Owns everything a sandbox VM boots from, and the per-sandbox disks:
//!
//! * the **kernel**: Debian's `linux-image-cloud-amd64` (or `-arm64`, see
//!   [`Arch`]) via apt, its ELF
//!   `vmlinux` extracted from the LZ4-compressed bzImage ([`bzimage`],
//!   [`kernel`]) and its modules tree ([`kmod`]);
//! * the **initramfs**: lohar as `/init` plus the modules it must load, in a
//!   newc cpio written here ([`cpio`], [`initramfs`]);
//! * the **rootfs tiers** `tiny` (busybox) and `minimal` (Debian bookworm via
//!   mmdebstrap), as read-only ext4 images ([`rootfs`], [`mkfs`]);
//! * the **cache** under the data directory with a manifest per artifact
//!   ([`layout`], [`manifest`], [`builder`], [`store`]);
//! * **per-sandbox disks** and the **config drive** ([`disk`],
//!   [`config_drive`]).
//!
//! The file layout lohar relies on is documented in `docs/guest-image.md`.
//! All functions block; the daemon calls them from `spawn_blocking`.

pub mod apt;
pub mod builder;
pub mod bzimage;
mod cmd;
pub mod config_drive;
pub mod cpio;
pub mod disk;
pub mod elf;
mod error;
mod fsutil;
pub mod initramfs;
pub mod kernel;
pub mod kmod;
pub mod layout;
pub mod manifest;
pub mod mirror;
pub mod mkfs;
pub mod oci;
pub mod rootfs;
pub mod store;

pub use builder::{
    BuildOptions, BuildReport, ImageBuilder, ImageProgress, NoProgress, Outcome, ProgressEvent,
    Selection, Step, StepReport,
};
pub use cmd::CommandError;
pub use config_drive::{
    write_config_drive, ConfigDrive, ConfigDriveFormat, ConfigFile, InitCommand,
};
pub use disk::{
    clone_volume, create_sandbox_disk, create_volume, destroy_sandbox_dir, grow_sandbox_disk,
    grow_volume, private_dir, remove_volume,
};
pub use error::{Error, Result};
pub use fsutil::{tree_usage, TreeUsage};
pub use layout::{Arch, Layout, Tier};
pub use store::{ImageStore, ResolvedImage, StoreError};
