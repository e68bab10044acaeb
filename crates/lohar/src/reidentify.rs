//! A new identity for a guest restored from another guest's memory
//! ([`proto::identity`]): the host writes one line to the VMM's console
//! input; the agent reads the guest's first serial port from start-up on,
//! on a thread blocked in `read(2)` (which is where a snapshot finds it, so
//! a restored copy reads the line its new host writes), and applies it:
//! token, hostname, `eth0`, clock, entropy, in that order.
//!
//! `lohar serve --identity-stdin` reads the same lines from its stdin and
//! applies only the token: it runs on a host whose name, network, clock and
//! entropy are not its to change.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use proto::identity::{GuestIdentity, IdentityError, IDENTITY_ENTROPY_BYTES, MAX_IDENTITY_LINE};

use crate::agent::Agent;

/// The guest's first serial port: x86's 8250, arm64's PL011.
const CONSOLES: [&str; 2] = ["ttyS0", "ttyAMA0"];
/// The kernel's consoles, the one `/dev/console` is last.
const ACTIVE_CONSOLES: &str = "/sys/class/tty/console/active";

/// Where the guest's agent keeps the token it was last told (tmpfs, root's
/// only): an agent PID 1 starts again takes it rather than the config
/// drive's, which belongs to the guest this one was copied from.
pub const SAVED_TOKEN: &str = "/run/bhatti/token";

/// One line out of a [`LineReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its `\n`.
    Complete(Vec<u8>),
    /// A line longer than the bound, discarded up to its `\n`.
    TooLong,
}

/// Splits a byte stream into `\n`-ended lines holding at most `max` bytes
/// of any one: a longer line is dropped (reported as [`Line::TooLong`]) and
/// reading resumes after its end. A partial line at end of input is dropped.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    max: usize,
    line: Vec<u8>,
    overlong: bool,
    chunk: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max: usize) -> LineReader<R> {
        LineReader {
            inner,
            max,
            line: Vec::new(),
            overlong: false,
            chunk: vec![0; 1024].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next line; `None` at end of input.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            while self.start < self.end {
                let b = self.chunk[self.start];
                self.start += 1;
                if b == b'\n' {
                    if std::mem::take(&mut self.overlong) {
                        return Ok(Some(Line::TooLong));
                    }
                    return Ok(Some(Line::Complete(std::mem::take(&mut self.line))));
                }
                if self.overlong {
                    continue;
                }
                if self.line.len() >= self.max {
                    self.overlong = true;
                    self.line = Vec::new();
                    continue;
                }
                self.line.push(b);
            }
            let n = match self.inner.read(&mut self.chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

/// The identity in one line, if it is an identity line that checks. Other
/// lines are ignored; a refused identity line is logged (never its token).
pub fn identity_of(line: &Line) -> Option<GuestIdentity> {
    let bytes = match line {
        Line::Complete(bytes) => bytes,
        Line::TooLong => {
            tracing::warn!(
                max = MAX_IDENTITY_LINE,
                "ignoring an over-long console line"
            );
            return None;
        }
    };
    match GuestIdentity::from_line(bytes) {
        Ok(id) => Some(id),
        Err(IdentityError::NotIdentity) => None,
        Err(e) => {
            tracing::warn!(error = %e, "refusing an identity line");
            None
        }
    }
}

/// Reads lines until end of input or an error, calling `apply` with each
/// identity. The bound leaves room for a `\r` before the `\n`.
pub fn listen<R: Read>(input: R, mut apply: impl FnMut(&GuestIdentity)) -> io::Result<()> {
    let mut lines = LineReader::new(input, MAX_IDENTITY_LINE + 1);
    while let Some(line) = lines.next_line()? {
        if let Some(id) = identity_of(&line) {
            apply(&id);
        }
    }
    Ok(())
}

/// In the guest: opens the console, echo off, and listens on a thread of
/// its own for the rest of the agent's life. Must run from start-up on: a
/// snapshot is only restorable with a new identity if it caught this
/// thread waiting in `read`.
pub fn start_console(agent: Arc<Agent>) {
    let (console, path) = match open_console() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lohar: no serial console to hear a new identity on: {e}");
            return;
        }
    };
    // On the console log: which port a host writes its line to.
    eprintln!("lohar: listening for a new identity on {path}");
    let spawned = std::thread::Builder::new()
        .name("identity-console".into())
        .spawn(move || {
            let result = listen(console, |id| apply_in_guest(&agent, id));
            tracing::warn!(console = %path, ?result, "the console listener stopped");
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the console listener");
    }
}

/// `lohar serve --identity-stdin`: listens on stdin, applies the token only.
pub fn start_stdin(agent: Arc<Agent>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("identity-stdin".into())
        .spawn(move || {
            let result = listen(io::stdin().lock(), |id| apply_token(&agent, id));
            tracing::info!(?result, "stdin closed: no more identities");
        })
        .map(drop)
}

fn apply_token(agent: &Agent, id: &GuestIdentity) {
    agent.set_token(&id.token);
    tracing::info!(hostname = %id.hostname, "new agent token");
}

/// Applies a whole identity in the guest. Each step that fails is logged
/// and the rest still run; none waits.
pub fn apply_in_guest(agent: &Agent, id: &GuestIdentity) {
    apply_token(agent, id);
    if let Err(e) =
        crate::init::guest::write_atomic(Path::new(SAVED_TOKEN), id.token.as_bytes(), 0o600, 0, 0)
    {
        tracing::warn!(error = %e.chain(), "cannot save the new token");
    }
    if let Err(e) = crate::init::guest::rename(&id.hostname, id.ip) {
        tracing::warn!(error = %e.chain(), "cannot set the new hostname");
    }
    match id.mac_bytes() {
        Ok(mac) => {
            if let Err(e) = crate::init::net::readdress(id.ip, id.prefix, id.gateway, mac) {
                tracing::warn!(error = %e.chain(), "cannot readdress eth0");
            }
        }
        Err(e) => tracing::warn!(error = %e, "bad MAC"),
    }
    if let Err(e) = crate::clock::set_realtime(id.unix_ms) {
        tracing::warn!(error = ?e, "cannot set the clock");
    }
    match id.entropy_bytes() {
        Ok(bytes) => {
            if let Err(e) = add_entropy(&bytes) {
                tracing::warn!(error = %e, "cannot reseed the random generator");
            }
        }
        Err(e) => tracing::warn!(error = %e, "bad entropy"),
    }
    tracing::info!(hostname = %id.hostname, ip = %id.ip, "new identity applied");
}

/// The token an agent restarted by PID 1 uses, if a new identity set one.
pub fn saved_token() -> Option<String> {
    let token = std::fs::read_to_string(SAVED_TOKEN).ok()?;
    (token.len() >= 16).then_some(token)
}

/// Serial ports to try, best first: the kernel's serial consoles (from
/// [`ACTIVE_CONSOLES`], `/dev/console`'s first), then [`CONSOLES`]. On
/// arm64 `ttyS0` may exist without hardware behind it (it opens, then
/// every read fails), so the kernel's word comes first.
fn console_candidates(active: &str) -> Vec<String> {
    let mut out: Vec<String> = active
        .split_whitespace()
        .rev()
        .filter(|n| n.starts_with("ttyS") || n.starts_with("ttyAMA"))
        .map(String::from)
        .collect();
    for name in CONSOLES {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

fn open_console() -> io::Result<(File, String)> {
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    let active = std::fs::read_to_string(ACTIVE_CONSOLES).unwrap_or_default();
    for name in console_candidates(&active) {
        let path = format!("/dev/{name}");
        // Non-blocking only for the open: a serial port's open may wait for
        // carrier.
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => {
                quiet(&f)?;
                set_blocking(&f)?;
                return Ok((f, path));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Input settings for a console that only the host writes to: no echo
/// (the line would otherwise come back out on the console log), no line
/// editing (our own bounded reader splits lines; the kernel's canonical
/// mode would cut them at 4095 bytes), no signal or flow-control
/// characters. Output settings are left alone.
fn quiet_termios(t: &mut libc::termios) {
    t.c_lflag &= !(libc::ECHO
        | libc::ECHONL
        | libc::ECHOE
        | libc::ECHOK
        | libc::ICANON
        | libc::ISIG
        | libc::IEXTEN);
    t.c_iflag &= !(libc::IXON | libc::IXOFF);
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

fn quiet(f: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid termios.
    if unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    quiet_termios(&mut t);
    // SAFETY: as above; tcsetattr only reads `t`.
    if unsafe { libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_blocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY` from `<linux/random.h>`: `_IOW('R', 0x03, int[2])` (the
/// `libc` crate lacks it; the same number on x86_64 and aarch64).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with its buffer.
#[repr(C)]
struct RandPoolInfo {
    /// Bits credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; IDENTITY_ENTROPY_BYTES],
}

fn pool_info(bytes: &[u8; IDENTITY_ENTROPY_BYTES]) -> RandPoolInfo {
    RandPoolInfo {
        entropy_count: (IDENTITY_ENTROPY_BYTES * 8) as libc::c_int,
        buf_size: IDENTITY_ENTROPY_BYTES as libc::c_int,
        buf: *bytes,
    }
}

/// Mixes the host's bytes into the pool (written, then added with credit)
/// and reseeds the generator now, so the copy's random numbers part from
/// its source's at once.
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let bytes: &[u8; IDENTITY_ENTROPY_BYTES] = bytes
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "wrong entropy length"))?;
    let mut random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    std::io::Write::write_all(&mut random, bytes)?;
    let info = pool_info(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info followed by buf_size bytes.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader handing out its bytes a few at a time, as a tty does.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn all_lines(input: &[u8], max: usize, step: usize) -> Vec<Line> {
        let mut r = LineReader::new(Trickle(input, step), max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            out.push(l);
        }
        out
    }

    fn identity() -> GuestIdentity {
        GuestIdentity {
            token: "new-token-0123456789".into(),
            hostname: "child-1".into(),
            ip: "10.200.0.7".parse().unwrap(),
            prefix: 24,
            gateway: "10.200.0.1".parse().unwrap(),
            mac: "02:b4:0a:c8:00:07".into(),
            unix_ms: 1_800_000_000_000,
            entropy: "ab".repeat(IDENTITY_ENTROPY_BYTES),
        }
    }

    #[test]
    fn a_long_line_is_dropped_and_reading_resumes_after_it() {
        let c = |s: &str| Line::Complete(s.as_bytes().to_vec());
        for step in [1, 3, 5000] {
            let mut input = b"abc\n".to_vec();
            input.extend(std::iter::repeat_n(b'x', 20));
            input.extend(b"\nexactly8\nnine-byte\n\nlast\npartial");
            assert_eq!(
                all_lines(&input, 8, step),
                [
                    c("abc"),
                    Line::TooLong,
                    c("exactly8"),
                    Line::TooLong,
                    c(""),
                    c("last")
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn identity_lines_are_picked_out_of_console_noise() {
        let good = identity().to_line();
        let crlf = good.trim_end().to_string() + "\r\n";
        let mut bad = identity();
        bad.token = "short".into();
        let long = format!(
            "{}{}\n",
            proto::identity::IDENTITY_PREFIX,
            "0".repeat(MAX_IDENTITY_LINE + 10)
        );
        let input = format!(
            "login: hello\n{long}{good}\x1b[0m noise\n{}{crlf}",
            bad.to_line()
        );
        let mut seen = Vec::new();
        for step in [1, 7, 4096] {
            seen.clear();
            listen(Trickle(input.as_bytes(), step), |id| seen.push(id.clone())).unwrap();
            assert_eq!(seen, [identity(), identity()], "step {step}");
        }
    }

    #[test]
    fn the_console_loses_echo_and_line_editing_but_keeps_its_output() {
        // SAFETY: termios is plain data.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ICANON;
        t.c_oflag = libc::OPOST | libc::ONLCR;
        t.c_iflag = libc::ICRNL | libc::IXON;
        quiet_termios(&mut t);
        assert_eq!(t.c_lflag, 0);
        assert_eq!(t.c_oflag, libc::OPOST | libc::ONLCR);
        assert_eq!(t.c_iflag, libc::ICRNL);
        assert_eq!((t.c_cc[libc::VMIN], t.c_cc[libc::VTIME]), (1, 0));
    }

    #[test]
    fn the_kernels_serial_console_is_tried_first() {
        assert_eq!(console_candidates(""), ["ttyS0", "ttyAMA0"]);
        assert_eq!(console_candidates("tty0 ttyS0\n"), ["ttyS0", "ttyAMA0"]);
        assert_eq!(console_candidates("ttyAMA0\n"), ["ttyAMA0", "ttyS0"]);
        assert_eq!(
            console_candidates("ttyS1 hvc0 ttyAMA0"),
            ["ttyAMA0", "ttyS1", "ttyS0"]
        );
    }

    #[test]
    fn rand_pool_info_has_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
        assert_eq!(
            std::mem::size_of::<RandPoolInfo>(),
            8 + IDENTITY_ENTROPY_BYTES
        );
        let info = pool_info(&[7; IDENTITY_ENTROPY_BYTES]);
        assert_eq!((info.entropy_count, info.buf_size), (512, 64));
        assert_eq!(
            RNDADDENTROPY,
            (1 << 30) | (8 << 16) | (b'R' as libc::c_ulong) << 8 | 3
        );
    }
}
