//! The guest wall clock, set by the host after a resume or a restore
//! (guest time continues where it stopped, so it lags by the sleep).

use std::sync::atomic::{AtomicBool, Ordering};

use proto::ErrorCode;

use crate::failure::Failure;

/// Set once by the guest agent (forked by PID 1); never in `lohar serve`.
static IN_GUEST: AtomicBool = AtomicBool::new(false);

/// Marks this process as the guest's agent: the clock is ours to set.
pub fn mark_guest() {
    IN_GUEST.store(true, Ordering::Relaxed);
}

/// Sets `CLOCK_REALTIME` to `unix_ms`. Only the guest's agent does this: a
/// lohar serving on a host (tests, development) must never move the host's
/// clock.
pub fn set_realtime(unix_ms: u64) -> Result<(), Failure> {
    if !IN_GUEST.load(Ordering::Relaxed) {
        return Err(Failure::new(
            ErrorCode::PermissionDenied,
            "only the guest's init sets the clock",
        ));
    }
    set(unix_ms)
}

fn set(unix_ms: u64) -> Result<(), Failure> {
    let ts = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the valid timespec we pass and nothing else.
    let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::new(
            ErrorCode::PermissionDenied,
            format!("clock_settime: {e}"),
        ));
    }
    tracing::info!(unix_ms, "clock set by the host");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_pid_1_the_clock_is_left_alone() {
        // Tests never run the guest agent.
        let e = set_realtime(0).unwrap_err();
        assert!(format!("{e:?}").contains("only the guest's init"), "{e:?}");
    }
}
