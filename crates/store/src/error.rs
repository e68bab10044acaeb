use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is malformed")]
    Json(#[from] serde_json::Error),
    #[error("a {kind} named '{name}' already exists")]
    Duplicate { kind: &'static str, name: String },
    #[error("no {kind} '{id}'")]
    NotFound { kind: &'static str, id: String },
    #[error("the alias '{alias}' is taken")]
    AliasTaken { alias: String },
    #[error("port {port} is already published as '{alias}'")]
    PortPublished { port: u16, alias: String },
    #[error("sandbox quota reached: {used} of {limit} sandboxes in use; destroy one first")]
    SandboxQuota { used: u64, limit: u64 },
    #[error("CPU quota reached: {used} of {limit} CPUs in use, {asked} more asked")]
    CpuQuota { used: u64, limit: u64, asked: u64 },
    #[error("memory quota reached: {used} of {limit} MiB in use, {asked} more asked")]
    MemoryQuota { used: u64, limit: u64, asked: u64 },
    #[error("disk quota reached: {used} of {limit} MiB in use, {asked} more asked")]
    DiskQuota { used: u64, limit: u64, asked: u64 },
    #[error("{0}")]
    InUse(String),
    #[error("checkpoint quota reached: {used} of {limit} checkpoints kept; delete one first")]
    CheckpointQuota { used: u64, limit: u64 },
    #[error("the database is at schema version {found}, newer than this binary knows ({known})")]
    TooNew { found: i64, known: i64 },
}

impl StoreError {
    /// Maps a UNIQUE constraint failure to [`StoreError::Duplicate`].
    pub(crate) fn unique(e: rusqlite::Error, kind: &'static str, name: &str) -> StoreError {
        match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                StoreError::Duplicate {
                    kind,
                    name: name.to_string(),
                }
            }
            _ => StoreError::Sqlite(e),
        }
    }
}
