//! The wire protocol between the bhatti host and `lohar`, the guest agent.
//!
//! Every connection carries a sequence of frames: a fixed 5-byte header
//! (payload length as `u32` big-endian, then a `u8` frame type) followed by
//! the payload. Control messages carry JSON payloads; data messages (stdin,
//! stdout, stderr, file data) carry raw bytes. A payload is at most
//! [`MAX_FRAME_PAYLOAD`] bytes, checked when encoding and before allocating
//! when decoding. Readers skip frame types they do not know.
//!
//! Every connection starts with a challenge-response handshake in both
//! directions ([`auth`]): the agent's [`Message::Challenge`], the host's
//! [`Message::Auth`], the agent's [`Message::AuthOk`]; the token itself never
//! crosses the wire. After that a connection serves one request at a time
//! (see `docs/wire-protocol.md` for the exchange of each request).
//!
//! [`config_drive`] holds the per-boot config drive's types and raw encoding,
//! shared by the image pipeline (writer) and lohar (reader).

pub mod arch;
pub mod auth;
mod codec;
pub mod config_drive;
pub mod identity;
#[cfg(feature = "tokio")]
mod io;
mod limits;
mod message;

pub use arch::Arch;
pub use auth::{Nonce, Proof};
pub use codec::{
    decode_frame, encode, encode_into, write_header, CodecError, Decoded, RawFrame, HEADER_LEN,
};
#[cfg(feature = "tokio")]
pub use io::{FrameReader, FrameWriter, ReadError, WriteError};
pub use limits::*;
pub use message::*;

/// Version of this protocol; sent in [`Challenge`], [`Auth`] and [`AuthOk`].
/// Bumped on any incompatible change to a frame type or payload. 2:
/// challenge-response authentication replaced protocol 1's token frame.
pub const PROTOCOL_VERSION: u32 = 2;

/// The TCP port lohar listens on at the guest's IP, for control
/// connections and tunnels alike (a connection becomes a byte pipe after
/// `Tunnel`/`TunnelOk`). Host and guest both take it from here.
pub const AGENT_PORT: u16 = 1024;
