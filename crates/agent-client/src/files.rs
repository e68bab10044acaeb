//! Files from the client side.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::{FileRead, FileStat, FileWrite, Ls, Message, Stat, DATA_CHUNK, MAX_FILE_WRITE};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::client::{call, AgentClient, Inner};
use crate::conn::{unexpected, Conn};
use crate::ClientError;

/// A file (or part of it) read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    pub data: Vec<u8>,
    /// Size of the whole file.
    pub total_size: u64,
    pub mode: u32,
    /// Part of the file was left out by the limits.
    pub truncated: bool,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<FileStat>,
    pub total: u64,
    pub truncated: bool,
}

/// Options of a write; `Default` means mode 0644 (or the replaced file's)
/// and the command user as owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub create_dirs: bool,
}

async fn read_exchange(c: &mut Conn, req: &FileRead) -> Result<FileContent, ClientError> {
    c.send(&Message::FileRead(req.clone())).await?;
    let start = match c.recv("file read").await? {
        Message::FileReadStart(s) => s,
        other => return Err(unexpected("file_read_start", &other)),
    };
    let mut data = Vec::new();
    loop {
        match c.recv("file read").await? {
            Message::Data(d) => data.extend_from_slice(&d),
            Message::FileReadEnd(end) => {
                return Ok(FileContent {
                    data,
                    total_size: start.total_size,
                    mode: start.mode,
                    truncated: end.truncated,
                })
            }
            other => return Err(unexpected("data or file_read_end", &other)),
        }
    }
}

fn write_request(path: &str, size: u64, opts: &WriteOptions) -> Result<FileWrite, ClientError> {
    if size > MAX_FILE_WRITE {
        return Err(ClientError::InvalidRequest(format!(
            "a write of {size} bytes exceeds the agent's {MAX_FILE_WRITE}-byte limit"
        )));
    }
    Ok(FileWrite {
        path: path.to_string(),
        size,
        mode: opts.mode,
        uid: opts.uid,
        gid: opts.gid,
        create_dirs: opts.create_dirs,
    })
}

async fn write_exchange<R: AsyncRead + Unpin>(
    c: &mut Conn,
    req: &FileWrite,
    mut src: R,
) -> Result<u64, ClientError> {
    c.send(&Message::FileWrite(req.clone())).await?;
    let size = req.size;
    let mut buf = vec![0u8; DATA_CHUNK.min(size as usize).max(1)];
    let mut sent = 0u64;
    while sent < size {
        let want = (size - sent).min(buf.len() as u64) as usize;
        let n = src
            .read(&mut buf[..want])
            .await
            .map_err(ClientError::LocalIo)?;
        if n == 0 {
            return Err(ClientError::InvalidRequest(format!(
                "the source ended after {sent} of {size} bytes"
            )));
        }
        c.send(&Message::Data(buf[..n].to_vec())).await?;
        sent += n as u64;
    }
    c.send(&Message::DataEnd).await?;
    match c.recv("file write").await? {
        Message::FileWritten(w) => Ok(w.bytes),
        other => Err(unexpected("file_written", &other)),
    }
}

/// A file read in progress: the file's size and mode, then its data chunk
/// by chunk as the caller asks for it. Nothing is read ahead: a caller
/// that stops asking stops the agent (TCP back-pressure), so a file of any
/// size passes through a bounded amount of memory. Each step must answer
/// within the client's deadline. Dropping it mid-way closes the
/// connection, which ends the read in the guest.
#[derive(Debug)]
pub struct FileReader {
    conn: Option<Conn>,
    pool: Arc<Inner>,
    deadline: Duration,
    /// Size of the whole file.
    pub total_size: u64,
    pub mode: u32,
    end: Option<proto::FileReadEnd>,
}

impl FileReader {
    /// The next chunk of data; `None` once the read is complete.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let msg = step(self.deadline, "file read", conn.recv("file read")).await?;
        match msg {
            Message::Data(d) => Ok(Some(d)),
            Message::FileReadEnd(end) => {
                self.end = Some(end);
                if let Some(conn) = self.conn.take() {
                    self.pool.checkin(conn);
                }
                Ok(None)
            }
            other => Err(unexpected("data or file_read_end", &other)),
        }
    }

    /// Whether the limits left part of the file out; known once
    /// [`FileReader::next_chunk`] returned `None`.
    pub fn truncated(&self) -> Option<bool> {
        self.end.as_ref().map(|e| e.truncated)
    }
}

/// One step of an exchange, within `after`.
async fn step<T>(
    after: Duration,
    operation: &'static str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| ClientError::Timeout { operation, after })?
}

impl AgentClient {
    /// Starts a streamed read: answers once the agent has opened the file
    /// (its size and mode known); the data follows through
    /// [`FileReader::next_chunk`].
    pub async fn read_file_stream(&self, req: FileRead) -> Result<FileReader, ClientError> {
        let deadline = self.call_deadline();
        let start = |mut conn: Conn| {
            let req = &req;
            async move {
                if let Err(e) = conn.send(&Message::FileRead(req.clone())).await {
                    return Err((None, e));
                }
                match conn.recv("file read").await {
                    Ok(Message::FileReadStart(s)) => Ok((conn, s)),
                    Ok(other) => Err((None::<Conn>, unexpected("file_read_start", &other))),
                    Err(e) => Err((Some(conn), e)),
                }
            }
        };
        let opened = async {
            let pooled = self.checkout_idle();
            let was_pooled = pooled.is_some();
            let conn = match pooled {
                Some(c) => c,
                None => self.open_fresh().await?,
            };
            match start(conn).await {
                Ok(v) => Ok(v),
                Err((conn, e)) if was_pooled && e.is_stale_connection() => {
                    drop(conn);
                    start(self.open_fresh().await?).await.map_err(|(_, e)| e)
                }
                Err((conn, e)) => {
                    // After an agent error the connection is in step.
                    if let (Some(conn), Some(_)) = (conn, e.agent_code()) {
                        self.pool().checkin(conn);
                    }
                    Err(e)
                }
            }
        };
        let (conn, s) = step(deadline, "file read", opened).await?;
        Ok(FileReader {
            conn: Some(conn),
            pool: self.pool(),
            deadline,
            total_size: s.total_size,
            mode: s.mode,
            end: None,
        })
    }

    /// Writes `size` bytes from `source` to a file atomically, streaming:
    /// each step (reading the source, sending to the agent, the agent's
    /// commit) must finish within the client's deadline, not the whole
    /// write, so a large upload from a slow but steady source completes.
    /// A small write (one data chunk) goes over a pooled connection and is
    /// retried once if that connection turns out stale; a larger one opens
    /// its own (its source can be read only once).
    pub async fn write_file_stream<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        size: u64,
        mut source: R,
        opts: WriteOptions,
    ) -> Result<u64, ClientError> {
        let req = write_request(path, size, &opts)?;
        let deadline = self.call_deadline();
        if size <= DATA_CHUNK as u64 {
            let mut data = vec![0u8; size as usize];
            step(deadline, "file write", async {
                source
                    .read_exact(&mut data)
                    .await
                    .map(|_| ())
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => ClientError::InvalidRequest(format!(
                            "the source ended before {size} bytes"
                        )),
                        _ => ClientError::LocalIo(e),
                    })
            })
            .await?;
            return self.write_file(path, &data, opts).await;
        }
        let mut conn = step(deadline, "file write", self.open_fresh()).await?;
        let c = &mut conn;
        step(
            deadline,
            "file write",
            c.send(&Message::FileWrite(req.clone())),
        )
        .await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        while sent < size {
            let want = (size - sent).min(buf.len() as u64) as usize;
            let n = step(deadline, "file write (reading the source)", async {
                source
                    .read(&mut buf[..want])
                    .await
                    .map_err(ClientError::LocalIo)
            })
            .await?;
            if n == 0 {
                return Err(ClientError::InvalidRequest(format!(
                    "the source ended after {sent} of {size} bytes"
                )));
            }
            step(
                deadline,
                "file write",
                c.send(&Message::Data(buf[..n].to_vec())),
            )
            .await?;
            sent += n as u64;
        }
        step(deadline, "file write", c.send(&Message::DataEnd)).await?;
        let result = match step(deadline, "file write", c.recv("file write")).await {
            Ok(Message::FileWritten(w)) => Ok(w.bytes),
            Ok(other) => Err(unexpected("file_written", &other)),
            Err(e) => Err(e),
        };
        self.finish(conn, result)
    }

    /// Reads a file, within the request's line and byte limits.
    pub async fn read_file(&self, req: FileRead) -> Result<FileContent, ClientError> {
        call!(self, "file read", |c| async {
            read_exchange(c, &req).await
        })
    }

    /// Writes a file atomically. Retried once on a fresh connection if a
    /// pooled one turns out stale.
    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        opts: WriteOptions,
    ) -> Result<u64, ClientError> {
        let req = write_request(path, data.len() as u64, &opts)?;
        call!(self, "file write", |c| async {
            write_exchange(c, &req, data).await
        })
    }

    /// Writes `size` bytes from `source` to a file atomically.
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        size: u64,
        source: R,
        opts: WriteOptions,
    ) -> Result<u64, ClientError> {
        let req = write_request(path, size, &opts)?;
        // The source can be read only once, so this exchange is never retried.
        let mut source = Some(source);
        call!(self, "file write", |c| async {
            match source.take() {
                Some(src) => write_exchange(c, &req, src).await,
                None => Err(ClientError::Closed {
                    operation: "file write",
                }),
            }
        })
    }

    /// Metadata of a path (a final symlink is not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        call!(self, "stat", |c| async {
            c.send(&Message::Stat(Stat {
                path: path.to_string(),
            }))
            .await?;
            match c.recv("stat").await? {
                Message::StatResult(s) => Ok(s),
                other => Err(unexpected("stat_result", &other)),
            }
        })
    }

    /// Lists a directory (capped at [`proto::MAX_LS_ENTRIES`] entries).
    pub async fn ls(&self, path: &str) -> Result<Listing, ClientError> {
        call!(self, "ls", |c| async {
            c.send(&Message::Ls(Ls {
                path: path.to_string(),
            }))
            .await?;
            let mut entries = Vec::new();
            loop {
                match c.recv("ls").await? {
                    Message::LsChunk(chunk) => entries.extend(chunk.entries),
                    Message::LsEnd(end) => {
                        return Ok(Listing {
                            entries,
                            total: end.total,
                            truncated: end.truncated,
                        })
                    }
                    other => return Err(unexpected("ls_chunk or ls_end", &other)),
                }
            }
        })
    }
}
