//! bhatti's MCP server (Model Context Protocol): JSON-RPC 2.0 messages in,
//! answers out, and the sandbox tools behind `tools/list` and
//! `tools/call`. One implementation for both transports: `bhatti mcp`
//! (stdio, [`stdio::serve`], its tools calling the REST API with the CLI's
//! client) and the daemon's `POST /mcp` (streamable HTTP, its tools
//! calling the service layer as the key's user). What differs is only the
//! [`Backend`] each hands to [`Server`].
//!
//! Hand-written rather than from an SDK crate: the server side of MCP the
//! tools need is five methods over JSON-RPC, and each transport already
//! has its own I/O (axum, the CLI's reqwest client); this keeps the
//! dependency tree to serde_json.
//!
//! Protocol revisions: the `initialize` handshake, versions
//! [`SUPPORTED_VERSIONS`] (the newest, 2025-11-25, is what the Python
//! `mcp` SDK offers). The stateless 2026 revision's `server/discover`
//! answers "method not found", which clients take as "use `initialize`".

mod protocol;
pub mod stdio;
mod tools;

pub use protocol::{
    error_response, negotiate, Server, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST,
    METHOD_NOT_FOUND, PARSE_ERROR, SUPPORTED_VERSIONS,
};
pub use tools::{definitions, parse_call, Call, CallError, MAX_READ_BYTES};

use api_types::{CreateSandbox, ExecBody, ExecResult, PublishPort, Published, Sandbox, Written};

/// A failure of a tool's operation, with the message the model sees
/// (`isError: true`): the API's own error text, e.g. "no sandbox 'x'".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolFailure(pub String);

/// A file's bytes as `read_file` returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    pub data: Vec<u8>,
    /// Size of the whole file.
    pub size: u64,
    /// Part of the file was left out (past `max_bytes`).
    pub truncated: bool,
}

/// What the tools do, for one caller: the daemon's service layer as the
/// key's user, or the REST API with the CLI's client and key.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    async fn create(&self, body: CreateSandbox) -> Result<Sandbox, ToolFailure>;
    async fn list(&self) -> Result<Vec<Sandbox>, ToolFailure>;
    /// A command run to completion (`body.detach` is false).
    async fn exec(&self, sandbox: &str, body: ExecBody) -> Result<ExecResult, ToolFailure>;
    async fn read_file(
        &self,
        sandbox: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<FileContent, ToolFailure>;
    async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<Written, ToolFailure>;
    async fn publish(&self, sandbox: &str, body: PublishPort) -> Result<Published, ToolFailure>;
    async fn destroy(&self, sandbox: &str) -> Result<(), ToolFailure>;
}
