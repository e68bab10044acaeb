//! Schema migrations, applied in order; `PRAGMA user_version` records how far.

use crate::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    // 1: users, sandboxes, secrets, events.
    "CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL UNIQUE,
        max_sandboxes INTEGER NOT NULL,
        max_cpus INTEGER NOT NULL,
        max_memory_mb INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        image TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        thermal TEXT NOT NULL,
        thermal_since INTEGER NOT NULL,
        ip TEXT,
        keep_hot INTEGER NOT NULL DEFAULT 0,
        labels TEXT NOT NULL DEFAULT '{}',
        runtime TEXT NOT NULL DEFAULT 'null',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (user_id, name)
    );
    CREATE TABLE secrets (
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, name)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        sandbox_id TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}',
        at INTEGER NOT NULL
    );
    CREATE INDEX events_by_sandbox ON events (sandbox_id, id);",
    // 2: publications (a sandbox port under a public alias).
    "CREATE TABLE publications (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        alias TEXT NOT NULL COLLATE NOCASE UNIQUE,
        created_at INTEGER NOT NULL,
        UNIQUE (sandbox_id, port)
    );
    CREATE INDEX publications_by_user ON publications (user_id);",
    // 3: each sandbox's egress policy (JSON, as the API shows it).
    "ALTER TABLE sandboxes ADD COLUMN egress TEXT NOT NULL DEFAULT '\"public\"';",
    // 4: share links (a sandbox's browser terminal behind a token; only the
    // token's SHA-256 is kept).
    "CREATE TABLE shares (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        token_hash TEXT NOT NULL UNIQUE,
        read_only INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX shares_by_sandbox ON shares (sandbox_id);",
    // 5: disk sizes. Sandboxes made before had 2 GiB disks; their users may
    // keep holding what they could before (2 GiB per sandbox of their quota).
    "ALTER TABLE sandboxes ADD COLUMN disk_mb INTEGER NOT NULL DEFAULT 2048;
    ALTER TABLE users ADD COLUMN max_disk_mb INTEGER NOT NULL DEFAULT 0;
    UPDATE users SET max_disk_mb = max_sandboxes * 2048;",
    // 6: persistent volumes, charged to max_disk_mb, and which sandboxes
    // use them (a sandbox row's delete detaches).
    "CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size_mb INTEGER NOT NULL,
        uuid TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (user_id, name)
    );
    CREATE TABLE volume_attachments (
        volume_id TEXT NOT NULL REFERENCES volumes(id),
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        mount TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        PRIMARY KEY (volume_id, sandbox_id)
    );
    CREATE INDEX volume_attachments_by_sandbox ON volume_attachments (sandbox_id);",
    // 7: checkpoints (a sandbox's memory and disk at an instant), and which
    // checkpoint a sandbox was made from or rolled back to (it is in use
    // while such a sandbox exists).
    "CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        sandbox_name TEXT NOT NULL,
        image TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_mb INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (user_id, name)
    );
    ALTER TABLE sandboxes ADD COLUMN checkpoint_id TEXT;",
    // 8: OCI images a user pulled, imported or saved (the files live under
    // `DATA/images/oci/<id>`; the row says whose, under which name, and
    // whether an admin shared it with everyone).
    "CREATE TABLE images (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        shared INTEGER NOT NULL DEFAULT 0,
        source TEXT NOT NULL,
        digest TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (user_id, name)
    );",
];

pub fn migrate(conn: &mut rusqlite::Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema as `version` left it (at most 4), with a user and a
    /// sandbox in it, migrated to the newest.
    fn migrated_from(version: usize) -> rusqlite::Connection {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO users VALUES ('u', 'alice', 'h', 5, 8, 8192, 0);
             INSERT INTO sandboxes (id, user_id, name, image, cpus, memory_mb, status, thermal,
                                    thermal_since, created_at, updated_at)
             VALUES ('sb-1', 'u', 'dev', 'minimal', 1, 512, 'running', 'hot', 0, 0, 0);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn rows_from_before_egress_policies_are_public() {
        let conn = migrated_from(2);
        let egress: String = conn
            .query_row("SELECT egress FROM sandboxes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            serde_json::from_str::<api_types::Egress>(&egress).unwrap(),
            api_types::Egress::Public
        );
    }

    #[test]
    fn sandboxes_from_before_disk_sizes_have_two_gib_and_users_room_for_them() {
        let conn = migrated_from(4);
        let disk: u64 = conn
            .query_row("SELECT disk_mb FROM sandboxes", [], |r| r.get(0))
            .unwrap();
        let quota: u64 = conn
            .query_row("SELECT max_disk_mb FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!((disk, quota), (2048, 5 * 2048));
    }
}
