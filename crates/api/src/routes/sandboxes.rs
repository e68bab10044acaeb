use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Guest, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

/// The caller's sandboxes (never wakes one).
#[utoipa::path(
    get,
    path = "/sandboxes",
    operation_id = "list_sandboxes",
    tag = "sandboxes",
    responses(
        (status = 200, description = "The caller's sandboxes.", body = Vec<api_types::Sandbox>),
        Authed
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::Sandbox>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.list(&user).await?))
}

/// Creates a sandbox and boots it; with a name that exists, answers that
/// sandbox.
#[utoipa::path(
    post,
    path = "/sandboxes",
    operation_id = "create_sandbox",
    tag = "sandboxes",
    request_body = api_types::CreateSandbox,
    responses(
        (status = 201, description = "Created and running.", body = api_types::Sandbox),
        (status = 200, description = "A sandbox of that name exists: it, unchanged.", body = api_types::Sandbox),
        (status = 403, description = "Past a quota (sandboxes, CPUs, memory, disk).", body = api_types::ErrorBody),
        (status = 404, description = "A volume to attach does not exist.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge, Guest
    )
)]
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<api_types::CreateSandbox>,
) -> Result<(StatusCode, Json<api_types::Sandbox>), ApiError> {
    state.limit(&user, Class::Create)?;
    let (created, sandbox) = state.service.create(&user, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox)))
}

/// One sandbox (never wakes it).
#[utoipa::path(
    get,
    path = "/sandboxes/{id}",
    operation_id = "get_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 200, description = "The sandbox.", body = api_types::Sandbox),
        Authed, Missing
    )
)]
pub async fn inspect(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.get(&user, &id).await?))
}

/// Changes a sandbox's `keep_hot` or labels.
#[utoipa::path(
    patch,
    path = "/sandboxes/{id}",
    operation_id = "patch_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::PatchSandbox,
    responses(
        (status = 200, description = "The sandbox as changed.", body = api_types::Sandbox),
        Authed, Invalid, JsonTooLarge, Missing, Guest
    )
)]
pub async fn patch(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::PatchSandbox>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.patch(&user, &id, body).await?))
}

/// Destroys a sandbox: its VM, disk and publications (a create still
/// running ends).
#[utoipa::path(
    delete,
    path = "/sandboxes/{id}",
    operation_id = "destroy_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 204, description = "Destroyed."),
        Authed, Missing, Guest
    )
)]
pub async fn destroy(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Create)?;
    state.service.destroy(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/:id/stop`: to cold (snapshot, VMM exits).
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/stop",
    operation_id = "stop_sandbox",
    tag = "sandboxes",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 200, description = "Cold: guest synced, snapshot written and verified, VM exited.", body = api_types::Sandbox),
        Authed, Missing, Guest
    )
)]
pub async fn stop(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Create)?;
    Ok(Json(state.service.stop(&user, &id).await?))
}

/// `?force=true` (or `false`) closes an open circuit breaker first;
/// anything else is refused.
pub fn parse_start_query(q: Option<&str>) -> Result<bool, ApiError> {
    match q.unwrap_or("") {
        "" | "force=false" => Ok(false),
        "force=true" | "force=1" => Ok(true),
        other => Err(ApiError::BadRequest(format!(
            "unknown query '{other}': only force=true|false"
        ))),
    }
}

/// `POST /sandboxes/:id/start[?force=true]`: wake (or boot a stopped one).
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/start",
    operation_id = "start_sandbox",
    tag = "sandboxes",
    params(
        ("id" = String, Path, description = "The sandbox's id or name."),
        ("force" = Option<bool>, Query, description = "`true` first closes the circuit breaker a failed restore opened. No other query is accepted."),
    ),
    responses(
        (status = 200, description = "Hot.", body = api_types::Sandbox),
        Authed, Invalid, Missing, Guest
    )
)]
pub async fn start(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Create)?;
    let force = parse_start_query(q.as_deref())?;
    Ok(Json(state.service.start_sandbox(&user, &id, force).await?))
}

/// The sandbox's PTY sessions (wakes it).
#[utoipa::path(
    get,
    path = "/sandboxes/{id}/sessions",
    operation_id = "list_sessions",
    tag = "guest",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    responses(
        (status = 200, description = "Its sessions.", body = Vec<api_types::SessionSummary>),
        Authed, Missing, Guest
    )
)]
pub async fn sessions(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Vec<api_types::SessionSummary>>, ApiError> {
    state.limit(&user, Class::Read)?;
    let sessions = state.service.sessions(&user, &id).await?;
    Ok(Json(
        sessions
            .into_iter()
            .map(|s| api_types::SessionSummary {
                session: s.session,
                pid: s.pid,
                cmd: s.argv,
                attached: s.attached,
                created_at: s.created_unix_ms as i64,
                last_activity_at: s.last_activity_unix_ms as i64,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_start_query;

    #[test]
    fn start_query() {
        assert!(!parse_start_query(None).unwrap());
        assert!(!parse_start_query(Some("force=false")).unwrap());
        assert!(parse_start_query(Some("force=true")).unwrap());
        assert!(parse_start_query(Some("force=yes")).is_err());
        assert!(parse_start_query(Some("x=1")).is_err());
    }
}
