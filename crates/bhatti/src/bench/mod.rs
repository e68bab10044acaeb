//! `bhatti bench …`: each benchmark measures an operation and, in the same
//! run, the physical limit it is built on, and reports both with their ratio.

mod agent;
mod boot;
mod stats;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The guest agent on this host: exec, file I/O and streaming through
    /// lohar vs. doing the same directly.
    Agent(agent::AgentBenchArgs),
    /// Create → first exec on real VMs (tiny and minimal), with where the
    /// time goes. Needs root and built images.
    Boot(boot::BootBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Agent(args) => agent::run(args),
        BenchCommand::Boot(args) => boot::run(args),
    }
}
