//! Publications: a sandbox port reachable from the public proxy under an
//! alias. Aliases are unique across all users, compared without regard to
//! case; a sandbox publishes each port at most once. Rows go with their
//! sandbox (and user): `ON DELETE CASCADE`.
//!
//! Publishing the same sandbox port twice is an error here
//! ([`StoreError::PortPublished`], carrying the alias it has); the daemon
//! decides whether that is idempotent for the caller.

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use crate::{now_ms, Result, Store, StoreError};

/// A published port, with its sandbox's name (joined in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublicationRecord {
    pub id: String,
    pub user_id: String,
    pub sandbox_id: String,
    /// The sandbox's name when the row was read.
    pub sandbox_name: String,
    pub port: u16,
    /// Lowercase, as stored.
    pub alias: String,
    /// Unix ms.
    pub created_at: i64,
}

/// What [`Store::insert_publication`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPublication {
    pub id: String,
    pub user_id: String,
    pub sandbox_id: String,
    pub port: u16,
    /// Stored lowercase.
    pub alias: String,
}

/// The columns of a [`PublicationRecord`], sandbox name joined in.
const SELECT: &str =
    "SELECT p.id, p.user_id, p.sandbox_id, s.name, p.port, p.alias, p.created_at FROM publications p \
     JOIN sandboxes s ON s.id = p.sandbox_id";

fn publication(r: &Row<'_>) -> rusqlite::Result<PublicationRecord> {
    Ok(PublicationRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        sandbox_name: r.get(3)?,
        port: r.get(4)?,
        alias: r.get(5)?,
        created_at: r.get(6)?,
    })
}

impl Store {
    /// Publishes a port. Fails with [`StoreError::AliasTaken`] when any
    /// publication (of any user) has the alias, ignoring case, and with
    /// [`StoreError::PortPublished`] when the sandbox already publishes the
    /// port.
    pub fn insert_publication(&self, p: &NewPublication) -> Result<PublicationRecord> {
        let alias = p.alias.to_ascii_lowercase();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT alias FROM publications WHERE sandbox_id = ?1 AND port = ?2",
                params![p.sandbox_id, p.port],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(existing) = existing {
            return Err(StoreError::PortPublished {
                port: p.port,
                alias: existing,
            });
        }
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM publications WHERE alias = ?1)",
            [&alias],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::AliasTaken { alias });
        }
        tx.execute(
            "INSERT INTO publications (id, user_id, sandbox_id, port, alias, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![p.id, p.user_id, p.sandbox_id, p.port, alias, now_ms()],
        )
        .map_err(|e| match StoreError::unique(e, "publication", &alias) {
            // Both were checked above in this transaction; a unique failure
            // left can only be the alias (case variants included).
            StoreError::Duplicate { .. } => StoreError::AliasTaken {
                alias: alias.clone(),
            },
            other => other,
        })?;
        let rec = tx
            .query_row(&format!("{SELECT} WHERE p.id = ?1"), [&p.id], publication)
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "sandbox",
                id: p.sandbox_id.clone(),
            })?;
        tx.commit()?;
        Ok(rec)
    }

    /// The publications of one sandbox, by port.
    pub fn publications_of_sandbox(&self, sandbox_id: &str) -> Result<Vec<PublicationRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("{SELECT} WHERE p.sandbox_id = ?1 ORDER BY p.port"))?;
        let rows = stmt.query_map([sandbox_id], publication)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// All publications of a user's sandboxes, by sandbox and port.
    pub fn publications_of_user(&self, user_id: &str) -> Result<Vec<PublicationRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT} WHERE p.user_id = ?1 ORDER BY p.sandbox_id, p.port"
        ))?;
        let rows = stmt.query_map([user_id], publication)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The publication with this alias (any case), of any user: the public
    /// proxy's lookup.
    pub fn publication_by_alias(&self, alias: &str) -> Result<Option<PublicationRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SELECT} WHERE p.alias = ?1"),
                [alias.to_ascii_lowercase()],
                publication,
            )
            .optional()?)
    }

    /// Unpublishes a sandbox's port; answers what was removed.
    pub fn delete_publication(&self, sandbox_id: &str, port: u16) -> Result<PublicationRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rec = tx
            .query_row(
                &format!("{SELECT} WHERE p.sandbox_id = ?1 AND p.port = ?2"),
                params![sandbox_id, port],
                publication,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound {
                kind: "publication",
                id: format!("{sandbox_id}:{port}"),
            })?;
        tx.execute("DELETE FROM publications WHERE id = ?1", [&rec.id])?;
        tx.commit()?;
        Ok(rec)
    }

    /// Unpublishes by alias (any case).
    pub fn delete_publication_alias(&self, alias: &str) -> Result<()> {
        let n = self.conn().execute(
            "DELETE FROM publications WHERE alias = ?1",
            [alias.to_ascii_lowercase()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "publication",
                id: alias.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandbox, NewUser};

    fn store() -> Store {
        let s = Store::open_in_memory().unwrap();
        for u in ["alice", "bob"] {
            s.create_user(&NewUser {
                id: format!("u-{u}"),
                name: u.into(),
                key_hash: format!("h-{u}"),
                max_sandboxes: 5,
                max_cpus: 8,
                max_memory_mb: 8192,
                max_disk_mb: 1 << 20,
            })
            .unwrap();
        }
        for (id, user, name) in [("sb-1", "alice", "dev"), ("sb-2", "bob", "web")] {
            s.insert_sandbox(&NewSandbox {
                id: id.into(),
                user_id: format!("u-{user}"),
                name: name.into(),
                image: "tiny".into(),
                cpus: 1,
                memory_mb: 256,
                disk_mb: 2048,
                keep_hot: false,
                labels: Default::default(),
                egress: Default::default(),
            })
            .unwrap();
        }
        s
    }

    fn new(id: &str, sandbox: &str, port: u16, alias: &str) -> NewPublication {
        NewPublication {
            id: id.into(),
            user_id: if sandbox == "sb-1" {
                "u-alice"
            } else {
                "u-bob"
            }
            .into(),
            sandbox_id: sandbox.into(),
            port,
            alias: alias.into(),
        }
    }

    #[test]
    fn aliases_are_global_and_case_insensitive() {
        let s = store();
        let p = s
            .insert_publication(&new("p1", "sb-1", 3000, "MyApp"))
            .unwrap();
        assert_eq!(p.alias, "myapp");
        assert_eq!(p.sandbox_name, "dev");
        assert_eq!(p.port, 3000);
        // Another user, another case: still taken.
        assert!(matches!(
            s.insert_publication(&new("p2", "sb-2", 80, "MYAPP")),
            Err(StoreError::AliasTaken { alias }) if alias == "myapp"
        ));
        assert_eq!(
            s.publication_by_alias("myAPP").unwrap().unwrap().sandbox_id,
            "sb-1"
        );
        assert!(s.publication_by_alias("other").unwrap().is_none());
    }

    #[test]
    fn a_port_is_published_once_per_sandbox() {
        let s = store();
        s.insert_publication(&new("p1", "sb-1", 3000, "one"))
            .unwrap();
        assert!(matches!(
            s.insert_publication(&new("p2", "sb-1", 3000, "two")),
            Err(StoreError::PortPublished { port: 3000, alias }) if alias == "one"
        ));
        // The same port of another sandbox, another port of this one: fine.
        s.insert_publication(&new("p3", "sb-2", 3000, "three"))
            .unwrap();
        s.insert_publication(&new("p4", "sb-1", 8080, "four"))
            .unwrap();
        let ports: Vec<u16> = s
            .publications_of_sandbox("sb-1")
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [3000, 8080]);
        assert_eq!(s.publications_of_user("u-bob").unwrap().len(), 1);
    }

    #[test]
    fn deletes_by_port_or_alias_and_with_the_sandbox() {
        let s = store();
        s.insert_publication(&new("p1", "sb-1", 3000, "one"))
            .unwrap();
        s.insert_publication(&new("p2", "sb-1", 8080, "two"))
            .unwrap();
        s.insert_publication(&new("p3", "sb-2", 80, "three"))
            .unwrap();
        assert_eq!(s.delete_publication("sb-1", 3000).unwrap().alias, "one");
        assert!(matches!(
            s.delete_publication("sb-1", 3000),
            Err(StoreError::NotFound { .. })
        ));
        // The alias is free again.
        s.insert_publication(&new("p4", "sb-2", 81, "one")).unwrap();
        s.delete_publication_alias("ONE").unwrap();
        assert!(s.delete_publication_alias("one").is_err());
        s.delete_sandbox("sb-1").unwrap();
        assert!(s.publication_by_alias("two").unwrap().is_none());
        assert!(s.publications_of_user("u-alice").unwrap().is_empty());
        assert_eq!(s.publications_of_user("u-bob").unwrap().len(), 1);
    }
}
