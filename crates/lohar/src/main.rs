//! `lohar`, the bhatti guest agent.
//!
//! In a sandbox VM it is PID 1: it brings the guest up and then serves the
//! lohar protocol (exec, PTY sessions, files, tunnels, activity) to the host.
//! `lohar serve` runs the same agent on any host without PID-1 duties, for
//! tests and benchmarks.

mod agent;
mod auth;
mod boot_command;
mod cli;
mod clock;
mod config;
mod conn;
mod exec;
mod failure;
mod files;
mod identity;
mod init;
mod ports;
mod pty;
mod reidentify;
mod server;
mod session;
mod spawn;
mod spawner;
mod tunnel;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::parse(std::env::args().skip(1)) {
        Ok(cli::Command::Version) => {
            println!("lohar {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Init) => {
            let pid = std::process::id();
            if pid != 1 {
                eprintln!(
                    "lohar: refusing PID-1 duties: this is pid {pid}, not PID 1\n\
                     run `lohar serve --listen ADDR --token-file FILE` to serve the agent on this host"
                );
                return ExitCode::from(2);
            }
            init::run()
        }
        Ok(cli::Command::Serve(opts)) => match server::run_test_mode(opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lohar: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("lohar: {e}\n\n{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}
