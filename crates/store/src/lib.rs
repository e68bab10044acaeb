//! bhatti's store: SQLite in WAL mode with migrations in code. The only
//! crate that speaks SQL. Blocking API: the daemon calls it from
//! `spawn_blocking`.
//!
//! Every user-owned row carries its `user_id`, and every lookup of one takes
//! the user: another user's object is simply not found.

mod checkpoints;
mod error;
mod events;
mod images;
mod migrations;
mod publications;
mod sandboxes;
mod secrets;
mod shares;
mod users;
mod volumes;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

pub use api_types::{SandboxStatus, Thermal};
pub use checkpoints::{CheckpointRow, NewCheckpoint};
pub use error::StoreError;
pub use events::{EventFilter, EventRecord};
pub use images::{ImageRow, NewImage};
pub use publications::{NewPublication, PublicationRecord};
pub use sandboxes::{NewSandbox, SandboxRow, SandboxUpdate, Usage};
pub use secrets::SecretRecord;
pub use shares::{NewShare, ShareRecord};
pub use users::{NewUser, UserRecord};
pub use volumes::{Attachment, NewAttachment, NewVolume, VolumeRow};

pub type Result<T> = std::result::Result<T, StoreError>;

/// A handle on the database. Cheap operations behind one connection: SQLite
/// serialises writers anyway, and the daemon's rates are far below its limits.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<rusqlite::Connection>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = rusqlite::Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // It holds key hashes and agent tokens: owner only. SQLite gives
        // its -wal and -shm files the database file's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidPath(format!("chmod 0600: {e}").into()),
            }
        })?;
        Self::setup(conn)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Store> {
        let conn = rusqlite::Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: ":memory:".into(),
            source,
        })?;
        Self::setup(conn)
    }

    fn setup(mut conn: rusqlite::Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrations::migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version after migration.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}
