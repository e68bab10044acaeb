use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::ratelimit::Class;
use crate::state::AppState;

pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::Sandbox>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.list(&user).await?))
}

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

pub async fn inspect(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.get(&user, &id).await?))
}

pub async fn patch(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::PatchSandbox>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.patch(&user, &id, body).await?))
}

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
