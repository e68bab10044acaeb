//! User administration (`bhatti user …`), straight on the store: it works
//! whether or not the daemon is running (SQLite WAL allows both).

use crate::error::ApiError;
use crate::keys::{generate_key, hash_key, random_hex};

/// Quotas of a new user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u64,
    pub max_disk_mb: u64,
}

/// Creates a user; returns the record and their key (shown once).
pub fn create_user(
    store: &store::Store,
    name: &str,
    quotas: Quotas,
) -> Result<(store::UserRecord, String), ApiError> {
    crate::validate::name("user", name)?;
    if quotas.max_sandboxes == 0
        || quotas.max_cpus == 0
        || quotas.max_memory_mb == 0
        || quotas.max_disk_mb == 0
    {
        return Err(ApiError::BadRequest("quotas must be at least 1".into()));
    }
    let key = generate_key().map_err(|e| ApiError::Internal(e.to_string()))?;
    let id = format!(
        "u-{}",
        random_hex(8).map_err(|e| ApiError::Internal(e.to_string()))?
    );
    let user = store.create_user(&store::NewUser {
        id,
        name: name.to_string(),
        key_hash: hash_key(&key),
        max_sandboxes: quotas.max_sandboxes,
        max_cpus: quotas.max_cpus,
        max_memory_mb: quotas.max_memory_mb,
        max_disk_mb: quotas.max_disk_mb,
    })?;
    Ok((user, key))
}

/// Replaces a user's key; the old one stops working at once.
pub fn rotate_key(store: &store::Store, name: &str) -> Result<String, ApiError> {
    let key = generate_key().map_err(|e| ApiError::Internal(e.to_string()))?;
    store.set_key_hash(name, &hash_key(&key))?;
    Ok(key)
}
