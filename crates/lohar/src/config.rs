//! The agent's configuration: from the config drive in a VM, from
//! `--config FILE` (JSON) in test mode.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Who commands run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RunAs {
    /// uid 1000 when the agent is root and that user exists, else the agent's own user.
    #[default]
    Auto,
    /// The agent's own user.
    Agent,
    /// This uid (and its gid from `/etc/passwd`, or `gid`).
    Uid { uid: u32, gid: Option<u32> },
}

/// Settings the agent runs with. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Env for every command, on top of the defaults, under the request's own env.
    pub env: BTreeMap<String, String>,
    pub run_as: RunAs,
    /// Working directory when a request gives none; the user's home when absent.
    pub default_cwd: Option<PathBuf>,
    /// A detached PTY session with no I/O for this long is killed.
    pub session_idle_timeout_secs: u64,
    /// Test mode only: a command started with the agent, detached in its
    /// own session, its output in `init_log` (in a VM, PID 1 starts the
    /// config drive's `init` itself, once per boot).
    pub init_command: Option<Vec<String>>,
    /// Working directory of `init_command` (else the default one).
    pub init_cwd: Option<PathBuf>,
    /// Where `init_command`'s output goes.
    pub init_log: PathBuf,
    /// Flush guest filesystems before reporting a command's exit, so the
    /// host can snapshot right after.
    pub sync_before_exit: bool,
    /// Where detached commands write their output when the request names no file.
    pub detach_log_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            env: BTreeMap::new(),
            run_as: RunAs::Auto,
            default_cwd: None,
            session_idle_timeout_secs: 24 * 3600,
            init_command: None,
            init_cwd: None,
            init_log: PathBuf::from(crate::boot_command::LOG_PATH),
            sync_before_exit: true,
            detach_log_dir: PathBuf::from("/tmp"),
        }
    }
}

impl AgentConfig {
    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config_and_rejects_unknown_fields() {
        let c: AgentConfig = serde_json::from_str(
            r#"{"env":{"A":"1"},"run_as":{"uid":{"uid":65534,"gid":null}},
                "session_idle_timeout_secs":2,"init_command":["sh"],"sync_before_exit":false}"#,
        )
        .unwrap();
        assert_eq!(
            c.run_as,
            RunAs::Uid {
                uid: 65534,
                gid: None
            }
        );
        assert_eq!(c.session_idle_timeout(), Duration::from_secs(2));
        assert!(serde_json::from_str::<AgentConfig>(r#"{"bogus":1}"#).is_err());
        let d: AgentConfig = serde_json::from_str("{}").unwrap();
        assert!(d.sync_before_exit);
    }
}
