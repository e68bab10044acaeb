//! Users and their API keys (only the SHA-256 of a key is stored).

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub key_hash: String,
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u64,
    /// Disk of all their sandboxes together, in MiB.
    pub max_disk_mb: u64,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u64,
    pub max_disk_mb: u64,
}

fn user(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        key_hash: r.get(2)?,
        max_sandboxes: r.get(3)?,
        max_cpus: r.get(4)?,
        max_memory_mb: r.get(5)?,
        created_at: r.get(6)?,
        max_disk_mb: r.get(7)?,
    })
}

const COLS: &str =
    "id, name, key_hash, max_sandboxes, max_cpus, max_memory_mb, created_at, max_disk_mb";

impl Store {
    pub fn create_user(&self, u: &NewUser) -> Result<UserRecord> {
        let now = now_ms();
        self.conn()
            .execute(
                "INSERT INTO users (id, name, key_hash, max_sandboxes, max_cpus, max_memory_mb,
                                    created_at, max_disk_mb)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    u.id,
                    u.name,
                    u.key_hash,
                    u.max_sandboxes,
                    u.max_cpus,
                    u.max_memory_mb,
                    now,
                    u.max_disk_mb
                ],
            )
            .map_err(|e| StoreError::unique(e, "user", &u.name))?;
        self.user_by_name(&u.name)?.ok_or(StoreError::NotFound {
            kind: "user",
            id: u.name.clone(),
        })
    }

    pub fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM users WHERE name = ?1"),
                [name],
                user,
            )
            .optional()?)
    }

    pub fn user_by_id(&self, id: &str) -> Result<Option<UserRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM users WHERE id = ?1"),
                [id],
                user,
            )
            .optional()?)
    }

    pub fn user_by_key_hash(&self, hash: &str) -> Result<Option<UserRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM users WHERE key_hash = ?1"),
                [hash],
                user,
            )
            .optional()?)
    }

    pub fn users(&self) -> Result<Vec<UserRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLS} FROM users ORDER BY name"))?;
        let rows = stmt.query_map([], user)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a user and (by cascade) their sandboxes' rows and secrets.
    pub fn delete_user(&self, name: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM users WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "user",
                id: name.to_string(),
            });
        }
        Ok(())
    }

    pub fn set_key_hash(&self, name: &str, hash: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE users SET key_hash = ?2 WHERE name = ?1",
            [name, hash],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "user",
                id: name.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn alice() -> NewUser {
        NewUser {
            id: "u-alice".into(),
            name: "alice".into(),
            key_hash: "hash-a".into(),
            max_sandboxes: 5,
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb: 1 << 20,
        }
    }

    #[test]
    fn users_are_created_found_rotated_and_deleted() {
        let s = Store::open_in_memory().unwrap();
        let a = s.create_user(&alice()).unwrap();
        assert_eq!(a.max_sandboxes, 5);
        assert!(matches!(
            s.create_user(&alice()),
            Err(StoreError::Duplicate { kind: "user", .. })
        ));
        assert_eq!(s.user_by_key_hash("hash-a").unwrap().unwrap().name, "alice");
        s.set_key_hash("alice", "hash-b").unwrap();
        assert!(s.user_by_key_hash("hash-a").unwrap().is_none());
        assert_eq!(s.users().unwrap().len(), 1);
        s.delete_user("alice").unwrap();
        assert!(matches!(
            s.delete_user("alice"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
