//! The Connect protocol (connectrpc.com/docs/protocol) as envd speaks it
//! to the SDKs: unary calls as `POST /<package>.<Service>/<Method>` with a
//! JSON (`application/json`) or binary (`application/proto`) body; server
//! streams as `application/connect+json|proto` bodies of enveloped
//! messages (one flag byte, a big-endian u32 length) ending with an
//! end-of-stream envelope (flag 2) that carries the error, if any. The
//! `e2b` SDKs send JSON (proto3's JSON mapping); both encodings are served.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest request message accepted (envd requests are small: paths,
/// commands, environment).
pub const MAX_REQUEST: usize = 1024 * 1024;

/// The message encoding of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// The codec a call's `Content-Type` names, and whether the call is a
    /// stream (`application/connect+…`).
    pub fn of(headers: &HeaderMap) -> Result<(Codec, bool), RpcError> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ct.as_str() {
            "application/json" => Ok((Codec::Json, false)),
            "application/proto" => Ok((Codec::Proto, false)),
            "application/connect+json" => Ok((Codec::Json, true)),
            "application/connect+proto" => Ok((Codec::Proto, true)),
            other => Err(RpcError::new(
                Code::InvalidArgument,
                format!("unsupported Content-Type '{other}': the Connect protocol with JSON or proto messages is served"),
            )),
        }
    }

    fn content_type(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Codec::Json, false) => "application/json",
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, true) => "application/connect+json",
            (Codec::Proto, true) => "application/connect+proto",
        }
    }

    pub fn decode<M: prost::Message + Default + DeserializeOwned>(
        self,
        data: &[u8],
    ) -> Result<M, RpcError> {
        let bad = |e: String| {
            RpcError::new(
                Code::InvalidArgument,
                format!("invalid request message: {e}"),
            )
        };
        match self {
            Codec::Json if data.is_empty() => Ok(M::default()),
            Codec::Json => serde_json::from_slice(data).map_err(|e| bad(e.to_string())),
            Codec::Proto => M::decode(data).map_err(|e| bad(e.to_string())),
        }
    }

    pub fn encode<M: prost::Message + Serialize>(self, msg: &M) -> Vec<u8> {
        match self {
            // The generated Serialize never fails.
            Codec::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
            Codec::Proto => msg.encode_to_vec(),
        }
    }
}

/// Connect's error codes (the subset envd's clients tell apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (the protocol's table).
    fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: code and message.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn unsupported(what: &str) -> RpcError {
        RpcError::new(
            Code::Unimplemented,
            format!("{what} is not supported by bhatti's E2B compatibility (see docs/clients.md)"),
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.name(), "message": self.message })
    }

    /// A unary call's error response.
    pub fn response(&self) -> Response {
        let mut resp = (self.code.status(), axum::Json(self.json())).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl From<ApiError> for RpcError {
    fn from(e: ApiError) -> RpcError {
        let code = match &e {
            ApiError::BadRequest(_) | ApiError::LengthRequired(_) => Code::InvalidArgument,
            ApiError::Unauthorized | ApiError::ShareUnauthorized => Code::Unauthenticated,
            ApiError::Forbidden(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Conflict(_) => Code::FailedPrecondition,
            ApiError::PayloadTooLarge(_) | ApiError::RateLimited { .. } => Code::ResourceExhausted,
            ApiError::Unavailable(_) | ApiError::BadGateway(_) => Code::Unavailable,
            ApiError::GatewayTimeout(_) => Code::DeadlineExceeded,
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Code::Internal
            }
        };
        RpcError::new(code, e.to_string())
    }
}

/// A unary call's answer.
pub fn unary<M: prost::Message + Serialize>(codec: Codec, msg: &M) -> Response {
    let mut resp = Body::from(codec.encode(msg)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.content_type(false)),
    );
    resp
}

/// One enveloped message of a stream.
pub fn frame<M: prost::Message + Serialize>(codec: Codec, msg: &M) -> Bytes {
    envelope(0, &codec.encode(msg))
}

/// The end of a stream, with its error if it failed. The end message is
/// JSON whatever the codec.
pub fn end_frame(err: Option<&RpcError>) -> Bytes {
    let body = match err {
        Some(e) => serde_json::json!({ "error": e.json() }),
        None => serde_json::json!({}),
    };
    envelope(2, body.to_string().as_bytes())
}

fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(5 + data.len());
    v.push(flags);
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    Bytes::from(v)
}

/// The single request message of a server-stream call's body.
pub fn unenvelope(body: &[u8]) -> Result<&[u8], RpcError> {
    let bad = |m: &str| RpcError::new(Code::InvalidArgument, format!("bad Connect envelope: {m}"));
    if body.len() < 5 {
        return Err(bad("shorter than its 5-byte prefix"));
    }
    if body[0] & 0x01 != 0 {
        return Err(bad("compressed messages are not accepted"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.get(5..5 + len)
        .ok_or_else(|| bad("length past the body"))
}

/// A stream's response: its frames as produced.
pub fn stream_response(
    codec: Codec,
    frames: impl futures_util::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    let body = Body::from_stream(futures_util::StreamExt::map(
        frames,
        Ok::<_, std::convert::Infallible>,
    ));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.content_type(true)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A stream that failed before its first message: a 200 with only the
/// end-of-stream error, as the protocol has it.
pub fn stream_error(codec: Codec, err: RpcError) -> Response {
    stream_response(codec, futures_util::stream::iter([end_frame(Some(&err))]))
}

/// The deadline the client set (`Connect-Timeout-Ms`), if any.
pub fn timeout_ms(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
}

/// A call as the handlers get it: who, which sandbox, how it is encoded,
/// and its request message's bytes.
#[derive(Debug)]
pub struct Call {
    pub caller: super::EnvdCaller,
    pub codec: Codec,
    pub stream: bool,
    pub message: Bytes,
    pub headers: HeaderMap,
}

async fn call(state: &AppState, headers: HeaderMap, body: Bytes) -> Result<Call, RpcError> {
    let user = super::caller(state, &headers).await?;
    let (codec, stream) = Codec::of(&headers)?;
    let sandbox = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            RpcError::new(
                Code::InvalidArgument,
                "the E2b-Sandbox-Id header is required (set E2B_SANDBOX_URL to the daemon's /e2b/envd)",
            )
        })?
        .to_string();
    if body.len() > MAX_REQUEST {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            "request message over 1 MiB",
        ));
    }
    let message = if stream {
        Bytes::copy_from_slice(unenvelope(&body)?)
    } else {
        body
    };
    Ok(Call {
        caller: super::EnvdCaller { user, sandbox },
        codec,
        stream,
        message,
        headers,
    })
}

/// Renders a failure in the call's shape: an end-of-stream error for a
/// stream, a JSON error with its status for a unary call.
fn failed(headers: &HeaderMap, err: RpcError) -> Response {
    match Codec::of(headers) {
        Ok((codec, true)) => stream_error(codec, err),
        _ => err.response(),
    }
}

/// envd's `process.Process` service (Connect-RPC).
#[utoipa::path(
    post,
    path = "/e2b/envd/process.Process/{method}",
    operation_id = "e2b_envd_process",
    tag = "e2b",
    params(
        ("method" = String, Path, description = "`Start` and `Connect` (server streams), `List`, `SendSignal`; the others answer `unimplemented`."),
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox."),
        ("X-Access-Token" = String, Header, description = "The `envdAccessToken` of the sandbox (a bhatti API key)."),
    ),
    request_body(content = inline(crate::openapi::Binary), description = "A Connect request message (JSON or proto; enveloped for streams).", content_type = "application/json"),
    responses(
        (status = 200, description = "The answer (unary) or a stream of enveloped `process.StartResponse`/`ConnectResponse` messages."),
        (status = 400, description = "A Connect error `{code, message}`."),
        (status = 401, description = "A Connect error `{code: unauthenticated}`."),
        (status = 404, description = "A Connect error `{code: not_found}`: no such sandbox or process of the caller's."),
    )
)]
pub async fn process_rpc(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = match call(&state, headers.clone(), body).await {
        Ok(c) => c,
        Err(e) => return failed(&headers, e),
    };
    super::process::dispatch(&state, &method, call).await
}

/// envd's `filesystem.Filesystem` service (Connect-RPC).
#[utoipa::path(
    post,
    path = "/e2b/envd/filesystem.Filesystem/{method}",
    operation_id = "e2b_envd_filesystem",
    tag = "e2b",
    params(
        ("method" = String, Path, description = "`Stat`, `ListDir`, `MakeDir`, `Move`, `Remove`; the watchers answer `unimplemented`."),
        ("E2b-Sandbox-Id" = String, Header, description = "The sandbox."),
        ("X-Access-Token" = String, Header, description = "The `envdAccessToken` of the sandbox (a bhatti API key)."),
    ),
    request_body(content = inline(crate::openapi::Binary), description = "A Connect request message (JSON or proto).", content_type = "application/json"),
    responses(
        (status = 200, description = "The answer message."),
        (status = 400, description = "A Connect error `{code, message}`."),
        (status = 401, description = "A Connect error `{code: unauthenticated}`."),
        (status = 404, description = "A Connect error `{code: not_found}`: no such sandbox of the caller's, or no such path."),
    )
)]
pub async fn filesystem_rpc(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = match call(&state, headers.clone(), body).await {
        Ok(c) => c,
        Err(e) => return failed(&headers, e),
    };
    super::filesystem::dispatch(&state, &method, call).await
}

/// Decodes the call's message.
pub fn message<M: prost::Message + Default + DeserializeOwned>(call: &Call) -> Result<M, RpcError> {
    call.codec.decode(&call.message)
}
