//! [`SandboxRecord`]: everything known about one sandbox, in serde-able
//! form so the store can persist it (the daemon issue) and recovery can
//! rebuild the registry from it.

use std::path::PathBuf;
use std::time::Duration;

use net::Attachment;
use serde::{Deserialize, Serialize};
use vmm::EngineKind;

use crate::id::{SandboxId, Token};
use crate::spec::SandboxSpec;
use crate::state::{SandboxState, ThermalState};

/// How long each phase of a create took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimings {
    /// Sandbox directory, sparse disk, config drive, TAP and address.
    pub prepare: Duration,
    /// Spawning the VMM until its vCPUs run (QMP connected, `cont` done).
    pub vmm_start: Duration,
    /// From running vCPUs until the agent authenticated a connection:
    /// kernel boot, lohar as PID 1, root assembly, network up.
    pub agent_ready: Duration,
}

impl BootTimings {
    /// The whole create.
    pub fn total(&self) -> Duration {
        self.prepare + self.vmm_start + self.agent_ready
    }
}

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    /// Identifier.
    pub id: SandboxId,
    /// What was asked for.
    pub spec: SandboxSpec,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Why it is `failed`, when it is.
    pub failure: Option<String>,
    /// The engine running it.
    pub engine: EngineKind,
    /// The guest kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// `DATA/sandboxes/<id>`.
    pub dir: PathBuf,
    /// Its place on the network, once attached.
    pub network: Option<Attachment>,
    /// The agent secret.
    pub token: Token,
    /// The VMM's pid while it runs.
    pub vmm_pid: Option<u32>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Phases of the create, once it finished.
    pub boot: Option<BootTimings>,
    /// Hot, warm or cold (meaningful while `running`).
    #[serde(default)]
    pub thermal: ThermalState,
    /// When `thermal` last changed, milliseconds since the Unix epoch.
    #[serde(default)]
    pub thermal_since_unix_ms: u64,
    /// Never paused or snapshotted by the thermal manager.
    #[serde(default)]
    pub keep_hot: bool,
    /// Why the last restore failed: while set, the sandbox is not woken
    /// automatically (the circuit breaker is open) until a forced start.
    #[serde(default)]
    pub breaker: Option<String>,
    /// Restores from cold this daemon process did (coalescing is tested
    /// against it).
    #[serde(default)]
    pub cold_wakes: u64,
}

impl SandboxRecord {
    /// The guest console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join(crate::machine::SERIAL_LOG)
    }
}
