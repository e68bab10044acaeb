//! Every message of the protocol and its frame type.
//!
//! Control payloads are JSON objects. Unknown JSON fields are ignored (not
//! denied) so that a newer peer can add optional fields without a version
//! bump; incompatible changes bump [`crate::PROTOCOL_VERSION`] instead.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::auth::{Nonce, Proof};

/// First frame on every connection, from the agent: a fresh nonce the host
/// proves knowledge of the token on (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Random, new for every connection.
    pub nonce: Nonce,
}

/// The host's answer to [`Challenge`]: its own nonce and
/// [`crate::auth::host_proof`] over both nonces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Random, new for every connection; the agent proves itself on it.
    pub nonce: Nonce,
    pub proof: Proof,
}

/// The agent's answer to a good [`Auth`]: [`crate::auth::agent_proof`]
/// shows the host it talks to the holder of the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    /// The agent's protocol version.
    pub version: u32,
    /// The agent's build version, for diagnostics.
    pub agent_version: String,
    pub proof: Proof,
}

/// Protocol 1's first frame, which carried the token itself. Decoded only
/// to refuse it with a clear error; its token is not even parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyAuth {
    #[serde(default)]
    pub version: u32,
}

/// Why a request failed. Stable across versions; a code a reader does not
/// know decodes as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The host's proof did not match, or the handshake was malformed.
    AuthFailed,
    /// The handshake did not finish within [`crate::AUTH_DEADLINE_SECS`].
    AuthTimeout,
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// A request was malformed or had invalid values.
    BadRequest,
    /// A frame arrived that the current exchange does not allow.
    UnexpectedFrame,
    /// A frame was larger than [`crate::MAX_FRAME_PAYLOAD`].
    FrameTooLarge,
    /// The agent already serves [`crate::MAX_CONNECTIONS`] connections.
    TooManyConnections,
    /// The agent already keeps [`crate::MAX_SESSIONS`] sessions.
    TooManySessions,
    /// A session name is already taken.
    SessionExists,
    /// The session has a client attached and the request did not ask to take it over.
    SessionAttached,
    /// The attachment ended because another client took the session over.
    SessionTakenOver,
    /// No such file, directory or session.
    NotFound,
    /// The command could not be started.
    SpawnFailed,
    /// A file write exceeded [`crate::MAX_FILE_WRITE`].
    FileTooLarge,
    /// The operation was not permitted.
    PermissionDenied,
    /// Another I/O failure in the guest.
    Io,
    /// A tunnel could not connect to its guest port.
    ConnectFailed,
    /// A code this reader does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// A failed request. The connection stays usable unless the code says
/// otherwise (auth and frame-size failures close it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for WindowSize {
    fn default() -> Self {
        WindowSize { rows: 24, cols: 80 }
    }
}

/// Run a command. Piped by default; `tty` makes it a PTY session.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment on top of the agent's defaults and configured env.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the user's home when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the client will send stdin; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run in a PTY session that outlives this connection.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (tty only).
    #[serde(default)]
    pub size: Option<WindowSize>,
    /// Session name (tty only); generated when absent.
    #[serde(default)]
    pub session: Option<String>,
    /// Start and return at once with the pid; output goes to `log_path`.
    #[serde(default)]
    pub detach: bool,
    /// Where a detached command's output goes; generated when absent.
    #[serde(default)]
    pub log_path: Option<String>,
    /// Kill the process group after this many milliseconds (piped only).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The command started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// Session name, for tty execs and attaches.
    #[serde(default)]
    pub session: Option<String>,
    /// Output file, for detached execs.
    #[serde(default)]
    pub log_path: Option<String>,
}

/// The command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit status; `128 + n` when killed by signal `n`.
    pub code: i32,
    /// The signal that killed it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// It was killed because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// Signal the running command's process group (SIGKILL when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Kill {
    #[serde(default)]
    pub signal: Option<i32>,
}

/// Attach to an existing PTY session; scrollback is replayed first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAttach {
    pub session: String,
    /// Take the session over from a client already attached.
    #[serde(default)]
    pub steal: bool,
    /// Resize to this on attach.
    #[serde(default)]
    pub size: Option<WindowSize>,
}

/// Names a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    pub session: String,
}

/// What the agent knows of one PTY session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub attached: bool,
    pub size: WindowSize,
    pub created_unix_ms: u64,
    pub last_activity_unix_ms: u64,
    pub scrollback_bytes: u64,
}

/// All sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    pub sessions: Vec<SessionInfo>,
}

/// Set the guest's wall clock (`CLOCK_REALTIME`). The host sends it after
/// resuming a paused VM or restoring a snapshot: guest time continues where
/// it stopped, so the clock lags by however long the VM slept. Answered by
/// `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTime {
    /// The host's time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// How busy the guest is; the host's thermal manager reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Last request, output or input seen by the agent (Unix ms).
    pub last_activity_unix_ms: u64,
    /// PTY sessions alive.
    pub sessions: u32,
    /// PTY sessions with a client attached.
    pub attached: u32,
    /// Piped commands running for a connected client.
    pub running_execs: u32,
    /// Open connections, this one included.
    pub connections: u32,
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
}

/// Read a file. `offset` and `limit` count lines; `max_bytes` caps the
/// bytes returned. Whichever limit hits first ends the read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileRead {
    pub path: String,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// Sent before the data of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadStart {
    /// Size of the whole file, whatever part is returned.
    pub total_size: u64,
    pub mode: u32,
}

/// Sent after the data of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadEnd {
    /// Bytes sent.
    pub bytes: u64,
    /// Part of the file (after `offset`) was left out.
    pub truncated: bool,
}

/// Write a file atomically: `size` bytes of [`Message::Data`] follow, then
/// [`Message::DataEnd`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileWrite {
    pub path: String,
    pub size: u64,
    /// Permission bits; 0644 when absent (or the replaced file's mode).
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

/// A write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWritten {
    pub bytes: u64,
}

/// Stat a path (without following a final symlink).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub path: String,
}

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one path or directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_unix_ms: i64,
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// List a directory (at most [`crate::MAX_LS_ENTRIES`] entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ls {
    pub path: String,
}

/// Some entries of a listing; a listing may span many chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsChunk {
    pub entries: Vec<FileStat>,
}

/// End of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsEnd {
    /// Entries in the directory.
    pub total: u64,
    /// Fewer than `total` were sent.
    pub truncated: bool,
}

/// Connect to `127.0.0.1:port` in the guest. After [`Message::TunnelOk`]
/// the connection carries raw bytes both ways, no more frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    pub port: u16,
}

/// One TCP socket listening in the guest, from `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    pub port: u16,
    /// The bound address: `0.0.0.0`, `127.0.0.1`, `::`, `::1`, …
    pub address: String,
    /// Always `tcp` for now.
    pub protocol: String,
}

/// The guest's listening TCP sockets (the agent's own port left out),
/// sorted by port then address; the answer to [`Message::ListPorts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortList {
    pub ports: Vec<ListeningPort>,
}

/// Every message, with its frame type in [`Message::frame_type`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Protocol 1's token frame; refused.
    LegacyAuth(LegacyAuth),
    Challenge(Challenge),
    Auth(Auth),
    AuthOk(AuthOk),
    Error(ErrorMsg),
    /// Generic success for requests with nothing to return.
    Ok,
    Exec(ExecRequest),
    Started(Started),
    Stdin(Vec<u8>),
    StdinEof,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize(WindowSize),
    Exit(Exit),
    Kill(Kill),
    /// Leave a PTY session running and end the attachment.
    Detach,
    SessionAttach(SessionAttach),
    SessionList,
    Sessions(Sessions),
    SessionKill(SessionRef),
    SessionQuery(SessionRef),
    Session(SessionInfo),
    ActivityQuery,
    Activity(Activity),
    FileRead(FileRead),
    FileReadStart(FileReadStart),
    Data(Vec<u8>),
    DataEnd,
    FileReadEnd(FileReadEnd),
    FileWrite(FileWrite),
    FileWritten(FileWritten),
    Stat(Stat),
    StatResult(FileStat),
    Ls(Ls),
    LsChunk(LsChunk),
    LsEnd(LsEnd),
    Tunnel(Tunnel),
    TunnelOk,
    SetTime(SetTime),
    /// Which TCP ports listen in the guest; answered by [`Message::PortList`].
    ListPorts,
    PortList(PortList),
}

/// Frame type bytes. Grouped by area; gaps leave room for additions.
pub mod frame_type {
    /// Protocol 1's token frame, kept to refuse it clearly.
    pub const LEGACY_AUTH: u8 = 0x01;
    pub const AUTH_OK: u8 = 0x02;
    pub const ERROR: u8 = 0x03;
    pub const OK: u8 = 0x04;
    pub const CHALLENGE: u8 = 0x05;
    pub const AUTH: u8 = 0x06;
    pub const EXEC: u8 = 0x10;
    pub const STARTED: u8 = 0x11;
    pub const STDIN: u8 = 0x12;
    pub const STDIN_EOF: u8 = 0x13;
    pub const STDOUT: u8 = 0x14;
    pub const STDERR: u8 = 0x15;
    pub const RESIZE: u8 = 0x16;
    pub const EXIT: u8 = 0x17;
    pub const KILL: u8 = 0x18;
    pub const DETACH: u8 = 0x19;
    pub const SESSION_ATTACH: u8 = 0x20;
    pub const SESSION_LIST: u8 = 0x21;
    pub const SESSIONS: u8 = 0x22;
    pub const SESSION_KILL: u8 = 0x23;
    pub const SESSION_QUERY: u8 = 0x24;
    pub const SESSION: u8 = 0x25;
    pub const ACTIVITY_QUERY: u8 = 0x30;
    pub const ACTIVITY: u8 = 0x31;
    pub const FILE_READ: u8 = 0x40;
    pub const FILE_READ_START: u8 = 0x41;
    pub const DATA: u8 = 0x42;
    pub const DATA_END: u8 = 0x43;
    pub const FILE_READ_END: u8 = 0x44;
    pub const FILE_WRITE: u8 = 0x45;
    pub const FILE_WRITTEN: u8 = 0x46;
    pub const STAT: u8 = 0x47;
    pub const STAT_RESULT: u8 = 0x48;
    pub const LS: u8 = 0x49;
    pub const LS_CHUNK: u8 = 0x4a;
    pub const LS_END: u8 = 0x4b;
    pub const TUNNEL: u8 = 0x50;
    pub const TUNNEL_OK: u8 = 0x51;
    pub const LIST_PORTS: u8 = 0x52;
    pub const PORT_LIST: u8 = 0x53;
    pub const SET_TIME: u8 = 0x60;
}

impl Message {
    /// The frame type byte this message travels under.
    pub fn frame_type(&self) -> u8 {
        use frame_type as t;
        match self {
            Message::LegacyAuth(_) => t::LEGACY_AUTH,
            Message::Challenge(_) => t::CHALLENGE,
            Message::Auth(_) => t::AUTH,
            Message::AuthOk(_) => t::AUTH_OK,
            Message::Error(_) => t::ERROR,
            Message::Ok => t::OK,
            Message::Exec(_) => t::EXEC,
            Message::Started(_) => t::STARTED,
            Message::Stdin(_) => t::STDIN,
            Message::StdinEof => t::STDIN_EOF,
            Message::Stdout(_) => t::STDOUT,
            Message::Stderr(_) => t::STDERR,
            Message::Resize(_) => t::RESIZE,
            Message::Exit(_) => t::EXIT,
            Message::Kill(_) => t::KILL,
            Message::Detach => t::DETACH,
            Message::SessionAttach(_) => t::SESSION_ATTACH,
            Message::SessionList => t::SESSION_LIST,
            Message::Sessions(_) => t::SESSIONS,
            Message::SessionKill(_) => t::SESSION_KILL,
            Message::SessionQuery(_) => t::SESSION_QUERY,
            Message::Session(_) => t::SESSION,
            Message::ActivityQuery => t::ACTIVITY_QUERY,
            Message::Activity(_) => t::ACTIVITY,
            Message::FileRead(_) => t::FILE_READ,
            Message::FileReadStart(_) => t::FILE_READ_START,
            Message::Data(_) => t::DATA,
            Message::DataEnd => t::DATA_END,
            Message::FileReadEnd(_) => t::FILE_READ_END,
            Message::FileWrite(_) => t::FILE_WRITE,
            Message::FileWritten(_) => t::FILE_WRITTEN,
            Message::Stat(_) => t::STAT,
            Message::StatResult(_) => t::STAT_RESULT,
            Message::Ls(_) => t::LS,
            Message::LsChunk(_) => t::LS_CHUNK,
            Message::LsEnd(_) => t::LS_END,
            Message::Tunnel(_) => t::TUNNEL,
            Message::TunnelOk => t::TUNNEL_OK,
            Message::SetTime(_) => t::SET_TIME,
            Message::ListPorts => t::LIST_PORTS,
            Message::PortList(_) => t::PORT_LIST,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::LegacyAuth(_) => "legacy_auth",
            Message::Challenge(_) => "challenge",
            Message::Auth(_) => "auth",
            Message::AuthOk(_) => "auth_ok",
            Message::Error(_) => "error",
            Message::Ok => "ok",
            Message::Exec(_) => "exec",
            Message::Started(_) => "started",
            Message::Stdin(_) => "stdin",
            Message::StdinEof => "stdin_eof",
            Message::Stdout(_) => "stdout",
            Message::Stderr(_) => "stderr",
            Message::Resize(_) => "resize",
            Message::Exit(_) => "exit",
            Message::Kill(_) => "kill",
            Message::Detach => "detach",
            Message::SessionAttach(_) => "session_attach",
            Message::SessionList => "session_list",
            Message::Sessions(_) => "sessions",
            Message::SessionKill(_) => "session_kill",
            Message::SessionQuery(_) => "session_query",
            Message::Session(_) => "session",
            Message::ActivityQuery => "activity_query",
            Message::Activity(_) => "activity",
            Message::FileRead(_) => "file_read",
            Message::FileReadStart(_) => "file_read_start",
            Message::Data(_) => "data",
            Message::DataEnd => "data_end",
            Message::FileReadEnd(_) => "file_read_end",
            Message::FileWrite(_) => "file_write",
            Message::FileWritten(_) => "file_written",
            Message::Stat(_) => "stat",
            Message::StatResult(_) => "stat_result",
            Message::Ls(_) => "ls",
            Message::LsChunk(_) => "ls_chunk",
            Message::LsEnd(_) => "ls_end",
            Message::Tunnel(_) => "tunnel",
            Message::TunnelOk => "tunnel_ok",
            Message::SetTime(_) => "set_time",
            Message::ListPorts => "list_ports",
            Message::PortList(_) => "port_list",
        }
    }

    /// Shorthand for an error message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorMsg {
            code,
            message: message.into(),
        })
    }
}
