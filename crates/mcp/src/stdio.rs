//! The stdio transport: one JSON-RPC message per line on stdin, one
//! answer per line on stdout (nothing else is written there). Requests
//! run concurrently — a long `exec` does not hold up a `ping` — and their
//! answers are written whole, one line each, in the order they finish.
//!
//! Bounded like the HTTP transport: a line longer than [`MAX_LINE`] is
//! skipped (to its newline) and answered with a parse error, and at most
//! [`MAX_IN_FLIGHT`] requests run at once (reading waits for a slot).

use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::protocol::{error_response, PARSE_ERROR};
use crate::{Backend, Server};

/// The longest message taken (the HTTP transport's body limit).
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// Requests running at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// One line of input.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    /// Over the limit; its bytes were skipped.
    TooLong,
}

/// The next line of `input` without its newline, or `None` at the end.
/// Never holds more than `max` bytes of it. A last line without a newline
/// counts.
async fn next_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    max: usize,
) -> std::io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = input.fill_buf().await?;
        if chunk.is_empty() {
            if buf.is_empty() && !too_long {
                return Ok(None);
            }
            break;
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => (&chunk[..at], Some(at + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + part.len() > max {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = done.unwrap_or(chunk.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    Ok(Some(Line::Text(String::from_utf8_lossy(&buf).into_owned())))
}

/// Serves `server` until `input` ends, then waits for the requests still
/// running and returns.
pub async fn serve<B, R, W>(
    server: Arc<Server<B>>,
    mut input: R,
    mut output: W,
) -> std::io::Result<()>
where
    B: Backend + 'static,
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Bounded by the tasks that can hold a sender: at most MAX_IN_FLIGHT.
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut reading = true;
    loop {
        let room = tasks.len() < MAX_IN_FLIGHT;
        tokio::select! {
            line = next_line(&mut input, MAX_LINE), if reading && room => match line? {
                Some(Line::Text(line)) if line.trim().is_empty() => {}
                Some(Line::Text(line)) => {
                    let (server, tx) = (server.clone(), tx.clone());
                    tasks.spawn(async move {
                        if let Some(answer) = server.handle_text(&line).await {
                            let _ = tx.send(answer);
                        }
                    });
                }
                Some(Line::TooLong) => {
                    let answer = error_response(
                        Value::Null,
                        PARSE_ERROR,
                        format!("message over {MAX_LINE} bytes"),
                    );
                    write_line(&mut output, &answer).await?;
                }
                None => reading = false,
            },
            Some(answer) = rx.recv() => write_line(&mut output, &answer).await?,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            else => break,
        }
        if !reading && tasks.is_empty() {
            // Every task has sent its answer before it ended.
            while let Ok(answer) = rx.try_recv() {
                write_line(&mut output, &answer).await?;
            }
            output.flush().await?;
            return Ok(());
        }
    }
    Ok(())
}

async fn write_line<W: AsyncWrite + Unpin>(output: &mut W, answer: &Value) -> std::io::Result<()> {
    output.write_all(answer.to_string().as_bytes()).await?;
    output.write_all(b"\n").await?;
    output.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        // A tiny buffer, so lines straddle reads.
        let mut r = tokio::io::BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        while let Some(l) = next_line(&mut r, max).await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        let text = |s: &str| Line::Text(s.to_string());
        assert_eq!(
            lines(b"ab\n\ncdef\n12345\nxy", 4).await,
            vec![
                text("ab"),
                text(""),
                text("cdef"),
                Line::TooLong,
                text("xy")
            ]
        );
        assert_eq!(lines(b"", 4).await, vec![]);
        assert_eq!(lines(b"123456789", 4).await, vec![Line::TooLong]);
        assert_eq!(lines(b"\n", 4).await, vec![text("")]);
    }
}
