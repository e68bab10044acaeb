//! One authenticated connection to the agent.

use proto::{Auth, FrameReader, FrameWriter, Message, PROTOCOL_VERSION};
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
    /// Connects and authenticates.
    pub async fn open(endpoint: &Endpoint, token: &str) -> Result<Conn, ClientError> {
        let stream = Stream::connect(endpoint).await?;
        let (r, w) = tokio::io::split(stream);
        let mut conn = Conn {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
            received: 0,
        };
        conn.send(&Message::Auth(Auth {
            token: token.to_string(),
            version: PROTOCOL_VERSION,
        }))
        .await?;
        match conn.recv("auth").await? {
            Message::AuthOk(_) => Ok(conn),
            other => Err(unexpected("auth_ok", &other)),
        }
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
