//! Share links: a sandbox's browser terminal behind a token. Only the
//! token's SHA-256 is stored; a link is found by that hash. Rows go with
//! their sandbox (and user): `ON DELETE CASCADE`. Expired rows are not
//! found by [`Store::share_by_token_hash`] and are deleted as links of the
//! same sandbox are listed or made.

use rusqlite::{params, OptionalExtension, Row};

use crate::{now_ms, Result, Store};

/// A share link (never its token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRecord {
    pub id: String,
    pub user_id: String,
    pub sandbox_id: String,
    /// The sandbox's name when the row was read.
    pub sandbox_name: String,
    pub read_only: bool,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; the link is refused from then on.
    pub expires_at: i64,
}

/// What [`Store::insert_share`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewShare {
    pub id: String,
    pub user_id: String,
    pub sandbox_id: String,
    /// SHA-256 (hex) of the token.
    pub token_hash: String,
    pub read_only: bool,
    /// Unix ms.
    pub expires_at: i64,
}

const SELECT: &str = "SELECT h.id, h.user_id, h.sandbox_id, s.name, h.read_only, h.created_at, \
     h.expires_at FROM shares h JOIN sandboxes s ON s.id = h.sandbox_id";

fn share(r: &Row<'_>) -> rusqlite::Result<ShareRecord> {
    Ok(ShareRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        sandbox_name: r.get(3)?,
        read_only: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
    })
}

impl Store {
    /// Stores a link, after deleting the sandbox's expired ones; `None`
    /// when the sandbox already has `max` live links.
    pub fn insert_share(&self, s: &NewShare, max: u32) -> Result<Option<ShareRecord>> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM shares WHERE sandbox_id = ?1 AND expires_at <= ?2",
            params![s.sandbox_id, now],
        )?;
        let live: i64 = tx.query_row(
            "SELECT COUNT(*) FROM shares WHERE sandbox_id = ?1",
            [&s.sandbox_id],
            |r| r.get(0),
        )?;
        if live >= i64::from(max) {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO shares (id, user_id, sandbox_id, token_hash, read_only, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.id,
                s.user_id,
                s.sandbox_id,
                s.token_hash,
                s.read_only,
                now,
                s.expires_at
            ],
        )?;
        let rec = tx
            .query_row(&format!("{SELECT} WHERE h.id = ?1"), [&s.id], share)
            .optional()?;
        tx.commit()?;
        Ok(rec)
    }

    /// The live links of one sandbox, oldest first (expired ones are
    /// deleted).
    pub fn shares_of_sandbox(&self, sandbox_id: &str) -> Result<Vec<ShareRecord>> {
        let now = now_ms();
        let conn = self.conn();
        conn.execute(
            "DELETE FROM shares WHERE sandbox_id = ?1 AND expires_at <= ?2",
            params![sandbox_id, now],
        )?;
        let mut stmt = conn.prepare(&format!(
            "{SELECT} WHERE h.sandbox_id = ?1 ORDER BY h.created_at, h.id"
        ))?;
        let rows = stmt.query_map([sandbox_id], share)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The live link whose token hashes to `hash`; none when there is no
    /// such link or it has expired.
    pub fn share_by_token_hash(&self, hash: &str) -> Result<Option<ShareRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SELECT} WHERE h.token_hash = ?1 AND h.expires_at > ?2"),
                params![hash, now_ms()],
                share,
            )
            .optional()?)
    }

    /// Revokes one link of a sandbox; whether it existed.
    pub fn delete_share(&self, sandbox_id: &str, id: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM shares WHERE sandbox_id = ?1 AND id = ?2",
            params![sandbox_id, id],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_sandbox() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.conn()
            .execute_batch(
                "INSERT INTO users VALUES ('u', 'alice', 'h', 5, 8, 8192, 0, 10240);
                 INSERT INTO sandboxes (id, user_id, name, image, cpus, memory_mb, status, thermal,
                                        thermal_since, created_at, updated_at)
                 VALUES ('sb-1', 'u', 'dev', 'minimal', 1, 512, 'running', 'hot', 0, 0, 0);",
            )
            .unwrap();
        s
    }

    fn new(id: &str, hash: &str, expires_at: i64) -> NewShare {
        NewShare {
            id: id.into(),
            user_id: "u".into(),
            sandbox_id: "sb-1".into(),
            token_hash: hash.into(),
            read_only: true,
            expires_at,
        }
    }

    #[test]
    fn links_are_found_by_hash_until_they_expire_or_are_revoked() {
        let s = store_with_sandbox();
        let later = now_ms() + 60_000;
        let rec = s
            .insert_share(&new("shr-1", "h1", later), 10)
            .unwrap()
            .unwrap();
        assert_eq!(rec.sandbox_name, "dev");
        assert!(rec.read_only);
        assert_eq!(s.share_by_token_hash("h1").unwrap().unwrap().id, "shr-1");
        assert!(s.share_by_token_hash("h2").unwrap().is_none());
        // Expired: not found, and gone from the list.
        s.insert_share(&new("shr-2", "h2", now_ms() - 1), 10)
            .unwrap()
            .unwrap();
        assert!(s.share_by_token_hash("h2").unwrap().is_none());
        let ids: Vec<_> = s
            .shares_of_sandbox("sb-1")
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["shr-1"]);
        assert!(!s.delete_share("sb-other", "shr-1").unwrap());
        assert!(s.delete_share("sb-1", "shr-1").unwrap());
        assert!(s.share_by_token_hash("h1").unwrap().is_none());
    }

    #[test]
    fn a_sandbox_holds_at_most_max_live_links() {
        let s = store_with_sandbox();
        let later = now_ms() + 60_000;
        assert!(s.insert_share(&new("a", "ha", later), 2).unwrap().is_some());
        assert!(s.insert_share(&new("b", "hb", later), 2).unwrap().is_some());
        assert!(s.insert_share(&new("c", "hc", later), 2).unwrap().is_none());
        // Deleting the sandbox takes its links.
        s.conn().execute("DELETE FROM sandboxes", []).unwrap();
        assert!(s.share_by_token_hash("ha").unwrap().is_none());
    }
}
