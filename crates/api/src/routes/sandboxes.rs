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

pub async fn sessions(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Vec<api_types::SessionSummary>>, ApiError> {
    state.limit(&user, Class::Read)?;
    let agent = state.service.agent(&user, &id).await?;
    let sessions = agent.sessions().await?;
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
