//! Waiting for a new VM's agent, and turning a dead VMM into an error an
//! operator can act on.

use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_client::{AgentClient, ClientError, Endpoint};
use vmm::{Vmm, VmmExit};

use crate::error::{CoreError, Result};
use crate::id::SandboxId;

/// How long one TCP probe may wait: a SYN sent before the guest's network
/// is up is dropped (the neighbour entry is pre-seeded, so nothing answers
/// "unreachable"), and the kernel would only retransmit after 1 s. Once
/// eth0 is up an absent listener answers with a reset at once, so this only
/// bounds how late we notice the network coming up.
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);
/// The first probe's bound (see [`wait_for_agent`]).
const FIRST_PROBE_TIMEOUT: Duration = Duration::from_millis(10);
/// Pause after a probe that failed fast (refused: guest up, agent not yet).
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// How long authentication may take once TCP connects (TCG is slow).
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Console bytes kept for error reports.
const SERIAL_TAIL_BYTES: u64 = 4096;
/// Console lines kept for error reports.
const SERIAL_TAIL_LINES: usize = 25;

/// The last lines of the guest console (empty when unreadable).
pub(crate) fn serial_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(SERIAL_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => last_lines(&text, SERIAL_TAIL_LINES),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no console log");
            String::new()
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How the VMM ended, in words.
pub(crate) fn exit_reason(exit: &VmmExit) -> String {
    let tail = exit.stderr_tail.trim();
    if tail.is_empty() {
        format!("VMM {}", exit.status)
    } else {
        format!("VMM {}; stderr: {tail}", exit.status)
    }
}

/// The error for a dead VMM.
pub(crate) fn dead(id: &SandboxId, exit: &VmmExit, serial_log: &Path) -> CoreError {
    CoreError::VmmExited {
        id: id.clone(),
        reason: exit_reason(exit),
        serial_tail: serial_tail(serial_log),
    }
}

/// Resolves when the VMM exits (never, if it was not started).
pub(crate) async fn exited(vmm: &dyn Vmm) -> VmmExit {
    match vmm.wait_exit().await {
        Ok(exit) => exit,
        Err(_) => std::future::pending().await,
    }
}

/// Where the agent of `vmm`'s guest listens: the engine's host socket
/// when it has one (the fake engine), else the guest's `ip` and
/// [`crate::AGENT_PORT`].
pub(crate) fn agent_endpoint(vmm: &dyn Vmm, ip: Ipv4Addr) -> Endpoint {
    match vmm.agent_socket() {
        Some(path) => Endpoint::Unix(path),
        None => Endpoint::Tcp((ip, crate::machine::AGENT_PORT).into()),
    }
}

/// Polls until the agent at `endpoint` authenticates a connection, the VMM
/// dies, or `timeout` passes. `restored`: the guest comes from a capture
/// and is told its identity on the console, so an agent refusing (or
/// proving with) another token is still the capture's, not an error yet.
///
/// Two phases per round: a bare TCP connect with a short timeout (is the
/// guest's network up and lohar listening?), then one authenticated ping on
/// the client's pool with a generous deadline — so a slow TCG guest is not
/// mistaken for an absent one, and a guest that is not up yet costs at most
/// [`PROBE_TIMEOUT`] of detection latency. The authenticated connection
/// stays in the client's pool for the first real call.
pub(crate) async fn wait_for_agent(
    id: &SandboxId,
    vmm: &dyn Vmm,
    client: &AgentClient,
    endpoint: &Endpoint,
    timeout: Duration,
    serial_log: &Path,
    restored: bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no attempt finished");
    // Short at first (a restored guest answers within milliseconds of
    // taking its address), doubling on each silent probe up to the bound.
    let mut probe_timeout = FIRST_PROBE_TIMEOUT;
    let dead_or_timeout = |last_error: String| match vmm.exit() {
        Some(exit) => dead(id, &exit, serial_log),
        None => CoreError::BootTimeout {
            id: id.clone(),
            after: timeout,
            last_error,
            serial_tail: serial_tail(serial_log),
        },
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || vmm.exit().is_some() {
            return Err(dead_or_timeout(last_error));
        }
        let round = async {
            let probe = async {
                match endpoint {
                    Endpoint::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.map(drop),
                    Endpoint::Unix(path) => tokio::net::UnixStream::connect(path).await.map(drop),
                }
            };
            match tokio::time::timeout(probe_timeout.min(left), probe).await {
                Err(_) => {
                    return Err(format!(
                        "connect to {endpoint}: no answer within {probe_timeout:?}"
                    ))
                }
                Ok(Err(e)) => return Err(format!("connect to {endpoint}: {e}")),
                Ok(Ok(())) => {}
            }
            match client.deadline(AUTH_TIMEOUT.min(left)).ping().await {
                Ok(_) => Ok(Ok(())),
                // A guest restored from a capture answers with the
                // capture's token until it has read its identity line
                // (at the same address when its source's was freed and
                // given to it): not yet, until the deadline.
                Err(e)
                    if restored
                        && (matches!(e, ClientError::AgentProof { .. })
                            || e.agent_code() == Some(proto::ErrorCode::AuthFailed)) =>
                {
                    Err(format!("{e} (the guest has not taken its identity yet)"))
                }
                // The agent answered and said no, or could not prove it
                // holds the token, or speaks another protocol: waiting
                // will not help.
                Err(
                    e @ (ClientError::Agent { .. }
                    | ClientError::UnexpectedFrame { .. }
                    | ClientError::AgentProof { .. }
                    | ClientError::VersionMismatch { .. }),
                ) => Ok(Err(e)),
                Err(e) => Err(e.to_string()),
            }
        };
        tokio::select! {
            r = round => match r {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(source)) => {
                    return Err(CoreError::AgentUnreachable { id: id.clone(), source });
                }
                Err(e) => {
                    if e.contains("no answer within") {
                        probe_timeout = (probe_timeout * 2).min(PROBE_TIMEOUT);
                    }
                    last_error = e;
                }
            },
            exit = exited(vmm) => return Err(dead(id, &exit, serial_log)),
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            exit = exited(vmm) => return Err(dead(id, &exit, serial_log)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\r\nb", 5), "a\nb");
        assert_eq!(last_lines("", 3), "");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        assert_eq!(serial_tail(&p), "");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&p, &text).unwrap();
        let tail = serial_tail(&p);
        assert_eq!(tail.lines().count(), SERIAL_TAIL_LINES);
        assert!(tail.ends_with("line 999"));
    }

    #[test]
    fn reasons() {
        let exit = VmmExit {
            status: vmm::ExitStatusKind::Signal(9),
            stderr_tail: String::new(),
        };
        assert_eq!(exit_reason(&exit), "VMM killed by signal 9");
        let exit = VmmExit {
            status: vmm::ExitStatusKind::Code(1),
            stderr_tail: "qemu: could not open disk\n".into(),
        };
        assert_eq!(
            exit_reason(&exit),
            "VMM exited with code 1; stderr: qemu: could not open disk"
        );
    }
}
