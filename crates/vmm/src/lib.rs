//! The engine layer of bhatti: everything that starts, pauses, snapshots and
//! stops one virtual machine, and nothing above that.
//!
//! * [`Vmm`] — the engine-neutral trait the orchestrator (`core`) programs
//!   against; one value is one VM, i.e. one VMM process at a time.
//! * [`VmSpec`] — what the VM looks like (vCPUs, memory, kernel, drives, NIC,
//!   serial log, working directory, memory file), validated before anything
//!   is spawned.
//! * Backends, one module each behind a cargo feature: [`qemu`] (QMP over a
//!   Unix socket; any Linux host, our CI) and [`firecracker`] (HTTP API over a
//!   Unix socket; production).
//! * [`select`] — picks an engine for this host from a preference and a
//!   [`select::HostProbe`], always with a human-readable reason.
//! * [`Engine`] — what makes VMs: [`select::EngineChoice`] is one (through
//!   [`new_vmm`]), the test engine `fake::FakeEngine` another, so `core`
//!   holds an `Arc<dyn Engine>` and never names a concrete engine.
//! * `fake` (cargo feature `fake`, for tests) — a `Vmm` whose "guest" is a
//!   real `lohar serve` on the host: the orchestrator's lifecycle, thermal
//!   and recovery paths run in milliseconds, without root or a hypervisor.
//!
//! The process plumbing every backend shares (supervising the VMM process,
//! its state, start-up, the shutdown escalation, the serial log) lives in
//! one private module; a backend says only what is engine-specific.
//!
//! A capability an engine lacks is a typed [`VmmError::Unsupported`], never a
//! silent no-op.

mod error;
mod process;
mod spec;
mod vmm;

pub mod confine;
pub mod select;
pub mod snapshot;
pub mod tsc;

#[cfg(feature = "fake")]
pub mod fake;
#[cfg(feature = "firecracker")]
pub mod firecracker;
#[cfg(feature = "qemu")]
pub mod qemu;

pub use confine::{ConfineConfig, ConfineState};
pub use error::{Result, VmmError};
pub use process::{ExitStatusKind, VmmExit};
pub use select::{select_engine, Arch, EngineChoice, EngineKind, EnginePreference};
pub use snapshot::{SnapshotInfo, SnapshotKind};
pub use spec::{DriveSpec, MacAddr, MemoryBacking, NetSpec, VmSpec, VOLUME_DRIVE_PREFIX};
pub use vmm::{Capabilities, Engine, ShutdownPath, ShutdownReport, VmState, Vmm};

/// Builds the VM object for `spec` on the engine chosen by
/// [`select_engine`]. Validates the spec (and the engine's own limits) but
/// starts nothing: call [`Vmm::boot`] or [`Vmm::restore`] next.
///
/// [`EngineKind::Fake`] is refused here: a fake VM needs its
/// `fake::FakeEngine` (fault plan, counters), which is an [`Engine`] of its
/// own.
pub fn new_vmm(choice: &EngineChoice, spec: VmSpec) -> Result<Box<dyn Vmm>> {
    new_vmm_confined(choice, None, spec)
}

/// [`new_vmm`] with the VMM confined (QEMU, Firecracker; `None`:
/// unconfined).
pub fn new_vmm_confined(
    choice: &EngineChoice,
    confinement: Option<std::sync::Arc<confine::Confinement>>,
    spec: VmSpec,
) -> Result<Box<dyn Vmm>> {
    match choice.kind {
        #[cfg(feature = "qemu")]
        EngineKind::QemuKvm | EngineKind::QemuTcg => {
            let accel = if choice.kind == EngineKind::QemuKvm {
                qemu::Accel::Kvm
            } else {
                qemu::Accel::Tcg
            };
            let config = qemu::QemuConfig::for_arch(choice.binary.clone(), accel, choice.arch)
                .confined(confinement);
            Ok(Box::new(qemu::QemuVmm::new(config, spec)?))
        }
        #[cfg(feature = "firecracker")]
        EngineKind::Firecracker if choice.arch != select::Arch::host_or_default() => {
            Err(VmmError::Unsupported {
                engine: EngineKind::Firecracker,
                operation: "guests of another architecture than the host's",
            })
        }
        #[cfg(feature = "firecracker")]
        EngineKind::Firecracker => {
            let config =
                firecracker::FirecrackerConfig::new(choice.binary.clone()).confined(confinement);
            Ok(Box::new(firecracker::FirecrackerVmm::new(config, spec)?))
        }
        EngineKind::Fake => Err(VmmError::Unsupported {
            engine: EngineKind::Fake,
            operation: "a VM from an engine choice (build it with fake::FakeEngine)",
        }),
        #[allow(unreachable_patterns)]
        other => Err(VmmError::EngineNotBuilt { engine: other }),
    }
}

/// An engine choice with its VMMs confined (or the reason they are not),
/// as the daemon runs it. Its [`Engine::choice`] reason ends with the
/// confinement sentence, so the engine line says whether it is on.
#[derive(Debug)]
pub struct ConfinedEngine {
    choice: EngineChoice,
    state: ConfineState,
}

impl ConfinedEngine {
    /// `choice` under `state`.
    pub fn new(mut choice: EngineChoice, state: ConfineState) -> Self {
        choice.reason = format!("{}; {state}", choice.reason);
        ConfinedEngine { choice, state }
    }

    /// Whether VMMs are confined.
    pub fn state(&self) -> &ConfineState {
        &self.state
    }
}

impl Engine for ConfinedEngine {
    fn choice(&self) -> &EngineChoice {
        &self.choice
    }

    fn new_vmm(&self, spec: VmSpec) -> Result<Box<dyn Vmm>> {
        new_vmm_confined(&self.choice, self.state.confinement().cloned(), spec)
    }
}
