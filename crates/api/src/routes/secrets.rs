use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use crate::auth::User;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::openapi::{Authed, Invalid, Missing};
use crate::ratelimit::Class;
use crate::state::{blocking, AppState};
use crate::validate;

fn summary(r: &store::SecretRecord) -> api_types::SecretSummary {
    api_types::SecretSummary {
        name: r.name.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// The caller's secrets: names and times, never values.
#[utoipa::path(
    get,
    path = "/secrets",
    operation_id = "list_secrets",
    tag = "secrets",
    responses(
        (status = 200, description = "The caller's secrets.", body = Vec<api_types::SecretSummary>),
        Authed
    )
)]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Json<Vec<api_types::SecretSummary>>, ApiError> {
    state.limit(&user, Class::Read)?;
    let store = state.store.clone();
    let uid = user.id.clone();
    let rows = blocking(move || store.secrets_of(&uid)).await?;
    Ok(Json(rows.iter().map(summary).collect()))
}

/// Stores a secret, encrypted (replaces one of the same name).
#[utoipa::path(
    post,
    path = "/secrets",
    operation_id = "create_secret",
    tag = "secrets",
    request_body = api_types::NewSecret,
    responses(
        (status = 201, description = "Stored.", body = api_types::SecretSummary),
        (status = 413, description = "A value over 64 KiB, or a body over the JSON limit.", body = api_types::ErrorBody),
        Authed, Invalid
    )
)]
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<api_types::NewSecret>,
) -> Result<(StatusCode, Json<api_types::SecretSummary>), ApiError> {
    state.limit(&user, Class::Read)?;
    validate::env_name(&body.name)?;
    if body.value.len() > 64 * 1024 {
        return Err(ApiError::PayloadTooLarge(
            "a secret value may be at most 64 KiB".into(),
        ));
    }
    let ciphertext = state
        .secrets
        .encrypt(&body.value)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let store = state.store.clone();
    let (uid, name) = (user.id.clone(), body.name.clone());
    let row = blocking(move || {
        store.put_secret(&uid, &name, &ciphertext)?;
        store.secret(&uid, &name)
    })
    .await?
    .ok_or_else(|| ApiError::Internal("secret vanished after writing".into()))?;
    Ok((StatusCode::CREATED, Json(summary(&row))))
}

/// Deletes a secret.
#[utoipa::path(
    delete,
    path = "/secrets/{name}",
    operation_id = "delete_secret",
    tag = "secrets",
    params(("name" = String, Path, description = "The secret's name.")),
    responses(
        (status = 204, description = "Deleted."),
        Authed, Missing
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    User(user): User,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.limit(&user, Class::Read)?;
    let store = state.store.clone();
    let uid = user.id.clone();
    blocking(move || store.delete_secret(&uid, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}
