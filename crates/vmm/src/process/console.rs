//! The guest console, capped: the VMM writes it to a pipe, a thread of the
//! daemon copies the pipe into the serial log and keeps that file at most
//! [`CONSOLE_CAP`] bytes — when a write would pass the cap, the file is cut
//! to its newest [`CONSOLE_CAP`]`/2` bytes first (a ring in two halves).
//!
//! Why a pipe and the daemon: the VMM (confined) cannot be trusted to cap
//! its own file, and a file the VMM appends to by path can only be rotated
//! behind its back. The daemon's copy is bounded by construction, keeps one
//! file (so `serial_tail` readers see the newest output at its end), and a
//! guest that writes faster than the copy is slowed by the full pipe — its
//! serial port stalls — rather than growing anything. When the daemon is
//! gone (killed, restarting), the VMM's writes fail with EPIPE and the
//! output is dropped; QEMU ignores SIGPIPE.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Result, VmmError};

/// Most bytes a serial log holds.
pub const CONSOLE_CAP: u64 = 1 << 20;

/// Bytes copied so far (tests check that more passed than was kept).
#[derive(Debug, Default)]
pub struct ConsoleCounter(AtomicU64);

impl ConsoleCounter {
    /// Bytes read from the VMM so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A pipe whose write end becomes the VMM's stdout, copied into `log`.
/// `fresh`: start the log empty (a boot), else append (a restore).
/// Returns the child's stdout; the copy ends when every write end is
/// closed (the VMM exited).
pub(crate) fn capped_console(
    log: &Path,
    fresh: bool,
    cap: u64,
    counter: Arc<ConsoleCounter>,
) -> Result<Stdio> {
    let prepare = |source| VmmError::Prepare {
        path: log.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(fresh)
        .mode(0o600)
        // A link planted where the log goes is refused, not followed.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(log)
        .map_err(prepare)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(prepare(std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors from pipe2, owned once each.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let name = log.display().to_string();
    std::thread::Builder::new()
        .name("vmm-console".into())
        .spawn(move || {
            if let Err(e) = copy_capped(File::from(read), file, cap, &counter) {
                tracing::warn!(log = %name, error = %e, "console copy stopped");
            }
        })
        .map_err(prepare)?;
    Ok(Stdio::from(write))
}

/// Copies `from` into `to` until EOF, keeping `to` at most `cap` bytes.
fn copy_capped(
    mut from: impl Read,
    mut to: File,
    cap: u64,
    counter: &ConsoleCounter,
) -> std::io::Result<()> {
    let mut len = to.seek(SeekFrom::End(0))?;
    if len > cap {
        len = trim(&mut to, len, cap / 2)?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        counter.0.fetch_add(n as u64, Ordering::Relaxed);
        // A single read larger than the cap keeps only its end.
        let data = &buf[n.saturating_sub(cap as usize)..n];
        if len + data.len() as u64 > cap {
            let keep = (cap / 2).saturating_sub(data.len() as u64);
            len = trim(&mut to, len, keep)?;
        }
        to.write_all(data)?;
        len += data.len() as u64;
    }
}

/// Keeps the last `keep` bytes of a file `len` long; leaves the offset at
/// the new end.
fn trim(f: &mut File, len: u64, keep: u64) -> std::io::Result<u64> {
    let keep = keep.min(len);
    let mut tail = vec![0u8; keep as usize];
    f.seek(SeekFrom::Start(len - keep))?;
    f.read_exact(&mut tail)?;
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&tail)?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_never_passes_the_cap_and_ends_with_the_newest_bytes() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("serial.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&log)
            .unwrap();
        // 10 MiB in uneven chunks through a reader that checks the file
        // size between reads.
        struct Src {
            left: usize,
            i: u64,
            log: std::path::PathBuf,
            max_seen: u64,
        }
        impl Read for Src {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let size = std::fs::metadata(&self.log).unwrap().len();
                self.max_seen = self.max_seen.max(size);
                if self.left == 0 {
                    return Ok(0);
                }
                let n = buf.len().min(self.left).min(7919);
                for b in &mut buf[..n] {
                    *b = b'a' + (self.i % 26) as u8;
                    self.i += 1;
                }
                self.left -= n;
                Ok(n)
            }
        }
        let mut src = Src {
            left: 10 << 20,
            i: 0,
            log: log.clone(),
            max_seen: 0,
        };
        let counter = ConsoleCounter::default();
        copy_capped(&mut src, file, 64 * 1024, &counter).unwrap();
        assert_eq!(counter.bytes(), 10 << 20);
        let kept = std::fs::read(&log).unwrap();
        assert!(kept.len() as u64 <= 64 * 1024, "{}", kept.len());
        assert!(src.max_seen <= 64 * 1024, "{}", src.max_seen);
        assert!(kept.len() >= 32 * 1024, "{}", kept.len());
        // The newest byte is the last one written, and the kept bytes are
        // contiguous.
        let last = (10u64 << 20) - 1;
        assert_eq!(*kept.last().unwrap(), b'a' + (last % 26) as u8);
        for (k, w) in kept.windows(2).enumerate() {
            assert_eq!((w[0] - b'a' + 1) % 26, w[1] - b'a', "gap at {k}");
        }
    }

    #[test]
    fn a_restore_appends_and_a_boot_starts_fresh() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("serial.log");
        let run = |fresh: bool, text: &str| {
            let counter = Arc::new(ConsoleCounter::default());
            let out = capped_console(&log, fresh, CONSOLE_CAP, counter).unwrap();
            let mut cmd = std::process::Command::new("/bin/sh");
            cmd.args(["-c", &format!("printf '{text}'")]).stdout(out);
            assert!(cmd.status().unwrap().success());
            drop(cmd);
        };
        let wait_for = |want: &str| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let got = std::fs::read_to_string(&log).unwrap_or_default();
                if got == want {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{got:?} != {want:?}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        run(true, "boot\\n");
        wait_for("boot\n");
        run(false, "restore\\n");
        wait_for("boot\nrestore\n");
        run(true, "again\\n");
        wait_for("again\n");
        // A symlink where the log goes is refused.
        let other = d.path().join("other");
        std::fs::write(&other, "x").unwrap();
        std::fs::remove_file(&log).unwrap();
        std::os::unix::fs::symlink(&other, &log).unwrap();
        let e = capped_console(&log, false, CONSOLE_CAP, Arc::default()).unwrap_err();
        assert!(e.to_string().contains("serial.log"), "{e}");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "x");
    }
}
