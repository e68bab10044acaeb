//! `bhatti`: the host binary. Today it carries the benchmarks; the daemon
//! (`serve`), the client commands and `user` administration build on the
//! same entry point.

mod bench;
mod config_cmd;
mod image_cmd;
mod serve;
mod user;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bhatti",
    version,
    about = "microVM sandboxes for AI coding agents"
)]
struct Cli {
    #[command(flatten)]
    client: cli::GlobalArgs,
    /// Log lines as text or as one JSON object each (for log shippers);
    /// `RUST_LOG` sets the filter
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(serve::ServeArgs),
    /// Check the daemon's config file and print the effective configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Manage users and their API keys.
    #[command(subcommand)]
    User(user::UserCommand),
    /// Images: build the tiers (on the server); list, inspect, pull,
    /// import, save, delete and share OCI images (through the daemon, or
    /// with --data-dir on a data directory).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Measure bhatti against the physical limits of this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Each line one object: fields, the span (a request's
        // `request_id`) and its parents.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Text => logs.init(),
    }
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Config(c) => config_cmd::run(c),
        Command::User(u) => user::run(u),
        Command::Image(i) => match image_cmd::route(i) {
            image_cmd::Routed::Server(i) => image_cmd::run(i),
            image_cmd::Routed::Client(c) => {
                return cli::run(cli.client, c, <Cli as clap::CommandFactory>::command)
            }
        },
        Command::Bench(b) => bench::run(b),
        Command::Client(c) => {
            return cli::run(cli.client, c, <Cli as clap::CommandFactory>::command)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bhatti: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
