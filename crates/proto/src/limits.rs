//! Limits both sides enforce. They are part of the protocol: a peer that
//! exceeds one gets an [`crate::ErrorCode`] naming it.

/// Largest frame payload, in bytes (1 MiB). Larger frames are refused when
/// encoding and rejected before allocation when decoding.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;

/// Size of the data chunks senders cut streams into. Well under the frame
/// limit so that a frame never needs more than one allocation of this size.
pub const DATA_CHUNK: usize = 64 * 1024;

/// Concurrent connections an agent accepts.
pub const MAX_CONNECTIONS: usize = 50;

/// Concurrent PTY sessions an agent keeps.
pub const MAX_SESSIONS: usize = 20;

/// Largest single file write, in bytes (100 MB).
pub const MAX_FILE_WRITE: u64 = 100 * 1000 * 1000;

/// Most entries one directory listing returns.
pub const MAX_LS_ENTRIES: usize = 10_000;

/// Scrollback kept per PTY session, in bytes.
pub const SCROLLBACK_BYTES: usize = 64 * 1024;

/// Seconds a connection has to authenticate before the agent closes it
/// (the host bounds its side of the handshake by the same).
pub const AUTH_DEADLINE_SECS: u64 = 5;

/// Connections an agent lets wait in the handshake at once. A new one past
/// this pushes out the longest waiting (`too_many_connections`), so
/// connections that never answer cannot keep the host out; they do not
/// count towards [`MAX_CONNECTIONS`], which counts authenticated ones.
pub const MAX_PENDING_AUTH: usize = 16;

/// Longest accepted session name, in bytes.
pub const MAX_SESSION_NAME: usize = 64;
