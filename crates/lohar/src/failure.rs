//! How request handlers fail: a request error is reported to the client and
//! the connection goes on; a connection error ends the connection.

use proto::{CodecError, ErrorCode, ErrorMsg, ReadError, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("reading from the client failed")]
    Read(#[from] ReadError),
    #[error("writing to the client failed")]
    Write(#[from] WriteError),
    #[error("the client went away")]
    ClientGone,
}

#[derive(Debug)]
pub enum Failure {
    /// Tell the client, keep the connection.
    Request(ErrorMsg),
    /// End the connection.
    Conn(ConnError),
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure::Request(ErrorMsg {
            code,
            message: message.into(),
        })
    }

    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::BadRequest, message)
    }

    /// A failed file-system call on `path`, with the code that best names it.
    pub fn io(what: &str, path: &str, e: &std::io::Error) -> Failure {
        Failure::Request(io_error(what, path, e))
    }
}

pub fn io_error(what: &str, path: &str, e: &std::io::Error) -> ErrorMsg {
    use std::io::ErrorKind;
    let code = match e.kind() {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    ErrorMsg {
        code,
        message: format!("{what} {path}: {e}"),
    }
}

impl From<ConnError> for Failure {
    fn from(e: ConnError) -> Self {
        Failure::Conn(e)
    }
}

impl From<WriteError> for Failure {
    fn from(e: WriteError) -> Self {
        Failure::Conn(ConnError::Write(e))
    }
}

impl From<ReadError> for Failure {
    fn from(e: ReadError) -> Self {
        match e {
            // The frame was read whole; only its payload was bad.
            ReadError::Codec(
                e @ (CodecError::Payload { .. } | CodecError::UnexpectedPayload { .. }),
            ) => Failure::bad_request(format!("{e}")),
            e => Failure::Conn(ConnError::Read(e)),
        }
    }
}
