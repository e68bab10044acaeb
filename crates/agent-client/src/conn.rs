//! One authenticated connection to the agent.

use std::time::Duration;

use proto::auth::{host_proof, verify_agent_proof};
use proto::{Auth, FrameReader, FrameWriter, Message, Nonce, AUTH_DEADLINE_SECS, PROTOCOL_VERSION};
use tokio::io::{ReadHalf, WriteHalf};

use crate::stream::{Endpoint, Stream};
use crate::ClientError;

#[derive(Debug)]
pub struct Conn {
    pub reader: FrameReader<ReadHalf<Stream>>,
    pub writer: FrameWriter<WriteHalf<Stream>>,
    /// Frames received so far, to tell a stale pooled connection (closed
    /// before answering) from one that failed mid-exchange.
    received: u64,
}

impl Conn {
    /// Connects and authenticates (both ways: see [`proto::auth`]), the
    /// handshake bounded by [`AUTH_DEADLINE_SECS`].
    pub async fn open(endpoint: &Endpoint, token: &str) -> Result<Conn, ClientError> {
        let stream = Stream::connect(endpoint).await?;
        let (r, w) = tokio::io::split(stream);
        let mut conn = Conn {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
            received: 0,
        };
        let after = Duration::from_secs(AUTH_DEADLINE_SECS);
        tokio::time::timeout(after, conn.authenticate(endpoint, token.as_bytes()))
            .await
            .map_err(|_| ClientError::Timeout {
                operation: "authentication",
                after,
            })??;
        Ok(conn)
    }

    /// The host's half of the handshake: answer the agent's challenge
    /// with a proof and a nonce of our own, then check the agent's proof.
    async fn authenticate(&mut self, endpoint: &Endpoint, token: &[u8]) -> Result<(), ClientError> {
        let challenge = match self.recv("authentication").await? {
            Message::Challenge(c) => c,
            other => return Err(unexpected("challenge", &other)),
        };
        if challenge.version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                agent: challenge.version,
                client: PROTOCOL_VERSION,
            });
        }
        let nonce = Nonce::random()?;
        self.send(&Message::Auth(Auth {
            version: PROTOCOL_VERSION,
            nonce,
            proof: host_proof(token, &challenge.nonce, &nonce),
        }))
        .await?;
        let ok = match self.recv("authentication").await? {
            Message::AuthOk(ok) => ok,
            other => return Err(unexpected("auth_ok", &other)),
        };
        if !verify_agent_proof(token, &challenge.nonce, &nonce, &ok.proof) {
            return Err(ClientError::AgentProof {
                endpoint: endpoint.to_string(),
            });
        }
        Ok(())
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        Ok(self.writer.send(msg).await?)
    }

    /// The next message; an agent error becomes [`ClientError::Agent`].
    pub async fn recv(&mut self, operation: &'static str) -> Result<Message, ClientError> {
        let msg = self.reader.read_message().await?;
        if msg.is_some() {
            self.received += 1;
        }
        match msg {
            Some(Message::Error(e)) => Err(e.into()),
            Some(m) => Ok(m),
            None => Err(ClientError::Closed { operation }),
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Gives back the whole stream and bytes read past the last frame.
    pub fn into_stream(self) -> (Stream, Vec<u8>) {
        let (r, early) = self.reader.into_parts();
        (r.unsplit(self.writer.into_inner()), early)
    }
}

pub fn unexpected(expected: &'static str, got: &Message) -> ClientError {
    ClientError::UnexpectedFrame {
        expected,
        got: got.name(),
    }
}
