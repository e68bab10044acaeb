//! Files from the client side.

use proto::{FileRead, FileStat, FileWrite, Ls, Message, Stat, DATA_CHUNK, MAX_FILE_WRITE};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::client::{call, AgentClient};
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

impl AgentClient {
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
