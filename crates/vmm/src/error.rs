//! The one error type of this crate. Variants are named after the operation
//! that failed and carry its context; sources are chained, not repeated.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::ExitStatusKind;
use crate::select::EngineKind;
use crate::vmm::VmState;

/// `Result` with [`VmmError`].
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// Why a VMM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The spec was rejected before anything was started.
    #[error("invalid VM spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field (`vcpus`, `kernel`, `drives[1].path`, …).
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Preparing a host-side file or directory failed.
    #[error("preparing {path}")]
    Prepare {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Confining the VMM (its user, cgroup, jail or a resource the daemon
    /// opens for it) failed.
    #[error("VMM confinement: {what}")]
    Confine {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The VMM binary could not be started.
    #[error("spawning {binary}")]
    Spawn {
        /// The binary we tried to run.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The VMM process exited (or was killed) while we needed it.
    #[error("VMM exited: {status}{}", fmt_tail(stderr_tail))]
    Exited {
        /// How it ended.
        status: ExitStatusKind,
        /// The last lines the VMM wrote to stderr (and its log).
        stderr_tail: String,
    },

    /// A QMP command failed (QEMU backend).
    #[cfg(feature = "qemu")]
    #[error("QMP {command}")]
    Qmp {
        /// The QMP command (`stop`, `migrate`, …), or `connect`.
        command: String,
        /// What went wrong.
        #[source]
        source: crate::qemu::qmp::QmpError,
    },

    /// A Firecracker API call failed.
    #[cfg(feature = "firecracker")]
    #[error("Firecracker API {method} {path}")]
    FirecrackerApi {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// What went wrong (a `fault_message` for API errors).
        #[source]
        source: crate::firecracker::api::ApiError,
    },

    /// A migration / snapshot job reported failure.
    #[error("{operation} failed: {message}")]
    Migration {
        /// `snapshot` or `restore`.
        operation: &'static str,
        /// The engine's description.
        message: String,
    },

    /// Reading or writing snapshot files failed.
    #[error("snapshot file {path}")]
    SnapshotIo {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The snapshot directory does not match what we are asked to restore.
    #[error("snapshot at {dir} cannot be restored: {reason}")]
    SnapshotMismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// Writing the guest's console input failed.
    #[error("writing to the guest's console: {source}")]
    Console {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine cannot do this at all.
    #[error("{operation} is not supported by the {engine} engine")]
    Unsupported {
        /// The engine.
        engine: EngineKind,
        /// The operation (`diff snapshot`, …).
        operation: &'static str,
    },

    /// The operation is not valid in the VM's current state.
    #[error("cannot {operation} a VM that is {state}")]
    InvalidState {
        /// The operation attempted.
        operation: &'static str,
        /// The state the VM was in.
        state: VmState,
    },

    /// A condition did not come true in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },

    /// No engine satisfies the preference on this host.
    #[error("engine {preference} unavailable: {reason}")]
    EngineUnavailable {
        /// What was asked for.
        preference: crate::select::EnginePreference,
        /// Why it cannot be had here.
        reason: String,
    },

    /// The fake engine failed: an injected fault, or no orphan to take over.
    #[cfg(feature = "fake")]
    #[error("fake engine: {operation} failed: {reason}")]
    Fake {
        /// `boot`, `snapshot`, `restore`, `take over`.
        operation: &'static str,
        /// Why (`injected fault` for a test's fault).
        reason: String,
    },

    /// The engine was chosen but this build leaves its backend out.
    #[error("the {engine} backend is not compiled into this build")]
    EngineNotBuilt {
        /// The engine.
        engine: EngineKind,
    },
}

fn fmt_tail(tail: &str) -> String {
    let tail = tail.trim();
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {tail}")
    }
}

impl VmmError {
    /// True when the error means the VMM process is gone.
    pub fn is_exited(&self) -> bool {
        matches!(self, VmmError::Exited { .. })
    }
}
