//! `POST /sandboxes/:id/exec`: collected JSON, NDJSON stream, or detached.

use std::convert::Infallible;

use agent_client::ExecEvent;
use api_types::limits::{DEFAULT_EXEC_TIMEOUT_SEC, MAX_EXEC_TIMEOUT_SEC};
use api_types::{ExecBody, ExecLine};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Guest, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

const NDJSON: &str = "application/x-ndjson";

/// The agent request for a validated body.
pub fn to_request(body: &ExecBody) -> Result<proto::ExecRequest, ApiError> {
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::BadRequest(
            "cmd must name a program: [\"prog\", \"arg\", …]".into(),
        ));
    }
    let timeout = body.timeout_sec.unwrap_or(DEFAULT_EXEC_TIMEOUT_SEC);
    if timeout == 0 || timeout > MAX_EXEC_TIMEOUT_SEC {
        return Err(ApiError::BadRequest(format!(
            "timeout_sec must be between 1 and {MAX_EXEC_TIMEOUT_SEC}"
        )));
    }
    if let Some(cwd) = &body.cwd {
        crate::validate::guest_path(cwd)?;
    }
    Ok(proto::ExecRequest {
        argv: body.cmd.clone(),
        env: body.env.clone(),
        cwd: body.cwd.clone(),
        detach: body.detach,
        timeout_ms: (!body.detach).then_some(timeout * 1000),
        ..Default::default()
    })
}

/// Runs a command: its output collected as JSON, streamed as NDJSON
/// (`Accept: application/x-ndjson`), or detached (`detach: true`).
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/exec",
    operation_id = "exec",
    tag = "guest",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command ran: its result, or with `Accept: application/x-ndjson` a stream of `ExecLine`s, one JSON object a line, flushed as produced, ending with `exit` (or `error`).",
            content(
                (api_types::ExecResult = "application/json"),
                (ExecLine = "application/x-ndjson"),
            )
        ),
        (status = 202, description = "Detached (`detach: true`): started in the background.", body = api_types::Detached),
        Authed, Invalid, JsonTooLarge, Missing, Guest
    )
)]
pub async fn exec(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Exec)?;
    let req = to_request(&body)?;
    if body.detach {
        let started = state.service.spawn(&user, &id, req).await?;
        let out = api_types::Detached {
            pid: started.pid,
            log_path: started.log_path.unwrap_or_default(),
        };
        return Ok((StatusCode::ACCEPTED, Json(out)).into_response());
    }
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON));
    if wants_stream {
        let exec = state.service.exec_stream(&user, &id, req).await?;
        return Ok(stream(exec));
    }
    let out = state.service.exec(&user, &id, req).await?;
    Ok(Json(api_types::ExecResult {
        exit_code: out.exit.code,
        stdout: text(out.stdout),
        stderr: text(out.stderr),
        timed_out: out.exit.timed_out,
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
    })
    .into_response())
}

/// Output as text, without a copy when it is UTF-8 already.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn line(l: &ExecLine) -> Bytes {
    let mut v = serde_json::to_vec(l).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams output as NDJSON lines, each flushed as it is produced. The
/// body pulls from the guest: a line is read from the agent only when the
/// client has taken the one before, so a slow client slows the command's
/// pipe and nothing piles up here. If the client goes away, the stream (and
/// with it the agent connection) is dropped, and the agent kills the
/// command's process group.
fn stream(exec: bhatti_core::GuestExec) -> Response {
    // `Some` while the command runs; `None` after its last line.
    let body = futures_util::stream::unfold(Some(exec), |exec| async move {
        let mut exec = exec?;
        let (l, more) = match exec.next().await {
            Ok(ExecEvent::Stdout(d)) => (
                ExecLine::Stdout {
                    data: String::from_utf8_lossy(&d).into_owned(),
                },
                true,
            ),
            Ok(ExecEvent::Stderr(d)) => (
                ExecLine::Stderr {
                    data: String::from_utf8_lossy(&d).into_owned(),
                },
                true,
            ),
            Ok(ExecEvent::Exit(e)) => (
                ExecLine::Exit {
                    exit_code: e.code,
                    timed_out: e.timed_out,
                },
                false,
            ),
            Err(e) => (
                ExecLine::Error {
                    error: crate::error::error_chain(&e),
                },
                false,
            ),
        };
        Some((Ok::<_, Infallible>(line(&l)), more.then_some(exec)))
    });
    (
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_commands_and_timeouts() {
        let ok = ExecBody {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        assert_eq!(to_request(&ok).unwrap().timeout_ms, Some(300_000));
        let empty = ExecBody::default();
        assert!(to_request(&empty).is_err());
        for t in [0, MAX_EXEC_TIMEOUT_SEC + 1] {
            let b = ExecBody {
                cmd: vec!["true".into()],
                timeout_sec: Some(t),
                ..Default::default()
            };
            assert!(to_request(&b).is_err(), "{t}");
        }
        let b = ExecBody {
            cmd: vec!["true".into()],
            cwd: Some("../x".into()),
            ..Default::default()
        };
        assert!(to_request(&b).is_err());
    }
}
