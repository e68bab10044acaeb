//! Running the external tools the pipeline relies on (apt, dpkg-deb, mkfs.ext4,
//! mmdebstrap, decompressors) with their stderr kept for error messages.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// How much of a failing tool's stderr is kept in the error.
const STDERR_TAIL: usize = 4096;

/// A failure to run an external tool.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (usually: not installed).
    #[error("Cannot start `{program}` (is it installed?)")]
    Spawn {
        /// Program name.
        program: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{program}` failed ({status}): {stderr}")]
    Failed {
        /// Program name.
        program: String,
        /// Exit status as printed by the OS.
        status: String,
        /// The last few KiB of its stderr.
        stderr: String,
    },
    /// Feeding the program's stdin failed.
    #[error("Cannot write to the stdin of `{program}`")]
    Stdin {
        /// Program name.
        program: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn program_name(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

fn check(program: String, out: Output) -> Result<Vec<u8>, CommandError> {
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let start = stderr.len().saturating_sub(STDERR_TAIL);
    let start = (start..stderr.len())
        .find(|i| stderr.is_char_boundary(*i))
        .unwrap_or(stderr.len());
    Err(CommandError::Failed {
        program,
        status: out.status.to_string(),
        stderr: stderr[start..].trim().to_owned(),
    })
}

/// Runs `cmd` to completion with no stdin; returns its stdout.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>, CommandError> {
    let program = program_name(cmd);
    tracing::debug!(command = ?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    check(program, out)
}

/// Runs `cmd` with `input` on its stdin; returns its stdout.
pub(crate) fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>, CommandError> {
    let program = program_name(cmd);
    tracing::debug!(command = ?cmd, input_len = input.len(), "running");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stdin = child.stdin.take();
    // The writer runs on its own thread so a tool that fills its stdout pipe
    // before draining stdin cannot deadlock us.
    let (write_result, out) = std::thread::scope(|s| {
        let writer = s.spawn(move || match stdin {
            Some(mut pipe) => pipe.write_all(input),
            None => Ok(()),
        });
        let out = child.wait_with_output();
        (writer.join(), out)
    });
    let out = out.map_err(|source| CommandError::Spawn {
        program: program.clone(),
        source,
    })?;
    match write_result {
        Ok(Ok(())) => {}
        // A tool that exits early closes the pipe; its exit status tells why.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Err(source)) => return Err(CommandError::Stdin { program, source }),
        Err(_) => {
            return Err(CommandError::Stdin {
                program,
                source: std::io::Error::other("stdin writer thread panicked"),
            })
        }
    }
    check(program, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout() {
        let out = run(Command::new("sh").args(["-c", "printf hi"])).expect("sh runs");
        assert_eq!(out, b"hi");
    }

    #[test]
    fn failure_keeps_stderr_and_status() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        match err {
            CommandError::Failed { stderr, status, .. } => {
                assert_eq!(stderr, "boom");
                assert!(status.contains('3'), "{status}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_program_is_spawn_error() {
        let err = run(&mut Command::new("/nonexistent/bhatti-tool")).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }

    #[test]
    fn pipes_large_input_without_deadlock() {
        let input = vec![b'x'; 4 << 20];
        let out = run_with_input(&mut Command::new("cat"), &input).expect("cat runs");
        assert_eq!(out.len(), input.len());
    }
}
