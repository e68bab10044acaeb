//! `POST /sandboxes/:id/exec`: collected JSON, NDJSON stream, or detached.

use std::convert::Infallible;
use std::time::Duration;

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

pub async fn exec(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Exec)?;
    let req = to_request(&body)?;
    let agent = state.service.agent(&user, &id).await?;
    if body.detach {
        let started = agent.spawn(req).await?;
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
    // The agent kills the command at its timeout; the client-side deadline
    // only catches an agent that stopped answering.
    let deadline = Duration::from_millis(req.timeout_ms.unwrap_or(0)) + Duration::from_secs(30);
    if wants_stream {
        return stream(agent, req).await;
    }
    let out = agent.deadline(deadline).exec(req).await?;
    Ok(Json(api_types::ExecResult {
        exit_code: out.exit.code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out: out.exit.timed_out,
    })
    .into_response())
}

fn line(l: &ExecLine) -> Bytes {
    let mut v = serde_json::to_vec(l).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams output as NDJSON lines, each flushed as it is produced. If the
/// client goes away, the stream (and with it the agent connection) is
/// dropped, and the agent kills the command's process group.
async fn stream(
    agent: agent_client::AgentClient,
    req: proto::ExecRequest,
) -> Result<Response, ApiError> {
    let mut exec = agent.exec_stream(req).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        loop {
            let l = match exec.next().await {
                Ok(ExecEvent::Stdout(d)) => ExecLine::Stdout {
                    data: String::from_utf8_lossy(&d).into_owned(),
                },
                Ok(ExecEvent::Stderr(d)) => ExecLine::Stderr {
                    data: String::from_utf8_lossy(&d).into_owned(),
                },
                Ok(ExecEvent::Exit(e)) => {
                    let _ = tx
                        .send(line(&ExecLine::Exit {
                            exit_code: e.code,
                            timed_out: e.timed_out,
                        }))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(line(&ExecLine::Error {
                            error: crate::error::error_chain(&e),
                        }))
                        .await;
                    return;
                }
            };
            if tx.send(line(&l)).await.is_err() {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
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
