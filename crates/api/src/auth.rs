//! Bearer-key authentication: the key's SHA-256 names its user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::keys::hash_key;
use crate::state::AppState;

/// Recently authenticated keys, so the hot path skips a database read.
/// Entries live [`AUTH_CACHE_TTL`]: a key rotated or a user deleted with
/// `bhatti user …` (another process) stops working within that time.
#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, (Arc<store::UserRecord>, Instant)>>,
}

pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(2);

impl AuthCache {
    fn get(&self, hash: &str) -> Option<Arc<store::UserRecord>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < AUTH_CACHE_TTL)
            .map(|(u, _)| u.clone())
    }

    fn put(&self, hash: String, user: Arc<store::UserRecord>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (_, at)| at.elapsed() < AUTH_CACHE_TTL);
        entries.insert(hash, (user, Instant::now()));
    }
}

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
        user_of_key(state, key).await.map(User)
    }
}

/// The user an API key names (through [`AuthCache`]); `Unauthorized` for
/// an unknown key. The bearer extractor and the E2B API's `X-API-Key` /
/// `X-Access-Token` share it.
pub async fn user_of_key(state: &AppState, key: &str) -> Result<Arc<store::UserRecord>, ApiError> {
    let hash = hash_key(key);
    if let Some(user) = state.auth_cache.get(&hash) {
        return Ok(user);
    }
    let store = state.store.clone();
    let h = hash.clone();
    let user = tokio::task::spawn_blocking(move || store.user_by_key_hash(&h))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
        .ok_or(ApiError::Unauthorized)?;
    let user = Arc::new(user);
    state.auth_cache.put(hash, user.clone());
    Ok(user)
}
