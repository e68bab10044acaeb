//! The crate's error type: one variant per failing operation, with the
//! sandbox id and what an operator needs to act (the VMM's exit, the tail
//! of the guest console).

use std::time::Duration;

use agent_client::ClientError;

use crate::id::SandboxId;
use crate::spec::SpecError;
use crate::state::{InvalidThermal, InvalidTransition, SandboxState};

/// `Result` with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The spec was rejected; nothing was created.
    #[error("Invalid sandbox spec")]
    InvalidSpec(#[from] SpecError),
    /// The image is unknown or not built (kernel, initramfs or rootfs
    /// missing); nothing was created.
    #[error(transparent)]
    Image(#[from] image::StoreError),
    /// Another live sandbox has this name.
    #[error("A sandbox named '{0}' already exists")]
    NameTaken(String),
    /// A live sandbox already has this id.
    #[error("A sandbox with id {0} already exists")]
    IdTaken(SandboxId),
    /// No such sandbox.
    #[error("No sandbox {0}")]
    NotFound(SandboxId),
    /// The sandbox is not in a state that allows the operation.
    #[error("Sandbox {id} is {state}; cannot {operation}")]
    InvalidState {
        /// The sandbox.
        id: SandboxId,
        /// Its state.
        state: SandboxState,
        /// What was attempted.
        operation: &'static str,
    },
    /// A lifecycle transition the state machine forbids (a bug if seen).
    #[error("Sandbox {id}")]
    Transition {
        /// The sandbox.
        id: SandboxId,
        /// The transition.
        #[source]
        source: InvalidTransition,
    },
    /// A thermal transition the table forbids (a bug if seen).
    #[error("Sandbox {id}")]
    ThermalTransition {
        /// The sandbox.
        id: SandboxId,
        /// The transition.
        #[source]
        source: InvalidThermal,
    },
    /// A destroy (or daemon shutdown) arrived while the sandbox was being
    /// created or booted: the create gave up and undid what it had done.
    #[error("Creating sandbox {id} was cancelled: it is being destroyed")]
    Cancelled {
        /// The sandbox.
        id: SandboxId,
    },
    /// An operation of core's own (a thermal transition started by the
    /// ticker, a snapshot at shutdown) did not finish within its bound.
    #[error("Sandbox {id}: {operation} did not finish within {after:?}")]
    TimedOut {
        /// The sandbox.
        id: SandboxId,
        /// What was cut short (`go warm`, `go cold`, `snapshot at shutdown`).
        operation: &'static str,
        /// The bound.
        after: Duration,
    },
    /// Choosing the engine failed.
    #[error("No usable VM engine")]
    Engine(#[source] vmm::VmmError),
    /// Setting up the host network failed.
    #[error("Setting up the sandbox network")]
    NetworkSetup(#[source] net::NetError),
    /// A capture could not be made, or is not one this daemon can use.
    #[error("Capture {dir}: {reason}")]
    Capture {
        /// Its directory.
        dir: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Random bytes (ids, tokens) could not be read.
    #[error("Reading random bytes")]
    Random(#[source] std::io::Error),
    /// Creating the sandbox's disk or config drive failed.
    #[error("Preparing the disks of sandbox {id}")]
    Disk {
        /// The sandbox.
        id: SandboxId,
        /// Underlying error (boxed: it is large).
        #[source]
        source: Box<image::Error>,
    },
    /// Attaching the sandbox to the network failed.
    #[error("Attaching sandbox {id} to the network")]
    Network {
        /// The sandbox.
        id: SandboxId,
        /// Underlying error.
        #[source]
        source: net::NetError,
    },
    /// Removing a sandbox's TAP (and its group's bridge, with its last
    /// sandbox) failed.
    #[error("Detaching TAP {tap} from the network")]
    Detach {
        /// The TAP.
        tap: String,
        /// Underlying error (boxed: it is large).
        #[source]
        source: Box<net::NetError>,
    },
    /// The VMM refused the spec or could not start.
    #[error("Starting the VM of sandbox {id}")]
    Vmm {
        /// The sandbox.
        id: SandboxId,
        /// Underlying error.
        #[source]
        source: vmm::VmmError,
    },
    /// The VMM process is gone (crashed, killed, guest powered off).
    #[error("The VM of sandbox {id} is dead: {reason}{}", console(serial_tail))]
    VmmExited {
        /// The sandbox.
        id: SandboxId,
        /// How the VMM ended (`killed by signal 9`, its stderr).
        reason: String,
        /// The end of the guest console.
        serial_tail: String,
    },
    /// The agent did not answer before the boot deadline.
    #[error(
        "The agent of sandbox {id} did not answer within {after:?} (last attempt: {last_error}){}",
        console(serial_tail)
    )]
    BootTimeout {
        /// The sandbox.
        id: SandboxId,
        /// The deadline.
        after: Duration,
        /// Why the last connection attempt failed.
        last_error: String,
        /// The end of the guest console.
        serial_tail: String,
    },
    /// The agent answered but refused us (bad token, protocol mismatch).
    #[error("The agent of sandbox {id} refused the connection")]
    AgentUnreachable {
        /// The sandbox.
        id: SandboxId,
        /// What it said.
        #[source]
        source: ClientError,
    },
    /// A call to the agent failed (the agent's own error, or transport).
    #[error("Agent call on sandbox {id}")]
    Agent {
        /// The sandbox.
        id: SandboxId,
        /// Underlying error.
        #[source]
        source: ClientError,
    },
    /// A destroy step failed; the sandbox is `failed` and destroy can be
    /// retried.
    #[error("Destroying sandbox {id}: cannot {step}")]
    Destroy {
        /// The sandbox.
        id: SandboxId,
        /// The step (`stop the VMM`, `remove the TAP`, `remove the directory`).
        step: &'static str,
        /// Underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Pausing, resuming or snapshotting the VM failed; the sandbox keeps
    /// its VMM (nothing was killed).
    #[error("Cannot {operation} sandbox {id}{}", stderr(stderr_tail))]
    Thermal {
        /// The sandbox.
        id: SandboxId,
        /// `pause`, `resume`, `snapshot`.
        operation: &'static str,
        /// Underlying error.
        #[source]
        source: Box<vmm::VmmError>,
        /// What the VMM wrote to stderr lately.
        stderr_tail: String,
    },
    /// The snapshot just written does not check out; the VM was left running.
    #[error("The snapshot of sandbox {id} is unusable ({reason}); the VM keeps running")]
    SnapshotVerify {
        /// The sandbox.
        id: SandboxId,
        /// What is wrong with it.
        reason: String,
    },
    /// A restore from cold failed; the circuit breaker is now open.
    #[error(
        "Restoring sandbox {id} from its snapshot failed: {reason}{}",
        stderr(stderr_tail)
    )]
    Restore {
        /// The sandbox.
        id: SandboxId,
        /// The error chain.
        reason: String,
        /// What the VMM wrote to stderr.
        stderr_tail: String,
    },
    /// A restore failed after the restored guest had begun to run, so its
    /// snapshot is spent (the engine consumed it): there is nothing to try
    /// again, the breaker stays closed, and the sandbox can only boot again
    /// from its disk.
    #[error(
        "Restoring sandbox {id} failed after its guest ran, so its snapshot is spent: {reason}{}",
        stderr(stderr_tail)
    )]
    SnapshotSpent {
        /// The sandbox.
        id: SandboxId,
        /// The error chain.
        reason: String,
        /// What the VMM wrote to stderr.
        stderr_tail: String,
    },
    /// An earlier restore failed and the breaker is open: no automatic wake
    /// until a forced start.
    #[error("Sandbox {id} is cold and its last restore failed ({reason}); start it with force to try again")]
    BreakerOpen {
        /// The sandbox.
        id: SandboxId,
        /// Why the last restore failed.
        reason: String,
    },
    /// A blocking task died.
    #[error("A blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

fn stderr(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- VMM stderr (last lines) ---\n{}", tail.trim_end())
    }
}

fn console(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- guest console (last lines) ---\n{}", tail.trim_end())
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl CoreError {
    /// The sandbox is gone or going; retrying the same call cannot help.
    pub fn is_dead(&self) -> bool {
        matches!(self, CoreError::VmmExited { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains() {
        let e = CoreError::Disk {
            id: "sb-000000000001".parse().unwrap(),
            source: Box::new(image::Error::DiskSize {
                size: 1,
                min: 2,
                max: 3,
            }),
        };
        assert_eq!(
            error_chain(&e),
            "Preparing the disks of sandbox sb-000000000001: Disk size 1 bytes is outside 2..=3"
        );
    }
}
