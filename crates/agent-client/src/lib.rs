//! The host side of the lohar protocol: a typed async client for a guest
//! agent — exec (collected or streamed), PTY sessions, files, tunnels and
//! activity — with per-call deadlines and a pool of authenticated
//! connections.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agent_client::ClientError> {
//! use agent_client::{AgentClient, Endpoint};
//! let client = AgentClient::new(Endpoint::Tcp("10.0.0.2:1024".parse().unwrap()), "token…");
//! let out = client.exec(proto::ExecRequest { argv: vec!["uname".into(), "-r".into()], ..Default::default() }).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(()) }
//! ```

mod client;
mod conn;
mod error;
mod files;
mod session;
mod stream;

pub use client::{AgentClient, ExecEvent, ExecInputHalf, ExecOutput, ExecOutputHalf, ExecStream};
pub use error::ClientError;
pub use files::{FileContent, FileReader, Listing, WriteOptions};
pub use session::{SessionEvent, SessionInput, SessionOutput, SessionStream};
pub use stream::{Endpoint, Tunnel};
