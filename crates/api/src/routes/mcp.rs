//! `/mcp`: the MCP server (crate `mcp`) over the streamable HTTP
//! transport, for the key's user. `POST` takes one JSON-RPC message (or a
//! batch) and answers with JSON: the response, or 202 with no body for
//! notifications. No session is kept and no server-sent stream is
//! offered, so `GET` and `DELETE` are 405. The tools call the same service
//! functions as the REST routes, under the same rate limits: another
//! user's sandbox is "not found" here too.

use std::sync::Arc;

use api_types::ErrorBody;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mcp::{Backend, FileContent, ToolFailure};

use crate::auth::User;
use crate::error::ApiError;
use crate::openapi::{Authed, Invalid};
use crate::ratelimit::Class;
use crate::state::AppState;

/// Largest `POST /mcp` body: 4 MiB (a `write_file` carries the file's
/// text in it).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The header a client sends after `initialize` with the version agreed.
const PROTOCOL_VERSION: &str = "mcp-protocol-version";

/// A JSON-RPC 2.0 message (`tools/call`, `initialize`, …; see docs/clients.md).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // documentation only: the body is read by crate `mcp`
pub struct JsonRpcMessage {
    /// Always `"2.0"`.
    jsonrpc: String,
    /// A request's id (string or integer); absent in a notification.
    #[schema(value_type = Option<String>)]
    id: Option<String>,
    /// `initialize`, `ping`, `tools/list`, `tools/call`, `notifications/…`.
    method: String,
    #[schema(value_type = Option<Object>)]
    params: Option<()>,
}

/// A JSON-RPC 2.0 answer: `result` or `error` (`{code, message}`).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct JsonRpcAnswer {
    jsonrpc: String,
    #[schema(value_type = Option<String>)]
    id: Option<String>,
    #[schema(value_type = Option<Object>)]
    result: Option<()>,
    #[schema(value_type = Option<Object>)]
    error: Option<()>,
}

/// One MCP message (JSON-RPC 2.0) from the client; answered with JSON.
#[utoipa::path(
    post,
    path = "/mcp",
    operation_id = "mcp",
    tag = "mcp",
    request_body(content = JsonRpcMessage, content_type = "application/json",
        description = "A JSON-RPC 2.0 request or notification (or a batch: an array of them)."),
    responses(
        (status = 200, description = "The JSON-RPC answer (an `error` member for unknown methods and bad params; tool failures are results with `isError: true`).", body = JsonRpcAnswer),
        (status = 202, description = "Notifications or responses only: nothing to answer."),
        (status = 413, description = "The body is over 4 MiB.", body = ErrorBody),
        Authed, Invalid
    )
)]
pub async fn post(
    State(state): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("MCP message over {MAX_BODY} bytes"))
        } else {
            ApiError::BadRequest(format!("cannot read the body: {}", e.body_text()))
        }
    })?;
    if let Some(v) = headers.get(PROTOCOL_VERSION) {
        let v = v.to_str().unwrap_or("");
        if !mcp::SUPPORTED_VERSIONS.contains(&v) {
            // As the spec asks: 400, with a JSON-RPC error a client reads.
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|m| m.get("id").cloned())
                .unwrap_or(serde_json::Value::Null);
            let msg = format!(
                "unsupported MCP-Protocol-Version '{v}' (supported: {})",
                mcp::SUPPORTED_VERSIONS.join(", ")
            );
            let answer = mcp::error_response(id, mcp::INVALID_REQUEST, msg);
            return Ok((StatusCode::BAD_REQUEST, Json(answer)).into_response());
        }
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the body is not UTF-8".into()))?;
    let server = mcp::Server::new(Tools { state, user });
    Ok(match server.handle_text(text).await {
        Some(answer) => Json(answer).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    })
}

fn not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST")],
        Json(ErrorBody {
            error: "this MCP endpoint keeps no session and offers no event stream: POST only"
                .into(),
        }),
    )
        .into_response()
}

/// No server-sent event stream is offered: 405 (the transport allows it).
#[utoipa::path(
    get,
    path = "/mcp",
    operation_id = "mcp_stream",
    tag = "mcp",
    responses(
        (status = 405, description = "No event stream: `POST` only.", body = ErrorBody),
        Authed
    )
)]
pub async fn get(User(_): User) -> Response {
    not_allowed()
}

/// No session to end: 405 (the transport allows it).
#[utoipa::path(
    delete,
    path = "/mcp",
    operation_id = "mcp_end_session",
    tag = "mcp",
    responses(
        (status = 405, description = "No session: `POST` only.", body = ErrorBody),
        Authed
    )
)]
pub async fn delete(User(_): User) -> Response {
    not_allowed()
}

/// The tools for one user, over the service.
struct Tools {
    state: AppState,
    user: Arc<store::UserRecord>,
}

impl std::fmt::Debug for Tools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tools")
            .field("user", &self.user.id)
            .finish()
    }
}

fn failure(e: ApiError) -> ToolFailure {
    if let ApiError::Internal(m) = &e {
        tracing::error!(error = %m, "internal error in an MCP tool");
    }
    ToolFailure(e.to_string())
}

impl Tools {
    fn limit(&self, class: Class) -> Result<(), ToolFailure> {
        self.state.limit(&self.user, class).map_err(failure)
    }
}

#[async_trait::async_trait]
impl Backend for Tools {
    async fn create(
        &self,
        body: api_types::CreateSandbox,
    ) -> Result<api_types::Sandbox, ToolFailure> {
        self.limit(Class::Create)?;
        let (_, sandbox) = self
            .state
            .service
            .create(&self.user, body)
            .await
            .map_err(failure)?;
        Ok(sandbox)
    }

    async fn list(&self) -> Result<Vec<api_types::Sandbox>, ToolFailure> {
        self.limit(Class::Read)?;
        self.state.service.list(&self.user).await.map_err(failure)
    }

    async fn exec(
        &self,
        sandbox: &str,
        body: api_types::ExecBody,
    ) -> Result<api_types::ExecResult, ToolFailure> {
        self.limit(Class::Exec)?;
        let req = super::exec::to_request(&body).map_err(failure)?;
        let out = self
            .state
            .service
            .exec(&self.user, sandbox, req)
            .await
            .map_err(failure)?;
        Ok(api_types::ExecResult {
            exit_code: out.exit.code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: out.exit.timed_out,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }

    async fn read_file(
        &self,
        sandbox: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<FileContent, ToolFailure> {
        self.limit(Class::Read)?;
        crate::validate::guest_path(path).map_err(failure)?;
        let req = proto::FileRead {
            path: path.to_string(),
            offset: None,
            limit: None,
            max_bytes: Some(max_bytes),
        };
        let mut file = self
            .state
            .service
            .read_file(&self.user, sandbox, req)
            .await
            .map_err(failure)?;
        let size = file.total_size();
        let mut data = Vec::new();
        while let Some(chunk) = file
            .next_chunk()
            .await
            .map_err(|e| failure(crate::service::guest_error(e)))?
        {
            data.extend_from_slice(&chunk);
            if data.len() as u64 > max_bytes {
                data.truncate(max_bytes as usize);
                break;
            }
        }
        Ok(FileContent {
            truncated: size > data.len() as u64,
            data,
            size,
        })
    }

    async fn write_file(
        &self,
        sandbox: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<api_types::Written, ToolFailure> {
        self.limit(Class::Exec)?;
        crate::validate::guest_path(path).map_err(failure)?;
        let opts = agent_client::WriteOptions {
            mode,
            ..Default::default()
        };
        let bytes = self
            .state
            .service
            .write_file(
                &self.user,
                sandbox,
                path,
                data.len() as u64,
                data.as_slice(),
                opts,
            )
            .await
            .map_err(failure)?;
        Ok(api_types::Written {
            path: path.to_string(),
            bytes,
        })
    }

    async fn publish(
        &self,
        sandbox: &str,
        body: api_types::PublishPort,
    ) -> Result<api_types::Published, ToolFailure> {
        self.limit(Class::Read)?;
        let (_, published) = self
            .state
            .service
            .publish(&self.user, sandbox, body)
            .await
            .map_err(failure)?;
        Ok(published)
    }

    async fn destroy(&self, sandbox: &str) -> Result<(), ToolFailure> {
        self.limit(Class::Create)?;
        self.state
            .service
            .destroy(&self.user, sandbox)
            .await
            .map_err(failure)
    }
}
