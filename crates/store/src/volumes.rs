//! Volume rows: a user's persistent disks, charged to the same disk quota
//! as sandbox disks (`users.max_disk_mb`), and their attachments to
//! sandboxes. An attachment lives as long as its sandbox row (the row's
//! delete removes it); a volume with attachments cannot be deleted or
//! grown by the store's callers' rules, and the store refuses the delete.
//!
//! Sharing rule, checked in the transaction that inserts the sandbox: a
//! volume attached read-write to a sandbox (running or not) is attached to
//! no other; one attached read-only may be attached read-only by any
//! number of sandboxes.

use rusqlite::{params, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::Serialize;

use crate::sandboxes::usage;
use crate::{now_ms, Result, Store, StoreError};

/// One row of the `volumes` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeRow {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub size_mb: u64,
    /// The ext4 UUID the volume was made with (lohar's fallback way to
    /// find it among the guest's disks).
    pub uuid: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A volume to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub size_mb: u64,
    pub uuid: String,
}

/// A volume to attach to a sandbox being inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAttachment {
    /// The user's volume, by name.
    pub volume: String,
    /// Absolute guest path.
    pub mount: String,
    pub read_only: bool,
}

/// A sandbox's use of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    pub volume_id: String,
    pub volume_name: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub mount: String,
    pub read_only: bool,
}

const COLS: &str = "id, user_id, name, size_mb, uuid, created_at, updated_at";

fn volume(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        size_mb: r.get(3)?,
        uuid: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
    })
}

/// A user's volume by name, inside a transaction.
fn volume_named(tx: &rusqlite::Transaction<'_>, user_id: &str, name: &str) -> Result<VolumeRow> {
    tx.query_row(
        &format!("SELECT {COLS} FROM volumes WHERE user_id = ?1 AND name = ?2"),
        params![user_id, name],
        volume,
    )
    .optional()?
    .ok_or_else(|| not_found(name))
}

fn not_found(name: &str) -> StoreError {
    StoreError::NotFound {
        kind: "volume",
        id: name.to_string(),
    }
}

fn disk_limit(tx: &Transaction<'_>, user_id: &str) -> Result<u64> {
    tx.query_row(
        "SELECT max_disk_mb FROM users WHERE id = ?1",
        [user_id],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        kind: "user",
        id: user_id.to_string(),
    })
}

/// Attaches `a` to sandbox `sandbox_id` inside `tx` (see the module docs
/// for the sharing rule).
pub(crate) fn attach(
    tx: &Transaction<'_>,
    user_id: &str,
    sandbox_id: &str,
    a: &NewAttachment,
) -> Result<()> {
    let vid: String = tx
        .query_row(
            "SELECT id FROM volumes WHERE user_id = ?1 AND name = ?2",
            params![user_id, a.volume],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| not_found(&a.volume))?;
    let holders: Vec<(String, bool)> = {
        let mut st = tx.prepare(
            "SELECT s.name, a.read_only FROM volume_attachments a
             JOIN sandboxes s ON s.id = a.sandbox_id
             WHERE a.volume_id = ?1 AND a.sandbox_id != ?2 ORDER BY s.name",
        )?;
        let rows = st.query_map(params![vid, sandbox_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if let Some((holder, _)) = holders.iter().find(|(_, ro)| !ro) {
        return Err(StoreError::InUse(format!(
            "volume '{}' is attached read-write to sandbox '{holder}'; \
             destroy it first",
            a.volume
        )));
    }
    if !a.read_only {
        if let Some((holder, _)) = holders.first() {
            return Err(StoreError::InUse(format!(
                "volume '{}' is attached read-only to sandbox '{holder}'{}; \
                 a read-write attach needs it attached nowhere (attach it read-only, \
                 or destroy those sandboxes first)",
                a.volume,
                if holders.len() > 1 {
                    format!(" and {} more", holders.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
    }
    tx.execute(
        "INSERT INTO volume_attachments (volume_id, sandbox_id, mount, read_only)
         VALUES (?1, ?2, ?3, ?4)",
        params![vid, sandbox_id, a.mount, a.read_only],
    )
    .map_err(|e| StoreError::unique(e, "attachment of volume", &a.volume))?;
    Ok(())
}

impl Store {
    /// Inserts a volume if its user's disk quota (sandbox disks and
    /// volumes) has room for it — check and insert in one transaction.
    pub fn insert_volume(&self, v: &NewVolume) -> Result<VolumeRow> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM volumes WHERE user_id = ?1 AND name = ?2)",
            params![v.user_id, v.name],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::Duplicate {
                kind: "volume",
                name: v.name.clone(),
            });
        }
        let limit = disk_limit(&tx, &v.user_id)?;
        let used = usage(&tx, &v.user_id)?.disk_mb;
        if used.saturating_add(v.size_mb) > limit {
            return Err(StoreError::DiskQuota {
                used,
                limit,
                asked: v.size_mb,
            });
        }
        let row = tx
            .query_row(
                &format!(
                    "INSERT INTO volumes (id, user_id, name, size_mb, uuid, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) RETURNING {COLS}"
                ),
                params![v.id, v.user_id, v.name, v.size_mb, v.uuid, now],
                volume,
            )
            .map_err(|e| StoreError::unique(e, "volume", &v.name))?;
        tx.commit()?;
        Ok(row)
    }

    /// A user's volume by name.
    pub fn volume(&self, user_id: &str, name: &str) -> Result<Option<VolumeRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM volumes WHERE user_id = ?1 AND name = ?2"),
                params![user_id, name],
                volume,
            )
            .optional()?)
    }

    /// A user's volumes, by name.
    pub fn volumes_of(&self, user_id: &str) -> Result<Vec<VolumeRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {COLS} FROM volumes WHERE user_id = ?1 ORDER BY name"
        ))?;
        let rows = st.query_map([user_id], volume)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Which sandboxes use volume `volume_id`, and how.
    pub fn attachments_of_volume(&self, volume_id: &str) -> Result<Vec<Attachment>> {
        self.attachments("a.volume_id = ?1", volume_id)
    }

    /// The volumes sandbox `sandbox_id` uses, in attach order.
    pub fn attachments_of_sandbox(&self, sandbox_id: &str) -> Result<Vec<Attachment>> {
        self.attachments("a.sandbox_id = ?1", sandbox_id)
    }

    fn attachments(&self, filter: &str, key: &str) -> Result<Vec<Attachment>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT a.volume_id, v.name, a.sandbox_id, s.name, a.mount, a.read_only
             FROM volume_attachments a
             JOIN volumes v ON v.id = a.volume_id
             JOIN sandboxes s ON s.id = a.sandbox_id
             WHERE {filter} ORDER BY a.rowid"
        ))?;
        let rows = st.query_map([key], |r| {
            Ok(Attachment {
                volume_id: r.get(0)?,
                volume_name: r.get(1)?,
                sandbox_id: r.get(2)?,
                sandbox_name: r.get(3)?,
                mount: r.get(4)?,
                read_only: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a user's volume row, refused ([`StoreError::InUse`]) while
    /// any sandbox has it attached. Returns the deleted row.
    pub fn delete_volume(&self, user_id: &str, name: &str) -> Result<VolumeRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = volume_named(&tx, user_id, name)?;
        in_use_check(&tx, &row, "deleted")?;
        tx.execute("DELETE FROM volumes WHERE id = ?1", [&row.id])?;
        tx.commit()?;
        Ok(row)
    }

    /// Sets a volume's size if the disk quota allows the difference, in
    /// one transaction. `may_grow` is asked, inside the transaction, with
    /// the volume's attachments: the caller refuses while a VM uses it.
    pub fn set_volume_size(
        &self,
        user_id: &str,
        name: &str,
        size_mb: u64,
        may_grow: impl FnOnce(&[(String, bool)]) -> std::result::Result<(), String>,
    ) -> Result<VolumeRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = volume_named(&tx, user_id, name)?;
        let holders: Vec<(String, bool)> = {
            let mut st = tx.prepare(
                "SELECT sandbox_id, read_only FROM volume_attachments WHERE volume_id = ?1",
            )?;
            let rows = st.query_map([&row.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        may_grow(&holders).map_err(StoreError::InUse)?;
        let limit = disk_limit(&tx, user_id)?;
        let used = usage(&tx, user_id)?.disk_mb;
        let asked = size_mb.saturating_sub(row.size_mb);
        if used.saturating_add(asked) > limit {
            return Err(StoreError::DiskQuota { used, limit, asked });
        }
        let row = tx.query_row(
            &format!(
                "UPDATE volumes SET size_mb = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {COLS}"
            ),
            params![row.id, size_mb, now_ms()],
            volume,
        )?;
        tx.commit()?;
        Ok(row)
    }
}

fn in_use_check(tx: &Transaction<'_>, row: &VolumeRow, what: &str) -> Result<()> {
    let names: Vec<String> = {
        let mut st = tx.prepare(
            "SELECT s.name FROM volume_attachments a JOIN sandboxes s ON s.id = a.sandbox_id
             WHERE a.volume_id = ?1 ORDER BY s.name",
        )?;
        let rows = st.query_map([&row.id], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if !names.is_empty() {
        return Err(StoreError::InUse(format!(
            "volume '{}' is attached to sandbox{} {}; it cannot be {what} until {} destroyed",
            row.name,
            if names.len() > 1 { "es" } else { "" },
            names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", "),
            if names.len() > 1 { "they are" } else { "it is" }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandbox, NewUser};

    fn store(max_disk_mb: u64) -> Store {
        let s = Store::open_in_memory().unwrap();
        s.create_user(&NewUser {
            id: "u".into(),
            name: "alice".into(),
            key_hash: "h".into(),
            max_sandboxes: 5,
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb,
        })
        .unwrap();
        s
    }

    fn vol(name: &str, mb: u64) -> NewVolume {
        NewVolume {
            id: format!("vol-{name}"),
            user_id: "u".into(),
            name: name.into(),
            size_mb: mb,
            uuid: "00000000-0000-4000-8000-000000000000".into(),
        }
    }

    fn sb(id: &str) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            user_id: "u".into(),
            name: id.into(),
            image: "tiny".into(),
            cpus: 1,
            memory_mb: 256,
            disk_mb: 100,
            keep_hot: false,
            labels: Default::default(),
            egress: Default::default(),
        }
    }

    fn att(v: &str, ro: bool) -> NewAttachment {
        NewAttachment {
            volume: v.into(),
            mount: "/data".into(),
            read_only: ro,
        }
    }

    #[test]
    fn quota_covers_volumes_and_sandbox_disks() {
        let s = store(1000);
        s.insert_volume(&vol("a", 600)).unwrap();
        assert!(matches!(
            s.insert_volume(&vol("a", 1)),
            Err(StoreError::Duplicate { .. })
        ));
        assert!(matches!(
            s.insert_volume(&vol("b", 401)),
            Err(StoreError::DiskQuota {
                used: 600,
                limit: 1000,
                asked: 401
            })
        ));
        s.insert_sandbox(&sb("s1")).unwrap();
        assert_eq!(s.usage_of("u").unwrap().disk_mb, 700);
        assert!(matches!(
            s.set_volume_size("u", "a", 901, |_| Ok(())),
            Err(StoreError::DiskQuota { asked: 301, .. })
        ));
        assert_eq!(
            s.set_volume_size("u", "a", 900, |_| Ok(()))
                .unwrap()
                .size_mb,
            900
        );
        assert_eq!(s.volumes_of("u").unwrap().len(), 1);
    }

    #[test]
    fn sharing_rules_and_detach_on_sandbox_delete() {
        let s = store(10_000);
        s.insert_volume(&vol("a", 100)).unwrap();
        s.insert_volume(&vol("b", 100)).unwrap();
        assert!(matches!(
            s.insert_sandbox_with(&sb("s0"), &[att("nope", false)]),
            Err(StoreError::NotFound { kind: "volume", .. })
        ));
        // The failed insert left no sandbox row.
        assert!(s.sandbox_row("s0").unwrap().is_none());
        s.insert_sandbox_with(&sb("s1"), &[att("a", false)])
            .unwrap();
        for ro in [false, true] {
            let e = s
                .insert_sandbox_with(&sb("s2"), &[att("a", ro)])
                .unwrap_err();
            assert!(matches!(e, StoreError::InUse(_)), "{e}");
        }
        s.insert_sandbox_with(&sb("s2"), &[att("b", true)]).unwrap();
        s.insert_sandbox_with(&sb("s3"), &[att("b", true)]).unwrap();
        assert!(matches!(
            s.insert_sandbox_with(&sb("s4"), &[att("b", false)]),
            Err(StoreError::InUse(_))
        ));
        let a = s.volume("u", "a").unwrap().unwrap();
        assert_eq!(s.attachments_of_volume(&a.id).unwrap().len(), 1);
        assert_eq!(s.attachments_of_sandbox("s1").unwrap()[0].volume_name, "a");
        assert!(matches!(
            s.delete_volume("u", "a"),
            Err(StoreError::InUse(_))
        ));
        s.delete_sandbox("s1").unwrap();
        assert!(s.attachments_of_volume(&a.id).unwrap().is_empty());
        s.delete_volume("u", "a").unwrap();
        assert!(s.volume("u", "a").unwrap().is_none());
        assert!(matches!(
            s.delete_volume("u", "a"),
            Err(StoreError::NotFound { .. })
        ));
        let holders = std::cell::Cell::new(0);
        assert!(matches!(
            s.set_volume_size("u", "b", 200, |h| {
                holders.set(h.len());
                Err("busy".into())
            }),
            Err(StoreError::InUse(_))
        ));
        assert_eq!(holders.get(), 2);
    }
}
