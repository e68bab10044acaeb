//! The client's errors and the exit codes they map to.

use std::io;
use std::path::PathBuf;

/// Exit code of a usage or configuration error (clap uses it for bad
/// arguments too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failed request, a refused connection, or a local I/O error.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of `exec` when the command hit its timeout (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when standard output was closed early (`bhatti list | head`),
/// as a shell reports a process killed by SIGPIPE.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Everything a client command can fail with. Messages are short and are
/// printed as `bhatti: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no API token: pass --token, set BHATTI_TOKEN, or run `bhatti setup --url URL --token TOKEN`"
    )]
    NoToken,
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no config directory: neither XDG_CONFIG_HOME nor HOME is set")]
    NoConfigDir,
    #[error("reading {}: {source}", path.display())]
    ConfigRead { path: PathBuf, source: io::Error },
    #[error("{} is not a valid bhatti config: {source}", path.display())]
    ConfigParse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("writing {}: {source}", path.display())]
    ConfigWrite { path: PathBuf, source: io::Error },
    #[error(
        "cannot connect to {url}: {reason}\nIs the daemon running? Start it with `bhatti serve`, or point --url / BHATTI_URL at it."
    )]
    Connect { url: String, reason: String },
    /// A 4xx/5xx answer: the server's own error message.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("the server at {url} refused this token ({message}); nothing was saved")]
    TokenRefused { url: String, message: String },
    #[error("request to {url} failed: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("unexpected answer to {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("exec stream ended without an exit status")]
    StreamCut,
    /// An `{"type":"error"}` line of an exec stream or shell socket.
    #[error("{0}")]
    Remote(String),
    #[error("reading {}: {source}", path.display())]
    LocalRead { path: PathBuf, source: io::Error },
    #[error("{} is not UTF-8 text; copy binary files with `bhatti file write` after create", path.display())]
    NotText { path: PathBuf },
    #[error("{what} is {size} bytes; the API accepts at most {max}")]
    TooLarge { what: String, size: u64, max: u64 },
    #[error("reading standard input: {0}")]
    Stdin(io::Error),
    #[error("the secret value is empty")]
    EmptySecret,
    /// Arguments clap cannot check alone.
    #[error("{0}")]
    Usage(String),
    #[error("writing output: {0}")]
    Output(io::Error),
    #[error("cannot watch signals: {0}")]
    Signals(io::Error),
    #[error("terminal: {0}")]
    Terminal(nix::Error),
    #[error("cannot start the client runtime: {0}")]
    Runtime(io::Error),
    #[error("WebSocket connection to {url}: {source}")]
    WebSocket {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("the CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "the server at {url} presented a certificate this client does not trust ({reason}).\nPass the CA that signed it: --ca-file FILE, BHATTI_CA_FILE=FILE, or ca_file = \"FILE\" in the config file."
    )]
    Untrusted { url: String, reason: String },
    #[error("the shell socket closed before the session was attached")]
    ShellClosed,
    #[error("local connection: {0}")]
    LocalConn(io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

impl CliError {
    /// The process exit code for this error: 2 for usage and configuration
    /// mistakes, 1 for everything the server or the network said.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NoToken
            | CliError::CaFile { .. }
            | CliError::BadUrl { .. }
            | CliError::NoConfigDir
            | CliError::ConfigParse { .. }
            | CliError::NotText { .. }
            | CliError::TooLarge { .. }
            | CliError::EmptySecret
            | CliError::Usage(_) => EXIT_USAGE,
            CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_BROKEN_PIPE,
            CliError::ConfigRead { .. }
            | CliError::ConfigWrite { .. }
            | CliError::Connect { .. }
            | CliError::Api { .. }
            | CliError::TokenRefused { .. }
            | CliError::Request { .. }
            | CliError::Decode { .. }
            | CliError::StreamCut
            | CliError::Remote(_)
            | CliError::LocalRead { .. }
            | CliError::Stdin(_)
            | CliError::Output(_)
            | CliError::Signals(_)
            | CliError::Terminal(_)
            | CliError::Runtime(_)
            | CliError::WebSocket { .. }
            | CliError::Untrusted { .. }
            | CliError::ShellClosed
            | CliError::Bind { .. }
            | CliError::LocalConn(_) => EXIT_FAILURE,
        }
    }

    /// Whether the error is worth printing (a closed stdout is not).
    pub fn is_silent(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_server_errors_have_distinct_codes() {
        assert_eq!(CliError::NoToken.exit_code(), 2);
        let api = CliError::Api {
            status: 404,
            message: "no sandbox named x".into(),
        };
        assert_eq!(api.exit_code(), 1);
        assert_eq!(api.to_string(), "no sandbox named x");
        let pipe = CliError::Output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(pipe.is_silent());
        assert_eq!(pipe.exit_code(), EXIT_BROKEN_PIPE);
        assert!(!CliError::Output(io::Error::other("disk full")).is_silent());
    }
}
