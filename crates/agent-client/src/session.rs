//! PTY sessions from the client side.

use std::sync::Arc;

use proto::{ErrorCode, ExecRequest, Exit, Kill, Message, SessionAttach, WindowSize, DATA_CHUNK};

use crate::client::{AgentClient, Inner};
use crate::conn::{unexpected, Conn};
use crate::ClientError;

/// What an attached session produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Terminal output (the scrollback replay arrives first, as output).
    Output(Vec<u8>),
    /// The session's command ended; the attachment is over.
    Exit(Exit),
    /// Another client took the session over; the attachment is over.
    TakenOver(String),
}

/// An attachment to a PTY session.
#[derive(Debug)]
pub struct SessionStream {
    conn: Option<Conn>,
    pool: Arc<Inner>,
    pub pid: u32,
    pub name: String,
}

impl AgentClient {
    /// Starts a command in a new PTY session and attaches to it.
    pub async fn open_session(&self, mut req: ExecRequest) -> Result<SessionStream, ClientError> {
        req.tty = true;
        req.detach = false;
        self.attach_with(Message::Exec(req)).await
    }

    /// Attaches to an existing session; its scrollback is replayed first.
    /// `steal` takes it over from a client already attached.
    pub async fn attach(
        &self,
        name: &str,
        steal: bool,
        size: Option<WindowSize>,
    ) -> Result<SessionStream, ClientError> {
        self.attach_with(Message::SessionAttach(SessionAttach {
            session: name.to_string(),
            steal,
            size,
        }))
        .await
    }

    async fn attach_with(&self, request: Message) -> Result<SessionStream, ClientError> {
        let pool = self.pool();
        let fut = async {
            let mut conn = self.open_conn().await?;
            conn.send(&request).await?;
            match conn.recv("session attach").await {
                Ok(Message::Started(s)) => Ok(SessionStream {
                    conn: Some(conn),
                    pool: pool.clone(),
                    pid: s.pid,
                    name: s.session.unwrap_or_default(),
                }),
                Ok(other) => Err(unexpected("started", &other)),
                Err(e) => {
                    if e.agent_code().is_some() {
                        pool.checkin(conn);
                    }
                    Err(e)
                }
            }
        };
        let after = self.call_deadline();
        tokio::time::timeout(after, fut)
            .await
            .map_err(|_| ClientError::Timeout {
                operation: "session attach",
                after,
            })?
    }
}

impl SessionStream {
    fn conn(&mut self) -> Result<&mut Conn, ClientError> {
        self.conn.as_mut().ok_or(ClientError::Closed {
            operation: "session (attachment over)",
        })
    }

    /// The next output, or the end of the attachment.
    pub async fn next(&mut self) -> Result<SessionEvent, ClientError> {
        let msg = self.conn()?.recv("session").await;
        match msg {
            Ok(Message::Stdout(d)) => Ok(SessionEvent::Output(d)),
            Ok(Message::Exit(e)) => {
                self.release();
                Ok(SessionEvent::Exit(e))
            }
            Err(ClientError::Agent {
                code: ErrorCode::SessionTakenOver,
                message,
            }) => {
                self.release();
                Ok(SessionEvent::TakenOver(message))
            }
            Ok(other) => Err(unexpected("stdout or exit", &other)),
            Err(e) => Err(e),
        }
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let conn = self.conn()?;
        for chunk in data.chunks(DATA_CHUNK) {
            conn.send(&Message::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn resize(&mut self, size: WindowSize) -> Result<(), ClientError> {
        self.conn()?.send(&Message::Resize(size)).await
    }

    /// Signals the session's process group (SIGTERM when `None`).
    pub async fn kill(&mut self, signal: Option<i32>) -> Result<(), ClientError> {
        self.conn()?.send(&Message::Kill(Kill { signal })).await
    }

    /// Leaves the session running and ends the attachment. Output that
    /// arrives before the agent confirms is returned.
    pub async fn detach(mut self) -> Result<Vec<u8>, ClientError> {
        let conn = self.conn()?;
        conn.send(&Message::Detach).await?;
        let mut trailing = Vec::new();
        loop {
            match conn.recv("session detach").await? {
                Message::Ok => break,
                Message::Stdout(d) => trailing.extend_from_slice(&d),
                // The session ended before the detach landed: nothing to detach.
                Message::Exit(_) => break,
                other => return Err(unexpected("ok", &other)),
            }
        }
        self.release();
        Ok(trailing)
    }

    /// Splits into an output half and an input half for concurrent use
    /// (a terminal bridge reads and writes at once). Dropping both halves
    /// detaches.
    pub fn into_split(mut self) -> Result<(SessionOutput, SessionInput), ClientError> {
        let conn = self.conn.take().ok_or(ClientError::Closed {
            operation: "session (attachment over)",
        })?;
        Ok((
            SessionOutput {
                reader: conn.reader,
            },
            SessionInput {
                writer: conn.writer,
            },
        ))
    }
}

/// Output half of a split [`SessionStream`].
#[derive(Debug)]
pub struct SessionOutput {
    reader: proto::FrameReader<tokio::io::ReadHalf<crate::stream::Stream>>,
}

impl SessionOutput {
    /// The next event; `Ok(None)` once the agent confirmed a detach.
    pub async fn next(&mut self) -> Result<Option<SessionEvent>, ClientError> {
        match self.reader.read_message().await? {
            Some(Message::Stdout(d)) => Ok(Some(SessionEvent::Output(d))),
            Some(Message::Exit(e)) => Ok(Some(SessionEvent::Exit(e))),
            Some(Message::Ok) => Ok(None),
            Some(Message::Error(e)) if e.code == ErrorCode::SessionTakenOver => {
                Ok(Some(SessionEvent::TakenOver(e.message)))
            }
            Some(Message::Error(e)) => Err(e.into()),
            Some(other) => Err(unexpected("stdout or exit", &other)),
            None => Err(ClientError::Closed {
                operation: "session",
            }),
        }
    }
}

/// Input half of a split [`SessionStream`].
#[derive(Debug)]
pub struct SessionInput {
    writer: proto::FrameWriter<tokio::io::WriteHalf<crate::stream::Stream>>,
}

impl SessionInput {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.writer.send(&Message::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn resize(&mut self, size: WindowSize) -> Result<(), ClientError> {
        Ok(self.writer.send(&Message::Resize(size)).await?)
    }

    /// Asks the agent to end the attachment; the output half then ends with `Ok(None)`.
    pub async fn detach(&mut self) -> Result<(), ClientError> {
        Ok(self.writer.send(&Message::Detach).await?)
    }
}
