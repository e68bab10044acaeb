//! `POST /images/:name/templates`: the caller's template of an image (see
//! `docs/state.md`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Invalid, JsonTooLarge, Missing};
use crate::ratelimit::Class;
use crate::state::AppState;

/// Makes (or remakes) the caller's template of an image with a shape: the
/// image is booted once, captured when its agent answers, and its VM
/// destroyed. Creates of that image and shape then restore from it
/// instead of booting. Returns when the template is ready.
#[utoipa::path(
    post,
    path = "/images/{name}/templates",
    operation_id = "warm_image",
    tag = "images",
    params(("name" = String, Path, description = "The image's name.")),
    request_body = api_types::WarmImage,
    responses(
        (status = 201, description = "The template.", body = api_types::Template),
        (status = 403, description = "The shape is past the caller's quota.", body = api_types::ErrorBody),
        (status = 409, description = "This template is being made already.", body = api_types::ErrorBody),
        (status = 502, description = "The boot that makes it failed.", body = api_types::ErrorBody),
        Authed, Missing, Invalid, JsonTooLarge
    )
)]
pub async fn warm(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<api_types::WarmImage>,
) -> Result<(StatusCode, Json<api_types::Template>), ApiError> {
    state.limit(&user, Class::Create)?;
    Ok((
        StatusCode::CREATED,
        Json(state.service.warm_template(&user, &name, body).await?),
    ))
}
