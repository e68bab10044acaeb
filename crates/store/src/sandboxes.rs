//! Sandbox rows. The store keeps what the API shows (name, image, size,
//! status, thermal state, ip, labels) in columns, and the orchestrator's
//! runtime record (paths, network attachment, token, …) as one JSON
//! document it does not interpret: the daemon serialises its typed record
//! whole and reads it back whole.
//!
//! A row is created inside one transaction with its user's quota check, so
//! parallel creates cannot overshoot a quota; every update names the row by
//! id and is one statement.

use std::collections::BTreeMap;

use api_types::{Egress, SandboxStatus, Thermal};
use rusqlite::types::{ToSql, Type};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

/// One row of the `sandboxes` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxRow {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Its writable disk, in MiB.
    pub disk_mb: u64,
    pub status: SandboxStatus,
    pub status_reason: Option<String>,
    pub thermal: Thermal,
    pub thermal_since: i64,
    pub ip: Option<String>,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    /// Where it may send.
    pub egress: Egress,
    /// The daemon's runtime record (JSON), once its VM was created.
    #[serde(skip)]
    pub runtime: Option<serde_json::Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A row to insert: it starts `creating` and `hot`, without a runtime
/// record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSandbox {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    pub egress: Egress,
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxUpdate {
    pub status: Option<SandboxStatus>,
    /// `Some(None)` clears the reason.
    pub status_reason: Option<Option<String>>,
    /// A change also sets `thermal_since` (an unchanged value keeps it).
    pub thermal: Option<Thermal>,
    pub ip: Option<Option<String>>,
    pub keep_hot: Option<bool>,
    pub labels: Option<BTreeMap<String, String>>,
    pub egress: Option<Egress>,
    /// The whole runtime record (`serde_json::Value::Null` clears it).
    pub runtime: Option<serde_json::Value>,
}

const COLS: &str = "id, user_id, name, image, cpus, memory_mb, status, status_reason, thermal, \
                    thermal_since, ip, keep_hot, labels, runtime, created_at, updated_at, egress, \
                    disk_mb";

fn bad_text(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e))
}

fn sandbox(r: &Row<'_>) -> rusqlite::Result<SandboxRow> {
    let status: String = r.get(6)?;
    let thermal: String = r.get(8)?;
    let labels: String = r.get(12)?;
    let runtime: String = r.get(13)?;
    let runtime: serde_json::Value = serde_json::from_str(&runtime).map_err(|e| bad_text(13, e))?;
    let egress: String = r.get(16)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        image: r.get(3)?,
        cpus: r.get(4)?,
        memory_mb: r.get(5)?,
        status: status.parse().map_err(|e| bad_text(6, e))?,
        status_reason: r.get(7)?,
        thermal: thermal.parse().map_err(|e| bad_text(8, e))?,
        thermal_since: r.get(9)?,
        ip: r.get(10)?,
        keep_hot: r.get(11)?,
        labels: serde_json::from_str(&labels).map_err(|e| bad_text(12, e))?,
        egress: serde_json::from_str(&egress).map_err(|e| bad_text(16, e))?,
        runtime: (!runtime.is_null()).then_some(runtime),
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
        disk_mb: r.get(17)?,
    })
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: "sandbox",
        id: id.to_string(),
    }
}

impl Store {
    /// Inserts a sandbox row if its user's quotas (sandboxes, CPUs, memory,
    /// read from the users table) allow it — check and insert in one
    /// transaction, so concurrent creates cannot overshoot. A name the
    /// user already has is [`StoreError::Duplicate`], whatever the quota.
    pub fn insert_sandbox(&self, s: &NewSandbox) -> Result<SandboxRow> {
        self.insert_sandbox_with(s, &[])
    }

    /// [`Store::insert_sandbox`] attaching `volumes` (by name, the user's)
    /// in the same transaction: an unknown volume is
    /// [`StoreError::NotFound`], a volume another sandbox holds read-write
    /// (or any read-write attach of one already attached) is
    /// [`StoreError::InUse`].
    pub fn insert_sandbox_with(
        &self,
        s: &NewSandbox,
        volumes: &[crate::NewAttachment],
    ) -> Result<SandboxRow> {
        let now = now_ms();
        let labels = serde_json::to_string(&s.labels)?;
        let egress = serde_json::to_string(&s.egress)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE user_id = ?1 AND name = ?2)",
            params![s.user_id, s.name],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::Duplicate {
                kind: "sandbox",
                name: s.name.clone(),
            });
        }
        let (max_sandboxes, max_cpus, max_memory_mb, max_disk_mb): (u64, u64, u64, u64) = tx
            .query_row(
                "SELECT max_sandboxes, max_cpus, max_memory_mb, max_disk_mb
                 FROM users WHERE id = ?1",
                [&s.user_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "user",
                id: s.user_id.clone(),
            })?;
        let Usage {
            sandboxes: count,
            cpus,
            memory_mb,
            disk_mb,
        } = usage(&tx, &s.user_id)?;
        if count >= max_sandboxes {
            return Err(StoreError::SandboxQuota {
                used: count,
                limit: max_sandboxes,
            });
        }
        if cpus + u64::from(s.cpus) > max_cpus {
            return Err(StoreError::CpuQuota {
                used: cpus,
                limit: max_cpus,
                asked: s.cpus.into(),
            });
        }
        if memory_mb + s.memory_mb > max_memory_mb {
            return Err(StoreError::MemoryQuota {
                used: memory_mb,
                limit: max_memory_mb,
                asked: s.memory_mb,
            });
        }
        if disk_mb.saturating_add(s.disk_mb) > max_disk_mb {
            return Err(StoreError::DiskQuota {
                used: disk_mb,
                limit: max_disk_mb,
                asked: s.disk_mb,
            });
        }
        let row = tx
            .query_row(
                &format!(
                    "INSERT INTO sandboxes (id, user_id, name, image, cpus, memory_mb, status,
                                            thermal, thermal_since, keep_hot, labels,
                                            created_at, updated_at, egress, disk_mb)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?9, ?9, ?12, ?13)
                     RETURNING {COLS}"
                ),
                params![
                    s.id,
                    s.user_id,
                    s.name,
                    s.image,
                    s.cpus,
                    s.memory_mb,
                    SandboxStatus::Creating.as_str(),
                    Thermal::Hot.as_str(),
                    now,
                    s.keep_hot,
                    labels,
                    egress,
                    s.disk_mb
                ],
                sandbox,
            )
            .map_err(|e| StoreError::unique(e, "sandbox", &s.name))?;
        for a in volumes {
            crate::volumes::attach(&tx, &s.user_id, &s.id, a)?;
        }
        tx.commit()?;
        Ok(row)
    }

    /// A sandbox row by id, whoever owns it (the daemon's own bookkeeping;
    /// requests go through [`Store::sandbox`]).
    pub fn sandbox_row(&self, id: &str) -> Result<Option<SandboxRow>> {
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
    pub fn sandbox(&self, user_id: &str, id_or_name: &str) -> Result<Option<SandboxRow>> {
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

    pub fn sandboxes_of(&self, user_id: &str) -> Result<Vec<SandboxRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLS} FROM sandboxes WHERE user_id = ?1 ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([user_id], sandbox)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every sandbox of every user (startup recovery, the DNS table).
    pub fn all_sandboxes(&self) -> Result<Vec<SandboxRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLS} FROM sandboxes ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], sandbox)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// What a user holds, for quotas.
    pub fn usage_of(&self, user_id: &str) -> Result<Usage> {
        usage(&self.conn(), user_id)
    }

    /// Sets sandbox `id`'s disk to `disk_mb` if its user's disk quota
    /// allows the difference (checked and written in one transaction).
    /// Only growing is allowed: a smaller size is refused by the caller.
    pub fn set_disk_mb(&self, id: &str, disk_mb: u64) -> Result<SandboxRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (user_id, old): (String, u64) = tx
            .query_row(
                "SELECT user_id, disk_mb FROM sandboxes WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| not_found(id))?;
        let limit: u64 = tx.query_row(
            "SELECT max_disk_mb FROM users WHERE id = ?1",
            [&user_id],
            |r| r.get(0),
        )?;
        let used = usage(&tx, &user_id)?.disk_mb;
        let asked = disk_mb.saturating_sub(old);
        if used.saturating_add(asked) > limit {
            return Err(StoreError::DiskQuota { used, limit, asked });
        }
        let row = tx.query_row(
            &format!(
                "UPDATE sandboxes SET disk_mb = ?2, updated_at = ?3 WHERE id = ?1 RETURNING {COLS}"
            ),
            params![id, disk_mb, now_ms()],
            sandbox,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// Changes the named fields of row `id` in one statement; the row as
    /// it is after.
    pub fn update_sandbox(&self, id: &str, u: &SandboxUpdate) -> Result<SandboxRow> {
        let now = now_ms();
        // ?1 is the id, ?2 the time; each field adds its own parameter.
        let mut sets = vec!["updated_at = ?2".to_string()];
        let mut values: Vec<Box<dyn ToSql>> = vec![Box::new(id.to_string()), Box::new(now)];
        let mut set = |sets: &mut Vec<String>, col: &str, v: Box<dyn ToSql>| {
            values.push(v);
            let n = values.len();
            if col == "thermal" {
                sets.push(format!(
                    "thermal = ?{n}, \
                     thermal_since = CASE WHEN thermal = ?{n} THEN thermal_since ELSE ?2 END"
                ));
            } else {
                sets.push(format!("{col} = ?{n}"));
            }
        };
        if let Some(v) = u.status {
            set(&mut sets, "status", Box::new(v.as_str()));
        }
        if let Some(v) = &u.status_reason {
            set(&mut sets, "status_reason", Box::new(v.clone()));
        }
        if let Some(v) = u.thermal {
            set(&mut sets, "thermal", Box::new(v.as_str()));
        }
        if let Some(v) = &u.ip {
            set(&mut sets, "ip", Box::new(v.clone()));
        }
        if let Some(v) = u.keep_hot {
            set(&mut sets, "keep_hot", Box::new(v));
        }
        if let Some(v) = &u.labels {
            set(&mut sets, "labels", Box::new(serde_json::to_string(v)?));
        }
        if let Some(v) = &u.egress {
            set(&mut sets, "egress", Box::new(serde_json::to_string(v)?));
        }
        if let Some(v) = &u.runtime {
            set(&mut sets, "runtime", Box::new(serde_json::to_string(v)?));
        }
        let sql = format!(
            "UPDATE sandboxes SET {} WHERE id = ?1 RETURNING {COLS}",
            sets.join(", ")
        );
        let params: Vec<&dyn ToSql> = values.iter().map(|v| v.as_ref()).collect();
        self.conn()
            .query_row(&sql, params.as_slice(), sandbox)
            .optional()?
            .ok_or_else(|| not_found(id))
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

/// What a user's sandboxes hold together, for quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    pub sandboxes: u64,
    pub cpus: u64,
    pub memory_mb: u64,
    /// Sandbox disks and volumes together (one quota, `max_disk_mb`).
    pub disk_mb: u64,
}

pub(crate) fn usage(conn: &rusqlite::Connection, user_id: &str) -> Result<Usage> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(cpus), 0), COALESCE(SUM(memory_mb), 0),
                COALESCE(SUM(disk_mb), 0)
                  + (SELECT COALESCE(SUM(size_mb), 0) FROM volumes WHERE user_id = ?1)
                  + (SELECT COALESCE(SUM(memory_mb + disk_mb), 0) FROM checkpoints WHERE user_id = ?1)
                  + (SELECT COALESCE(SUM((bytes + 1048575) / 1048576), 0) FROM images WHERE user_id = ?1)
         FROM sandboxes WHERE user_id = ?1",
        [user_id],
        |r| {
            Ok(Usage {
                sandboxes: r.get(0)?,
                cpus: r.get(1)?,
                memory_mb: r.get(2)?,
                disk_mb: r.get(3)?,
            })
        },
    )?)
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
                max_disk_mb: 1 << 20,
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
            disk_mb: 2048,
            keep_hot: false,
            labels: BTreeMap::from([("team".into(), "a".into())]),
            egress: Egress::Public,
        }
    }

    #[test]
    fn sandboxes_are_scoped_to_their_user() {
        let s = store_with(&["alice", "bob"]);
        let row = s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        assert_eq!(
            (row.status, row.thermal, row.runtime),
            (SandboxStatus::Creating, Thermal::Hot, None)
        );
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
        assert_eq!(s.sandbox_row("sb-2").unwrap().unwrap().user_id, "u-bob");
        assert_eq!(s.sandboxes_of("u-bob").unwrap().len(), 1);
        assert_eq!(
            s.usage_of("u-alice").unwrap(),
            Usage {
                sandboxes: 1,
                cpus: 2,
                memory_mb: 1024,
                disk_mb: 2048
            }
        );
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
                    status: Some(SandboxStatus::Running),
                    ip: Some(Some("10.0.0.2".into())),
                    runtime: Some(serde_json::json!({"tap": "bt1"})),
                    thermal: Some(Thermal::Hot),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(after.status, SandboxStatus::Running);
        assert_eq!(after.ip.as_deref(), Some("10.0.0.2"));
        assert_eq!(after.runtime.as_ref().unwrap()["tap"], "bt1");
        assert_eq!(after.labels, before.labels);
        assert_eq!(after.egress, Egress::Public, "the default");
        let allow = Egress::Allow(vec!["api.example.com".into(), "10.1.2.0/24".into()]);
        let patched = s
            .update_sandbox(
                "sb-1",
                &SandboxUpdate {
                    egress: Some(allow.clone()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(patched.egress, allow);
        assert_eq!(s.sandbox("u-alice", "dev").unwrap().unwrap().egress, allow);
        assert_eq!(
            after.thermal_since, before.thermal_since,
            "thermal unchanged keeps its timestamp"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let warm = s
            .update_sandbox(
                "sb-1",
                &SandboxUpdate {
                    thermal: Some(Thermal::Warm),
                    status_reason: Some(Some("why".into())),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(warm.thermal, Thermal::Warm);
        assert!(warm.thermal_since > before.thermal_since);
        assert_eq!(warm.status_reason.as_deref(), Some("why"));
        assert_eq!(warm.status, SandboxStatus::Running, "untouched");
        let cleared = s
            .update_sandbox(
                "sb-1",
                &SandboxUpdate {
                    status_reason: Some(None),
                    ip: Some(None),
                    runtime: Some(serde_json::Value::Null),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            (cleared.status_reason, cleared.ip, cleared.runtime),
            (None, None, None)
        );
        assert!(matches!(
            s.update_sandbox("nope", &SandboxUpdate::default()),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_sandbox("sb-1").unwrap();
        assert!(s.sandbox("u-alice", "dev").unwrap().is_none());
    }

    #[test]
    fn quota_is_checked_in_the_insert() {
        let s = store_with(&["alice"]);
        // 5 sandboxes, 8 CPUs, 8192 MiB.
        for i in 0..4 {
            s.insert_sandbox(&new(&format!("sb-{i}"), "alice", &format!("n{i}")))
                .unwrap();
        }
        // 8 of 8 CPUs in use.
        let mut small = new("sb-x", "alice", "x");
        small.cpus = 1;
        assert_eq!(
            s.insert_sandbox(&small).unwrap_err().to_string(),
            "CPU quota reached: 8 of 8 CPUs in use, 1 more asked"
        );
        s.delete_sandbox("sb-0").unwrap();
        let mut big = new("sb-y", "alice", "y");
        big.memory_mb = 6000;
        assert!(matches!(
            s.insert_sandbox(&big),
            Err(StoreError::MemoryQuota {
                used: 3072,
                limit: 8192,
                asked: 6000
            })
        ));
        s.insert_sandbox(&new("sb-4", "alice", "n4")).unwrap();
        // A taken name is a duplicate before it is a quota question.
        assert!(matches!(
            s.insert_sandbox(&new("sb-z", "alice", "n4")),
            Err(StoreError::Duplicate { .. })
        ));
        assert!(matches!(
            s.insert_sandbox(&new("sb-u", "nobody", "n")),
            Err(StoreError::NotFound { kind: "user", .. })
        ));
    }

    #[test]
    fn disk_quota_covers_creates_and_grows() {
        let s = Store::open_in_memory().unwrap();
        s.create_user(&NewUser {
            id: "u-alice".into(),
            name: "alice".into(),
            key_hash: "h".into(),
            max_sandboxes: 5,
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb: 5000,
        })
        .unwrap();
        let sized = |id: &str, mb: u64| NewSandbox {
            cpus: 1,
            memory_mb: 256,
            disk_mb: mb,
            ..new(id, "alice", id)
        };
        assert_eq!(s.insert_sandbox(&sized("a", 2000)).unwrap().disk_mb, 2000);
        s.insert_sandbox(&sized("b", 2000)).unwrap();
        assert!(matches!(
            s.insert_sandbox(&sized("c", 1001)),
            Err(StoreError::DiskQuota {
                used: 4000,
                limit: 5000,
                asked: 1001
            })
        ));
        assert_eq!(s.usage_of("u-alice").unwrap().disk_mb, 4000);
        // A grow is charged the difference only.
        assert_eq!(s.set_disk_mb("a", 3000).unwrap().disk_mb, 3000);
        assert_eq!(
            s.set_disk_mb("b", 2001).unwrap_err().to_string(),
            "disk quota reached: 5000 of 5000 MiB in use, 1 more asked"
        );
        assert_eq!(s.sandbox_row("b").unwrap().unwrap().disk_mb, 2000);
        assert!(matches!(
            s.set_disk_mb("nope", 1),
            Err(StoreError::NotFound { .. })
        ));
        s.delete_sandbox("a").unwrap();
        s.insert_sandbox(&sized("c", 3000)).unwrap();
    }

    #[test]
    fn parallel_inserts_never_overshoot_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = std::sync::Arc::new(Store::open(&path).unwrap());
        s.create_user(&NewUser {
            id: "u-alice".into(),
            name: "alice".into(),
            key_hash: "h".into(),
            max_sandboxes: 3,
            max_cpus: 64,
            max_memory_mb: 1 << 20,
            max_disk_mb: 1 << 30,
        })
        .unwrap();
        // Half the writers on their own connection to the same file, as a
        // second process would be: the transaction, not the in-process
        // mutex, must hold the line.
        let other = std::sync::Arc::new(Store::open(&path).unwrap());
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let s = if i % 2 == 0 { s.clone() } else { other.clone() };
                std::thread::spawn(move || {
                    s.insert_sandbox(&new(&format!("sb-{i}"), "alice", &format!("n{i}")))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 3, "{results:?}");
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::SandboxQuota { used: 3, limit: 3 })));
        assert_eq!(s.usage_of("u-alice").unwrap().sandboxes, 3);
    }

    #[test]
    fn a_bad_status_in_the_table_is_an_error_not_a_panic() {
        let s = store_with(&["alice"]);
        s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        s.conn()
            .execute("UPDATE sandboxes SET status = 'melted'", [])
            .unwrap();
        assert!(s.sandbox("u-alice", "dev").is_err());
    }

    #[test]
    fn deleting_a_user_removes_their_rows() {
        let s = store_with(&["alice"]);
        s.insert_sandbox(&new("sb-1", "alice", "dev")).unwrap();
        s.delete_user("alice").unwrap();
        assert!(s.all_sandboxes().unwrap().is_empty());
    }
}
