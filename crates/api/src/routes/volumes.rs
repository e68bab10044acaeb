//! `/volumes`: the caller's persistent volumes (`docs/state.md`).

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::routes::files::BodyReader;
use crate::state::AppState;

/// The caller's volumes, by name, with the sandboxes using each.
#[utoipa::path(
    get,
    path = "/volumes",
    operation_id = "list_volumes",
    tag = "volumes",
    responses(
        (status = 200, description = "The caller's volumes.", body = Vec<api_types::Volume>),
        Authed
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::Volume>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.list_volumes(&user).await?))
}

/// Creates an empty volume (ext4) of `size_mb` MiB.
#[utoipa::path(
    post,
    path = "/volumes",
    operation_id = "create_volume",
    tag = "volumes",
    request_body = api_types::CreateVolume,
    responses(
        (status = 201, description = "Created.", body = api_types::Volume),
        (status = 403, description = "Past the disk quota (sandbox disks and volumes).", body = api_types::ErrorBody),
        (status = 409, description = "The caller has a volume of that name.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge
    )
)]
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<api_types::CreateVolume>,
) -> Result<(StatusCode, Json<api_types::Volume>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::CREATED,
        Json(state.service.create_volume(&user, body).await?),
    ))
}

/// A volume: its size, times, and which sandboxes use it and how.
#[utoipa::path(
    get,
    path = "/volumes/{name}",
    operation_id = "inspect_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume's name.")),
    responses(
        (status = 200, description = "The volume.", body = api_types::Volume),
        Authed, Missing
    )
)]
pub async fn inspect(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Json<api_types::Volume>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.get_volume(&user, &name).await?))
}

/// Grows a volume (`size_mb`, larger only).
#[utoipa::path(
    patch,
    path = "/volumes/{name}",
    operation_id = "patch_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume's name.")),
    request_body = api_types::PatchVolume,
    responses(
        (status = 200, description = "The volume as grown.", body = api_types::Volume),
        (status = 403, description = "Past the disk quota.", body = api_types::ErrorBody),
        (status = 409, description = "A sandbox using it runs hot or warm.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge, Missing
    )
)]
pub async fn patch(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<api_types::PatchVolume>,
) -> Result<Json<api_types::Volume>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(
        state
            .service
            .grow_volume(&user, &name, body.size_mb)
            .await?,
    ))
}

/// Deletes a volume and its data.
#[utoipa::path(
    delete,
    path = "/volumes/{name}",
    operation_id = "delete_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume's name.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 409, description = "A sandbox (running or not) has it attached.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Read)?;
    state.service.delete_volume(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Clones a volume: a new volume of the same size and content, charged
/// to the disk quota.
#[utoipa::path(
    post,
    path = "/volumes/{name}/clone",
    operation_id = "clone_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume to copy.")),
    request_body = api_types::CloneVolume,
    responses(
        (status = 201, description = "The new volume.", body = api_types::Volume),
        (status = 403, description = "Past the disk quota.", body = api_types::ErrorBody),
        (status = 409, description = "The caller has a volume of the new name, or a sandbox holding the source read-write runs hot or warm.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge, Missing
    )
)]
pub async fn clone(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<api_types::CloneVolume>,
) -> Result<(StatusCode, Json<api_types::Volume>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::CREATED,
        Json(state.service.clone_volume(&user, &name, body).await?),
    ))
}

/// Streams a tar of the volume's files, made inside a short-lived utility
/// VM with the volume attached read-only (the host never reads a guest's
/// file system).
#[utoipa::path(
    get,
    path = "/volumes/{name}/archive",
    operation_id = "export_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume's name.")),
    responses(
        (status = 200, description = "A tar of the volume's root (`./…` members, owners by number). \
            An error after the first byte ends the stream early (the transfer is cut, not completed).",
            content((inline(crate::openapi::Binary) = "application/x-tar"))),
        (status = 409, description = "A sandbox holds it read-write, or it is being exported or imported.", body = api_types::ErrorBody),
        (status = 502, description = "The utility VM did not start.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn export(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state.limit(&user, Class::Create)?;
    let export = state.service.export_volume(&user, &name).await?;
    // `Some` until the tar ends or fails; the export (its VM) is dropped
    // with the stream, a client gone mid-way included.
    let body = futures_util::stream::unfold(Some(export), |export| async move {
        let mut export = export?;
        match export.next().await {
            Ok(Some(data)) => Some((Ok(Bytes::from(data)), Some(export))),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "a volume export ended early");
                Some((Err(std::io::Error::other(e)), None))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Replaces the volume's files with those of a tar (the volume is
/// emptied first), unpacked inside a short-lived utility VM.
#[utoipa::path(
    put,
    path = "/volumes/{name}/archive",
    operation_id = "import_volume",
    tag = "volumes",
    params(("name" = String, Path, description = "The volume's name.")),
    request_body(content = inline(crate::openapi::Binary), content_type = "application/x-tar",
        description = "A tar (`Content-Length` required, at most the volume's size)."),
    responses(
        (status = 200, description = "Imported.", body = api_types::Volume),
        (status = 400, description = "The tar did not unpack (the volume may hold part of it).", body = api_types::ErrorBody),
        (status = 409, description = "A sandbox has it attached, or it is being exported or imported.", body = api_types::ErrorBody),
        (status = 411, description = "No `Content-Length`.", body = api_types::ErrorBody),
        (status = 413, description = "Larger than the volume.", body = api_types::ErrorBody),
        (status = 502, description = "The utility VM did not start.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn import(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<api_types::Volume>, ApiError> {
    state.limit(&user, Class::Create)?;
    let size = headers
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| ApiError::LengthRequired("an archive upload needs a Content-Length".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
    Ok(Json(
        state
            .service
            .import_volume(&user, &name, size, BodyReader::new(body))
            .await?,
    ))
}
