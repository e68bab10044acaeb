//! Bearer-key authentication: the key's SHA-256 names its user.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::keys::hash_key;
use crate::state::AppState;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct User(pub Arc<store::UserRecord>);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let hash = hash_key(key);
        let store = state.store.clone();
        let user = tokio::task::spawn_blocking(move || store.user_by_key_hash(&hash))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
            .ok_or(ApiError::Unauthorized)?;
        Ok(User(Arc::new(user)))
    }
}
