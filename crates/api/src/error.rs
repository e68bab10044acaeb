//! API errors: each maps to a status and a `{"error": …}` body.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    /// A share token that is malformed, unknown, expired or revoked.
    #[error("invalid, expired or revoked share link")]
    ShareUnauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    LengthRequired(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("rate limit exceeded; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    Unavailable(String),
    /// The sandbox's VM died or its agent broke the exchange.
    #[error("{0}")]
    BadGateway(String),
    /// A call into the guest passed its deadline.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::ShareUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        let status = self.status();
        let body = Json(api_types::ErrorBody {
            error: self.to_string(),
        });
        let mut resp = (status, body).into_response();
        if let ApiError::RateLimited { retry_after } = &self {
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::Duplicate { .. }
            | store::StoreError::AliasTaken { .. }
            | store::StoreError::PortPublished { .. }
            | store::StoreError::InUse(_) => ApiError::Conflict(e.to_string()),
            store::StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            store::StoreError::SandboxQuota { .. }
            | store::StoreError::CpuQuota { .. }
            | store::StoreError::MemoryQuota { .. }
            | store::StoreError::DiskQuota { .. }
            | store::StoreError::CheckpointQuota { .. } => ApiError::Forbidden(e.to_string()),
            other => ApiError::Internal(error_chain(&other)),
        }
    }
}

/// Core's errors: what the caller asked for wrong is a 400, a sandbox
/// whose VM is not there (or whose breaker is open) a 503, one in no state
/// for the operation a 409, a bound that ran out a 504, the agent's own
/// errors as the agent said, anything else from the VM a 502.
impl From<bhatti_core::CoreError> for ApiError {
    fn from(e: bhatti_core::CoreError) -> Self {
        use bhatti_core::CoreError as E;
        match e {
            E::Agent { source, .. } => ApiError::from(source),
            E::InvalidSpec(_) | E::Image(_) => ApiError::BadRequest(error_chain(&e)),
            E::NotFound(_) => ApiError::Unavailable(format!(
                "the sandbox's VM is not running: {}",
                error_chain(&e)
            )),
            E::BreakerOpen { .. } => ApiError::Unavailable(error_chain(&e)),
            // The sandbox is in no state for it (being destroyed, not
            // running): the caller's request conflicts with what happens.
            E::Cancelled { .. }
            | E::InvalidState { .. }
            | E::NameTaken(_)
            | E::IdTaken(_)
            | E::Capture { .. } => ApiError::Conflict(error_chain(&e)),
            E::TimedOut { .. } => ApiError::GatewayTimeout(error_chain(&e)),
            _ => ApiError::BadGateway(error_chain(&e)),
        }
    }
}

impl From<agent_client::ClientError> for ApiError {
    fn from(e: agent_client::ClientError) -> Self {
        use proto::ErrorCode as C;
        if let agent_client::ClientError::Timeout { .. } = e {
            return ApiError::GatewayTimeout(format!("sandbox agent: {e}"));
        }
        match e.agent_code() {
            Some(C::NotFound) => ApiError::NotFound(e.to_string()),
            Some(C::BadRequest | C::SpawnFailed | C::SessionExists | C::FileTooLarge) => {
                ApiError::BadRequest(agent_message(&e))
            }
            Some(C::PermissionDenied) => ApiError::Forbidden(agent_message(&e)),
            Some(C::SessionAttached) => ApiError::Conflict(agent_message(&e)),
            Some(C::TooManySessions | C::TooManyConnections) => ApiError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            _ => ApiError::BadGateway(format!("sandbox agent: {}", error_chain(&e))),
        }
    }
}

fn agent_message(e: &agent_client::ClientError) -> String {
    match e {
        agent_client::ClientError::Agent { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
