//! The client's bounded-memory paths through a real agent: collected exec
//! with a cap per stream, streamed file reads and streamed writes with a
//! deadline per step.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agent_client::{ClientError, WriteOptions};
use common::*;
use proto::{ExecRequest, FileRead};
use tokio::io::{AsyncRead, ReadBuf};

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_capped_exec_keeps_the_cap_and_runs_to_its_end() {
    let a = TestAgent::start();
    // What it writes to stderr after its stdout, and its exit code, show
    // it ran past the cap to its end.
    let script = "head -c 3000000 /dev/zero; echo small >&2; exit 3";
    let out = a.client.exec_capped(sh(script), 1000).await.unwrap();
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr, b"small\n");
    assert!(!out.stderr_truncated);
    assert_eq!(out.exit.code, 3, "the command ran to its end");
    // Uncapped: everything, nothing said truncated.
    let out = a.client.exec(sh("head -c 200000 /dev/zero")).await.unwrap();
    assert_eq!(out.stdout.len(), 200_000);
    assert!(!out.stdout_truncated);
}

#[tokio::test]
async fn a_streamed_read_delivers_the_whole_file_and_its_limits() {
    let a = TestAgent::start();
    let path = a.path("big");
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 13).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let req = |max_bytes| FileRead {
        path: path.display().to_string(),
        max_bytes,
        ..Default::default()
    };
    let mut r = a.client.read_file_stream(req(None)).await.unwrap();
    assert_eq!(r.total_size, data.len() as u64);
    assert_eq!(r.truncated(), None, "unknown before the end");
    let mut got = Vec::new();
    let mut chunks = 0;
    while let Some(c) = r.next_chunk().await.unwrap() {
        assert!(c.len() <= proto::DATA_CHUNK);
        got.extend_from_slice(&c);
        chunks += 1;
    }
    assert!(chunks > 1);
    assert!(got == data, "streamed data differs");
    assert_eq!(r.truncated(), Some(false));
    assert_eq!(r.next_chunk().await.unwrap(), None, "done stays done");

    let mut r = a.client.read_file_stream(req(Some(100))).await.unwrap();
    let mut got = Vec::new();
    while let Some(c) = r.next_chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, &data[..100]);
    assert_eq!(r.truncated(), Some(true));

    // A reader dropped half-way leaves the client usable.
    let mut r = a.client.read_file_stream(req(None)).await.unwrap();
    r.next_chunk().await.unwrap().expect("a first chunk");
    drop(r);
    let st = a.client.stat(&path.display().to_string()).await.unwrap();
    assert_eq!(st.size, data.len() as u64);

    let e = a
        .client
        .read_file_stream(FileRead {
            path: a.path("missing").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.agent_code(), Some(proto::ErrorCode::NotFound), "{e}");
}

/// A source that yields `data` in small pieces, then stalls forever
/// (`stall`) or ends.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    stall: bool,
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.data.len() {
            return if this.stall {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            };
        }
        let n = (this.data.len() - this.pos)
            .min(buf.remaining())
            .min(10_000);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_streamed_write_commits_whole_and_a_stalled_source_times_out() {
    let a = TestAgent::start();
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i| (i % 241) as u8).collect();
    let path = a.path("up.bin").display().to_string();
    let src = Trickle {
        data: data.clone(),
        pos: 0,
        stall: false,
    };
    let n = a
        .client
        .write_file_stream(&path, data.len() as u64, src, WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(std::fs::read(&path).unwrap() == data);

    // Small: one chunk, over the pool.
    let small = a.path("small").display().to_string();
    let n = a
        .client
        .write_file_stream(&small, 5, &b"hello"[..], WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, 5);
    assert_eq!(std::fs::read(&small).unwrap(), b"hello");

    // A source that ends early: refused, nothing written.
    let short = a.path("short").display().to_string();
    let src = Trickle {
        data: vec![1; 200_000],
        pos: 0,
        stall: false,
    };
    let e = a
        .client
        .write_file_stream(&short, 300_000, src, WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidRequest(_)), "{e}");
    assert!(!std::path::Path::new(&short).exists());

    // A source that stalls: the step's deadline ends the write.
    let stalled = a.path("stalled").display().to_string();
    let src = Trickle {
        data: vec![2; 100_000],
        pos: 0,
        stall: true,
    };
    let e = a
        .client
        .deadline(Duration::from_millis(300))
        .write_file_stream(&stalled, 1_000_000, src, WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(!std::path::Path::new(&stalled).exists());
    // The agent is fine afterwards.
    assert_eq!(a.client.stat(&path).await.unwrap().size, data.len() as u64);
}
