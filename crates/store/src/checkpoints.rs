//! Checkpoint rows: a user's captures of sandboxes (the files live under
//! the data directory; the row says whose, of what and how big). A
//! checkpoint is in use while a sandbox made from it, or rolled back to
//! it, exists (`sandboxes.checkpoint_id`): such a sandbox may still run on
//! its memory image.

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

/// One row of the `checkpoints` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointRow {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// The sandbox it was taken of (it may be gone since).
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Bytes its files occupy on the host.
    pub bytes: u64,
    pub created_at: i64,
}

/// A checkpoint to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCheckpoint {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub bytes: u64,
}

const COLS: &str =
    "id, user_id, name, sandbox_id, sandbox_name, image, cpus, memory_mb, disk_mb, bytes, created_at";

fn checkpoint(r: &Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        sandbox_id: r.get(3)?,
        sandbox_name: r.get(4)?,
        image: r.get(5)?,
        cpus: r.get(6)?,
        memory_mb: r.get(7)?,
        disk_mb: r.get(8)?,
        bytes: r.get(9)?,
        created_at: r.get(10)?,
    })
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound {
        kind: "checkpoint",
        id: name.to_string(),
    }
}

impl Store {
    /// Inserts a checkpoint unless the user keeps `limit` already (the count
    /// and the insert in one transaction).
    pub fn insert_checkpoint(&self, c: &NewCheckpoint, limit: u64) -> Result<CheckpointRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let used: u64 = tx.query_row(
            "SELECT COUNT(*) FROM checkpoints WHERE user_id = ?1",
            [&c.user_id],
            |r| r.get(0),
        )?;
        if used >= limit {
            return Err(StoreError::CheckpointQuota { used, limit });
        }
        tx.execute(
            &format!("INSERT INTO checkpoints ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![
                c.id,
                c.user_id,
                c.name,
                c.sandbox_id,
                c.sandbox_name,
                c.image,
                c.cpus,
                c.memory_mb,
                c.disk_mb,
                c.bytes,
                now_ms()
            ],
        )
        .map_err(|e| StoreError::unique(e, "checkpoint", &c.name))?;
        let row = tx.query_row(
            &format!("SELECT {COLS} FROM checkpoints WHERE id = ?1"),
            [&c.id],
            checkpoint,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// A user's checkpoint by name or id.
    pub fn checkpoint(&self, user_id: &str, reference: &str) -> Result<CheckpointRow> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {COLS} FROM checkpoints WHERE user_id = ?1 AND (name = ?2 OR id = ?2)"
                ),
                params![user_id, reference],
                checkpoint,
            )
            .optional()?
            .ok_or_else(|| not_found(reference))
    }

    /// A user's checkpoints, oldest first.
    pub fn checkpoints(&self, user_id: &str) -> Result<Vec<CheckpointRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {COLS} FROM checkpoints WHERE user_id = ?1 ORDER BY created_at, name"
        ))?;
        let rows = st.query_map([user_id], checkpoint)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a user's checkpoint unless a sandbox made from it (or rolled
    /// back to it) exists; returns the row deleted.
    pub fn delete_checkpoint(&self, user_id: &str, reference: &str) -> Result<CheckpointRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!(
                    "SELECT {COLS} FROM checkpoints WHERE user_id = ?1 AND (name = ?2 OR id = ?2)"
                ),
                params![user_id, reference],
                checkpoint,
            )
            .optional()?
            .ok_or_else(|| not_found(reference))?;
        let users: Vec<String> = {
            let mut st =
                tx.prepare("SELECT name FROM sandboxes WHERE checkpoint_id = ?1 ORDER BY name")?;
            let rows = st.query_map([&row.id], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if !users.is_empty() {
            return Err(StoreError::InUse(format!(
                "checkpoint '{}' is in use by sandbox(es) made from it or rolled back to it: {}",
                row.name,
                users.join(", ")
            )));
        }
        tx.execute("DELETE FROM checkpoints WHERE id = ?1", [&row.id])?;
        tx.commit()?;
        Ok(row)
    }

    /// Records which checkpoint a sandbox was made from or rolled back to.
    pub fn set_sandbox_checkpoint(&self, sandbox_id: &str, checkpoint_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET checkpoint_id = ?2 WHERE id = ?1",
            params![sandbox_id, checkpoint_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "sandbox",
                id: sandbox_id.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandbox, NewUser};

    fn store_with_user() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.create_user(&NewUser {
            id: "u1".into(),
            name: "alice".into(),
            key_hash: "h1".into(),
            max_sandboxes: 4,
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb: 1 << 20,
        })
        .unwrap();
        s
    }

    fn new(id: &str, name: &str) -> NewCheckpoint {
        NewCheckpoint {
            id: id.into(),
            user_id: "u1".into(),
            name: name.into(),
            sandbox_id: "sb-000000000001".into(),
            sandbox_name: "dev".into(),
            image: "minimal".into(),
            cpus: 1,
            memory_mb: 512,
            disk_mb: 2048,
            bytes: 100 << 20,
        }
    }

    #[test]
    fn checkpoints_are_counted_named_and_held_by_their_sandboxes() {
        let s = store_with_user();
        let a = s.insert_checkpoint(&new("ck-1", "a"), 2).unwrap();
        assert_eq!(s.checkpoint("u1", "a").unwrap(), a);
        assert_eq!(s.checkpoint("u1", "ck-1").unwrap(), a);
        assert!(matches!(
            s.insert_checkpoint(&new("ck-2", "a"), 2),
            Err(StoreError::Duplicate { .. })
        ));
        s.insert_checkpoint(&new("ck-3", "b"), 2).unwrap();
        assert!(matches!(
            s.insert_checkpoint(&new("ck-4", "c"), 2),
            Err(StoreError::CheckpointQuota { used: 2, limit: 2 })
        ));
        assert_eq!(s.checkpoints("u1").unwrap().len(), 2);
        assert!(matches!(
            s.checkpoint("u2", "a"),
            Err(StoreError::NotFound { .. })
        ));

        s.insert_sandbox_with(
            &NewSandbox {
                id: "sb-000000000009".into(),
                user_id: "u1".into(),
                name: "child".into(),
                image: "minimal".into(),
                cpus: 1,
                memory_mb: 512,
                disk_mb: 2048,
                keep_hot: false,
                labels: Default::default(),
                egress: Default::default(),
            },
            &[],
        )
        .unwrap();
        s.set_sandbox_checkpoint("sb-000000000009", "ck-1").unwrap();
        let e = s.delete_checkpoint("u1", "a").unwrap_err();
        assert!(
            matches!(e, StoreError::InUse(ref m) if m.contains("child")),
            "{e}"
        );
        s.delete_sandbox("sb-000000000009").unwrap();
        assert_eq!(s.delete_checkpoint("u1", "a").unwrap().id, "ck-1");
        assert!(matches!(
            s.delete_checkpoint("u1", "a"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
