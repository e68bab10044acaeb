//! The agent's half of the handshake (see [`proto::auth`]) and the bound on
//! connections waiting in it.
//!
//! A connection gets a fresh challenge, must answer within
//! [`AUTH_DEADLINE_SECS`] with a proof made with the token, and is then
//! shown the agent's own proof. At most [`MAX_PENDING_AUTH`] connections
//! wait in the handshake at once; a new one pushes out the longest waiting,
//! so a neighbour opening connections that never answer cannot keep the
//! host out, and a failed or slow handshake holds nothing once closed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use proto::auth::{agent_proof, verify_host_proof};
use proto::{
    AuthOk, Challenge, ErrorCode, FrameReader, FrameWriter, Message, Nonce, AUTH_DEADLINE_SECS,
    MAX_PENDING_AUTH, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::agent::Agent;

/// How long a refusal may take to write before the connection is dropped
/// without it (a peer that does not read).
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Connections in the handshake, oldest first. Dropping a sender tells its
/// handshake it was pushed out.
#[derive(Debug, Default)]
pub struct Pending {
    inner: Mutex<PendingInner>,
}

#[derive(Debug, Default)]
struct PendingInner {
    next_id: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// One connection's place among the pending; leaves when dropped.
#[derive(Debug)]
pub struct PendingSlot<'a> {
    pending: &'a Pending,
    id: u64,
    /// Resolves (with an error) when a newer connection pushed this one out.
    pub evicted: oneshot::Receiver<()>,
}

impl Pending {
    /// Takes a place, pushing out the longest waiting connection when all
    /// [`MAX_PENDING_AUTH`] places are taken.
    pub fn enter(&self) -> PendingSlot<'_> {
        self.enter_bounded(MAX_PENDING_AUTH)
    }

    fn enter_bounded(&self, max: usize) -> PendingSlot<'_> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while inner.waiting.len() >= max.max(1) {
            // Dropping the sender wakes that handshake.
            inner.waiting.pop_front();
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.waiting.push_back((id, tx));
        PendingSlot {
            pending: self,
            id,
            evicted: rx,
        }
    }

    /// Connections waiting in the handshake now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .len()
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        let mut inner = self.pending.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.waiting.retain(|(id, _)| *id != self.id);
    }
}

/// Why a handshake ended without authenticating.
enum Refused {
    /// Tell the peer this, then close.
    With(Message),
    /// The peer left or cannot be written to: just close.
    Silently,
}

/// Runs the handshake on a new connection: `true` once it authenticated
/// (and got the agent's proof). Otherwise the peer got an error frame
/// saying why, where it could take one, and the caller closes.
pub async fn handshake<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut slot = agent.pending.enter();
    let deadline = Duration::from_secs(AUTH_DEADLINE_SECS);
    let outcome = tokio::select! {
        r = tokio::time::timeout(deadline, exchange(agent, reader, writer)) => match r {
            Ok(outcome) => outcome,
            Err(_) => Err(Refused::With(Message::error(
                ErrorCode::AuthTimeout,
                format!("no answer to the challenge within {AUTH_DEADLINE_SECS}s"),
            ))),
        },
        _ = &mut slot.evicted => Err(Refused::With(Message::error(
            ErrorCode::TooManyConnections,
            format!(
                "pushed out by a newer connection: at most {MAX_PENDING_AUTH} may be authenticating"
            ),
        ))),
    };
    drop(slot);
    match outcome {
        Ok(()) => true,
        Err(Refused::With(refusal)) => {
            tracing::info!(?refusal, "refusing connection");
            let _ = tokio::time::timeout(REFUSAL_WRITE, writer.send(&refusal)).await;
            false
        }
        Err(Refused::Silently) => false,
    }
}

/// Challenge, check the answer, prove ourselves.
async fn exchange<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let nonce = Nonce::random().map_err(|e| {
        tracing::error!(error = %e, "no nonce for a challenge");
        Refused::With(Message::error(ErrorCode::Io, e.to_string()))
    })?;
    writer
        .send(&Message::Challenge(Challenge {
            version: PROTOCOL_VERSION,
            nonce,
        }))
        .await
        .map_err(|_| Refused::Silently)?;
    let refusal = match reader.read_message().await {
        Ok(Some(Message::Auth(auth))) => {
            // One copy for both proofs, even if the token changes meanwhile.
            let token = agent.token();
            if auth.version != PROTOCOL_VERSION {
                Message::error(
                    ErrorCode::VersionMismatch,
                    format!(
                        "client speaks protocol {}, agent speaks {PROTOCOL_VERSION}",
                        auth.version
                    ),
                )
            } else if !verify_host_proof(&token, &nonce, &auth.nonce, &auth.proof) {
                Message::error(
                    ErrorCode::AuthFailed,
                    "invalid proof: not made with this sandbox's token for this challenge",
                )
            } else {
                let ok = Message::AuthOk(AuthOk {
                    version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    proof: agent_proof(&token, &nonce, &auth.nonce),
                });
                return writer.send(&ok).await.map_err(|_| Refused::Silently);
            }
        }
        Ok(Some(Message::LegacyAuth(old))) => Message::error(
            ErrorCode::VersionMismatch,
            format!(
                "a protocol {} token frame is not accepted: this agent speaks protocol \
                 {PROTOCOL_VERSION}, which answers a challenge and never sends the token",
                old.version
            ),
        ),
        Ok(Some(other)) => Message::error(
            ErrorCode::AuthFailed,
            format!(
                "the first frame must be auth (the answer to the challenge), got {}",
                other.name()
            ),
        ),
        Ok(None) => return Err(Refused::Silently),
        Err(e) => Message::error(ErrorCode::AuthFailed, format!("bad auth frame: {e}")),
    };
    Err(Refused::With(refusal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pending_set_pushes_out_the_oldest() {
        let p = Pending::default();
        let mut a = p.enter_bounded(2);
        let mut b = p.enter_bounded(2);
        assert_eq!(p.len(), 2);
        let mut c = p.enter_bounded(2);
        assert_eq!(p.len(), 2);
        assert!(
            matches!(
                a.evicted.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ),
            "the oldest is told"
        );
        assert!(matches!(
            b.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        // Leaving frees the place; an evicted slot's drop removes nothing else.
        drop(a);
        assert_eq!(p.len(), 2);
        drop(b);
        assert_eq!(p.len(), 1);
        assert!(matches!(
            c.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        drop(c);
        assert_eq!(p.len(), 0);
    }
}
