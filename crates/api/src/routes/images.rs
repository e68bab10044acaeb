//! `/images…` and `/tasks/:id`: the images a caller can boot, pulling and
//! importing OCI images and saving a sandbox as one (long work, as tasks),
//! deleting them, and an admin's sharing (docs/images.md).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryParams};
use crate::openapi::{Authed, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::routes::files::BodyReader;
use crate::state::AppState;

/// The images the caller can boot: the built tiers, their own images, the
/// shared ones and the server's (the admin CLI's), each name once, as a
/// create would take it (their own before a shared one of that name).
#[utoipa::path(
    get,
    path = "/images",
    operation_id = "list_images",
    tag = "images",
    responses(
        (status = 200, description = "The images the caller can boot.", body = Vec<api_types::ImageInfo>),
        Authed
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::ImageInfo>>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.list_images(&user).await?))
}

/// One image: where it came from, its digest and size, whose it is, and
/// its config's run settings (Env, WorkingDir, User, Entrypoint, Cmd).
#[utoipa::path(
    get,
    path = "/images/{name}",
    operation_id = "inspect_image",
    tag = "images",
    params(("name" = String, Path, description = "The image's name.")),
    responses(
        (status = 200, description = "The image.", body = api_types::ImageInfo),
        Authed, Missing
    )
)]
pub async fn inspect(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<Json<api_types::ImageInfo>, ApiError> {
    state.limit(&user, Class::Read)?;
    crate::validate::name("image", &name)?;
    Ok(Json(state.service.inspect_image(&user, &name).await?))
}

/// Deletes an image: the caller's own (an admin: also a shared image or a
/// server image), with its templates. Its cached blobs stay.
#[utoipa::path(
    delete,
    path = "/images/{name}",
    operation_id = "delete_image",
    tag = "images",
    params(("name" = String, Path, description = "The image's name.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "A built-in tier.", body = api_types::ErrorBody),
        (status = 403, description = "Shared with the caller, or the server's: only its owner or an admin may delete it.", body = api_types::ErrorBody),
        (status = 409, description = "Sandboxes or checkpoints use it (named).", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Create)?;
    crate::validate::name("image", &name)?;
    state.service.delete_image(&user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pulls an OCI image from a registry as a new private image of the
/// caller's, in a task. What can be checked at once is (a malformed
/// reference or name 400, a name the caller has 409, no disk quota left
/// 403); the registry's answers come as the task's failure (`status`:
/// 404 no such repository or tag, 502 registry unreachable or broken,
/// 403 access refused, 413 past the caller's disk quota).
#[utoipa::path(
    post,
    path = "/images/pull",
    operation_id = "pull_image",
    tag = "images",
    request_body = api_types::PullImage,
    responses(
        (status = 202, description = "Pulling; follow the task at `GET /tasks/{id}`.", body = api_types::Task),
        (status = 403, description = "No disk quota left.", body = api_types::ErrorBody),
        (status = 409, description = "The caller has an image of that name, or a task making it.", body = api_types::ErrorBody),
        (status = 429, description = "Too many of the caller's tasks are running.", body = api_types::ErrorBody),
        Authed, Invalid, JsonTooLarge
    )
)]
pub async fn pull(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<api_types::PullImage>,
) -> Result<(StatusCode, Json<api_types::Task>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(state.service.pull_image(&user, body).await?),
    ))
}

/// The query of `POST /images/import`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// The new image's name.
    name: String,
}

/// Imports a `docker save` archive or a tar of an OCI image layout (gzip
/// allowed) as a new private image of the caller's. The upload is
/// received first (bounded by what is left of the caller's disk quota);
/// unpacking runs as a task (a hostile layer fails it with 400).
#[utoipa::path(
    post,
    path = "/images/import",
    operation_id = "import_image",
    tag = "images",
    params(ImportQuery),
    request_body(content = inline(crate::openapi::Binary), content_type = "application/x-tar",
        description = "The archive (`Content-Length` required, at most what is left of the caller's disk quota)."),
    responses(
        (status = 202, description = "Received; unpacking. Follow the task at `GET /tasks/{id}`.", body = api_types::Task),
        (status = 400, description = "An invalid name, or a body shorter or longer than its Content-Length.", body = api_types::ErrorBody),
        (status = 403, description = "No disk quota left.", body = api_types::ErrorBody),
        (status = 409, description = "The caller has an image of that name, or a task making it.", body = api_types::ErrorBody),
        (status = 411, description = "No `Content-Length`.", body = api_types::ErrorBody),
        (status = 413, description = "Larger than what is left of the caller's disk quota.", body = api_types::ErrorBody),
        (status = 429, description = "Too many of the caller's tasks are running.", body = api_types::ErrorBody),
        Authed
    )
)]
pub async fn import(
    State(state): State<AppState>,
    User(user): User,
    QueryParams(q): QueryParams<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<api_types::Task>), ApiError> {
    state.limit(&user, Class::Create)?;
    let size = headers
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| ApiError::LengthRequired("an archive upload needs a Content-Length".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
    let task = state
        .service
        .import_image(&user, &q.name, size, BodyReader::new(body))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(task)))
}

/// The query of the share routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShareQuery {
    /// Whose image (a user's name); the caller's by default.
    #[serde(default)]
    owner: Option<String>,
}

/// Shares an image with every user (admin only). Two shared images may
/// not have one name.
#[utoipa::path(
    post,
    path = "/images/{name}/share",
    operation_id = "share_image",
    tag = "images",
    params(("name" = String, Path, description = "The image's name."), ShareQuery),
    responses(
        (status = 200, description = "Shared.", body = api_types::ImageInfo),
        (status = 403, description = "Not an admin key.", body = api_types::ErrorBody),
        (status = 409, description = "Another shared image has that name.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn share(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<ShareQuery>,
) -> Result<Json<api_types::ImageInfo>, ApiError> {
    state.limit(&user, Class::Create)?;
    crate::validate::name("image", &name)?;
    Ok(Json(
        state
            .service
            .share_image(&user, &name, q.owner.as_deref(), true)
            .await?,
    ))
}

/// Stops sharing an image (admin only): its owner keeps it; other users'
/// sandboxes made from it keep running.
#[utoipa::path(
    delete,
    path = "/images/{name}/share",
    operation_id = "unshare_image",
    tag = "images",
    params(("name" = String, Path, description = "The image's name."), ShareQuery),
    responses(
        (status = 200, description = "No longer shared.", body = api_types::ImageInfo),
        (status = 403, description = "Not an admin key.", body = api_types::ErrorBody),
        Authed, Missing
    )
)]
pub async fn unshare(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<ShareQuery>,
) -> Result<Json<api_types::ImageInfo>, ApiError> {
    state.limit(&user, Class::Create)?;
    crate::validate::name("image", &name)?;
    Ok(Json(
        state
            .service
            .share_image(&user, &name, q.owner.as_deref(), false)
            .await?,
    ))
}

/// One of the caller's tasks (pull, import, save): its state, progress,
/// and its result or failure (with the status the work would have
/// answered). Finished tasks are kept an hour, 16 per user at most.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    operation_id = "get_task",
    tag = "images",
    params(("id" = String, Path, description = "The task's id.")),
    responses(
        (status = 200, description = "The task.", body = api_types::Task),
        Authed, Missing
    )
)]
pub async fn task(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<api_types::Task>, ApiError> {
    state.limit(&user, Class::Read)?;
    Ok(Json(state.service.task(&user, &id)?))
}

/// Saves a sandbox's disk state as a new private image of the caller's,
/// in a task: a tar of its root file system (one file system: not /proc,
/// /sys, /dev, /run, /tmp nor volumes) made inside the sandbox, unpacked
/// on the host by the same checks as an OCI layer. The sandbox keeps
/// running; the image keeps the source image's run settings.
#[utoipa::path(
    post,
    path = "/sandboxes/{id}/save",
    operation_id = "save_sandbox",
    tag = "images",
    params(("id" = String, Path, description = "The sandbox's id or name.")),
    request_body = api_types::SaveImage,
    responses(
        (status = 202, description = "Saving; follow the task at `GET /tasks/{id}`.", body = api_types::Task),
        (status = 403, description = "No disk quota left.", body = api_types::ErrorBody),
        (status = 409, description = "The caller has an image of that name, or a task making it.", body = api_types::ErrorBody),
        (status = 429, description = "Too many of the caller's tasks are running.", body = api_types::ErrorBody),
        Authed, Missing, Invalid, JsonTooLarge
    )
)]
pub async fn save(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<api_types::SaveImage>,
) -> Result<(StatusCode, Json<api_types::Task>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(state.service.save_image(&user, &id, &body.name).await?),
    ))
}
