//! `bhatti config …`: the daemon's configuration file.

use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate the daemon's config file and print the effective
    /// configuration (defaults filled in, secrets redacted) as TOML.
    Check {
        /// The file to check. Default: $BHATTI_CONFIG, else
        /// /etc/bhatti/config.toml if it exists, else the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Check { config } => {
            let (config, source) = api::DaemonConfig::resolve(config.as_deref())?;
            // The certificate files are read as `bhatti serve` would.
            for (section, tls) in [
                ("tls", config.tls.clone()),
                ("publish.tls", config.publish.tls.files()),
            ] {
                if let Some((cert, key)) = tls.files(section).map_err(anyhow::Error::msg)? {
                    api::tls::load_pair(cert, key)?;
                }
            }
            print!(
                "# bhatti effective configuration\n# source: {source}\n\n{}",
                config.to_toml()
            );
            eprintln!("bhatti: config OK ({source})");
            Ok(())
        }
    }
}
