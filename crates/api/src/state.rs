//! What every handler shares.

use std::sync::Arc;

use crate::config::DaemonConfig;
use crate::error::ApiError;
use crate::ratelimit::{Class, RateLimiter};
use crate::secrets::SecretBox;
use crate::service::Service;

#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<DaemonConfig>,
    pub store: Arc<store::Store>,
    pub secrets: Arc<SecretBox>,
    pub limiter: Arc<RateLimiter>,
    pub health: api_types::Health,
    pub service: Arc<Service>,
    pub auth_cache: Arc<crate::auth::AuthCache>,
    /// Becomes `true` when the daemon begins to shut down: endless
    /// streams (`GET /events?follow=true`) end.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// Open `GET /events?follow=true` streams by user (a bounded number).
    pub followers: Arc<crate::routes::events::Followers>,
    /// The E2B compatibility layer's timeouts and processes.
    pub e2b: Arc<crate::e2b::E2bState>,
    /// The per-client-IP limit on share-token attempts.
    pub shares: Arc<crate::share::ShareGuard>,
}

impl AppState {
    /// Whether `user` holds an admin key (`admins` in the config).
    pub fn is_admin(&self, user: &store::UserRecord) -> bool {
        self.config.admins.contains(&user.name)
    }

    /// `Forbidden` unless `user` is an admin.
    pub fn require_admin(&self, user: &store::UserRecord) -> Result<(), ApiError> {
        if self.is_admin(user) {
            Ok(())
        } else {
            Err(ApiError::Forbidden("this needs an admin key".into()))
        }
    }

    /// Charges one request of `class` to `user`.
    pub fn limit(&self, user: &store::UserRecord, class: Class) -> Result<(), ApiError> {
        self.limiter
            .check(&user.id, class)
            .map_err(|retry_after| ApiError::RateLimited { retry_after })
    }
}

/// Runs store work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}
