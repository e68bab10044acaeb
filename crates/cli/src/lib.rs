//! The bhatti command-line client: the client commands of the `bhatti`
//! binary (`create`, `exec`, `shell`, `file`, …), the HTTP client of the
//! API in `docs/api.md`, and the terminal side of the shell WebSocket.
//!
//! The binary flattens [`GlobalArgs`] and [`Command`] into its own clap
//! parser and hands them to [`run`]. Nothing here is Linux-specific: the
//! client builds on macOS too. The reference is `docs/cli.md`.

mod args;
mod client;
mod commands;
mod config;
mod error;
mod exec;
mod forward;
mod mcp;
mod output;
mod shell;
mod terminal;

use std::process::ExitCode;

pub use args::{
    Command, CreateArgs, ExecArgs, FileCommand, GlobalArgs, ImageClientCommand, ImageImportArgs,
    ImagePullArgs, SecretCommand, ShellArgs, WarmArgs,
};
pub use client::Client;
pub use config::{Layer, Settings, DEFAULT_URL};
pub use error::{CliError, EXIT_FAILURE, EXIT_TIMED_OUT, EXIT_USAGE};

/// Runs a client command and turns its outcome into the process exit code,
/// printing `bhatti: <message>` on failure. `app` builds the binary's full
/// clap command, for `completion`.
pub fn run(global: GlobalArgs, command: Command, app: fn() -> clap::Command) -> ExitCode {
    match commands::run(global, command, app) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if !e.is_silent() {
                eprintln!("bhatti: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
