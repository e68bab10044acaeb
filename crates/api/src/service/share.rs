//! Share links: a token that opens one sandbox's browser terminal
//! (`crate::share` has the tokens and the page).

use api_types::{CreateShare, Share, ShareCreated};
use store::{NewShare, ShareRecord, UserRecord};

use super::Service;
use crate::error::ApiError;
use crate::keys::random_hex;
use crate::share::{generate_token, hash_token, well_formed, PAGE_PATH};
use crate::state::blocking;

fn view(r: &ShareRecord) -> Share {
    Share {
        id: r.id.clone(),
        sandbox: r.sandbox_name.clone(),
        read_only: r.read_only,
        created_at: r.created_at,
        expires_at: r.expires_at,
    }
}

impl Service {
    /// Makes a link to `id`'s terminal; `base` is the URL it is given under.
    pub async fn create_share(
        &self,
        user: &UserRecord,
        id: &str,
        body: CreateShare,
        base: &str,
    ) -> Result<ShareCreated, ApiError> {
        let ttl = self.config.share.ttl(body.ttl_secs)?;
        let row = self.row(user, id).await?;
        let token = generate_token()?;
        let share_id = format!(
            "shr-{}",
            random_hex(6).map_err(|e| ApiError::Internal(e.to_string()))?
        );
        let new = NewShare {
            id: share_id,
            user_id: user.id.clone(),
            sandbox_id: row.id.clone(),
            token_hash: hash_token(&token),
            read_only: body.read_only,
            // ttl is at most a year (ShareConfig::validate).
            expires_at: store::now_ms() + (ttl as i64) * 1000,
        };
        let max = self.config.share.max_per_sandbox;
        let store = self.store.clone();
        let rec = blocking(move || store.insert_share(&new, max))
            .await?
            .ok_or_else(|| {
                ApiError::Conflict(format!(
                    "'{}' already has {max} live share links (share.max_per_sandbox); revoke one first",
                    row.name
                ))
            })?;
        let path = format!("{PAGE_PATH}#t={token}");
        Ok(ShareCreated {
            share: view(&rec),
            url: format!("{base}{path}"),
            path,
            token,
        })
    }

    /// The live links of `id`.
    pub async fn shares(&self, user: &UserRecord, id: &str) -> Result<Vec<Share>, ApiError> {
        let row = self.row(user, id).await?;
        let store = self.store.clone();
        let rows = blocking(move || store.shares_of_sandbox(&row.id)).await?;
        Ok(rows.iter().map(view).collect())
    }

    /// Revokes one link of `id`: 404 when it has no such link.
    pub async fn revoke_share(
        &self,
        user: &UserRecord,
        id: &str,
        share_id: &str,
    ) -> Result<(), ApiError> {
        let row = self.row(user, id).await?;
        let store = self.store.clone();
        let (sid, shid) = (row.id.clone(), share_id.to_string());
        if blocking(move || store.delete_share(&sid, &shid)).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!(
                "'{}' has no share link '{share_id}'",
                row.name
            )))
        }
    }

    /// The live link `token` opens and its owner: 401 for anything else
    /// (malformed, unknown, expired, revoked, its owner gone).
    pub async fn share_by_token(&self, token: &str) -> Result<(ShareRecord, UserRecord), ApiError> {
        if !well_formed(token) {
            return Err(ApiError::ShareUnauthorized);
        }
        let store = self.store.clone();
        let hash = hash_token(token);
        let share = blocking(move || store.share_by_token_hash(&hash))
            .await?
            .ok_or(ApiError::ShareUnauthorized)?;
        let store = self.store.clone();
        let uid = share.user_id.clone();
        let user = blocking(move || store.user_by_id(&uid))
            .await?
            .ok_or(ApiError::ShareUnauthorized)?;
        Ok((share, user))
    }
}
