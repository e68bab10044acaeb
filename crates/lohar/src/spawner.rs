//! Starting piped commands as another user without a full `fork`.
//!
//! The standard library can only start a child through `posix_spawn`
//! (which uses a `vfork`-like clone and is several times cheaper than
//! `fork` for a short command) when it does not have to change the child's
//! user. So commands for the sandbox user are started from a dedicated
//! thread that has taken on that user's credentials itself: on Linux
//! credentials belong to each thread, and raw `setresuid` & co. (unlike
//! glibc's wrappers, which change every thread) change only the calling
//! one. A child spawned from that thread inherits them.
//!
//! Commands that need a `pre_exec` step anyway (PTY sessions, which must
//! acquire a controlling terminal) are not started here.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::identity::Identity;

type Job = (
    tokio::process::Command,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

/// A thread running with the command user's credentials that spawns commands.
#[derive(Debug, Clone)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
}

/// Switches the calling thread (only) to `id`'s credentials.
fn become_user_on_this_thread(id: &Identity) -> std::io::Result<()> {
    let groups: Vec<libc::gid_t> = id.groups.clone();
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: raw credential syscalls with valid arguments; `groups` outlives
    // the call. They affect only this thread, which does nothing else.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            groups.len(),
            groups.as_ptr(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid))?;
        check(libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid))?;
    }
    Ok(())
}

impl Spawner {
    /// Starts the spawner thread for `id`. Children it starts are tokio
    /// children of `runtime`.
    pub fn start(id: &Identity, runtime: tokio::runtime::Handle) -> std::io::Result<Spawner> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let id = id.clone();
        std::thread::Builder::new()
            .name(format!("spawner-{}", id.uid))
            .spawn(move || {
                let _rt = runtime.enter();
                let switched = become_user_on_this_thread(&id);
                let ok = switched.is_ok();
                let _ = ready_tx.send(switched);
                if !ok {
                    return;
                }
                for (mut cmd, reply) in queue {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread died"))??;
        Ok(Spawner { jobs })
    }

    pub async fn spawn(
        &self,
        cmd: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}
