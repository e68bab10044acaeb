//! The sandbox lifecycle as a state machine.
//!
//! ```text
//! Creating ──► Running ──► Destroying ──► Destroyed
//!    │            │            ▲  │
//!    └──► Failed ◄┘────────────┘  └──► Failed (cleanup incomplete; retry destroy)
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Disks, network and VM are being set up; the agent is not ready yet.
    Creating,
    /// The VM runs and its agent answered.
    Running,
    /// The VMM died, or a destroy could not clean up; the record says why.
    /// Only destroy is possible.
    Failed,
    /// Being torn down.
    Destroying,
    /// Gone: no process, TAP or directory remains.
    Destroyed,
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Failed => "failed",
            SandboxState::Destroying => "destroying",
            SandboxState::Destroyed => "destroyed",
        })
    }
}

/// How warm a `running` sandbox is (docs/thermal.md). Orthogonal to
/// [`SandboxState`]: a sandbox is `Running` in all three; only the VMM
/// differs.
///
/// ```text
/// Hot ──pause──► Warm ──snapshot, VMM exits──► Cold
///  ▲  ◄─resume──   │                            │
///  │               └──────────(stop)────────────┤
///  └───────────restore (new VMM, clock set)─────┘
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ThermalState {
    /// vCPUs running.
    #[default]
    Hot,
    /// vCPUs stopped, VMM alive, RAM resident.
    Warm,
    /// No VMM: device state in the sandbox's snapshot directory, RAM in its
    /// memory file.
    Cold,
}

impl fmt::Display for ThermalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThermalState::Hot => "hot",
            ThermalState::Warm => "warm",
            ThermalState::Cold => "cold",
        })
    }
}

/// Whether the thermal transition `from → to` is allowed. Exhaustive with
/// no wildcard, like [`valid_transition`]. Hot → Cold is a stop (pause and
/// snapshot in one step); Cold → Warm does not exist (a restore runs the
/// vCPUs, and the clock must be set before the sandbox counts as awake).
pub fn valid_thermal(from: ThermalState, to: ThermalState) -> bool {
    use ThermalState::*;
    match (from, to) {
        (Hot, Warm) | (Hot, Cold) => true,
        (Warm, Hot) | (Warm, Cold) => true,
        (Cold, Hot) => true,
        (Hot, Hot) | (Warm, Warm) | (Cold, Cold) | (Cold, Warm) => false,
    }
}

/// A thermal transition the table ([`valid_thermal`]) does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Invalid thermal transition {from} -> {to}")]
pub struct InvalidThermal {
    /// From.
    pub from: ThermalState,
    /// To.
    pub to: ThermalState,
}

/// [`valid_thermal`] as a `Result`.
pub fn thermal_transition(
    from: ThermalState,
    to: ThermalState,
) -> Result<ThermalState, InvalidThermal> {
    if valid_thermal(from, to) {
        Ok(to)
    } else {
        Err(InvalidThermal { from, to })
    }
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Invalid sandbox transition {from} -> {to}")]
pub struct InvalidTransition {
    /// From.
    pub from: SandboxState,
    /// To.
    pub to: SandboxState,
}

/// Whether `from → to` is allowed. Exhaustive over every pair with no
/// wildcard: a new state must be decided here for every other one.
pub fn valid_transition(from: SandboxState, to: SandboxState) -> bool {
    use SandboxState::*;
    match (from, to) {
        (Creating, Running) | (Creating, Failed) | (Creating, Destroying) => true,
        (Running, Failed) | (Running, Destroying) => true,
        (Failed, Destroying) => true,
        (Destroying, Destroyed) | (Destroying, Failed) => true,

        (Creating, Creating) | (Creating, Destroyed) => false,
        (Running, Creating) | (Running, Running) | (Running, Destroyed) => false,
        (Failed, Creating) | (Failed, Running) | (Failed, Failed) | (Failed, Destroyed) => false,
        (Destroying, Creating) | (Destroying, Running) | (Destroying, Destroying) => false,
        (Destroyed, Creating)
        | (Destroyed, Running)
        | (Destroyed, Failed)
        | (Destroyed, Destroying)
        | (Destroyed, Destroyed) => false,
    }
}

/// [`valid_transition`] as a `Result`.
pub fn transition(from: SandboxState, to: SandboxState) -> Result<SandboxState, InvalidTransition> {
    if valid_transition(from, to) {
        Ok(to)
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    const ALL: [SandboxState; 5] = [Creating, Running, Failed, Destroying, Destroyed];

    #[test]
    fn allowed_transitions_are_exactly_these() {
        let allowed = [
            (Creating, Running),
            (Creating, Failed),
            (Creating, Destroying),
            (Running, Failed),
            (Running, Destroying),
            (Failed, Destroying),
            (Destroying, Destroyed),
            (Destroying, Failed),
        ];
        for from in ALL {
            for to in ALL {
                assert_eq!(
                    valid_transition(from, to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert_eq!(
            transition(Destroyed, Running).unwrap_err().to_string(),
            "Invalid sandbox transition destroyed -> running"
        );
    }

    #[test]
    fn thermal_transitions_are_exactly_these() {
        use ThermalState::*;
        let all = [Hot, Warm, Cold];
        let allowed = [
            (Hot, Warm),
            (Hot, Cold),
            (Warm, Hot),
            (Warm, Cold),
            (Cold, Hot),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    valid_thermal(from, to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert_eq!(serde_json::to_string(&Cold).unwrap(), "\"cold\"");
        assert_eq!(
            thermal_transition(Cold, Warm).unwrap_err().to_string(),
            "Invalid thermal transition cold -> warm"
        );
        assert_eq!(thermal_transition(Warm, Cold), Ok(Cold));
    }

    #[test]
    fn destroyed_is_terminal_and_every_state_can_reach_it() {
        assert!(ALL.iter().all(|&to| !valid_transition(Destroyed, to)));
        for from in [Creating, Running, Failed] {
            assert!(valid_transition(from, Destroying));
        }
        assert_eq!(
            serde_json::to_string(&Destroying).unwrap(),
            "\"destroying\""
        );
    }
}
