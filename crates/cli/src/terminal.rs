//! The local terminal: raw mode for the shell, echo off for secrets, and
//! the window size. Each mode is a guard that restores the saved settings
//! when dropped, so every way out (return, error, unwinding panic) gives
//! the terminal back.

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use crate::error::{CliError, Result};

fn set(t: &Termios) -> Result<()> {
    termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, t).map_err(CliError::Terminal)
}

fn get() -> Result<Termios> {
    termios::tcgetattr(std::io::stdin().as_fd()).map_err(CliError::Terminal)
}

fn restore(saved: &Termios) {
    if let Err(e) = set(saved) {
        eprintln!("bhatti: cannot restore the terminal ({e}); run `reset`");
    }
}

/// Raw mode on standard input while alive; the saved settings come back on drop.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> Result<RawMode> {
        let saved = get()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        set(&raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore(&self.saved);
    }
}

/// Echo off on standard input while alive (reading a secret).
#[derive(Debug)]
pub struct NoEcho {
    saved: Termios,
}

impl NoEcho {
    pub fn enter() -> Result<NoEcho> {
        let saved = get()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        set(&quiet)?;
        Ok(NoEcho { saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        restore(&self.saved);
    }
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);

/// The terminal's size (rows, cols), when stdout is a terminal.
pub fn terminal_size() -> Option<(u16, u16)> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own; the
    // fd is stdout's, open for the life of the process.
    let r = unsafe { tiocgwinsz(stdout.as_fd().as_raw_fd(), &mut ws) };
    (r.is_ok() && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}
