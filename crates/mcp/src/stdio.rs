//! The stdio transport: one JSON-RPC message per line on stdin, one
//! answer per line on stdout (nothing else is written there). Requests
//! run concurrently — a long `exec` does not hold up a `ping` — and their
//! answers are written whole, one line each, in the order they finish.

use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{Backend, Server};

/// Serves `server` until `input` ends, then waits for the requests still
/// running and returns.
pub async fn serve<B, R, W>(server: Arc<Server<B>>, input: R, mut output: W) -> std::io::Result<()>
where
    B: Backend + 'static,
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut lines = input.lines();
    let mut tasks = tokio::task::JoinSet::new();
    let mut reading = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if reading => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    let (server, tx) = (server.clone(), tx.clone());
                    tasks.spawn(async move {
                        if let Some(answer) = server.handle_text(&line).await {
                            let _ = tx.send(answer.to_string());
                        }
                    });
                }
                None => reading = false,
            },
            Some(answer) = rx.recv() => {
                output.write_all(answer.as_bytes()).await?;
                output.write_all(b"\n").await?;
                output.flush().await?;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            else => break,
        }
        if !reading && tasks.is_empty() {
            // Every task has sent its answer before it ended.
            while let Ok(answer) = rx.try_recv() {
                output.write_all(answer.as_bytes()).await?;
                output.write_all(b"\n").await?;
            }
            output.flush().await?;
            return Ok(());
        }
    }
    Ok(())
}
