//! Lifecycle events, stored so users and tests read the same history.

use rusqlite::params;
use serde::Serialize;

use crate::{now_ms, Result, Store};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub id: i64,
    pub sandbox_id: Option<String>,
    pub kind: String,
    pub detail: serde_json::Value,
    pub at: i64,
}

impl Store {
    pub fn record_event(
        &self,
        user_id: &str,
        sandbox_id: Option<&str>,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO events (user_id, sandbox_id, kind, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![user_id, sandbox_id, kind, serde_json::to_string(detail)?, now_ms()],
        )?;
        Ok(())
    }

    /// A sandbox's events, oldest first.
    pub fn events_of(&self, user_id: &str, sandbox_id: &str) -> Result<Vec<EventRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, sandbox_id, kind, detail, at FROM events
             WHERE user_id = ?1 AND sandbox_id = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map([user_id, sandbox_id], |r| {
            let detail: String = r.get(3)?;
            Ok(EventRecord {
                id: r.get(0)?,
                sandbox_id: r.get(1)?,
                kind: r.get(2)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_kept_in_order_per_sandbox() {
        let s = Store::open_in_memory().unwrap();
        s.record_event(
            "u",
            Some("sb"),
            "created",
            &serde_json::json!({"image": "tiny"}),
        )
        .unwrap();
        s.record_event("u", Some("sb"), "destroyed", &serde_json::json!({}))
            .unwrap();
        s.record_event("u", Some("other"), "created", &serde_json::json!({}))
            .unwrap();
        let ev = s.events_of("u", "sb").unwrap();
        assert_eq!(
            ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["created", "destroyed"]
        );
        assert_eq!(ev[0].detail["image"], "tiny");
        assert!(s.events_of("someone-else", "sb").unwrap().is_empty());
    }

    #[test]
    fn a_file_database_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bhatti.db");
        {
            let s = Store::open(&path).unwrap();
            s.record_event("u", None, "boot", &serde_json::json!({}))
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 3);
        let mode: String = s
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        for f in ["bhatti.db", "bhatti.db-wal"] {
            let m = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{f}");
        }
    }
}
