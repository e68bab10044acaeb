//! Client errors.

use std::time::Duration;

use proto::{ErrorCode, ErrorMsg, ReadError, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} did not finish within {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    /// The agent answered with an error.
    #[error("agent error ({code:?}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("expected {expected} from the agent, got {got}")]
    UnexpectedFrame {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the agent closed the connection during {operation}")]
    Closed { operation: &'static str },
    #[error("reading from the agent failed")]
    Read(#[from] ReadError),
    #[error("writing to the agent failed")]
    Write(#[from] WriteError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("reading local data failed")]
    LocalIo(#[source] std::io::Error),
    /// The agent speaks another protocol version (protocol 1 agents never
    /// send a challenge: they answer `auth_timeout` instead).
    #[error("the agent speaks protocol {agent}, this client {client}")]
    VersionMismatch { agent: u32, client: u32 },
    /// The peer's `auth_ok` did not carry a proof made with the token: it is
    /// not the sandbox's agent (or holds another token).
    #[error("the peer at {endpoint} did not prove it holds the sandbox's token; not its agent")]
    AgentProof { endpoint: String },
    #[error("cannot make a nonce")]
    Random(#[from] proto::auth::RandomError),
}

impl From<ErrorMsg> for ClientError {
    fn from(e: ErrorMsg) -> Self {
        ClientError::Agent {
            code: e.code,
            message: e.message,
        }
    }
}

impl ClientError {
    /// The agent's error code, when the agent refused the request.
    pub fn agent_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether a failure on a pooled connection before any answer means the
    /// connection had gone stale and the request can go again on a new one.
    pub(crate) fn is_stale_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Closed { .. }
                | ClientError::Write(_)
                | ClientError::Read(ReadError::Io(_))
        )
    }
}
