//! `bhatti bench …`: each benchmark measures an operation and, in the same
//! run, the physical limit it is built on, and reports both with their ratio.

mod agent;
mod api;
mod boot;
mod stats;
mod thermal;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The guest agent on this host: exec, file I/O and streaming through
    /// lohar vs. doing the same directly.
    Agent(agent::AgentBenchArgs),
    /// Create → first exec on real VMs (tiny and minimal), with where the
    /// time goes. Needs root and built images.
    Boot(boot::BootBenchArgs),
    /// The daemon's API against the agent client it wraps: exec, 1 KiB
    /// files, 10 concurrent execs, /health. Needs root and built images.
    Api(api::ApiBenchArgs),
    /// Thermal tiers on a real VM: pause, resume, warm and cold wake +
    /// exec vs. a fresh boot, snapshot size vs. memory dirtied. Needs root
    /// and built images.
    Thermal(thermal::ThermalBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Agent(args) => agent::run(args),
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Api(args) => api::run(args),
        BenchCommand::Thermal(args) => thermal::run(args),
    }
}
