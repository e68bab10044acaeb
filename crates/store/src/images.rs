//! Image rows: OCI images a user pulled, imported or saved. The files live
//! under `DATA/images/oci/<id>` (the id, never the name, names the
//! directory, so two users' images of one name never meet); the row says
//! whose it is, its name and whether it is shared with everyone. Each is
//! charged to its owner's disk quota at its root filesystem's size.

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

/// One row of the `images` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    /// Also the directory's name under `DATA/images/oci/`.
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub shared: bool,
    pub source: String,
    pub digest: String,
    /// Size of its root filesystem.
    pub bytes: u64,
    pub created_at: i64,
}

/// An image to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub source: String,
    pub digest: String,
    pub bytes: u64,
}

const COLS: &str = "id, user_id, name, shared, source, digest, bytes, created_at";

fn image(r: &Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        shared: r.get(3)?,
        source: r.get(4)?,
        digest: r.get(5)?,
        bytes: r.get(6)?,
        created_at: r.get(7)?,
    })
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl Store {
    /// Inserts an image if its size fits in the user's disk quota (checked
    /// in the same transaction). A name the user has already is a
    /// [`StoreError::Duplicate`].
    pub fn insert_image(&self, i: &NewImage) -> Result<ImageRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let asked = mib(i.bytes);
        let held = crate::sandboxes::usage(&tx, &i.user_id)?.disk_mb;
        let most: u64 = tx
            .query_row(
                "SELECT max_disk_mb FROM users WHERE id = ?1",
                [&i.user_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "user",
                id: i.user_id.clone(),
            })?;
        if held + asked > most {
            return Err(StoreError::DiskQuota {
                used: held,
                limit: most,
                asked,
            });
        }
        tx.execute(
            &format!("INSERT INTO images ({COLS}) VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7)"),
            params![
                i.id,
                i.user_id,
                i.name,
                i.source,
                i.digest,
                i.bytes,
                now_ms()
            ],
        )
        .map_err(|e| StoreError::unique(e, "image", &i.name))?;
        let row = tx.query_row(
            &format!("SELECT {COLS} FROM images WHERE id = ?1"),
            [&i.id],
            image,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// The user's own image of that name.
    pub fn own_image(&self, user_id: &str, name: &str) -> Result<Option<ImageRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM images WHERE user_id = ?1 AND name = ?2"),
                params![user_id, name],
                image,
            )
            .optional()?)
    }

    /// The image a user means by `name`: their own, else the shared one of
    /// that name.
    pub fn visible_image(&self, user_id: &str, name: &str) -> Result<Option<ImageRow>> {
        if let Some(own) = self.own_image(user_id, name)? {
            return Ok(Some(own));
        }
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLS} FROM images WHERE shared = 1 AND name = ?1
                     ORDER BY created_at LIMIT 1"
                ),
                [name],
                image,
            )
            .optional()?)
    }

    /// The images a user can use: their own and the shared ones, by name.
    pub fn visible_images(&self, user_id: &str) -> Result<Vec<ImageRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLS} FROM images WHERE user_id = ?1 OR shared = 1 ORDER BY name, created_at"
        ))?;
        let rows = stmt.query_map([user_id], image)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every image row (their ids are the directories under
    /// `DATA/images/oci/` this table owns).
    pub fn all_images(&self) -> Result<Vec<ImageRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLS} FROM images ORDER BY created_at"))?;
        let rows = stmt.query_map([], image)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Shares an image with everyone, or stops sharing it. Another shared
    /// image of the same name is a [`StoreError::Duplicate`].
    pub fn set_image_shared(&self, id: &str, shared: bool) -> Result<ImageRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!("SELECT {COLS} FROM images WHERE id = ?1"),
                [id],
                image,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "image",
                id: id.to_string(),
            })?;
        if shared {
            let other: Option<String> = tx
                .query_row(
                    "SELECT id FROM images WHERE shared = 1 AND name = ?1 AND id != ?2",
                    params![row.name, id],
                    |r| r.get(0),
                )
                .optional()?;
            if other.is_some() {
                return Err(StoreError::Duplicate {
                    kind: "shared image",
                    name: row.name,
                });
            }
        }
        tx.execute(
            "UPDATE images SET shared = ?2 WHERE id = ?1",
            params![id, shared],
        )?;
        tx.commit()?;
        Ok(ImageRow { shared, ..row })
    }

    /// Deletes an image row by id.
    pub fn delete_image(&self, id: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM images WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "image",
                id: id.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewUser;

    fn store() -> Store {
        let s = Store::open_in_memory().unwrap();
        for u in ["a", "b"] {
            s.create_user(&NewUser {
                id: format!("u-{u}"),
                name: u.to_string(),
                key_hash: format!("h-{u}"),
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 8192,
                max_disk_mb: 100,
            })
            .unwrap();
        }
        s
    }

    fn new(id: &str, user: &str, name: &str, bytes: u64) -> NewImage {
        NewImage {
            id: id.into(),
            user_id: format!("u-{user}"),
            name: name.into(),
            source: "r/x:1".into(),
            digest: "sha256:00".into(),
            bytes,
        }
    }

    #[test]
    fn owners_sharing_and_quota() {
        let s = store();
        s.insert_image(&new("i.1", "a", "app", 10 << 20)).unwrap();
        // Same name, another user: no collision.
        s.insert_image(&new("i.2", "b", "app", 1)).unwrap();
        assert!(matches!(
            s.insert_image(&new("i.3", "a", "app", 1)),
            Err(StoreError::Duplicate { .. })
        ));
        assert!(s.own_image("u-b", "x").unwrap().is_none());
        s.insert_image(&new("i.4", "a", "private", 1)).unwrap();
        assert!(s.visible_image("u-b", "private").unwrap().is_none());
        s.set_image_shared("i.4", true).unwrap();
        assert_eq!(
            s.visible_image("u-b", "private").unwrap().unwrap().id,
            "i.4"
        );
        // B's own wins over A's shared of the same name.
        s.set_image_shared("i.1", true).unwrap();
        assert_eq!(s.visible_image("u-b", "app").unwrap().unwrap().id, "i.2");
        // Two shared images of one name are refused.
        assert!(matches!(
            s.set_image_shared("i.2", true),
            Err(StoreError::Duplicate { .. })
        ));
        let names: Vec<String> = s
            .visible_images("u-b")
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(names, ["i.1", "i.2", "i.4"]);
        s.set_image_shared("i.4", false).unwrap();
        assert!(s.visible_image("u-b", "private").unwrap().is_none());
        // Images count in the disk quota (100 MiB): 11 MiB held by A (a byte counts a MiB).
        assert!(matches!(
            s.insert_image(&new("i.5", "a", "big", 90 << 20)),
            Err(StoreError::DiskQuota {
                used: 11,
                limit: 100,
                asked: 90
            })
        ));
        s.delete_image("i.4").unwrap();
        assert!(s.delete_image("i.4").is_err());
    }
}
