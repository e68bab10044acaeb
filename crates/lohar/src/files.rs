//! File reads (with line and byte limits), atomic writes, stat and listings.
//!
//! File-system work runs on blocking threads; data crosses to the
//! connection through small bounded channels so a large file is never held
//! in memory whole.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use proto::{
    ErrorCode, ErrorMsg, FileKind, FileRead, FileReadEnd, FileReadStart, FileStat, FileWrite,
    FileWritten, FrameReader, FrameWriter, LsChunk, LsEnd, Message, DATA_CHUNK, MAX_FILE_WRITE,
    MAX_LS_ENTRIES,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::agent::Agent;
use crate::failure::{io_error, ConnError, Failure};

/// Largest encoded listing chunk; well under the frame limit.
const LS_CHUNK_BYTES: usize = 256 * 1024;

/// Resolves a request path: absolute, or relative to the user's home.
fn resolve(agent: &Agent, path: &str) -> Result<PathBuf, Failure> {
    if path.is_empty() {
        return Err(Failure::bad_request("path is empty"));
    }
    if path.contains('\0') {
        return Err(Failure::bad_request("path contains a NUL byte"));
    }
    let p = Path::new(path);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        agent.identity.home.join(p)
    })
}

fn failed(e: ErrorMsg) -> Failure {
    Failure::Request(e)
}

enum ReadEvent {
    Start(FileReadStart),
    Chunk(Vec<u8>),
    End(FileReadEnd),
    Failed(ErrorMsg),
}

pub async fn read<W: AsyncWrite + Unpin>(
    agent: &Agent,
    writer: &mut FrameWriter<W>,
    req: FileRead,
) -> Result<(), Failure> {
    let path = resolve(agent, &req.path)?;
    let (tx, mut rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = read_blocking(&path, &req, &tx) {
            let _ = tx.blocking_send(ReadEvent::Failed(e));
        }
    });
    while let Some(ev) = rx.recv().await {
        let msg = match ev {
            ReadEvent::Start(s) => Message::FileReadStart(s),
            ReadEvent::Chunk(d) => Message::Data(d),
            ReadEvent::End(e) => Message::FileReadEnd(e),
            ReadEvent::Failed(e) => return Err(failed(e)),
        };
        writer.send(&msg).await?;
    }
    Ok(())
}

/// Sends a read's events. Returning early (the connection went away and the
/// receiver closed) is fine: nothing is left behind.
fn read_blocking(
    path: &Path,
    req: &FileRead,
    tx: &mpsc::Sender<ReadEvent>,
) -> Result<(), ErrorMsg> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| io_error("cannot open", &shown, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_error("cannot stat", &shown, &e))?;
    if meta.is_dir() {
        return Err(ErrorMsg {
            code: ErrorCode::BadRequest,
            message: format!("{shown} is a directory; list it instead"),
        });
    }
    if !meta.is_file() {
        return Err(ErrorMsg {
            code: ErrorCode::BadRequest,
            message: format!("{shown} is not a regular file"),
        });
    }
    let send = |ev| tx.blocking_send(ev).is_ok();
    if !send(ReadEvent::Start(FileReadStart {
        total_size: meta.len(),
        mode: meta.mode(),
    })) {
        return Ok(());
    }
    let max_bytes = req.max_bytes.unwrap_or(u64::MAX);
    let mut r = BufReader::with_capacity(DATA_CHUNK, file);
    let read_err = |e: std::io::Error| io_error("cannot read", &shown, &e);
    // Skip `offset` lines.
    let mut skipped = 0;
    while skipped < req.offset.unwrap_or(0) {
        let buf = r.fill_buf().map_err(read_err)?;
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                skipped += 1;
            }
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
    let mut lines_left = req.limit.unwrap_or(u64::MAX);
    let mut sent: u64 = 0;
    let mut chunk = Vec::with_capacity(DATA_CHUNK);
    let truncated = loop {
        let buf = r.fill_buf().map_err(read_err)?;
        if buf.is_empty() {
            break false;
        }
        if lines_left == 0 || sent == max_bytes {
            break true;
        }
        let budget = (max_bytes - sent).min(buf.len() as u64) as usize;
        let mut take = budget;
        if req.limit.is_some() {
            if let Some(i) = buf[..budget].iter().position(|&b| b == b'\n') {
                take = i + 1;
                lines_left -= 1;
            }
        }
        chunk.extend_from_slice(&buf[..take]);
        r.consume(take);
        sent += take as u64;
        if chunk.len() >= DATA_CHUNK
            && !send(ReadEvent::Chunk(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(DATA_CHUNK),
            )))
        {
            return Ok(());
        }
    };
    if !chunk.is_empty() && !send(ReadEvent::Chunk(chunk)) {
        return Ok(());
    }
    send(ReadEvent::End(FileReadEnd {
        bytes: sent,
        truncated,
    }));
    Ok(())
}

enum WriteCmd {
    Data(Vec<u8>),
    Commit(oneshot::Sender<Result<u64, ErrorMsg>>),
}

/// Receives a write: the header is already read; data frames and the end
/// marker follow. A refused write still consumes its data frames, so the
/// connection stays in step and usable.
pub async fn write<R, W>(
    agent: &Agent,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    req: FileWrite,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let target = check_write(agent, &req);
    let (tx, rx) = mpsc::channel::<WriteCmd>(8);
    let mut sink = match target {
        Ok(path) => {
            let owner = default_owner(agent, &req);
            let mode = req.mode;
            let create_dirs = req.create_dirs;
            tokio::task::spawn_blocking(move || write_blocking(path, mode, owner, create_dirs, rx));
            Ok(tx)
        }
        Err(e) => Err(e),
    };
    let mut received: u64 = 0;
    loop {
        let msg = match reader.read_message().await {
            Ok(Some(m)) => m,
            // Dropping the sink makes the writer thread delete its temp file.
            Ok(None) => return Err(Failure::Conn(ConnError::ClientGone)),
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::Data(d) => {
                received += d.len() as u64;
                if sink.is_ok() && received > req.size {
                    sink = Err(failed(ErrorMsg {
                        code: ErrorCode::BadRequest,
                        message: format!("more data than the declared size of {} bytes", req.size),
                    }));
                }
                if let Ok(tx) = &sink {
                    if tx.send(WriteCmd::Data(d)).await.is_err() {
                        sink = Err(Failure::new(ErrorCode::Io, "the file writer stopped"));
                    }
                }
            }
            Message::DataEnd => break,
            other => {
                return Err(Failure::new(
                    ErrorCode::UnexpectedFrame,
                    format!("unexpected {} frame during a file write", other.name()),
                ))
            }
        }
    }
    let tx = sink?;
    if received != req.size {
        return Err(Failure::bad_request(format!(
            "received {received} bytes but the write declared {}",
            req.size
        )));
    }
    let (done_tx, done_rx) = oneshot::channel();
    let outcome = match tx.send(WriteCmd::Commit(done_tx)).await {
        Ok(()) => done_rx
            .await
            .unwrap_or_else(|_| Err(io_msg("the file writer stopped"))),
        Err(_) => Err(io_msg("the file writer stopped")),
    };
    let bytes = outcome.map_err(failed)?;
    writer
        .send(&Message::FileWritten(FileWritten { bytes }))
        .await?;
    Ok(())
}

fn io_msg(m: &str) -> ErrorMsg {
    ErrorMsg {
        code: ErrorCode::Io,
        message: m.to_string(),
    }
}

fn check_write(agent: &Agent, req: &FileWrite) -> Result<PathBuf, Failure> {
    if req.size > MAX_FILE_WRITE {
        return Err(Failure::new(
            ErrorCode::FileTooLarge,
            format!(
                "a write of {} bytes exceeds the {MAX_FILE_WRITE}-byte limit",
                req.size
            ),
        ));
    }
    if req.mode.is_some_and(|m| m > 0o7777) {
        return Err(Failure::bad_request(
            "mode must be permission bits (at most 0o7777)",
        ));
    }
    let path = resolve(agent, &req.path)?;
    if path.file_name().is_none() || req.path.ends_with('/') {
        return Err(Failure::bad_request(format!("{} names no file", req.path)));
    }
    if path.is_dir() {
        return Err(Failure::bad_request(format!("{} is a directory", req.path)));
    }
    Ok(path)
}

/// New files belong to the command user unless the request says otherwise.
fn default_owner(agent: &Agent, req: &FileWrite) -> (Option<u32>, Option<u32>) {
    let id = &agent.identity;
    match (req.uid, req.gid) {
        (None, None) if id.switch => (Some(id.uid), Some(id.gid)),
        other => other,
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Deletes the temp file unless the write was committed.
struct TempFile {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
            }
        }
    }
}

fn write_blocking(
    path: PathBuf,
    mode: Option<u32>,
    owner: (Option<u32>, Option<u32>),
    create_dirs: bool,
    mut rx: mpsc::Receiver<WriteCmd>,
) {
    let shown = path.display().to_string();
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let prepared = (|| {
        if create_dirs {
            std::fs::create_dir_all(&dir)
                .map_err(|e| io_error("cannot create directory", &dir.display().to_string(), &e))?;
        }
        let temp = dir.join(format!(
            ".{name}.lohar-{}-{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| io_error("cannot create a temp file beside", &shown, &e))?;
        Ok((
            file,
            TempFile {
                path: temp,
                committed: false,
            },
        ))
    })();
    let (mut file, mut temp, mut failure) = match prepared {
        Ok((f, t)) => (Some(f), Some(t), None),
        Err(e) => (None, None, Some(e)),
    };
    let mut written: u64 = 0;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            WriteCmd::Data(d) => {
                if let (Some(f), None) = (file.as_mut(), &failure) {
                    match f.write_all(&d) {
                        Ok(()) => written += d.len() as u64,
                        Err(e) => failure = Some(io_error("cannot write", &shown, &e)),
                    }
                }
            }
            WriteCmd::Commit(done) => {
                let result = match (failure.take(), file.take(), temp.as_mut()) {
                    (Some(e), _, _) => Err(e),
                    (None, Some(f), Some(t)) => commit(f, t, &path, mode, owner).map(|()| written),
                    _ => Err(io_msg("the write was not prepared")),
                };
                let _ = done.send(result);
                return;
            }
        }
    }
    // The connection went away before committing: TempFile's drop cleans up.
}

fn commit(
    file: File,
    temp: &mut TempFile,
    path: &Path,
    mode: Option<u32>,
    owner: (Option<u32>, Option<u32>),
) -> Result<(), ErrorMsg> {
    let shown = path.display().to_string();
    let existing = std::fs::metadata(path).ok();
    let mode = mode
        .or(existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let owner = match (owner, &existing) {
        ((None, None), Some(m)) => (Some(m.uid()), Some(m.gid())),
        (o, _) => o,
    };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("cannot set mode of", &shown, &e))?;
    if owner.0.is_some() || owner.1.is_some() {
        std::os::unix::fs::fchown(&file, owner.0, owner.1)
            .map_err(|e| io_error("cannot set owner of", &shown, &e))?;
    }
    file.sync_all()
        .map_err(|e| io_error("cannot sync", &shown, &e))?;
    drop(file);
    std::fs::rename(&temp.path, path).map_err(|e| io_error("cannot replace", &shown, &e))?;
    temp.committed = true;
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            if let Err(e) = d.sync_all() {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot sync directory");
            }
        }
    }
    Ok(())
}

fn stat_of(name: String, path: &Path) -> std::io::Result<FileStat> {
    let m = std::fs::symlink_metadata(path)?;
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let symlink_target = if ft.is_symlink() {
        std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(FileStat {
        name,
        kind,
        size: m.len(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime_unix_ms: m.mtime() * 1000 + m.mtime_nsec() / 1_000_000,
        symlink_target,
    })
}

pub async fn stat(agent: &Agent, path: &str) -> Result<Message, Failure> {
    let p = resolve(agent, path)?;
    let shown = path.to_string();
    tokio::task::spawn_blocking(move || {
        stat_of(shown.clone(), &p)
            .map(Message::StatResult)
            .map_err(|e| Failure::io("cannot stat", &shown, &e))
    })
    .await
    .map_err(|e| Failure::new(ErrorCode::Io, format!("stat task failed: {e}")))?
}

pub async fn ls<W: AsyncWrite + Unpin>(
    agent: &Agent,
    writer: &mut FrameWriter<W>,
    path: &str,
) -> Result<(), Failure> {
    let dir = resolve(agent, path)?;
    let shown = path.to_string();
    let listing = tokio::task::spawn_blocking(move || list_blocking(&dir, &shown))
        .await
        .map_err(|e| Failure::new(ErrorCode::Io, format!("listing task failed: {e}")))??;
    let (entries, total) = listing;
    let truncated = (entries.len() as u64) < total;
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0;
    for entry in entries {
        let size = serde_json::to_vec(&entry).map_or(0, |v| v.len()) + 1;
        if chunk_bytes + size > LS_CHUNK_BYTES && !chunk.is_empty() {
            let entries = std::mem::take(&mut chunk);
            writer.send(&Message::LsChunk(LsChunk { entries })).await?;
            chunk_bytes = 0;
        }
        chunk_bytes += size;
        chunk.push(entry);
    }
    if !chunk.is_empty() {
        writer
            .send(&Message::LsChunk(LsChunk { entries: chunk }))
            .await?;
    }
    writer
        .send(&Message::LsEnd(LsEnd { total, truncated }))
        .await?;
    Ok(())
}

/// The first [`MAX_LS_ENTRIES`] entries in directory order, sorted by name,
/// and the total count.
fn list_blocking(dir: &Path, shown: &str) -> Result<(Vec<FileStat>, u64), Failure> {
    let rd = std::fs::read_dir(dir).map_err(|e| Failure::io("cannot list", shown, &e))?;
    let mut entries = Vec::new();
    let mut total = 0u64;
    for ent in rd {
        let ent = ent.map_err(|e| Failure::io("cannot list", shown, &e))?;
        total += 1;
        if entries.len() < MAX_LS_ENTRIES {
            let name = ent.file_name().to_string_lossy().into_owned();
            // An entry removed while listing is simply skipped.
            if let Ok(st) = stat_of(name, &ent.path()) {
                entries.push(st);
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path, req: FileRead) -> (Vec<u8>, FileReadEnd, u64) {
        let (tx, mut rx) = mpsc::channel(1024);
        read_blocking(path, &req, &tx).unwrap();
        drop(tx);
        let (mut data, mut end, mut total) = (Vec::new(), None, 0);
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                ReadEvent::Start(s) => total = s.total_size,
                ReadEvent::Chunk(c) => data.extend(c),
                ReadEvent::End(e) => end = Some(e),
                ReadEvent::Failed(e) => panic!("{e:?}"),
            }
        }
        (data, end.unwrap(), total)
    }

    fn req(offset: Option<u64>, limit: Option<u64>, max_bytes: Option<u64>) -> FileRead {
        FileRead {
            path: String::new(),
            offset,
            limit,
            max_bytes,
        }
    }

    #[test]
    fn line_and_byte_limits_combine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "l0\nl1\nl2\nl3\nl4").unwrap();
        // (offset, limit, max_bytes, expected data, expected truncated)
        type Case = (Option<u64>, Option<u64>, Option<u64>, &'static str, bool);
        let cases: &[Case] = &[
            (None, None, None, "l0\nl1\nl2\nl3\nl4", false),
            (Some(1), None, None, "l1\nl2\nl3\nl4", false),
            (Some(1), Some(2), None, "l1\nl2\n", true),
            (None, Some(5), None, "l0\nl1\nl2\nl3\nl4", false),
            (None, Some(9), None, "l0\nl1\nl2\nl3\nl4", false),
            (None, None, Some(4), "l0\nl", true),
            (Some(2), Some(2), Some(4), "l2\nl", true),
            (Some(3), Some(1), Some(100), "l3\n", true),
            (Some(4), None, None, "l4", false),
            (Some(10), None, None, "", false),
            (None, None, Some(0), "", true),
            (None, Some(0), None, "", true),
            (None, None, Some(14), "l0\nl1\nl2\nl3\nl4", false),
        ];
        for &(o, l, m, want, trunc) in cases {
            let (data, end, total) = read_all(&p, req(o, l, m));
            assert_eq!(String::from_utf8(data).unwrap(), want, "{o:?} {l:?} {m:?}");
            assert_eq!(end.truncated, trunc, "{o:?} {l:?} {m:?}");
            assert_eq!(end.bytes, want.len() as u64);
            assert_eq!(total, 14);
        }
    }
}
