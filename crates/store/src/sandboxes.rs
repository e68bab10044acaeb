//! Sandbox rows. The store keeps what the API shows (name, image, size,
//! status, thermal state, ip, labels) in columns, and the orchestrator's
//! runtime state (paths, TAP, MAC, token, …) as an opaque JSON document it
//! does not interpret.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub status: String,
    pub status_reason: Option<String>,
    pub thermal: String,
    pub thermal_since: i64,
    pub ip: Option<String>,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    #[serde(skip)]
    pub runtime: serde_json::Value,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewSandbox {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub status: String,
    pub thermal: String,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxUpdate {
    pub status: Option<String>,
    /// `Some(None)` clears the reason.
    pub status_reason: Option<Option<String>>,
    pub thermal: Option<String>,
    pub ip: Option<Option<String>>,
    pub keep_hot: Option<bool>,
    pub labels: Option<BTreeMap<String, String>>,
    pub runtime: Option<serde_json::Value>,
}

const COLS: &str = "id, user_id, name, image, cpus, memory_mb, status, status_reason, thermal, \
                    thermal_since, ip, keep_hot, labels, runtime, created_at, updated_at";

fn sandbox(r: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    let labels: String = r.get(12)?;
    let runtime: String = r.get(13)?;
    let bad_json = |i, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(SandboxRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        image: r.get(3)?,
        cpus: r.get(4)?,
        memory_mb: r.get(5)?,
        status: r.get(6)?,
        status_reason: r.get(7)?,
        thermal: r.get(8)?,
        thermal_since: r.get(9)?,
        ip: r.get(10)?,
        keep_hot: r.get(11)?,
        labels: serde_json::from_str(&labels).map_err(|e| bad_json(12, e))?,
        runtime: serde_json::from_str(&runtime).map_err(|e| bad_json(13, e))?,
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
    })
}

impl Store {
    pub fn insert_sandbox(&self, s: &NewSandbox) -> Result<SandboxRecord> {
        let now = now_ms();
        let labels = serde_json::to_string(&s.labels)?;
        self.conn()
            .execute(
                "INSERT INTO sandboxes (id, user_id, name, image, cpus, memory_mb, status, thermal,
                                        thermal_since, keep_hot, labels, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?9, ?9)",
                params![
                    s.id,
                    s.user_id,
                    s.name,
                    s.image,
                    s.cpus,
                    s.memory_mb,
                    s.status,
                    s.thermal,
                    now,
                    s.keep_hot,
                    labels
                ],
            )
            .map_err(|e| StoreError::unique(e, "sandbox", &s.name))?;
        self.sandbox_by_id(&s.id)?.ok_or(StoreError::NotFound {
            kind: "sandbox",
            id: s.id.clone(),
        })
    }

    fn sandbox_by_id(&self, id: &str) -> Result<Option<SandboxRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM sandboxes WHERE id = ?1"),
                [id],
                sandbox,
            )
            .optional()?)
    }

    /// A user's sandbox by id or name.
    pub fn sandbox(&self, user_id: &str, id_or_name: &str) -> Result<Option<SandboxRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {COLS} FROM sandboxes WHERE user_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
                ),
                [user_id, id_or_name],
                sandbox,
            )
            .optional()?)
    }

    pub fn sandboxes_of(&self, user_id: &str) -> Result<Vec<SandboxRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLS} FROM sandboxes WHERE user_id = ?1 ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([user_id], sandbox)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every sandbox of every user (startup recovery, thermal manager).
    pub fn all_sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLS} FROM sandboxes ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], sandbox)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (sandboxes, cpus, memory_mb) a user holds, for quotas.
    pub fn usage_of(&self, user_id: &str) -> Result<(u32, u32, u64)> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*), COALESCE(SUM(cpus), 0), COALESCE(SUM(memory_mb), 0)
             FROM sandboxes WHERE user_id = ?1",
            [user_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    }

    pub fn update_sandbox(&self, id: &str, u: &SandboxUpdate) -> Result<SandboxRecord> {
        let now = now_ms();
        {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let touch = |tx: &rusqlite::Transaction<'_>, sql: &str, v: &dyn rusqlite::ToSql| {
                tx.execute(sql, params![v, id])
            };
            if let Some(v) = &u.status {
                touch(&tx, "UPDATE sandboxes SET status = ?1 WHERE id = ?2", v)?;
            }
            if let Some(v) = &u.status_reason {
                touch(
                    &tx,
                    "UPDATE sandboxes SET status_reason = ?1 WHERE id = ?2",
                    v,
                )?;
            }
            if let Some(v) = &u.thermal {
                tx.execute(
                    "UPDATE sandboxes SET thermal = ?1,
                        thermal_since = CASE WHEN thermal = ?1 THEN thermal_since ELSE ?3 END
                     WHERE id = ?2",
                    params![v, id, now],
                )?;
            }
            if let Some(v) = &u.ip {
                touch(&tx, "UPDATE sandboxes SET ip = ?1 WHERE id = ?2", v)?;
            }
            if let Some(v) = &u.keep_hot {
                touch(&tx, "UPDATE sandboxes SET keep_hot = ?1 WHERE id = ?2", v)?;
            }
            if let Some(v) = &u.labels {
                let j = serde_json::to_string(v)?;
                touch(&tx, "UPDATE sandboxes SET labels = ?1 WHERE id = ?2", &j)?;
            }
            if let Some(v) = &u.runtime {
                let j = serde_json::to_string(v)?;
                touch(&tx, "UPDATE sandboxes SET runtime = ?1 WHERE id = ?2", &j)?;
            }
            let n = tx.execute(
                "UPDATE sandboxes SET updated_at = ?1 WHERE id = ?2",
                params![now, id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    kind: "sandbox",
                    id: id.to_string(),
                });
            }
            tx.commit()?;
        }
        self.sandbox_by_id(id)?.ok_or(StoreError::NotFound {
            kind: "sandbox",
            id: id.to_string(),
        })
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "sandbox",
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

    fn store_with(users: &[&str]) -> Store {
        let s = Store::open_in_memory().unwrap();
        for u in users {
            s.create_user(&NewUser {
                id: format!("u-{u}"),
                name: u.to_string(),
                key_hash: format!("h-{u}"),
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 8192,
            })
            .unwrap();
        }
        s
    }

    fn new(id: &str, user: &str, name: &str) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            user_id: format!("u-{user}"),
            name: name.into(),
            image: "minimal".into(),
            cpus: 2,
            memory_mb: 1024,
            status: "creating".into(),
            thermal: "hot".into(),
            keep_hot: false,
            labels: BTreeMap::from([("team".into(), "a".into())]),
        }
    }

    #[test]
    fn sandboxes_are_scoped_to_their_user() {
        let s = store_with(&["alice", "bob"]);
        s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        // Names are unique per user, not globally.
        s.insert_sandbox(&new("sb-2", "bob", "dev")).unwrap();
        assert!(matches!(
            s.insert_sandbox(&new("sb-3", "alice", "dev")),
            Err(StoreError::Duplicate { .. })
        ));
        assert_eq!(s.sandbox("u-alice", "dev").unwrap().unwrap().id, "sb-1");
        assert_eq!(s.sandbox("u-alice", "sb-1").unwrap().unwrap().name, "dev");
        assert!(
            s.sandbox("u-alice", "sb-2").unwrap().is_none(),
            "bob's sandbox is invisible to alice"
        );
        assert_eq!(s.sandboxes_of("u-bob").unwrap().len(), 1);
        assert_eq!(s.usage_of("u-alice").unwrap(), (1, 2, 1024));
        assert_eq!(s.all_sandboxes().unwrap().len(), 2);
    }

    #[test]
    fn updates_change_only_what_they_name() {
        let s = store_with(&["alice"]);
        let before = s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        let after = s
            .update_sandbox(
                "sb-1",
                &SandboxUpdate {
                    status: Some("running".into()),
                    ip: Some(Some("10.0.0.2".into())),
                    runtime: Some(serde_json::json!({"tap": "bt1"})),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(after.status, "running");
        assert_eq!(after.ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(after.runtime["tap"], "bt1");
        assert_eq!(after.labels, before.labels);
        assert_eq!(
            after.thermal_since, before.thermal_since,
            "thermal unchanged keeps its timestamp"
        );
        let warm = s
            .update_sandbox(
                "sb-1",
                &SandboxUpdate {
                    thermal: Some("warm".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(warm.thermal, "warm");
        assert!(warm.thermal_since >= before.thermal_since);
        assert!(matches!(
            s.update_sandbox("nope", &SandboxUpdate::default()),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_sandbox("sb-1").unwrap();
        assert!(s.sandbox("u-alice", "dev").unwrap().is_none());
    }

    #[test]
    fn deleting_a_user_removes_their_rows() {
        let s = store_with(&["alice"]);
        s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        s.delete_user("alice").unwrap();
        assert!(s.all_sandboxes().unwrap().is_empty());
    }
}
