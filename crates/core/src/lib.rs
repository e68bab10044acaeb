//! The bhatti orchestrator core: the sandbox lifecycle.
//!
//! Owns what happens between "create a sandbox from this spec" and "it is
//! gone": validation before anything is touched ([`SandboxSpec`],
//! [`Limits`]), the sandbox directory with its sparse disk and config drive
//! (`image`), the TAP and address (`net`), the VM on whichever engine
//! [`vmm::select_engine`] picked (only `trait Vmm` is named here), waiting
//! for the guest agent, passing exec / files / sessions through to it
//! (`agent-client`) while watching the VMM, and destroy that leaves no
//! process, TAP or file behind.
//!
//! * [`SandboxManager`] — the operations; one per daemon.
//! * [`SandboxRecord`] — serde-able state of one sandbox, for the store.
//! * [`SandboxState`] — the lifecycle, with an exhaustive transition table.
//! * [`CoreError`] — typed failures; a dead VMM, a boot timeout and a
//!   refusing agent carry the guest console's last lines.
//!
//! No HTTP and no SQL here: the API crate maps requests onto these calls,
//! the store persists records. The registry is in memory for now.

mod boot;
mod config;
mod error;
mod guest;
mod id;
mod manager;
mod networks;
mod orphans;
mod record;
mod spec;
mod state;
mod thermal;

pub use config::CoreConfig;
pub use error::{CoreError, Result};
pub use id::{BadSandboxId, SandboxId, Token};
pub use manager::{
    SandboxManager, AGENT_PORT, BASE_CMDLINE, MEMORY_FILE, SERIAL_LOG, SNAPSHOT_DIR,
};
pub use networks::{GroupNetworkConfig, NetworkEvent};
pub use orphans::{vmm_processes, OrphanError, Reaped};
pub use record::{BootTimings, SandboxRecord};
pub use spec::{Limits, SandboxSpec, SpecError, DEFAULT_CPUS, DEFAULT_IMAGE, DEFAULT_MEMORY_MB};
pub use state::{
    transition, valid_thermal, valid_transition, InvalidTransition, SandboxState, ThermalState,
};
pub use thermal::{ThermalEvent, ThermalEventKind, ThermalPolicy};
