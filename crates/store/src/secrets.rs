//! Secrets: the store keeps ciphertext only (the daemon encrypts with age).

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretRecord {
    pub name: String,
    #[serde(skip)]
    pub ciphertext: Vec<u8>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Store {
    /// Creates or replaces a secret.
    pub fn put_secret(&self, user_id: &str, name: &str, ciphertext: &[u8]) -> Result<()> {
        let now = now_ms();
        self.conn().execute(
            "INSERT INTO secrets (user_id, name, ciphertext, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (user_id, name) DO UPDATE SET ciphertext = ?3, updated_at = ?4",
            params![user_id, name, ciphertext, now],
        )?;
        Ok(())
    }

    pub fn secret(&self, user_id: &str, name: &str) -> Result<Option<SecretRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, ciphertext, created_at, updated_at FROM secrets
                 WHERE user_id = ?1 AND name = ?2",
                [user_id, name],
                |r| {
                    Ok(SecretRecord {
                        name: r.get(0)?,
                        ciphertext: r.get(1)?,
                        created_at: r.get(2)?,
                        updated_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn secrets_of(&self, user_id: &str) -> Result<Vec<SecretRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, ciphertext, created_at, updated_at FROM secrets
             WHERE user_id = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([user_id], |r| {
            Ok(SecretRecord {
                name: r.get(0)?,
                ciphertext: r.get(1)?,
                created_at: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_secret(&self, user_id: &str, name: &str) -> Result<()> {
        let n = self.conn().execute(
            "DELETE FROM secrets WHERE user_id = ?1 AND name = ?2",
            [user_id, name],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "secret",
                id: name.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewUser;

    #[test]
    fn secrets_are_per_user_and_replaceable() {
        let s = Store::open_in_memory().unwrap();
        for u in ["alice", "bob"] {
            s.create_user(&NewUser {
                id: format!("u-{u}"),
                name: u.into(),
                key_hash: format!("h-{u}"),
                max_sandboxes: 1,
                max_cpus: 1,
                max_memory_mb: 1,
                max_disk_mb: 1 << 20,
            })
            .unwrap();
        }
        s.put_secret("u-alice", "TOKEN", b"c1").unwrap();
        s.put_secret("u-alice", "TOKEN", b"c2").unwrap();
        assert_eq!(
            s.secret("u-alice", "TOKEN").unwrap().unwrap().ciphertext,
            b"c2"
        );
        assert!(s.secret("u-bob", "TOKEN").unwrap().is_none());
        assert_eq!(s.secrets_of("u-alice").unwrap().len(), 1);
        assert!(matches!(
            s.delete_secret("u-bob", "TOKEN"),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_secret("u-alice", "TOKEN").unwrap();
        assert!(s.secrets_of("u-alice").unwrap().is_empty());
    }
}
