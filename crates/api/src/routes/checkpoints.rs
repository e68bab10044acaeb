//! Checkpoints (`/checkpoints`, `/sandboxes/:id/checkpoints`), rollback
//! (`/sandboxes/:id/restore`) and forks (`/sandboxes/:id/fork`); see
//! `docs/state.md`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Guest, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

/// Captures a sandbox's memory and disk as a named checkpoint. A hot or
/// warm sandbox is synced and paused only while the copies are made; a cold
/// one is copied from its snapshot.
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/checkpoints",
    operation_id = "create_checkpoint",
    tag = "checkpoints",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::CreateCheckpoint,
    responses(
        (status = 201, description = "Taken.", body = api_types::Checkpoint),
        (status = 403, description = "The caller keeps as many checkpoints as allowed.", body = api_types::ErrorBody),
        (status = 409, description = "A checkpoint of that name exists, or the sandbox is not running (stopped, failed, being made) or has volumes.", body = api_types::ErrorBody),
        Authed, Missing, Invalid, JsonTooLarge, Guest
    )
)]
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::CreateCheckpoint>,
) -> Result<(StatusCode, Json<api_types::Checkpoint>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::CREATED,
        Json(state.service.create_checkpoint(&user, &id, body).await?),
    ))
}

/// The caller's checkpoints.
#[utoipa::path(
    get,
    path = "/checkpoints",
    operation_id = "list_checkpoints",
    tag = "checkpoints",
    responses(
        (status = 200, description = "The caller's checkpoints, oldest first.", body = Vec<api_types::Checkpoint>),
        Authed
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::Checkpoint>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.list_checkpoints(&user).await?))
}

/// One checkpoint.
#[utoipa::path(
    get,
    path = "/checkpoints/{name}",
    operation_id = "inspect_checkpoint",
    tag = "checkpoints",
    params(("name" = String, Path, description = "The checkpoint's name or id.")),
    responses(
        (status = 200, description = "The checkpoint.", body = api_types::Checkpoint),
        Authed, Missing
    )
)]
pub async fn inspect(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Json<api_types::Checkpoint>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.get_checkpoint(&user, &name).await?))
}

/// Deletes a checkpoint and its files.
#[utoipa::path(
    delete,
    path = "/checkpoints/{name}",
    operation_id = "delete_checkpoint",
    tag = "checkpoints",
    params(("name" = String, Path, description = "The checkpoint's name or id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 409, description = "A sandbox made from it, or rolled back to it, exists.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Create)?;
    state.service.delete_checkpoint(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rolls a sandbox back to a checkpoint: its processes, memory and files
/// become the checkpoint's; it keeps its name, address and token.
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/restore",
    operation_id = "restore_sandbox",
    tag = "checkpoints",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::RestoreSandbox,
    responses(
        (status = 200, description = "Restored, hot.", body = api_types::Sandbox),
        (status = 409, description = "The sandbox is not running, has volumes, or the checkpoint is of another shape (image, CPUs, memory, disk).", body = api_types::ErrorBody),
        Authed, Missing, Invalid, JsonTooLarge, Guest
    )
)]
pub async fn restore(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::RestoreSandbox>,
) -> Result<Json<api_types::Sandbox>, ApiError> {
    state.limit(&user, Class::Create)?;
    Ok(Json(
        state.service.restore_checkpoint(&user, &id, body).await?,
    ))
}

/// Forks a running (hot, warm or cold) sandbox into `count` new ones, each
/// with its memory (copy-on-write), processes and files, and an identity of
/// its own (name, hostname, address, MAC, token).
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/fork",
    operation_id = "fork_sandbox",
    tag = "checkpoints",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::ForkSandbox,
    responses(
        (status = 201, description = "The children, running.", body = Vec<api_types::Sandbox>),
        (status = 403, description = "Past a quota (sandboxes, CPUs, memory, disk).", body = api_types::ErrorBody),
        (status = 409, description = "The sandbox is not running (failed: with the reason), has volumes, or a child's name is taken.", body = api_types::ErrorBody),
        Authed, Missing, Invalid, JsonTooLarge, Guest
    )
)]
pub async fn fork(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::ForkSandbox>,
) -> Result<(StatusCode, Json<Vec<api_types::Sandbox>>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::CREATED,
        Json(state.service.fork(&user, &id, body).await?),
    ))
}
