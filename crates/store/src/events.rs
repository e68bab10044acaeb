//! Lifecycle events, stored so users and tests read the same history.

use rusqlite::params;
use serde::Serialize;

use crate::{now_ms, Result, Store};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub id: i64,
    /// Whose sandbox (or account) the event is about.
    pub user_id: String,
    pub sandbox_id: Option<String>,
    pub kind: String,
    pub detail: serde_json::Value,
    pub at: i64,
}

/// Which events [`Store::list_events`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this user's events (`None`: everyone's).
    pub user_id: Option<String>,
    pub sandbox_id: Option<String>,
    pub kind: Option<String>,
    /// At or after this time (Unix ms).
    pub since: Option<i64>,
    /// At or before this time (Unix ms).
    pub until: Option<i64>,
    /// Only events recorded after the one with this id.
    pub after_id: Option<i64>,
    /// At most this many (the newest ones, unless `after_id` is set: then
    /// the oldest after it).
    pub limit: u32,
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRecord> {
    let detail: String = r.get(4)?;
    Ok(EventRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        kind: r.get(3)?,
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        at: r.get(5)?,
    })
}

/// The SQL of [`Store::list_events`] and its arguments.
fn events_query(filter: &EventFilter, order: &str) -> (String, Vec<rusqlite::types::Value>) {
    // Only the conditions given, so that SQLite can walk the id
    // (rowid) range of a cursor rather than the whole table.
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    use rusqlite::types::Value as V;
    if let Some(u) = &filter.user_id {
        conds.push("user_id = ?");
        args.push(V::Text(u.clone()));
    }
    if let Some(sb) = &filter.sandbox_id {
        conds.push("sandbox_id = ?");
        args.push(V::Text(sb.clone()));
    }
    if let Some(k) = &filter.kind {
        conds.push("kind = ?");
        args.push(V::Text(k.clone()));
    }
    if let Some(t) = filter.since {
        conds.push("at >= ?");
        args.push(V::Integer(t));
    }
    if let Some(t) = filter.until {
        conds.push("at <= ?");
        args.push(V::Integer(t));
    }
    if let Some(id) = filter.after_id {
        conds.push("id > ?");
        args.push(V::Integer(id));
    }
    args.push(V::Integer(i64::from(filter.limit)));
    let cond = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT id, user_id, sandbox_id, kind, detail, at FROM events
         {cond} ORDER BY id {order} LIMIT ?"
    );
    (sql, args)
}

impl Store {
    /// Events matching `filter`, oldest first.
    pub fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>> {
        let conn = self.conn();
        // Oldest-first after a cursor (following); otherwise the newest
        // `limit`, returned oldest first.
        let order = if filter.after_id.is_some() {
            "ASC"
        } else {
            "DESC"
        };
        let (sql, args) = events_query(filter, order);
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), event_row)?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        if filter.after_id.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// The id of the newest event (0 when there is none).
    pub fn last_event_id(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
    }

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
            "SELECT id, user_id, sandbox_id, kind, detail, at FROM events
             WHERE user_id = ?1 AND sandbox_id = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map([user_id, sandbox_id], event_row)?;
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
    fn events_are_filtered_by_user_sandbox_kind_time_and_cursor() {
        let s = Store::open_in_memory().unwrap();
        for (u, sb, k) in [
            ("u", "a", "created"),
            ("u", "a", "running"),
            ("u", "b", "created"),
            ("v", "c", "created"),
            ("u", "a", "stopped"),
        ] {
            s.record_event(u, Some(sb), k, &serde_json::json!({}))
                .unwrap();
        }
        let kinds = |f: EventFilter| {
            s.list_events(&EventFilter { limit: 100, ..f })
                .unwrap()
                .into_iter()
                .map(|e| format!("{}/{}/{}", e.user_id, e.sandbox_id.unwrap(), e.kind))
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(EventFilter::default()).len(), 5);
        assert_eq!(
            kinds(EventFilter {
                user_id: Some("u".into()),
                sandbox_id: Some("a".into()),
                ..Default::default()
            }),
            ["u/a/created", "u/a/running", "u/a/stopped"]
        );
        assert_eq!(
            kinds(EventFilter {
                user_id: Some("u".into()),
                kind: Some("created".into()),
                ..Default::default()
            }),
            ["u/a/created", "u/b/created"]
        );
        // The newest `limit`, oldest first.
        let newest = s
            .list_events(&EventFilter {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            newest.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["created", "stopped"]
        );
        assert_eq!(newest[0].user_id, "v");
        // After a cursor: the oldest ones after it.
        let after = s
            .list_events(&EventFilter {
                after_id: Some(newest[0].id - 2),
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(after[0].id, newest[0].id - 1);
        assert_eq!(after.len(), 2);
        assert_eq!(s.last_event_id().unwrap(), newest[1].id);
        // Time bounds.
        let at = newest[1].at;
        assert_eq!(
            kinds(EventFilter {
                since: Some(at + 1),
                ..Default::default()
            }),
            Vec::<String>::new()
        );
        assert_eq!(
            kinds(EventFilter {
                until: Some(at),
                ..Default::default()
            })
            .len(),
            5
        );
    }

    #[test]
    fn a_follower_s_query_walks_the_id_range_not_the_table() {
        let s = Store::open_in_memory().unwrap();
        let filter = EventFilter {
            user_id: Some("u".into()),
            after_id: Some(41),
            limit: 1000,
            ..Default::default()
        };
        let (sql, args) = events_query(&filter, "ASC");
        let conn = s.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("rowid>?")),
            "a scan: {plan:?}"
        );
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
        assert_eq!(s.schema_version().unwrap(), 8);
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
