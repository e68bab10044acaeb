//! Why the guest could not boot. Every variant names the failing operation
//! and what it acted on; [`BootError::chain`] renders the whole cause chain
//! for the console line `lohar: boot failed: …`.

use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use proto::config_drive::ConfigDriveError;

use super::cmdline::CmdlineError;

/// A boot step that failed; fatal for PID 1 (it powers the VM off).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A filesystem could not be mounted.
    #[error("Cannot mount {fstype} {source_dev} on {target}")]
    Mount {
        fstype: String,
        source_dev: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    /// A mount could not be moved into the new root (or the new root onto `/`).
    #[error("Cannot move mount {from} to {to}")]
    MoveMount {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Errno,
    },
    /// `chroot`/`chdir` into the new root failed.
    #[error("Cannot {op} into the new root")]
    SwitchRoot {
        op: &'static str,
        #[source]
        source: Errno,
    },
    /// A file operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs was built for another kernel.
    #[error("The initramfs is for kernel {expected}, but {running} is running")]
    KernelMismatch { expected: String, running: String },
    /// A line of `modules.load` is not a module path under the modules tree.
    #[error("Bad modules.load line {line}: {entry:?}")]
    BadModuleList { line: usize, entry: String },
    /// `finit_module` failed (other than `EEXIST`).
    #[error("Cannot load kernel module {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// Something the boot waits for did not appear in time.
    #[error("Timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// No attached disk has the content a role needs.
    #[error("No {role} among the disks ({found})")]
    MissingDisk { role: &'static str, found: String },
    /// Two disks claim one role.
    #[error("Two disks look like the {role}: {first} and {second}")]
    DuplicateDisk {
        role: &'static str,
        first: PathBuf,
        second: PathBuf,
    },
    /// The config drive is an ext4 image: lohar reads only the raw format.
    #[error(
        "{path} is an ext4 config drive; lohar reads only the raw format (ConfigDriveFormat::Raw)"
    )]
    Ext4ConfigDrive { path: PathBuf },
    /// The kernel command line lacks or garbles the network settings.
    #[error("Kernel command line")]
    Cmdline(#[from] CmdlineError),
    /// The config drive does not decode or validate.
    #[error("Bad config drive {path}")]
    ConfigDrive {
        path: PathBuf,
        #[source]
        source: ConfigDriveError,
    },
    /// A network interface could not be configured.
    #[error("Cannot {op} on {iface}")]
    Net {
        op: &'static str,
        iface: String,
        #[source]
        source: std::io::Error,
    },
    /// The hostname could not be set.
    #[error("Cannot set the hostname to {hostname}")]
    Hostname {
        hostname: String,
        #[source]
        source: Errno,
    },
    /// The agent process could not be started.
    #[error("Cannot fork the agent")]
    Fork(#[source] Errno),
}

impl BootError {
    /// `self: cause: cause …`, for one console line.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> BootError {
        let path = path.into();
        move |source| BootError::Io { op, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_every_cause() {
        let e = BootError::ConfigDrive {
            path: "/dev/vdc".into(),
            source: ConfigDriveError::UnsupportedVersion(7),
        };
        assert_eq!(
            e.chain(),
            "Bad config drive /dev/vdc: Unsupported config drive format version 7"
        );
        let e = BootError::Mount {
            fstype: "ext4".into(),
            source_dev: "/dev/vda".into(),
            target: "/run/bhatti/base".into(),
            source: Errno::EINVAL,
        };
        assert!(e
            .chain()
            .starts_with("Cannot mount ext4 /dev/vda on /run/bhatti/base: EINVAL"));
    }
}
