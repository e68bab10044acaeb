//! `bhatti exec`: the NDJSON exec stream, split into lines as chunks
//! arrive, each line's output written through as soon as it is read.

use std::io::Write;

use api_types::ExecLine;
use reqwest::Response;

use crate::client::Client;
use crate::error::{CliError, Result, EXIT_TIMED_OUT};

/// Splits a byte stream into `\n`-terminated lines, whatever the chunking.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Appends a chunk and returns the lines it completed (without `\n`
    /// or `\r\n`; empty lines dropped).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(i) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = trim_cr(&self.pending[start..start + i]);
            if !line.is_empty() {
                lines.push(line.to_vec());
            }
            start += i + 1;
        }
        self.pending.drain(..start);
        lines
    }

    /// The unterminated last line, if any.
    pub fn finish(self) -> Option<Vec<u8>> {
        let line = trim_cr(&self.pending);
        (!line.is_empty()).then(|| line.to_vec())
    }
}

fn trim_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

pub fn parse_line(line: &[u8]) -> Result<ExecLine> {
    serde_json::from_slice(line).map_err(|source| CliError::Decode {
        what: "the exec stream",
        source,
    })
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    pub timed_out: bool,
}

impl ExitStatus {
    /// The client's own exit code: the command's, 124 when it timed out,
    /// 255 when the code does not fit a process exit status.
    pub fn process_code(self) -> u8 {
        if self.timed_out {
            EXIT_TIMED_OUT
        } else {
            u8::try_from(self.code).unwrap_or(255)
        }
    }
}

/// Applies stream lines to two outputs, flushing as it goes.
#[derive(Debug)]
pub struct Sink<O, E> {
    pub out: O,
    pub err: E,
    pub exit: Option<ExitStatus>,
}

impl<O: Write, E: Write> Sink<O, E> {
    pub fn new(out: O, err: E) -> Self {
        Sink {
            out,
            err,
            exit: None,
        }
    }

    pub fn apply(&mut self, line: ExecLine) -> Result<()> {
        match line {
            ExecLine::Stdout { data } => write_flush(&mut self.out, data.as_bytes()),
            ExecLine::Stderr { data } => write_flush(&mut self.err, data.as_bytes()),
            ExecLine::Exit {
                exit_code,
                timed_out,
            } => {
                self.exit = Some(ExitStatus {
                    code: exit_code,
                    timed_out,
                });
                Ok(())
            }
            ExecLine::Error { error } => Err(CliError::Remote(error)),
        }
    }

    fn apply_bytes(&mut self, line: &[u8]) -> Result<()> {
        let l = parse_line(line)?;
        self.apply(l)
    }

    /// The end of the stream: it must have said how the command ended.
    pub fn finish(&self) -> Result<ExitStatus> {
        self.exit.ok_or(CliError::StreamCut)
    }
}

fn write_flush(w: &mut impl Write, b: &[u8]) -> Result<()> {
    w.write_all(b)
        .and_then(|()| w.flush())
        .map_err(CliError::Output)
}

/// Reads an NDJSON exec answer into `sink` and returns how the command ended.
pub async fn stream<O: Write, E: Write>(
    client: &Client,
    mut resp: Response,
    sink: &mut Sink<O, E>,
) -> Result<ExitStatus> {
    let mut lines = LineSplitter::default();
    while let Some(chunk) = resp.chunk().await.map_err(|e| client.transport_error(e))? {
        for l in lines.push(&chunk) {
            sink.apply_bytes(&l)?;
        }
    }
    if let Some(l) = lines.finish() {
        sink.apply_bytes(&l)?;
    }
    sink.finish()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn lines_survive_any_chunking() {
        let input = b"{\"a\":1}\n{\"b\":2}\r\n\n{\"c\":3}";
        let want: Vec<Vec<u8>> = vec![
            b"{\"a\":1}".to_vec(),
            b"{\"b\":2}".to_vec(),
            b"{\"c\":3}".to_vec(),
        ];
        for size in 1..=input.len() {
            let mut s = LineSplitter::default();
            let mut got = Vec::new();
            for chunk in input.chunks(size) {
                got.extend(s.push(chunk));
            }
            got.extend(s.finish());
            assert_eq!(got, want, "chunk size {size}");
        }
    }

    #[test]
    fn sink_routes_output_and_records_exit() {
        let mut sink = Sink::new(Vec::new(), Vec::new());
        for l in [
            r#"{"type":"stdout","data":"out1\n"}"#,
            r#"{"type":"stderr","data":"err\n"}"#,
            r#"{"type":"stdout","data":"out2"}"#,
            r#"{"type":"exit","exit_code":3}"#,
        ] {
            sink.apply_bytes(l.as_bytes()).unwrap();
        }
        assert_eq!(sink.out, b"out1\nout2");
        assert_eq!(sink.err, b"err\n");
        let st = sink.finish().unwrap();
        assert_eq!(
            st,
            ExitStatus {
                code: 3,
                timed_out: false
            }
        );
        assert_eq!(st.process_code(), 3);
    }

    #[test]
    fn error_lines_garbage_and_missing_exit_fail() {
        let mut sink = Sink::new(Vec::new(), Vec::new());
        let e = sink
            .apply_bytes(br#"{"type":"error","error":"agent went away"}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "agent went away");
        assert!(matches!(
            sink.apply_bytes(b"not json"),
            Err(CliError::Decode { .. })
        ));
        assert!(matches!(sink.finish(), Err(CliError::StreamCut)));
    }

    #[test]
    fn exit_codes() {
        let st = |code, timed_out| ExitStatus { code, timed_out }.process_code();
        assert_eq!(st(0, false), 0);
        assert_eq!(st(255, false), 255);
        assert_eq!(st(137, true), EXIT_TIMED_OUT);
        assert_eq!(st(-1, false), 255);
        assert_eq!(st(300, false), 255);
    }

    /// A writer whose contents the test can read while the stream is open.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Output is written as each chunk arrives, not when the stream ends:
    /// a loopback server sends one line, waits until the client has
    /// printed it, then sends the rest.
    #[tokio::test(flavor = "current_thread")]
    async fn output_is_written_while_the_stream_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let out = Shared::default();
        let seen = out.clone();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers and the small JSON body arrive before we answer.
            while !req.windows(4).any(|w| w == b"\r\n\r\n") || !req.ends_with(b"}") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed early");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(req.starts_with("POST /sandboxes/demo/exec "), "{req}");
            assert!(req.contains("accept: application/x-ndjson"), "{req}");
            assert!(req.contains("authorization: Bearer bht_t"), "{req}");
            let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            sock.write_all(
                chunk("{\"type\":\"stdout\",\"data\":\"first\\n\"}\n{\"type\":\"std").as_bytes(),
            )
            .await
            .unwrap();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen.0.lock().unwrap().as_slice() != b"first\n" {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "first line not written while streaming"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let rest = "out\",\"data\":\"second\\n\"}\n{\"type\":\"exit\",\"exit_code\":7}\n";
            sock.write_all(format!("{}0\r\n\r\n", chunk(rest)).as_bytes())
                .await
                .unwrap();
        });
        let client = Client::new(&format!("http://{addr}"), Some("bht_t".into())).unwrap();
        let body = api_types::ExecBody {
            cmd: vec!["x".into()],
            ..Default::default()
        };
        let resp = client.exec_stream("demo", &body).await.unwrap();
        let mut sink = Sink::new(out.clone(), Vec::new());
        let st = stream(&client, resp, &mut sink).await.unwrap();
        server.await.unwrap();
        assert_eq!(st.code, 7);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"first\nsecond\n");
    }
}
