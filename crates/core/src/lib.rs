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
//! * [`SandboxManager`] — the operations; one per daemon. Its modules go
//!   by concept: `registry` (the entries, whose fields are private and
//!   whose lifecycle and thermal changes go through the tables of
//!   [`SandboxState`] and [`ThermalState`]), `lifecycle` (create, boot
//!   again, destroy — serialised per sandbox, a destroy cancels a create in
//!   progress), `thermal` (pause, resume, stop, start, restore, the
//!   ticker), `shutdown` (the bounded [`SandboxManager::stop_all`]),
//!   `recovery` (adoption after a restart), `guest` (calls into a guest),
//!   `capture` (memory and disk at an instant, for checkpoints, forks and
//!   templates, and sandboxes restored from them).
//! * [`SandboxRecord`] — serde-able state of one sandbox, for the store.
//! * [`CoreError`] — typed failures; a dead VMM, a boot timeout and a
//!   refusing agent carry the guest console's last lines.
//!
//! No HTTP and no SQL here: the API crate maps requests onto these calls,
//! the store persists records. The registry is in memory.

mod boot;
mod capture;
mod config;
mod error;
mod guest;
mod id;
mod lifecycle;
mod machine;
mod manager;
mod networks;
mod orphans;
mod record;
mod recovery;
mod registry;
mod shutdown;
mod spec;
mod state;
mod thermal;

pub use capture::{Capture, CaptureMeta, Durability, CAPTURE_DISK, CAPTURE_META, CAPTURE_SNAPSHOT};
pub use config::CoreConfig;
pub use error::{CoreError, Result};
pub use guest::{
    GuestExec, GuestFile, GuestSession, GuestSessionInput, GuestSessionOutput, GuestTunnel,
    CALL_DEADLINE, EXEC_GRACE,
};
pub use id::{BadSandboxId, SandboxId, Token};
pub use machine::{
    base_cmdline, AGENT_PORT, BASE_CMDLINE, BASE_CMDLINE_ARM64, MEMORY_FILE, SERIAL_LOG,
    SNAPSHOT_DIR,
};
pub use manager::SandboxManager;
pub use networks::{GroupNetworkConfig, NetworkEvent};
pub use orphans::{vmm_processes, OrphanError, Reaped};
pub use record::{BootTimings, SandboxRecord};
pub use recovery::kill_orphan_vmm;
pub use shutdown::{Stopped, KILL_GRACE};
pub use spec::{
    Limits, SandboxSpec, SpecError, VolumeSpec, DEFAULT_CPUS, DEFAULT_IMAGE, DEFAULT_MEMORY_MB,
    MAX_DISK_MB, MIN_DISK_MB,
};
pub use state::{
    thermal_transition, transition, valid_thermal, valid_transition, InvalidThermal,
    InvalidTransition, SandboxState, ThermalState,
};
pub use thermal::{ThermalEvent, ThermalEventKind, ThermalPolicy};
