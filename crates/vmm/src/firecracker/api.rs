//! A minimal HTTP/1.1 client for Firecracker's API socket.
//!
//! One connection per request, closed after the response: Firecracker's
//! server handles one connection at a time, and an idle kept-alive
//! connection would block the next caller. Requests carry JSON bodies with
//! a `Content-Length`; responses are read by their `Content-Length` (which
//! Firecracker always sends) and errors decode Firecracker's
//! `{"fault_message": …}` body.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest response head we accept.
const MAX_HEAD: usize = 16 * 1024;
/// Longest response body we accept.
const MAX_BODY: usize = 1 << 20;
/// Default time one API call may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The socket could not be connected.
    #[error("connecting to {path}")]
    Connect {
        /// The API socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
    /// The response is not the HTTP we expect.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// Firecracker refused the request.
    #[error("HTTP {status}: {fault_message}")]
    Fault {
        /// HTTP status code.
        status: u16,
        /// Firecracker's `fault_message` (or the raw body if it had none).
        fault_message: String,
    },
    /// No complete response in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The request body could not be encoded.
    #[error("encoding the request body")]
    Encode(#[source] serde_json::Error),
    /// The response body is not the JSON we expect.
    #[error("decoding the response body")]
    Decode(#[source] serde_json::Error),
}

impl ApiError {
    /// True when the API socket is gone or refuses connections (the VMM
    /// exited or has not started listening).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ApiError::Connect { .. } => true,
            ApiError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            ),
            ApiError::Malformed(_)
            | ApiError::Fault { .. }
            | ApiError::Timeout(_)
            | ApiError::Encode(_)
            | ApiError::Decode(_) => false,
        }
    }
}

/// Firecracker's error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read.
    Get,
    /// Create or replace.
    Put,
    /// Update.
    Patch,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// A successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// 2xx status.
    pub status: u16,
    /// Body bytes (empty for 204).
    pub body: Vec<u8>,
}

/// A client for one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        let body = serde_json::to_vec(body).map_err(ApiError::Encode)?;
        self.request(Method::Put, path, Some(&body)).await.map(drop)
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        let body = serde_json::to_vec(body).map_err(ApiError::Encode)?;
        self.request(Method::Patch, path, Some(&body))
            .await
            .map(drop)
    }

    /// `GET path`, decoding the JSON body.
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ApiError> {
        let r = self.request(Method::Get, path, None).await?;
        serde_json::from_slice(&r.body).map_err(ApiError::Decode)
    }

    /// One request on a fresh connection; non-2xx becomes [`ApiError::Fault`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ApiError::Timeout(self.timeout))?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let req = encode_request(method, path, body);
        stream.write_all(&req).await.map_err(ApiError::Io)?;
        let resp = read_response(&mut stream).await?;
        // Dropping the stream closes the connection.
        if (200..300).contains(&resp.status) {
            Ok(resp)
        } else {
            let fault_message = match serde_json::from_slice::<Fault>(&resp.body) {
                Ok(f) => f.fault_message,
                Err(_) => String::from_utf8_lossy(&resp.body).trim().to_string(),
            };
            Err(ApiError::Fault {
                status: resp.status,
                fault_message,
            })
        }
    }
}

/// The bytes of one request.
pub fn encode_request(method: Method, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut out = format!(
        "{} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
        method.as_str()
    );
    if let Some(b) = body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// Parses a response head: status code and `Content-Length` (if any).
pub fn parse_head(head: &str) -> Result<(u16, Option<usize>), ApiError> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(ApiError::Malformed(format!("status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| ApiError::Malformed(format!("status line {status_line:?}")))?;
    let mut length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ApiError::Malformed(format!("header {line:?}")))?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            let n = value
                .trim()
                .parse::<usize>()
                .map_err(|_| ApiError::Malformed(format!("header {line:?}")))?;
            length = Some(n);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::Malformed(format!("unsupported {line:?}")));
        }
    }
    Ok((status, length))
}

async fn read_response(stream: &mut UnixStream) -> Result<Response, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(ApiError::Malformed(format!(
                "head longer than {MAX_HEAD} bytes"
            )));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(ApiError::Io)?;
        if n == 0 {
            return Err(ApiError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| ApiError::Malformed("non-UTF-8 head".into()))?;
    let (status, length) = parse_head(head)?;
    let mut body = buf[head_end + 4..].to_vec();
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    match (no_body, length) {
        (true, _) => body.clear(),
        (false, Some(n)) => {
            if n > MAX_BODY {
                return Err(ApiError::Malformed(format!("body of {n} bytes")));
            }
            while body.len() < n {
                let mut chunk = vec![0u8; (n - body.len()).min(64 * 1024)];
                let got = stream.read(&mut chunk).await.map_err(ApiError::Io)?;
                if got == 0 {
                    return Err(ApiError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("body ended at {} of {n} bytes", body.len()),
                    )));
                }
                body.extend_from_slice(&chunk[..got]);
            }
            body.truncate(n);
        }
        // No length: the body runs to the end of the connection.
        (false, None) => {
            let mut rest = Vec::new();
            (&mut *stream)
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut rest)
                .await
                .map_err(ApiError::Io)?;
            body.extend_from_slice(&rest);
            if body.len() > MAX_BODY {
                return Err(ApiError::Malformed("unbounded body".into()));
            }
        }
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_with_content_length() {
        let r = encode_request(
            Method::Put,
            "/actions",
            Some(br#"{"action_type":"InstanceStart"}"#),
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}"
        );
        let r = encode_request(Method::Get, "/", None);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
    }

    #[test]
    fn parses_heads() {
        assert_eq!(
            parse_head("HTTP/1.1 204 No Content\r\nServer: Firecracker API").unwrap(),
            (204, None)
        );
        assert_eq!(
            parse_head(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nContent-Type: application/json"
            )
            .unwrap(),
            (400, Some(12))
        );
        for bad in [
            "",
            "HTTP/1.1",
            "SPDY 200 OK",
            "HTTP/1.1 abc OK",
            "HTTP/1.1 200 OK\r\nno colon",
            "HTTP/1.1 200 OK\r\nContent-Length: x",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
        assert!(parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
    }
}
