//! The crate's error type.

use std::path::PathBuf;

use crate::pool::PoolError;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An interface name (or TAP prefix) is not acceptable.
    #[error("Invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The network configuration is inconsistent.
    #[error("Invalid network config: {0}")]
    InvalidConfig(String),
    /// The `ip` binary could not be run.
    #[error("Cannot run {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A privileged operation failed; `stderr` is the tool's own message.
    #[error("Cannot {op}: `{command}` {status}: {stderr}")]
    Command {
        /// What was being done (`create TAP bt0ac80002`).
        op: String,
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A per-link kernel setting could not be written.
    #[error("Cannot set {path}")]
    Sysctl {
        /// The `/proc/sys` file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tool's output could not be understood.
    #[error("Cannot parse the output of `{command}`")]
    Parse {
        /// The command line.
        command: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A link exists under the name we need, but is something else.
    #[error("Link {name} exists but is a {found}, not a {wanted}")]
    WrongKind {
        /// The link.
        name: String,
        /// What it is (`tun`, `veth`, `device`).
        found: String,
        /// What we need.
        wanted: &'static str,
    },
    /// Address bookkeeping refused.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// `Result` with [`NetError`].
pub type Result<T, E = NetError> = std::result::Result<T, E>;
