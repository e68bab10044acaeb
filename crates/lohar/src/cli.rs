//! Command-line parsing, by hand: the agent keeps its dependencies few.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage:
  lohar                                   run as PID 1 in a sandbox VM
  lohar serve --listen ADDR --token-file FILE [--config FILE] [--identity-stdin]
                                          serve the agent on this host (no PID-1 duties)
  lohar --version

ADDR is unix:/path/to/socket or tcp:HOST:PORT (port 0 picks a free port).
`serve` prints `LISTENING <addr>` on stdout once it accepts connections.
With --identity-stdin it reads identity lines (BHATTI-IDENTITY2 {json}) from
stdin and takes each one's token as its own (nothing else of the host's).
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    pub listen: ListenAddr,
    pub token_file: PathBuf,
    pub config: Option<PathBuf>,
    /// Read identity lines on stdin and take their tokens.
    pub identity_stdin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Init,
    Serve(ServeOptions),
    Version,
    Help,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown argument '{0}'")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("serve needs --{0}")]
    Required(&'static str),
    #[error("bad listen address '{0}': use unix:/path or tcp:HOST:PORT")]
    BadListen(String),
}

pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Command, CliError> {
    let Some(first) = args.next() else {
        return Ok(Command::Init);
    };
    match first.as_str() {
        "--version" | "-V" => Ok(Command::Version),
        "--help" | "-h" | "help" => Ok(Command::Help),
        "serve" => parse_serve(args),
        other => Err(CliError::Unknown(other.to_string())),
    }
}

fn parse_serve(mut args: impl Iterator<Item = String>) -> Result<Command, CliError> {
    let (mut listen, mut token_file, mut config) = (None, None, None);
    let mut identity_stdin = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &'static str| args.next().ok_or(CliError::MissingValue(name));
        match arg.as_str() {
            "--listen" => listen = Some(parse_listen(&value("--listen")?)?),
            "--token-file" => token_file = Some(PathBuf::from(value("--token-file")?)),
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--identity-stdin" => identity_stdin = true,
            other => return Err(CliError::Unknown(other.to_string())),
        }
    }
    Ok(Command::Serve(ServeOptions {
        listen: listen.ok_or(CliError::Required("listen"))?,
        token_file: token_file.ok_or(CliError::Required("token-file"))?,
        config,
        identity_stdin,
    }))
}

fn parse_listen(s: &str) -> Result<ListenAddr, CliError> {
    if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        Ok(ListenAddr::Unix(PathBuf::from(path)))
    } else if let Some(addr) = s.strip_prefix("tcp:").filter(|a| a.contains(':')) {
        Ok(ListenAddr::Tcp(addr.to_string()))
    } else {
        Err(CliError::BadListen(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> impl Iterator<Item = String> {
        s.split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn parses_each_command() {
        assert_eq!(parse(args("")), Ok(Command::Init));
        assert_eq!(parse(args("--version")), Ok(Command::Version));
        assert_eq!(
            parse(args(
                "serve --listen tcp:127.0.0.1:0 --token-file /t --config /c --identity-stdin"
            )),
            Ok(Command::Serve(ServeOptions {
                listen: ListenAddr::Tcp("127.0.0.1:0".into()),
                token_file: "/t".into(),
                config: Some("/c".into()),
                identity_stdin: true,
            }))
        );
        assert_eq!(
            parse(args("serve --listen unix:/s --token-file /t")),
            Ok(Command::Serve(ServeOptions {
                listen: ListenAddr::Unix("/s".into()),
                token_file: "/t".into(),
                config: None,
                identity_stdin: false,
            }))
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(args("bogus")), Err(CliError::Unknown("bogus".into())));
        assert_eq!(
            parse(args("serve --listen")),
            Err(CliError::MissingValue("--listen"))
        );
        assert_eq!(
            parse(args("serve --token-file /t")),
            Err(CliError::Required("listen"))
        );
        assert_eq!(
            parse(args("serve --listen 1.2.3.4 --token-file /t")),
            Err(CliError::BadListen("1.2.3.4".into()))
        );
    }
}
