//! Pseudo-terminal allocation and sizing.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use proto::WindowSize;

/// A new pty pair. The master is non-blocking; both ends are close-on-exec
/// (the slave reaches the child as its stdio through dup2, which clears it).
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

fn winsize(size: WindowSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

pub fn open(size: WindowSize) -> nix::Result<Pty> {
    let pair = openpty(Some(&winsize(size)), None)?;
    for fd in [&pair.master, &pair.slave] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    let flags = OFlag::from_bits_truncate(fcntl(pair.master.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        pair.master.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
    })
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

/// Sets the terminal size; the kernel signals SIGWINCH to the foreground group.
pub fn resize(master: BorrowedFd<'_>, size: WindowSize) -> nix::Result<()> {
    // SAFETY: `master` is an open pty master for the duration of the call and
    // the pointer refers to a live, initialised Winsize.
    unsafe { set_winsize(master.as_raw_fd(), &winsize(size)) }.map(drop)
}
